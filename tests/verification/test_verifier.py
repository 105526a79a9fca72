"""bnfold.verification.verify: statuses, options, interfaces and the JSON of a result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import BadInput
from bnfold.testing import conv_bn_model
from bnfold.verification import (
    verify,
)


def _vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def test_verify_identical_models_and_options() -> None:
    model = conv_bn_model(blocks=2)
    v = verify(model, model, runs=2, seed=3, dims={"N": 2}, provider="cpu")
    assert v.status == "passed" and v.passed and v.max_abs_err == 0
    assert v.provider == "CPUExecutionProvider" and v.runs == 2 and v.seed == 3
    assert v.input_shapes == {"x": [2, 3, 8, 8]} and v.assumed_dims == {}
    assert verify(model, model).assumed_dims == {"N": 1}


def test_verify_paths_with_external_data(tmp_path: Path) -> None:
    model = conv_bn_model(blocks=2, channels=16)
    onnx.save(
        model,
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.data",
        size_threshold=0,
    )
    assert (tmp_path / "ext.data").exists()
    result = bnfold.fold(str(tmp_path / "ext.onnx"))
    assert result.verification is not None and result.verification.status == "passed"
    assert verify(str(tmp_path / "ext.onnx"), result.model).status == "passed"


def test_verify_detects_a_changed_weight() -> None:
    model = conv_bn_model()
    folded = bnfold.fold(model, verify=False).model
    w = next(t for t in folded.graph.initializer if len(t.dims) == 4)
    a = numpy_helper.to_array(w).copy()
    a.flat[0] += 0.25
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    v = verify(model, folded)
    assert v.status == "failed" and not v.passed and "y" in v.message
    assert v.outputs[0].mismatches > 0 and v.outputs[0].min_atol >= v.outputs[0].max_abs_err * 0.5


def test_verify_error_when_reference_cannot_run_and_failed_when_candidate_cannot() -> None:
    bf = conv_bn_model(dtype="bfloat16")
    v = verify(bf, bf)
    assert v.status == "error" and not v.passed
    assert v.message.startswith("onnxruntime cannot run the reference model")
    assert "[ONNXRuntimeError]" not in v.message
    good = conv_bn_model()
    broken = onnx.ModelProto()
    broken.CopyFrom(good)
    broken.graph.node[0].op_type = "NoSuchOp"
    v = verify(good, broken)
    assert v.status == "failed" and "cannot run the candidate" in v.message


def test_verify_different_interfaces_is_bad_input() -> None:
    a = conv_bn_model()
    b = conv_bn_model()
    b.graph.output[0].name = "z"
    b.graph.node[-1].output[0] = "z"
    with pytest.raises(BadInput, match="different outputs"):
        verify(a, b)
    c = conv_bn_model()
    c.graph.input[0].name = "image"
    c.graph.node[0].input[0] = "image"
    with pytest.raises(BadInput, match="different inputs"):
        verify(a, c)


def test_inputs_backed_by_initializers_may_be_overridden() -> None:
    # IR < 4 style: an initializer also listed as graph input is optional to feed
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "g",
        [_vi("x", TensorProto.FLOAT, [2]), _vi("bias", TensorProto.FLOAT, [2])],
        [_vi("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    v = verify(model, model, inputs={"x": np.zeros(2, np.float32), "bias": np.full(2, 3.0, np.float32)})
    assert v.status == "passed" and v.input_shapes == {"x": [2], "bias": [2]}


def test_fold_result_to_dict_is_strict_json() -> None:
    model = conv_bn_model()
    folded = bnfold.fold(model, verify=False).model
    w = next(t for t in folded.graph.initializer if len(t.dims) == 4)
    a = numpy_helper.to_array(w).copy()
    a.flat[:] += 1.0
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    result = bnfold.fold(model)
    result.verification = verify(model, folded)
    assert result.verification.outputs[0].max_rel_err == math.inf  # relu zeros in the reference
    json.dumps(result.to_dict(), allow_nan=False)
