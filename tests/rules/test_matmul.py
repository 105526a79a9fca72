"""``matmul``: MatMul (+ Add) -> BN with 2-D activations, rewritten as one Gemm (checks in
tests/pattern_checks.py)."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper
from onnx_builders import (
    F16,
)
from pattern_checks import assert_pattern, assert_skipped, matmul_model


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


def test_skip_matmul_add_not_per_feature_broadcast() -> None:
    model, _ = matmul_model(add=(3, 4))  # [M, N]: a bias per row, not per feature
    assert_skipped(model, "broadcast")


def test_skip_matmul_weight_not_2d() -> None:
    model, _ = matmul_model(w_shape=(1, 5, 4), bn_channels=3)  # [3,5] @ [1,5,4] -> [1,3,4]
    assert_skipped(model, "weight_shape")


def test_matmul_two_consumers_kept() -> None:
    model, _ = matmul_model()
    model.graph.node.append(helper.make_node("Relu", ["mm"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None, None]))
    assert_skipped(model, "multiple_consumers")
