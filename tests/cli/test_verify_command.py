"""``bnfold verify REFERENCE CANDIDATE``: the CI gate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
from cli_helpers import assert_usage_error, check_schema, corrupt, last_line, ort_fold, save
from cli_runner import invoke

from bnfold.testing import conv_bn_model


def test_verify_passes_another_tools_fold_and_catches_corruption(folder: Path) -> None:
    ref = folder / "b.onnx"
    theirs = ort_fold(ref, folder / "b.ort.onnx")
    result = invoke("verify", ref, theirs, "--runs", "2")
    assert result.exit_code == 0, result.output
    assert re.match(r"^PASSED 1/1 outputs match, max abs err \S+$", last_line(result.stdout))
    bad = corrupt(ref, folder / "bad.onnx")
    result = invoke("verify", ref, bad)
    assert result.exit_code == 1, result.output
    line = last_line(result.stdout)
    assert line.startswith("FAILED 1/1 outputs differ, max abs err ") and "(output y)" in line


def test_verify_json_schema_and_bad_input(folder: Path) -> None:
    ref = folder / "a.onnx"
    result = invoke("verify", ref, ref, "--json", "-")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    check_schema(doc)
    assert doc["verification"]["outputs"][0]["max_abs_err"] == 0
    # different interfaces, missing file, bad option: exit 2, one line
    other = save(conv_bn_model(in_channels=2), folder / "c.onnx")
    other_model = onnx.load(str(other))
    other_model.graph.output[0].name = "z"
    other_model.graph.node[-1].output[0] = "z"
    save(other_model, other)
    for args in (
        [ref, other],
        [ref, folder / "nope.onnx"],
        [ref, ref, "--runs", "x"],
        [ref, ref, "--dim", "M=1"],
    ):
        result = invoke("verify", *args)
        assert_usage_error(result, result.stderr)


def test_verify_unverifiable_reference_fails_the_gate(tmp_path: Path) -> None:
    bf = save(conv_bn_model(dtype="bfloat16"), tmp_path / "bf.onnx")
    result = invoke("verify", bf, bf)
    assert result.exit_code == 1
    assert last_line(result.stdout).startswith(
        "FAILED not verified: onnxruntime cannot run the reference model"
    )
