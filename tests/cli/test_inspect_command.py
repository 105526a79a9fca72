"""``bnfold inspect MODEL...``: every BN, whether it folds, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

from cli_helpers import assert_usage_error, check_schema, files, last_line, save
from cli_runner import invoke

from bnfold.testing import conv_bn_model


def test_inspect_lists_every_bn_and_writes_nothing(tmp_path: Path) -> None:
    src = save(conv_bn_model(blocks=2, matmul_bn=True), tmp_path / "m.onnx")
    result = invoke("inspect", src)
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout) == "PASSED 2 foldable, 1 kept"
    lines = result.stdout.splitlines()
    rows = [ln.split()[0] for ln in lines if ln.strip().startswith("bn")]
    assert rows == ["bn0", "bn1", "bn_mm"]  # graph order
    assert "channel_axis" in result.stdout
    assert files(tmp_path) == {"m.onnx"}
    result = invoke("inspect", src, "--strict", "--json", "-")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    check_schema(doc)
    bns = doc["models"][0]["batchnorms"]
    assert [b["foldable"] for b in bns] == [True, True, False]
    assert bns[2]["follows_op"] == "MatMul" and bns[2]["code"] == "channel_axis"
    result = invoke("inspect", tmp_path / "nope.onnx")
    assert_usage_error(result, result.stderr)


def test_inspect_merge_branches_shows_what_the_flag_folds() -> None:
    """Without the flag the identity BN of a RepVGG block names the flag; with it, all three BNs
    fold (merged_branches), as ``bnfold.fold(merge_branches=True)`` would."""
    src = Path(__file__).resolve().parents[2] / "models" / "onnx" / "case_repvgg_block.onnx"
    result = invoke("inspect", src, "--json", "-")
    assert result.exit_code == 0, result.output
    bns = {b["bn"]: b for b in json.loads(result.stdout)["models"][0]["batchnorms"]}
    assert bns["bn_identity"]["code"] == "needs_merge_branches"
    assert "--merge-branches" in bns["bn_identity"]["message"]
    result = invoke("inspect", src, "--merge-branches", "--json", "-")
    assert result.exit_code == 0, result.output
    bns = {b["bn"]: b for b in json.loads(result.stdout)["models"][0]["batchnorms"]}
    assert {b["pattern"] for b in bns.values()} == {"merged_branches"}
    assert all(b["foldable"] for b in bns.values()) and len(bns) == 3
