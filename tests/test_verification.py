"""bnfold.verification: comparison semantics, input generation and validation, verify() statuses."""

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
    check_request,
    compare,
    default_tolerances,
    jsonable,
    normalize_provider,
    verify,
)
from bnfold.verification.inputs import load_inputs, make_inputs, symbolic_dims
from bnfold.verification.runner import one_line

# ------------------------------------------------------------------------------------------------
# compare


def test_compare_passes_within_tolerance_and_reports_needed_tolerances() -> None:
    ref = np.array([1.0, -2.0, 0.0, 4.0], np.float32)
    cand = ref + np.array([1e-6, -2e-6, 0.0, 0.5], np.float32)
    c = compare("y", ref, cand, atol=0.1, rtol=0.0)
    assert not c.passed and c.mismatches == 1
    assert c.max_abs_err == pytest.approx(0.5)
    assert c.min_atol == pytest.approx(0.5)  # the smallest atol that passes with rtol 0
    assert c.min_rtol == pytest.approx((0.5 - 0.1) / 4.0)  # the smallest rtol that passes with atol 0.1
    assert compare("y", ref, cand, atol=c.min_atol, rtol=0.0).passed
    assert compare("y", ref, cand, atol=0.1, rtol=c.min_rtol * 1.0001).passed


def test_compare_nan_inf_and_zero_reference() -> None:
    ref = np.array([np.nan, np.inf, -np.inf, 0.0], np.float32)
    assert compare("y", ref, ref.copy(), atol=0.0, rtol=0.0).passed
    c = compare("y", ref, np.array([1.0, np.inf, -np.inf, 0.0], np.float32), atol=0.0, rtol=0.0)
    assert not c.passed and c.max_abs_err == math.inf
    c = compare("y", np.zeros(3, np.float32), np.array([0, 0, 1e-3], np.float32), atol=0.0, rtol=1.0)
    assert not c.passed and c.max_rel_err == math.inf and c.min_rtol == math.inf
    assert c.min_atol == pytest.approx(1e-3)


def test_compare_shape_dtype_and_integer_outputs() -> None:
    c = compare("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert not c.passed and "shape/dtype differ" in c.message
    c = compare("i", np.array([1, 2, 3]), np.array([1, 2, 5]))
    assert not c.passed and c.mismatches == 1 and c.max_abs_err == 2
    assert compare("b", np.array([True, False]), np.array([True, False])).passed


def test_default_tolerances_scale_with_output_magnitude() -> None:
    small = default_tolerances(np.dtype("float32"), np.array([0.5, -1.0]))
    large = default_tolerances(np.dtype("float32"), np.array([500.0, -1000.0]))
    assert large[0] == pytest.approx(1000 * small[0])
    assert small[1] == large[1] == 1e-4
    assert default_tolerances(np.dtype("float16"), np.array([1.0]))[1] == 1e-2
    assert default_tolerances(np.dtype("float32"), np.array([np.inf, 2.0]))[0] == pytest.approx(2e-4)


# ------------------------------------------------------------------------------------------------
# inputs


def _vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def test_make_inputs_binds_symbolic_dims_from_given_arrays_and_records_assumptions() -> None:
    interface = [
        (v.name, v.type)
        for v in (
            _vi("a", TensorProto.FLOAT, ["B", 3, "T"]),
            _vi("b", TensorProto.FLOAT, ["B", None]),
            _vi("ids", TensorProto.INT64, ["B", 4]),
        )
    ]
    assumed: dict[str, int] = {}
    given = {"a": np.zeros((5, 3, 7), np.float32)}
    feeds = make_inputs(interface, np.random.default_rng(0), {}, {}, given, assumed)
    assert feeds["a"] is given["a"]
    assert feeds["b"].shape == (5, 32)  # B bound by the given array; the unnamed dim assumed
    assert assumed == {"b[1]": 32}
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].min() >= 0 and feeds["ids"].max() < 4
    assert symbolic_dims(interface) == ["B", "T", "b[1]"]
    feeds = make_inputs(
        interface, np.random.default_rng(0), {}, {"B": 2, "T": 9, "b[1]": 3}, {}, assumed := {}
    )
    assert feeds["a"].shape == (2, 3, 9) and feeds["b"].shape == (2, 3) and assumed == {}


def test_make_inputs_is_seeded() -> None:
    interface = [("x", _vi("x", TensorProto.FLOAT, [2, 3]).type)]
    a = make_inputs(interface, np.random.default_rng([0, 0]), {}, {}, {}, {})
    b = make_inputs(interface, np.random.default_rng([0, 0]), {}, {}, {}, {})
    c = make_inputs(interface, np.random.default_rng([1, 0]), {}, {}, {}, {})
    assert np.array_equal(a["x"], b["x"]) and not np.array_equal(a["x"], c["x"])


def test_scalar_boolean_inputs_alternate_between_runs() -> None:
    interface = [
        ("cond", _vi("cond", TensorProto.BOOL, []).type),
        ("mask", _vi("mask", TensorProto.BOOL, [64]).type),
    ]
    runs = [make_inputs(interface, np.random.default_rng([0, r]), {}, {}, {}, {}, None, r) for r in range(3)]
    assert [bool(f["cond"]) for f in runs] == [True, False, True]
    assert runs[0]["mask"].dtype == bool and 0 < runs[0]["mask"].sum() < 64


def test_unknown_rank_and_non_tensor_inputs_need_help() -> None:
    no_shape = onnx.TypeProto()
    no_shape.tensor_type.elem_type = TensorProto.FLOAT
    with pytest.raises(BadInput, match="unknown rank"):
        make_inputs([("x", no_shape)], np.random.default_rng(0), {}, {}, {}, {})
    feeds = make_inputs([("x", no_shape)], np.random.default_rng(0), {"x": [2, 2]}, {}, {}, {})
    assert feeds["x"].shape == (2, 2)
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    with pytest.raises(BadInput, match="not a tensor"):
        make_inputs([("s", seq.type)], np.random.default_rng(0), {}, {}, {}, {})


def test_load_inputs(tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", x=np.ones((1, 2), np.float32))
    assert load_inputs(tmp_path / "in.npz")["x"].shape == (1, 2)
    assert load_inputs(str(tmp_path / "in.npz"))["x"].dtype == np.float32
    assert load_inputs({"x": [[1.0, 2.0]]})["x"].shape == (1, 2)
    assert load_inputs(None) == {}
    (tmp_path / "bad.npz").write_bytes(b"nope")
    for bad in (tmp_path / "bad.npz", tmp_path / "missing.npz"):
        with pytest.raises(BadInput):
            load_inputs(bad)
    np.save(tmp_path / "one.npy", np.zeros(2))
    with pytest.raises(BadInput, match="npz"):
        load_inputs(tmp_path / "one.npy")
    with pytest.raises(BadInput):
        load_inputs(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inputs": {"nope": np.zeros(1, np.float32)}}, "unknown names: nope"),
        ({"inputs": {"x": np.zeros((1, 3, 8, 8), np.float64)}}, "dtype float32, got float64"),
        ({"inputs": {"x": np.zeros((1, 3, 8), np.float32)}}, "rank 3"),
        ({"inputs": {"x": np.zeros((1, 2, 8, 8), np.float32)}}, "at axis 1"),
        ({"inputs": {"x": np.zeros((2, 3, 8, 8), np.float32)}, "dims": {"N": 3}}, r"dims\['N'\]=3"),
        ({"shapes": {"y": [1]}}, "shapes= for unknown input"),
        ({"shapes": {"x": [1, 3, 8]}}, "rank 3"),
        ({"shapes": {"x": [1, 3, 8, 8]}, "inputs": {"x": np.zeros((1, 3, 8, 8), np.float32)}}, "both"),
        ({"dims": {"batch": 1}}, r"unknown dimension\(s\): batch \(dynamic dimensions: N\)"),
        ({"runs": 0}, "runs must be at least 1"),
        ({"atol": -1.0}, "atol must be"),
        ({"rtol": float("nan")}, "rtol must be"),
        ({"provider": "NoSuchExecutionProvider"}, "not available"),
    ],
)
def test_verify_rejects_bad_requests(kwargs: dict, match: str) -> None:
    model = conv_bn_model()
    with pytest.raises(BadInput, match=match):
        verify(model, model, **kwargs)


def test_check_request_validates_without_running() -> None:
    model = conv_bn_model()
    check_request(model, {"x": np.zeros((2, 3, 8, 8), np.float32)}, None, None)
    with pytest.raises(BadInput):
        check_request(model, None, {"q": [1]}, None)


def test_fold_with_nothing_to_fold_still_validates_options() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [_vi("x", TensorProto.FLOAT, [1, 4])],
        [_vi("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold(model)
    assert result.verification is not None and result.verification.runs == 0 and result.passed
    with pytest.raises(BadInput):
        bnfold.fold(model, inputs={"nope": np.zeros(1, np.float32)})


# ------------------------------------------------------------------------------------------------
# verify


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


# ------------------------------------------------------------------------------------------------
# JSON and small helpers


def test_jsonable_replaces_non_finite_numbers() -> None:
    data = {"a": math.inf, "b": [1.0, -math.inf, math.nan], "c": np.float32(2.5), "d": {"e": np.int64(3)}}
    out = jsonable(data)
    assert out == {"a": None, "b": [1.0, None, None], "c": 2.5, "d": {"e": 3}}
    json.dumps(out, allow_nan=False)


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


def test_provider_names_and_one_line_messages() -> None:
    assert normalize_provider("cpu") == "CPUExecutionProvider"
    assert normalize_provider("CUDA") == "CUDAExecutionProvider"
    assert normalize_provider("MyExecutionProvider") == "MyExecutionProvider"
    exc = RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : bad\nmore")
    assert one_line(exc) == "INVALID_GRAPH : bad"
    assert one_line(RuntimeError("")) == "RuntimeError"


def test_onnxruntime_banner_and_source_paths_stay_out_of_messages(monkeypatch, capsys) -> None:
    """onnxruntime's Python wrapper prints an 'EP Error' banner to stdout when a session fails
    with a ValueError; its messages carry C++ source paths and signatures. Neither reaches the user."""
    import onnxruntime as ort

    class Failing:
        def __init__(self, *args, **kwargs) -> None:
            print("*************** EP Error ***************")
            raise RuntimeError(
                "[ONNXRuntimeError] : 1 : FAIL : Load model from /x/m.onnx failed:/onnxruntime_src/onnxruntime/"
                "core/providers/common.h:81 onnxruntime::AutoPadType onnxruntime::StringToAutoPadType(const "
                "std::string&) false was false. Unknown AutoPadType String"
            )

    model = conv_bn_model()
    monkeypatch.setattr(ort, "InferenceSession", Failing)
    v = verify(model, model)
    assert v.status == "error"
    assert v.message == "onnxruntime cannot run the reference model: FAIL : Unknown AutoPadType String"
    assert capsys.readouterr().out == ""
