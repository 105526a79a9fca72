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
    assert re.match(
        r"^PASSED 1/1 outputs match, max abs err \S+ = [0-9.e+-]+ noise floors$", last_line(result.stdout)
    )
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


def test_localize_names_the_first_tensor_that_diverges(folder: Path) -> None:
    import numpy as np
    from onnx import numpy_helper

    ref = save(conv_bn_model(blocks=3), folder / "deep.onnx")
    folded = folder / "deep.folded.onnx"
    assert invoke(ref, "-o", folded, "-q").exit_code == 0
    model = onnx.load(str(folded))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    weight = next(t for t in model.graph.initializer if t.name == convs[1].input[1])
    broken = numpy_helper.to_array(weight) * np.float32(1.01)  # the second layer 1 % off
    weight.CopyFrom(numpy_helper.from_array(broken, weight.name))
    bad = folder / "deep.bad.onnx"
    onnx.save(model, str(bad))
    result = invoke("verify", ref, bad, "--localize", "--json", "-")
    assert result.exit_code == 1
    found = json.loads(result.stdout)["verification"]["first_divergence"]
    assert found["cand_node"] == convs[1].name and found["max_abs_err"] > 0
    text = invoke("verify", ref, bad, "--localize")
    assert f"first divergence: tensor '{found['tensor']}'" in text.stdout
    # without --localize nothing is localized; a correct fold localizes to nothing
    assert (
        json.loads(invoke("verify", ref, bad, "--json", "-").stdout)["verification"]["first_divergence"]
        is None
    )
    clean = invoke("verify", ref, folded, "--localize")
    assert clean.exit_code == 0 and "no intermediate tensor diverges" in clean.stdout
