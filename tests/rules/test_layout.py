"""``layout``: layer [-> Add] -> one channel-keeping Transpose / Reshape / Flatten / Unsqueeze /
Squeeze -> BN folds into the layer, the op stays (checked in onnxruntime with optimizations off,
and against float64 values computed here); kept when the op moves, splits or merges the channels,
or its shapes cannot be proven."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import F16, F32, F64, GraphBuilder, count_ops, initializer, run_ort
from pattern_checks import assert_pattern, assert_rounded_once, assert_skipped, bn, bn_affine64, rnd


def conv_then(
    op: str,
    *,
    attrs: dict[str, Any] | None = None,
    const: Sequence[int] | None = None,
    rank: int = 2,
    size: Sequence[int] = (4, 4),
    declare: Sequence[int] | None = None,
    opset: int = 17,
    bias: bool = True,
    channels: int = 4,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X [2, 3, *size] -> Conv(4, rank-D, same size) -> op (``const``: its second input) ->
    BN(``channels``: the extent of the op output's axis 1) -> Y. ``declare``: the Conv output's
    declared (fixed) shape."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    xshape = [2, 3, *size]
    gb.input("X", F32, xshape)
    ins = ["X", gb.const("W", rnd(rng, [4, 3] + [1] * rank, 0.5))] + (
        [gb.const("Bc", rnd(rng, [4]))] if bias else []
    )
    gb.node("Conv", ins, ["c"], name="conv")
    if declare is not None:
        gb.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, list(declare)))
    op_ins = ["c"] + ([gb.const("arg", np.array(const, np.int64))] if const is not None else [])
    gb.node(op, op_ins, ["v"], name="layout", **(attrs or {}))
    bn(gb, "v", "Y", channels, rng)
    gb.output("Y", F32, [None] * _out_rank(op, rank + 2, attrs or {}, const, size))
    return gb.model(opset), {"X": rnd(rng, xshape)}


def _out_rank(
    op: str, rank: int, attrs: dict[str, Any], const: Sequence[int] | None, size: Sequence[int]
) -> int:
    axes = (
        list(const)
        if const is not None
        else list(attrs.get("axes", [i for i, d in enumerate(size, 2) if d == 1]))
    )
    return {
        "Reshape": len(const or ()),
        "Transpose": rank,
        "Flatten": 2,
        "Unsqueeze": rank + len(axes),
        "Squeeze": rank - len(axes),
    }[op]


def tokens(
    op: str = "Transpose",
    *,
    attrs: dict[str, Any] | None = None,
    const: Sequence[int] | None = None,
    add: Sequence[int] | None = None,
    back: bool = True,
    x_shape: Sequence[int] = (2, 5, 6),
    dtype: Any = F32,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X [B, T, 6] -> MatMul(W [6, 4]) [-> Add(b)] -> op (default Transpose [0, 2, 1]) -> BN(4)
    [-> Transpose back] -> Y: a conformer / TDNN block."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", dtype, list(x_shape))
    gb.node("MatMul", ["X", gb.const("W", rnd(rng, [6, 4], 0.4, dtype))], ["m"], name="linear")
    z = "m"
    if add is not None:
        gb.node("Add", ["m", gb.const("b", rnd(rng, add, 1.0, dtype))], ["a"], name="bias")
        z = "a"
    if op == "Transpose" and attrs is None:
        attrs = {"perm": [0, 2, 1]}
    op_ins = [z] + ([gb.const("arg", np.array(const, np.int64))] if const is not None else [])
    gb.node(op, op_ins, ["v"], name="layout", **(attrs or {}))
    bn(gb, "v", "n" if back else "Y", 4, rng, dtype=dtype)
    if back:
        gb.node("Transpose", ["n"], ["Y"], name="back", perm=[0, 2, 1])
    gb.output("Y", dtype, [None] * _out_rank(op, len(x_shape), attrs or {}, const, ()))
    return gb.model(17), {"X": rnd(rng, x_shape, 1.0, dtype)}


def _tokens_by_hand(model: onnx.ModelProto, x: np.ndarray, add: bool) -> np.ndarray:
    """Y of :func:`tokens` (Transpose, BN, Transpose back) in float64: BN on the features."""
    s, t = bn_affine64(model)
    z = x.astype(np.float64) @ initializer(model, "W").astype(np.float64)
    if add:
        z = z + initializer(model, "b").astype(np.float64)
    return z * s + t


@pytest.mark.parametrize("dtype", [F32, F16, F64])
def test_matmul_transpose_bn_scale_into_weight_shift_as_add(dtype: Any) -> None:
    model, feeds = tokens(dtype=dtype)
    folded = assert_pattern(model, feeds, ["layout"], gone=["BatchNormalization"], dtype=dtype)
    assert count_ops(folded, "Transpose") == 2 and count_ops(folded, "MatMul") == 1
    add = next(n for n in folded.graph.node if n.op_type == "Add")
    assert add.name == "bn" and list(add.output) == ["n"] and add.input[0] == "v"
    s, t = bn_affine64(model)
    w = initializer(model, "W").astype(np.float64)
    assert_rounded_once(initializer(folded, "W"), w * s, "W")
    assert_rounded_once(initializer(folded, add.input[1]), t.reshape(4, 1), "shift")
    if dtype == F32:
        want = _tokens_by_hand(model, feeds["X"], add=False)
        np.testing.assert_allclose(run_ort(folded, feeds)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("add", [(4,), (1, 1, 4), (5, 4), (5, 1)], ids=["C", "11C", "TC", "T1"])
@pytest.mark.parametrize("dtype", [F32, F16, F64])
def test_matmul_add_transpose_bn_shift_into_the_add(add: tuple[int, ...], dtype: Any) -> None:
    model, feeds = tokens(add=add, dtype=dtype)
    folded = assert_pattern(model, feeds, ["layout"], gone=["BatchNormalization"], dtype=dtype)
    assert count_ops(folded, "Add") == 1 and count_ops(folded, "MatMul") == 1
    s, t = bn_affine64(model)
    bias = next(n for n in folded.graph.node if n.op_type == "Add")
    assert_rounded_once(
        initializer(folded, bias.input[1]), initializer(model, "b").astype(np.float64) * s + t, "b"
    )
    assert_rounded_once(initializer(folded, "W"), initializer(model, "W").astype(np.float64) * s, "W")
    if dtype == F32:
        want = _tokens_by_hand(model, feeds["X"], add=True)
        np.testing.assert_allclose(run_ort(folded, feeds)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_2d_matmul_unsqueeze_bn_becomes_a_gemm() -> None:
    model, feeds = tokens("Unsqueeze", const=[-1], back=False, x_shape=(3, 6))
    folded = assert_pattern(model, feeds, ["layout"], gone=["BatchNormalization", "MatMul"])
    assert count_ops(folded, "Gemm") == 1 and count_ops(folded, "Unsqueeze") == 1


def test_matmul_transpose_bn_then_bn_rounds_once() -> None:
    model, feeds = tokens(add=(4,), back=False)
    model.graph.node.append(
        helper.make_node(
            "BatchNormalization", ["Y", "bn_scale", "bn_B", "bn_mean", "bn_var"], ["Z"], name="bn2"
        )
    )
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [None] * 3))
    assert_pattern(model, feeds, ["layout", "bn_after_chain"], gone=["BatchNormalization"])


@pytest.mark.parametrize(
    "kw",
    [
        dict(op="Reshape", const=[0, 4, -1]),
        dict(op="Reshape", const=[0, 0, -1]),
        dict(op="Reshape", const=[2, 4, 16], declare=[2, 4, 4, 4]),
        dict(op="Reshape", const=[2, -1, 16], declare=[2, 4, 4, 4]),
        dict(op="Transpose", attrs={"perm": [0, 1, 3, 2]}),
        dict(op="Transpose", attrs={"perm": [3, 1, 0, 2]}),
        dict(op="Unsqueeze", const=[-1], rank=1, size=(5,)),
        dict(op="Unsqueeze", attrs={"axes": [3]}, rank=1, size=(5,), opset=11),
        dict(op="Squeeze", const=[3], size=(4, 1)),
        dict(op="Squeeze", attrs={"axes": [-1]}, size=(4, 1), opset=11),
        dict(op="Flatten", attrs={"axis": 1}, size=(1, 1), declare=[2, 4, 1, 1]),
    ],
    ids=[
        "reshape_0_C_-1",
        "reshape_0_0_-1",
        "reshape_fixed_shape",
        "reshape_-1_channels",
        "transpose_hw",
        "transpose_moves_batch",
        "unsqueeze_last",
        "unsqueeze_attribute",
        "squeeze_last",
        "squeeze_attribute",
        "flatten_1x1",
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_layout_bn_folds_into_the_conv(kw: dict, bias: bool) -> None:
    model, feeds = conv_then(**kw, bias=bias)
    folded = assert_pattern(model, feeds, ["layout"], gone=["BatchNormalization"])
    assert count_ops(folded, kw["op"]) == 1
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    s, t = bn_affine64(model)
    w = initializer(model, "W").astype(np.float64)
    b = initializer(model, "Bc").astype(np.float64) if bias else np.zeros(4)
    assert_rounded_once(initializer(folded, conv.input[1]), w * s.reshape(-1, *[1] * (w.ndim - 1)), "W")
    assert_rounded_once(initializer(folded, conv.input[2]), b * s + t, "bias")


def test_gemm_flatten_bn() -> None:
    rng = np.random.default_rng(0)
    gb = GraphBuilder()
    gb.input("X", F64, [3, 5])
    gb.node(
        "Gemm",
        ["X", gb.const("W", rnd(rng, [5, 4], 0.4, F64)), gb.const("Bc", rnd(rng, [4], 1.0, F64))],
        ["g"],
    )
    gb.node("Flatten", ["g"], ["v"], name="layout", axis=1)
    bn(gb, "v", "Y", 4, rng, dtype=F64)
    gb.output("Y", F64, [3, 4])
    model, feeds = gb.model(17), {"X": rnd(rng, [3, 5], 1.0, F64)}
    assert_pattern(model, feeds, ["layout"], gone=["BatchNormalization"], dtype=F64)


@pytest.mark.parametrize(
    "kw",
    [
        dict(op="Transpose", attrs={"perm": [0, 2, 3, 1]}),
        dict(op="Reshape", const=[0, 2, -1], channels=2),
        dict(op="Reshape", const=[0, -1, 2], channels=32),
        dict(op="Flatten", attrs={"axis": 1}, channels=64),
        dict(op="Flatten", attrs={"axis": 1}, size=(2, 2), declare=[2, 4, 2, 2], channels=16),
        dict(op="Unsqueeze", const=[1], rank=1, size=(5,), channels=1),
        dict(op="Squeeze", const=[0], size=(4, 1)),
    ],
    ids=[
        "transpose_nhwc",
        "reshape_splits",
        "reshape_merges",
        "flatten",
        "flatten_fixed",
        "unsqueeze_1",
        "squeeze_0",
    ],
)
def test_skip_conv_layout_moving_the_channels(kw: dict) -> None:
    model, _ = conv_then(**kw)
    if kw["op"] == "Squeeze":  # Squeeze(0) of [2, 4, 4, 1] is invalid: make the batch 1
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    report = assert_skipped(model, "channel_axis")
    assert "layout" in report.skipped[0].message


@pytest.mark.parametrize(
    "kw",
    [
        dict(op="Reshape", const=[2, 4, -1]),
        dict(op="Reshape", const=[-1, 4, 16]),
        dict(op="Squeeze", size=(4, 1)),
    ],
    ids=["reshape_fixed_batch", "reshape_-1_first", "squeeze_without_axes"],
)
def test_skip_conv_layout_unknown_shape(kw: dict) -> None:
    model, _ = conv_then(**kw)
    assert_skipped(model, "unknown_shape")


def test_skip_reshape_with_a_computed_shape() -> None:
    model, _ = conv_then("Reshape", const=[0, 4, -1])
    model.graph.input.append(helper.make_tensor_value_info("S", TensorProto.INT64, [3]))
    next(n for n in model.graph.node if n.name == "layout").input[1] = "S"
    assert_skipped(model, "unknown_shape")


@pytest.mark.parametrize(
    "kw",
    [
        dict(op="Transpose", attrs={"perm": [0, 1, 2]}),
        dict(op="Unsqueeze", const=[-1]),
        dict(op="Reshape", const=[0, 4, -1], add=(4,)),
    ],
    ids=["identity_perm", "unsqueeze", "reshape_0_C_-1"],
)
def test_skip_matmul_layout_moving_the_features(kw: dict) -> None:
    model, _ = tokens(**kw, back=False)
    if kw["op"] != "Reshape":  # the BN normalizes T = 5
        model, _ = tokens(**kw, back=False, x_shape=(2, 4, 6))
    assert_skipped(model, "channel_axis")


def test_skip_matmul_of_unknown_rank() -> None:
    model, _ = tokens(back=False)  # X reshaped to a shape only known at run time
    model.graph.input.append(helper.make_tensor_value_info("S", TensorProto.INT64, [3]))
    model.graph.node.insert(0, helper.make_node("Reshape", ["X", "S"], ["xr"], name="reshape_in"))
    next(n for n in model.graph.node if n.name == "linear").input[0] = "xr"
    assert_skipped(model, "unknown_rank")


def test_skip_layer_output_with_another_reader() -> None:
    model, _ = tokens(back=False)
    model.graph.node.append(helper.make_node("Relu", ["m"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 3))
    assert_skipped(model, "multiple_consumers")


def test_skip_layout_output_that_is_a_graph_output() -> None:
    model, _ = conv_then("Transpose", attrs={"perm": [0, 1, 3, 2]})
    model.graph.output.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "graph_output")
