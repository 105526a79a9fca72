"""The noise floor (bnfold.verification.noise) and the tolerance it sets, checked against
onnxruntime (optimizations off) running copies nudged by this test's own bit arithmetic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from noise_checks import bits, own_floor
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import run_ort

import bnfold
from bnfold.report import OutputCheck, Verification
from bnfold.testing import conv_bn_model
from bnfold.verification import default_tolerances, describe_error, verify
from bnfold.verification.noise import nudge, touched_tensors


def _chain(**kwargs: object) -> onnx.ModelProto:
    """conv_bn_model with He-scaled weights (x sqrt 2), so the input still reaches the output of
    a deep Conv -> BN -> Relu chain instead of dying out."""
    model = conv_bn_model(**kwargs)  # type: ignore[arg-type]
    for t in model.graph.initializer:
        if t.name.startswith("w"):
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((a.astype(np.float64) * math.sqrt(2)).astype(a.dtype), t.name))
    return model


DEEP = {"blocks": 50, "channels": 8}
NARROW_FP16 = {"blocks": 8, "channels": 2, "dtype": "float16"}


def _feeds(model: onnx.ModelProto, dtype: object) -> dict[str, np.ndarray]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value or 1 for d in dims]
    return {"x": np.random.default_rng(7).standard_normal(shape).astype(dtype)}


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_nudge_moves_each_element_by_at_most_one_ulp(dtype: object) -> None:
    values = np.array([1.0, -2.5, 3e-3, 0.0, np.inf, -np.inf, np.nan] + [0.7] * 200).astype(dtype)
    moved = nudge(values, np.random.default_rng(0))
    assert moved.dtype == values.dtype
    finite = np.isfinite(values.astype(np.float64)) & (values.astype(np.float64) != 0)
    steps = bits(moved)[finite] - bits(values)[finite]
    assert set(np.unique(steps)) == {-1, 0, 1}  # nonzero values of one sign: one bit step
    assert np.array_equal(moved[4:6], values[4:6]) and np.isnan(moved[6].astype(np.float64))
    assert abs(float(moved[3])) <= float(np.finfo(np.float16).smallest_subnormal)  # zero: at most its ulp
    again = nudge(values, np.random.default_rng(0))
    assert np.array_equal(bits(again), bits(moved))  # seeded


def test_touched_tensors_are_the_parameters_of_the_named_nodes() -> None:
    model = conv_bn_model(blocks=3)
    assert touched_tensors(model, {"conv1", "bn1"}) == {"w1", "bias1", "gamma1", "beta1", "mean1", "var1"}
    assert touched_tensors(model, {"relu1"}) == set()


@pytest.mark.parametrize(
    ("kwargs", "dtype"), [(DEEP, np.float32), (NARROW_FP16, np.float16)], ids=["deep_chain_50", "narrow_fp16"]
)
def test_floor_matches_an_independent_estimate_and_a_correct_fold_sits_inside(
    kwargs: dict, dtype: object
) -> None:
    model = _chain(**kwargs, batch=1)
    feeds = _feeds(model, dtype)
    result = bnfold.fold(model, inputs=feeds)
    assert result.verification is not None and result.verification.status == "passed"
    (check,) = result.verification.outputs
    estimate = own_floor(model, feeds)
    assert check.noise_floor is not None and estimate > 0
    assert estimate / 4 <= check.noise_floor <= estimate * 4, (check.noise_floor, estimate)
    (y,) = run_ort(model, feeds)
    assert check.noise_floor < 0.05 * float(np.max(np.abs(y.astype(np.float64))))  # rounding, not the signal
    assert (
        check.err_over_noise is not None and check.err_over_noise < 5
    )  # a correct fold: a few floors at most
    assert check.err_over_noise == pytest.approx(check.max_abs_err / check.noise_floor)


@pytest.mark.parametrize(
    ("kwargs", "factor", "floors"),
    [(DEEP, 1.01, 1000), (NARROW_FP16, 1.10, 20)],
    ids=["deep_chain_50_one_percent", "narrow_fp16_ten_percent"],
)
def test_a_wrong_weight_is_far_outside_the_floor_and_fails(
    kwargs: dict, factor: float, floors: float
) -> None:
    """One folded weight tensor scaled by ``factor``. (In fp16 a 1 % error is about ten ulps of
    every weight of the tensor: some six floors, within the tolerance; 10 % is far outside.)"""
    model = _chain(**kwargs)
    folded = bnfold.fold(model, verify=False).model
    w = next(t for t in folded.graph.initializer if t.name == "w3")
    a = numpy_helper.to_array(w)
    w.CopyFrom(numpy_helper.from_array((a.astype(np.float64) * factor).astype(a.dtype), w.name))
    v = verify(model, folded)
    (check,) = v.outputs
    assert v.status == "failed" and not check.passed
    assert check.err_over_noise is not None and check.err_over_noise > floors


def _cancelling_model(shift_ulps: int = 0) -> onnx.ModelProto:
    """y = (x @ W + 4096) - 4096: outputs near 1 carry the rounding of 4096 (ulp 4.9e-4)."""
    big = np.float32(4096.0)
    minus = -big
    for _ in range(shift_ulps):
        minus = np.nextafter(minus, np.float32(np.inf))
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
            helper.make_node("Add", ["xw", "big"], ["up"], name="up"),
            helper.make_node("Add", ["up", "minus"], ["y"], name="down"),
        ],
        "cancel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(big), "big"),
            numpy_helper.from_array(np.array(minus, np.float32), "minus"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_default_tolerance_is_ten_floors_on_a_sensitive_model_and_an_explicit_atol_wins() -> None:
    reference, candidate = _cancelling_model(), _cancelling_model(shift_ulps=2)
    v = verify(reference, candidate)
    (check,) = v.outputs
    assert check.noise_floor is not None and check.noise_floor >= 4.8e-4  # one ulp of 4096, at least
    assert check.max_abs_err == pytest.approx(4.8828125e-4, rel=0.01)  # two ulps of numbers just below 4096
    assert check.atol == pytest.approx(10 * check.noise_floor)
    assert check.atol > default_tolerances(np.dtype("float32"), np.full(8, 10.0))[0]  # above the dtype's
    assert v.status == "passed" and check.err_over_noise is not None and check.err_over_noise < 10
    strict = verify(reference, candidate, atol=1e-4)
    assert strict.status == "failed" and strict.outputs[0].atol == 1e-4


def _swamped_model(big: float) -> onnx.ModelProto:
    """y = (x @ W + big) - big with W small: with big = 2**24 (ulp 2) the float32 outputs are
    nothing but the rounding of ``big``."""
    model = _cancelling_model()
    for t in model.graph.initializer:
        value = numpy_helper.to_array(t)
        if t.name == "w":
            value = value * np.float32(1e-2)
        elif t.name in ("big", "minus"):
            value = np.array(np.sign(value) * big, np.float32)
        t.CopyFrom(numpy_helper.from_array(value, t.name))
    return model


def test_a_pass_on_outputs_that_are_rounding_noise_says_it_proves_nothing() -> None:
    swamped = _swamped_model(2.0**24)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    (y,) = run_ort(swamped, feeds)
    assert 10 * own_floor(swamped, feeds) >= np.abs(y).max()  # independent: the floor covers the output
    v = verify(swamped, swamped)
    assert v.status == "passed" and "rounding noise" in v.message and "y" in v.message
    assert "rounding noise" not in verify(swamped, swamped, atol=1e-6).message  # the user's own tolerance
    # a sensitive but meaningful model (outputs near 1, floor 5e-4) is not called noise
    assert verify(_cancelling_model(), _cancelling_model(shift_ulps=2)).message == ""


def test_floor_zero_without_float_parameters_and_json_fields() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    v = verify(model, model)
    assert v.outputs[0].noise_floor == 0.0 and v.outputs[0].err_over_noise is None
    assert describe_error(v) == "max abs err 0 (noise floor 0)"
    result = bnfold.fold(conv_bn_model(blocks=2))
    out = json.loads(json.dumps(result.to_dict(), allow_nan=False))["verification"]["outputs"][0]
    assert out["noise_floor"] > 0 and out["err_over_noise"] == pytest.approx(
        out["max_abs_err"] / out["noise_floor"]
    )


def _check(name: str, err: float, floor: float | None) -> OutputCheck:
    ratio = err / floor if floor else None
    return OutputCheck(name, "float32", [1], True, err, 0.0, 1.0, 0.0, 0.0, 0.0, 0, "", floor, ratio)


def test_describe_error_names_the_output_most_floors_away() -> None:
    v = Verification(True, "passed", outputs=[_check("a", 1e-3, 1e-2), _check("b", 3.1e-6, 3.875e-6)])
    assert describe_error(v) == "max abs err 3.1e-06 = 0.8 noise floors"
    assert describe_error(Verification(True, "passed", outputs=[_check("a", 2e-5, None)])) == (
        "max abs err 2e-05 (noise floor not measured)"
    )
    assert describe_error(Verification(False, "failed", outputs=[_check("a", math.inf, 1e-6)])) == (
        "max abs err inf = inf noise floors"
    )
    assert describe_error(Verification(False, "error")) == ""


def test_a_file_with_external_data_is_nudged_through_overrides_with_the_same_floor(tmp_path: Path) -> None:
    """No copy of a file with external data is built: onnxruntime runs the file with nudged
    initializers; the nudges (same seed, same tensors) and so the floor equal the in-memory ones."""
    model = _chain(blocks=4, channels=16)
    on_disk = _chain(blocks=4, channels=16)  # a copy: saving moves its tensors out of the proto
    onnx.save(
        on_disk, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="e.data", size_threshold=0
    )
    folded = bnfold.fold(model, verify=False).model
    from_file = verify(tmp_path / "ext.onnx", folded).outputs[0]
    in_memory = verify(model, folded).outputs[0]
    assert from_file.noise_floor is not None and from_file.noise_floor > 0
    assert from_file.noise_floor == in_memory.noise_floor
    result = bnfold.fold(str(tmp_path / "ext.onnx"))  # the fold's own verification, from the file
    assert (
        result.verification is not None
        and result.verification.outputs[0].noise_floor == in_memory.noise_floor
    )
