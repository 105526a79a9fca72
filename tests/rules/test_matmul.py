"""``matmul``: MatMul (+ Add) -> BN with 2-D activations, rewritten as one Gemm (checks in
tests/pattern_checks.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import (
    F16,
    F32,
    GraphBuilder,
)
from pattern_checks import assert_pattern, assert_skipped, bn, rnd


def matmul_model(
    *,
    x_shape: Sequence[Any] | None = (3, 5),
    feed_shape: Sequence[int] = (3, 5),
    n: int = 4,
    add: Sequence[int] | None = None,
    bn_channels: int | None = None,
    pre: str = "",
    w_shape: Sequence[int] | None = None,
    seed: int = 0,
    dtype: Any = F32,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> [pre] -> MatMul(., W) [-> Add(b)] -> BN -> Y."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", dtype, list(x_shape) if x_shape is not None else list(feed_shape))
    a = "X"
    k = feed_shape[-1]
    if x_shape is None and not pre:  # reshaped to a shape only known at run time: rank unknown
        gb.input("S", np.int64, [len(feed_shape)])
        gb.node("Reshape", ["X", "S"], ["flat"])
        a = "flat"
    if pre == "flatten":
        gb.node("Flatten", ["X"], ["flat"], axis=1)
        a, k = "flat", int(np.prod(feed_shape[1:]))
    elif pre == "reshape":
        gb.const("shape", np.array([feed_shape[0], -1], np.int64))
        gb.node("Reshape", ["X", "shape"], ["flat"])
        a, k = "flat", int(np.prod(feed_shape[1:]))
    elif pre == "gemm_relu":  # like the legacy torch export: Gemm -> Relu -> MatMul
        gb.const("G", rnd(rng, (k, 6), 0.4, dtype))
        gb.node("Gemm", ["X", "G"], ["g"])
        gb.node("Relu", ["g"], ["flat"])
        a, k = "flat", 6
    gb.const("W", rnd(rng, w_shape or (k, n), 1 / np.sqrt(k), dtype))
    gb.node("MatMul", [a, "W"], ["mm"], name="mm")
    z = "mm"
    if add is not None:
        gb.const("b", rnd(rng, add, 1.0, dtype))
        gb.node("Add", ["mm", "b"], ["mm_b"], name="add")
        z = "mm_b"
    bn(gb, z, "Y", bn_channels or n, rng, dtype=dtype)
    out_rank = max(len(feed_shape) if not pre else 2, len(w_shape or (k, n)))
    gb.output("Y", dtype, [None] * out_rank)
    feeds = {"X": rnd(rng, feed_shape, 1.0, dtype)}
    if x_shape is None and not pre:
        feeds["S"] = np.array(feed_shape, np.int64)
    return gb.model(17), feeds


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
