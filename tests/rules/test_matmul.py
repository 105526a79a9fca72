"""``matmul``: MatMul (+ Add) -> BN with 2-D activations, rewritten as one Gemm; ``matmul_add``:
MatMul -> Add(constant [M, N] or [M, 1]) -> BN, the Add kept with s * C + t (checks in
tests/pattern_checks.py)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_builders import F16, F32, F64, count_ops, initializer, run_ort
from pattern_checks import assert_pattern, assert_rounded_once, assert_skipped, bn_affine64, matmul_model


@pytest.mark.parametrize("pre", ["", "flatten", "reshape", "gemm_relu"])
def test_matmul_bn_2d(pre: str) -> None:
    shape = (2, 3, 2, 2) if pre in ("flatten", "reshape") else (3, 5)
    x_shape = None if pre in ("flatten", "reshape", "gemm_relu") else shape
    model, feeds = matmul_model(pre=pre, x_shape=x_shape, feed_shape=shape)
    folded = assert_pattern(model, feeds, ["matmul"], gone=["BatchNormalization", "MatMul"])
    gemm = [n for n in folded.graph.node if n.name == "mm"][0]
    assert gemm.op_type == "Gemm" and len(gemm.input) == 3


@pytest.mark.parametrize("add", [(4,), (1, 4), ()])
def test_matmul_add_bn(add: tuple[int, ...]) -> None:
    model, feeds = matmul_model(add=add)
    assert_pattern(model, feeds, ["matmul"], gone=["BatchNormalization", "MatMul", "Add"])


def test_matmul_bn_float16() -> None:
    model, feeds = matmul_model(add=(4,), dtype=F16)
    assert_pattern(model, feeds, ["matmul"], gone=["BatchNormalization", "MatMul"], dtype=F16)


def test_skip_matmul_3d_input_channel_axis() -> None:
    # [2, 3, 5] @ [5, 4] -> [2, 3, 4]: the BN's channel axis 1 is the sequence axis (3)
    model, _ = matmul_model(x_shape=(2, 3, 5), feed_shape=(2, 3, 5), bn_channels=3)
    assert_skipped(model, "channel_axis")


def test_skip_matmul_unknown_rank() -> None:
    model, _ = matmul_model(x_shape=None)
    assert_skipped(model, "unknown_rank")


@pytest.mark.parametrize("add", [(3, 4), (3, 1)], ids=["MN", "M1"])
@pytest.mark.parametrize("dtype", [F32, F16, F64])
def test_matmul_add_full_constant_keeps_the_add(add: tuple[int, ...], dtype: object) -> None:
    """[M, N] / [M, 1] is no Gemm bias: the MatMul and the Add stay, W's columns take s and the
    constant becomes s * C + t (shape [M, N]), each the float64 value rounded once."""
    model, feeds = matmul_model(add=add, dtype=dtype)
    folded = assert_pattern(model, feeds, ["matmul_add"], gone=["BatchNormalization", "Gemm"], dtype=dtype)
    assert count_ops(folded, "MatMul") == 1 and count_ops(folded, "Add") == 1
    s, t = bn_affine64(model)
    mm = next(n for n in folded.graph.node if n.op_type == "MatMul")
    add_node = next(n for n in folded.graph.node if n.op_type == "Add")
    assert list(add_node.output) == ["Y"]
    w = initializer(model, "W").astype(np.float64)
    c = initializer(model, "b").astype(np.float64)
    assert_rounded_once(initializer(folded, mm.input[1]), w * s[None, :], "W")
    assert_rounded_once(initializer(folded, add_node.input[1]), c * s[None, :] + t[None, :], "C")


def test_matmul_add_full_constant_numbers() -> None:
    """The folded model against Y = BN(X @ W + C) computed here in float64."""
    model, feeds = matmul_model(add=(3, 4))
    folded = assert_pattern(model, feeds, ["matmul_add"], gone=["BatchNormalization"])
    s, t = bn_affine64(model)
    z = feeds["X"].astype(np.float64) @ initializer(model, "W").astype(np.float64)
    want = (z + initializer(model, "b").astype(np.float64)) * s + t
    np.testing.assert_allclose(run_ort(folded, feeds)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_matmul_add_full_constant_then_two_bns_round_once() -> None:
    model, feeds = matmul_model(add=(3, 4))
    bn2 = helper.make_node(
        "BatchNormalization", ["Y", "bn_scale", "bn_B", "bn_mean", "bn_var"], ["Z"], name="bn2"
    )
    model.graph.node.append(bn2)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [None, None]))
    assert_pattern(model, feeds, ["matmul_add", "bn_after_chain"], gone=["BatchNormalization"])


def test_skip_matmul_add_constant_of_higher_rank() -> None:
    model, _ = matmul_model(add=(2, 3, 4), bn_channels=3)  # the Add output is 3-D, its axis 1 the rows
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 3))
    assert_skipped(model, "broadcast")


def test_skip_matmul_add_full_constant_after_a_3d_matmul() -> None:
    model, _ = matmul_model(x_shape=(2, 3, 5), feed_shape=(2, 3, 5), add=(3, 4), bn_channels=3)
    assert_skipped(model, "channel_axis")


def test_skip_matmul_weight_not_2d() -> None:
    model, _ = matmul_model(w_shape=(1, 5, 4), bn_channels=3)  # [3,5] @ [1,5,4] -> [1,3,4]
    assert_skipped(model, "weight_shape")


def test_matmul_two_consumers_kept() -> None:
    model, _ = matmul_model()
    model.graph.node.append(helper.make_node("Relu", ["mm"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None, None]))
    assert_skipped(model, "multiple_consumers")
