"""--json (schema v1 of docs/cli.md), --junit-xml and the GitHub step summary, end to end."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from cli_helpers import check_schema, corrupt, last_line, save
from cli_runner import invoke

from bnfold.testing import conv_bn_model


def test_json_stdout_is_pure_and_matches_schema(folder: Path) -> None:
    result = invoke(folder / "a.onnx", "--json", "-")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    check_schema(doc)
    assert doc["status"] == "passed" and doc["exit_code"] == 0
    assert doc["models"][0]["folded"] == 1 and doc["models"][0]["written"]
    assert doc["final_line"] == last_line(result.stderr)  # human text went to stderr
    assert "wrote" in result.stderr
    result = invoke(folder / "a.onnx", "--json", "-", "--quiet")
    assert result.stderr == ""
    json.loads(result.stdout)


def test_json_for_several_models_and_failures(tmp_path: Path) -> None:
    a = save(conv_bn_model(seed=0), tmp_path / "a.onnx")
    mm = save(conv_bn_model(matmul_bn=True), tmp_path / "mm.onnx")
    bf = save(conv_bn_model(dtype="bfloat16"), tmp_path / "bf.onnx")
    report = tmp_path / "r.json"
    junit = tmp_path / "j.xml"
    result = invoke(
        a, mm, bf, tmp_path / "missing.onnx", "--strict", "-j", "1", "--json", report, "--junit-xml", junit
    )
    assert result.exit_code == 2, result.output
    doc = json.loads(report.read_text())
    check_schema(doc)
    by_name = {Path(m["input"]).name: m for m in doc["models"]}
    assert by_name["a.onnx"]["status"] == "passed" and by_name["a.onnx"]["written"]
    assert by_name["mm.onnx"]["status"] == "failed" and by_name["mm.onnx"]["kept_after_linear"] == ["bn_mm"]
    assert (
        by_name["bf.onnx"]["verification_status"] == "unverifiable" and by_name["bf.onnx"]["exit_code"] == 1
    )
    assert by_name["missing.onnx"]["status"] == "error" and by_name["missing.onnx"]["exit_code"] == 2
    assert doc["summary"]["models"] == 4 and doc["summary"]["errors"] == 1
    assert last_line(result.stdout).startswith("FAILED 3 of 4 models")
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("errors"), suite.get("failures")) == ("1", "2")
    error = suite.find("testcase/error")
    assert error is not None and "no such file" in error.get("message")


def test_infinite_errors_become_null(folder: Path) -> None:
    bad = corrupt(folder / "b.onnx", folder / "bad.onnx")
    result = invoke("verify", folder / "b.onnx", bad, "--json", "-")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    check_schema(doc)
    out = doc["verification"]["outputs"][0]
    assert out["passed"] is False and out["max_rel_err"] is None  # relu zeros in the reference


def test_junit_xml_and_github_summary(tmp_path: Path) -> None:
    a = save(conv_bn_model(seed=0), tmp_path / "a.onnx")
    mm = save(conv_bn_model(matmul_bn=True), tmp_path / "mm.onnx")
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    junit = tmp_path / "junit.xml"
    result = invoke(
        a, mm, "--strict", "-j", "1", "--junit-xml", junit, env={"GITHUB_STEP_SUMMARY": str(summary)}
    )
    assert result.exit_code == 1
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert len(cases) == 4  # per model: "fold" + one per output
    assert suite.get("tests") == "4" and suite.get("failures") == "1"
    failed = [c for c in cases if c.find("failure") is not None]
    assert failed[0].get("classname").endswith("mm.onnx") and "--strict" in failed[0].find("failure").get(
        "message"
    )
    text = summary.read_text()
    assert text.startswith("# earlier step\n")  # appended, not overwritten
    assert "| model | result |" in text and "a.onnx" in text and "❌ failed" in text

    bad = corrupt(a, tmp_path / "bad.onnx")
    result = invoke("verify", a, bad, "--junit-xml", junit)
    assert result.exit_code == 1
    failure = ET.parse(junit).getroot().find("testsuite/testcase[@name='output y']/failure")
    assert failure is not None and "max abs err" in failure.get("message")
