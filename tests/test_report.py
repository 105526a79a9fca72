"""The vocabularies and records of bnfold.report: plain strings in the JSON, every reason explained
and tested."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bnfold.report import (
    ONNX_REASONS,
    REASON_MEANINGS,
    FoldedPair,
    FoldReport,
    Pattern,
    Reason,
    SkippedBN,
    Status,
    Verification,
)

TESTS = Path(__file__).resolve().parent


def test_every_reason_code_has_a_negative_test() -> None:
    codes = {str(r) for r in ONNX_REASONS}
    assert len(codes) == 37
    source = "".join(p.read_text() for p in sorted([*TESTS.glob("rules/*.py"), *TESTS.glob("onnx/*.py")]))
    tested = set(re.findall(r'assert_skipped\([^\n]*"([a-z_]+)"', source))
    tested |= {"malformed"} if "MALFORMED" in source else set()
    assert codes <= tested, sorted(codes - tested)


def test_every_reason_has_a_one_line_meaning() -> None:
    assert set(REASON_MEANINGS) == set(Reason)
    assert all(m and "\n" not in m for m in REASON_MEANINGS.values())


def test_design_doc_lists_every_reason_with_its_meaning() -> None:
    doc = (TESTS.parent / "docs" / "design.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (.+?) \| [^|]+ \|$", doc, re.M))
    assert rows == {str(r): REASON_MEANINGS[r] for r in Reason}


def test_json_holds_the_plain_strings() -> None:
    report = FoldReport(
        folded=[FoldedPair("bn", "conv", "Conv", "main", Pattern.MATMUL)],
        skipped=[SkippedBN("bn2", Reason.PADDING, "pads", "main")],
    )
    text = json.dumps(report.to_dict())
    assert '"pattern": "matmul"' in text and '"code": "padding"' in text
    assert json.loads(text)["skipped"][0]["code"] == "padding"
    assert f"{Reason.PADDING}" == "padding" and str(Pattern.BN_AFTER) == "bn_after"
    verification = Verification(passed=True, status=Status.PASSED)
    assert json.dumps(verification.to_dict()["status"]) == '"passed"'


def test_plain_strings_become_members() -> None:
    skipped = SkippedBN("bn", "graph_output", "m", "main")  # type: ignore[arg-type]
    assert skipped.code is Reason.GRAPH_OUTPUT
    assert FoldedPair("bn", "c", "Conv", "main", "bn_before").pattern is Pattern.BN_BEFORE  # type: ignore[arg-type]
    assert Verification(passed=False, status="error").status is Status.ERROR  # type: ignore[arg-type]
