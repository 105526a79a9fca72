"""JUnit XML and the GitHub step summary from outcome records."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bnfold.cli.outcome import ModelOutcome, VerifyOutcome
from bnfold.cli.render.junit import junit_xml
from bnfold.cli.render.summary import append_step_summary, fold_summary_md, verify_summary_md


def _failed_output() -> dict[str, object]:
    return {
        "name": "y|z",
        "dtype": "float32",
        "shape": [2],
        "max_abs_err": 0.5,
        "max_rel_err": None,
        "atol": 1e-4,
        "rtol": 0.0,
        "min_atol": 0.5,
        "min_rtol": None,
        "passed": False,
        "mismatches": 2,
    }


def _outcomes() -> list[ModelOutcome]:
    ok = ModelOutcome(
        "a.onnx", "a.folded.onnx", written=True, status="passed", exit_code=0, folded=1, seconds=0.5
    )
    ok.verification_status, ok.nodes_before, ok.nodes_after = "passed", 3, 2
    ok.verification = {"max_abs_err": 1e-7, "outputs": []}
    skipped = ModelOutcome(
        "s.onnx", "s.folded.onnx", status="passed", exit_code=0, message="not verified: --no-verify"
    )
    skipped.verification_status = "skipped"
    bad = ModelOutcome("b.onnx", "b.folded.onnx", status="error", exit_code=2, message="no such file")
    failed = ModelOutcome(
        "f.onnx", "f.folded.onnx", status="failed", exit_code=1, message="verification failed"
    )
    failed.verification_status = "failed"
    failed.verification = {"max_abs_err": 0.5, "outputs": [_failed_output()]}
    return [ok, skipped, bad, failed]


def test_junit_one_case_per_model_and_output() -> None:
    root = ET.fromstring(junit_xml("bnfold fold", [(o.input, o) for o in _outcomes()], "fold"))
    suite = root.find("testsuite")
    assert suite is not None
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")} == {
        "tests": "5",
        "failures": "2",
        "errors": "1",
        "skipped": "1",
        "time": "0.500",
    }
    error = suite.find("testcase[@classname='b.onnx']/error")
    assert error is not None and error.get("type") == "BadInput" and error.get("message") == "no such file"
    output = suite.find("testcase[@name='output y|z']/failure")
    assert output is not None and output.get("type") == "VerificationFailed"
    assert output.get("message") == (
        "output y|z (float32, 2): max abs err 5.00e-01, max rel err inf, tolerance atol 1.00e-04 + rtol 0*|ref|, "
        "2 elements outside; passes with atol >= 5.00e-01 or rtol >= inf"
    )


def test_fold_summary_markdown() -> None:
    text = fold_summary_md(_outcomes(), "FAILED 2 of 4 models: 1 folded, 0 kept")
    lines = text.splitlines()
    assert lines[0] == "### ❌ bnfold: FAILED 2 of 4 models: 1 folded, 0 kept"
    assert "| `a.onnx` | ✅ passed | 1 | 0 | 3 → 2 | 1.00e-07 | `a.folded.onnx` |" in lines
    assert "| `s.onnx` | ⚠️ passed, not verified | 0 | 0 |  |  | not written |" in lines
    assert "- `b.onnx`: no such file" in lines and "- `f.onnx`: verification failed" in lines
    assert text.endswith("\n\n")


def test_verify_summary_escapes_pipes() -> None:
    out = VerifyOutcome("r.onnx", "c.onnx", status="failed", exit_code=1)
    out.verification = {"outputs": [_failed_output()]}
    text = verify_summary_md(out, "FAILED 1/1 outputs differ")
    assert "| `y\\|z` | float32 | 5.00e-01 | inf | 1.00e-04 | 0 | ❌ |" in text


def test_step_summary_appends_and_warns_when_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings: list[str] = []
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    append_step_summary("x", warnings.append)  # not in a workflow: nothing
    target = tmp_path / "s.md"
    target.write_text("before\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    append_step_summary("after\n", warnings.append)
    assert target.read_text() == "before\nafter\n" and warnings == []
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "missing" / "s.md"))
    append_step_summary("x", warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("cannot append to GITHUB_STEP_SUMMARY")
