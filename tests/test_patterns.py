"""The affine folds beyond Conv -> BN (issue 6): MatMul(+Add) -> BN, chains through constant Adds,
decomposed BNs (Mul + Add), BN before an unpadded Conv or Flatten -> Gemm, standalone BN -> Mul +
Add (opt-in), and dequantized Conv weights.

Every positive test checks the fold count and pattern, the nodes that must be gone,
``onnx.checker`` (full check) and the numerics of original vs folded computed here with
onnxruntime and every optimization off (``ORT_DISABLE_ALL``); bnfold's own verification is never
used. Every negative test checks the reason code and that the model is byte-identical.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import (
    F16,
    F32,
    GraphBuilder,
    add_bn,
    assert_ort_equivalent,
    bn_stats,
    cast,
    check_model,
    count_ops,
    initializer,
)

import bnfold
from bnfold.onnx.driver import fold_model


def fold(model: onnx.ModelProto, **kw: Any) -> tuple[onnx.ModelProto, bnfold.FoldReport]:
    out = copy.deepcopy(model)
    report = fold_model(out, **kw)
    return out, report


def assert_pattern(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    patterns: Sequence[str],
    *,
    gone: Sequence[str] = (),
    dtype: Any = F32,
    **kw: Any,
) -> onnx.ModelProto:
    """Fold; check the patterns, ops removed, checker, ORT numerics (optimizations off), idempotence."""
    check_model(model)
    original = model.SerializeToString()
    folded, report = fold(model, **kw)
    assert model.SerializeToString() == original  # the input is never modified
    assert [f.pattern for f in report.folded] == list(patterns), (report.folded, report.skipped)
    assert not report.skipped, report.skipped
    for op in gone:
        assert count_ops(folded, op) == 0, op
    check_model(folded)
    assert [v.name for v in folded.graph.output] == [v.name for v in model.graph.output]
    assert_ort_equivalent(model, folded, feeds, dtype)
    again, rep2 = fold(folded, **kw)
    assert not rep2.folded
    assert again.SerializeToString() == folded.SerializeToString()
    return folded


def assert_skipped(
    model: onnx.ModelProto, code: str, *, op: str = "BatchNormalization", **kw: Any
) -> bnfold.FoldReport:
    """Nothing folded, one skip with ``code``, the model byte-identical and valid."""
    check_model(model)
    original = model.SerializeToString()
    folded, report = fold(model, **kw)
    assert not report.folded, report.folded
    skipped = report.skipped if op == "BatchNormalization" else report.skipped_affine
    other = report.skipped_affine if op == "BatchNormalization" else report.skipped
    assert [(s.code, s.op) for s in skipped] == [(code, op)], (report.skipped, report.skipped_affine)
    assert not other
    assert skipped[0].message
    assert folded.SerializeToString() == original
    return report


def bn(
    gb: GraphBuilder,
    x: str,
    y: str,
    c: int,
    rng: np.random.Generator,
    prefix: str = "bn",
    dtype: Any = F32,
    **kw: Any,
) -> None:
    add_bn(gb, x, y, bn_stats(rng, c), dtype=dtype, bn_opset=15, prefix=prefix, **kw)


def rnd(rng: np.random.Generator, shape: Sequence[int], scale: float = 1.0, dtype: Any = F32) -> np.ndarray:
    return cast(rng.normal(0, scale, list(shape)), dtype)


# ==============================================================================================
# MatMul (+ Add) -> BN
# ==============================================================================================
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


# ==============================================================================================
# chains: Conv -> BN -> BN, Conv -> Add -> BN, Conv -> Mul -> Add
# ==============================================================================================
def conv_chain(
    *,
    ops: Sequence[tuple[str, Sequence[int] | None]],
    cin: int = 3,
    cout: int = 4,
    bias: bool = True,
    op: str = "Conv",
    group: int = 1,
    seed: int = 0,
    size: int = 5,
    rank: int = 2,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> Conv -> ops... -> Y, each op ``("bn", None)``, ``("add", shape)`` or ``("mul", shape)``."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    xshape = [2, cin] + [size] * rank
    gb.input("X", F32, xshape)
    wshape = [cout, cin // group] if op == "Conv" else [cin, cout // group]
    ins = ["X", gb.const("W", rnd(rng, wshape + [3] * rank, 0.3))]
    if bias:
        ins.append(gb.const("Bc", rnd(rng, [cout])))
    gb.node(op, ins, ["c0"], name="conv", pads=[1] * (2 * rank), group=group if group > 1 else None)
    prev = "c0"
    for i, (kind, shape) in enumerate(ops):
        out = "Y" if i == len(ops) - 1 else f"c{i + 1}"
        if kind == "bn":
            bn(gb, prev, out, cout, rng, prefix=f"bn{i}")
        else:
            vals = (
                rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape)
                if kind == "mul"
                else rng.normal(0, 1, shape)
            )
            gb.const(f"k{i}", np.asarray(vals, np.float32))
            gb.node(kind.capitalize(), [prev, f"k{i}"], [out], name=f"{kind}{i}")
        prev = out
    gb.output("Y", F32, [None] * (rank + 2))
    return gb.model(17), {"X": rnd(rng, xshape)}


def test_conv_bn_bn() -> None:
    model, feeds = conv_chain(ops=[("bn", None), ("bn", None)])
    assert_pattern(model, feeds, ["bn_after", "bn_after_chain"], gone=["BatchNormalization"])


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (), (1,), (1, 1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_add_bn(shape: tuple[int, ...], bias: bool) -> None:
    model, feeds = conv_chain(ops=[("add", shape), ("bn", None)], bias=bias)
    assert_pattern(model, feeds, ["bn_after_chain"], gone=["BatchNormalization", "Add"])


@pytest.mark.parametrize("rank,shape", [(1, (4, 1)), (1, (1, 4, 1)), (3, (4, 1, 1, 1)), (3, (1, 4, 1, 1, 1))])
def test_conv_1d_3d_add_bn_and_decomposed(rank: int, shape: tuple[int, ...]) -> None:
    model, feeds = conv_chain(ops=[("add", shape), ("bn", None)], rank=rank, size=4)
    assert_pattern(model, feeds, ["bn_after_chain"], gone=["BatchNormalization", "Add"])
    model, feeds = conv_chain(ops=[("mul", shape), ("add", shape)], rank=rank, size=4)
    assert_pattern(model, feeds, ["decomposed_affine"], gone=["Mul", "Add"])


def test_skip_conv1d_add_with_2d_conv_shape_broadcast() -> None:
    # [4, 1, 1] on a 1-D conv output [2, 4, L] lines the 4 up with the batch axis
    model, _ = conv_chain(ops=[("add", (1, 1, 1)), ("bn", None)], rank=1)
    for t in model.graph.initializer:
        if t.name == "k0":
            t.CopyFrom(numpy_helper.from_array(np.ones((2, 1, 1), np.float32), "k0"))
    assert_skipped(model, "broadcast")


def test_conv_transpose_grouped_add_bn() -> None:
    model, feeds = conv_chain(
        ops=[("add", (6, 1, 1)), ("bn", None)], op="ConvTranspose", cin=4, cout=6, group=2
    )
    assert_pattern(model, feeds, ["bn_after_chain"], gone=["BatchNormalization", "Add"])


@pytest.mark.parametrize("shape", [(4,), (1, 4, 5, 5), (2, 4, 1, 1)])
def test_skip_conv_add_bn_not_per_channel_broadcast(shape: tuple[int, ...]) -> None:
    # [4] aligns with the width axis; [1,4,5,5] is per pixel; [2,4,1,1] is per sample
    model, _ = conv_chain(ops=[("add", shape), ("bn", None)], size=4 if shape == (4,) else 5)
    assert_skipped(model, "broadcast")


@pytest.mark.parametrize(
    "mshape,ashape", [((4, 1, 1), (4, 1, 1)), ((1, 4, 1, 1), (1, 4, 1, 1)), ((), (4, 1, 1)), ((4, 1, 1), ())]
)
def test_decomposed_mul_add(mshape: tuple[int, ...], ashape: tuple[int, ...]) -> None:
    model, feeds = conv_chain(ops=[("mul", mshape), ("add", ashape)])
    assert_pattern(model, feeds, ["decomposed_affine"], gone=["Mul", "Add"])


def test_decomposed_mul_add_then_bn() -> None:
    model, feeds = conv_chain(ops=[("mul", (4, 1, 1)), ("add", (4, 1, 1)), ("bn", None)], bias=False)
    assert_pattern(
        model, feeds, ["decomposed_affine", "bn_after_chain"], gone=["Mul", "Add", "BatchNormalization"]
    )


def test_decomposed_mul_only_and_bad_add_kept() -> None:
    model, feeds = conv_chain(ops=[("mul", (4, 1, 1)), ("add", (1, 4, 5, 5))])
    folded = assert_pattern(model, feeds, ["decomposed_affine"], gone=["Mul"])
    assert count_ops(folded, "Add") == 1


def test_decomposed_gemm_mul_add() -> None:
    rng = np.random.default_rng(3)
    gb = GraphBuilder()
    gb.input("X", F32, [3, 5])
    gb.const("W", rnd(rng, (4, 5), 0.4))
    gb.const("C", rnd(rng, (4,)))
    gb.node("Gemm", ["X", "W", "C"], ["g"], name="gemm", transB=1, alpha=0.5, beta=2.0)
    gb.const("m", rnd(rng, (1, 4)))
    gb.node("Mul", ["m", "g"], ["gm"], name="mul")  # constant first: Mul commutes
    gb.const("a", rnd(rng, (4,)))
    gb.node("Add", ["gm", "a"], ["Y"], name="add")
    gb.output("Y", F32, [3, 4])
    assert_pattern(gb.model(17), {"X": rnd(rng, (3, 5))}, ["decomposed_affine"], gone=["Mul", "Add"])


def test_skip_decomposed_mul_not_per_channel() -> None:
    model, _ = conv_chain(ops=[("mul", (1, 4, 5, 5)), ("add", (4, 1, 1))])
    assert_skipped(model, "broadcast", op="Mul")


def test_decomposed_mul_shared_conv_output_untouched() -> None:
    model, _ = conv_chain(ops=[("mul", (4, 1, 1)), ("add", (4, 1, 1))])
    model.graph.node.append(helper.make_node("Relu", ["c0"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    check_model(model)
    folded, report = fold(model)
    assert not report.folded and not report.skipped and not report.skipped_affine  # not a decomposed BN
    assert folded.SerializeToString() == model.SerializeToString()


def test_mul_of_activations_ignored() -> None:
    model, _ = conv_chain(ops=[("mul", (4, 1, 1))])
    model.graph.node[-1].input[1] = "c0"  # x * x: not a constant scale
    folded, report = fold(model)
    assert not report.folded and not report.skipped and not report.skipped_affine


# ==============================================================================================
# BN before Conv / Flatten -> Gemm
# ==============================================================================================
def bn_conv_model(
    *,
    cin: int = 4,
    cout: int = 6,
    group: int = 1,
    pads: Sequence[int] | None = None,
    auto_pad: str | None = None,
    strides: Sequence[int] | None = None,
    bias: bool = True,
    kernel: int = 3,
    relu_before: bool = False,
    seed: int = 0,
    size: int = 6,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X [-> Relu] -> BN -> Conv -> Y."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", F32, [2, cin, size, size])
    x = "X"
    if relu_before:
        gb.node("Relu", ["X"], ["r"])
        x = "r"
    bn(gb, x, "b", cin, rng)
    ins = ["b", gb.const("W", rnd(rng, [cout, cin // group, kernel, kernel], 0.3))]
    if bias:
        ins.append(gb.const("Bc", rnd(rng, [cout])))
    gb.node(
        "Conv",
        ins,
        ["Y"],
        name="conv",
        group=group if group > 1 else None,
        pads=pads,
        auto_pad=auto_pad,
        strides=strides,
    )
    gb.output("Y", F32, [None] * 4)
    return gb.model(17), {"X": rnd(rng, [2, cin, size, size])}


BN_CONV_CASES = {
    "dense": dict(),
    "no_bias": dict(bias=False),
    "grouped": dict(cin=4, cout=6, group=2),
    "depthwise": dict(cin=4, cout=4, group=4),
    "depthwise_multiplier": dict(cin=3, cout=6, group=3),
    "strided_valid": dict(strides=[2, 2], auto_pad="VALID", size=7),
    "zero_pads": dict(pads=[0, 0, 0, 0]),
    "after_relu": dict(relu_before=True),
    "1x1": dict(kernel=1),
}


@pytest.mark.parametrize("case", BN_CONV_CASES)
def test_bn_before_conv(case: str) -> None:
    model, feeds = bn_conv_model(**BN_CONV_CASES[case])
    assert_pattern(model, feeds, ["bn_before"], gone=["BatchNormalization"])


@pytest.mark.parametrize(
    "kw", [dict(pads=[1, 1, 1, 1]), dict(pads=[0, 0, 1, 0]), dict(auto_pad="SAME_UPPER")]
)
def test_skip_bn_before_padded_conv(kw: dict) -> None:
    model, _ = bn_conv_model(**kw)
    assert_skipped(model, "padding")


def test_skip_bn_before_conv_two_consumers() -> None:
    model, _ = bn_conv_model()
    model.graph.node.append(helper.make_node("Relu", ["b"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "no_producer")


def test_bn_before_conv_then_bn_after() -> None:
    model, feeds = bn_conv_model()
    rng = np.random.default_rng(5)
    conv = [n for n in model.graph.node if n.op_type == "Conv"][0]
    conv.output[0] = "z"
    gb = GraphBuilder()
    bn(gb, "z", "Y", 6, rng, prefix="bn2")
    model.graph.node.extend(gb.nodes)
    model.graph.initializer.extend(gb.initializers)
    assert_pattern(model, feeds, ["bn_before", "bn_after_chain"], gone=["BatchNormalization"])


def bn_flatten_gemm(
    *,
    c: int = 3,
    hw: Sequence[int] = (2, 2),
    n: int = 5,
    trans_b: int = 0,
    alpha: float | None = None,
    beta: float | None = None,
    c_shape: Sequence[int] | None = (5,),
    axis: int | None = None,
    trans_a: int = 0,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", F32, [2, c, *hw])
    bn(gb, "X", "b", c, rng)
    gb.node("Flatten", ["b"], ["f"], name="flatten", axis=axis)
    k = c * int(np.prod(hw))
    ins = ["f", gb.const("B", rnd(rng, (n, k) if trans_b else (k, n), 0.4))]
    if c_shape is not None:
        ins.append(gb.const("C", rnd(rng, c_shape)))
    gb.node(
        "Gemm",
        ins,
        ["Y"],
        name="gemm",
        transB=trans_b or None,
        transA=trans_a or None,
        alpha=alpha,
        beta=beta,
    )
    gb.output("Y", F32, [None] * 2)
    return gb.model(17), {"X": rnd(rng, [2, c, *hw])}


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(trans_b=1),
        dict(c_shape=None),
        dict(alpha=0.5, beta=1.5),
        dict(c_shape=(2, 5), beta=-1.0),
        dict(hw=()),
        dict(hw=(3,), trans_b=1),
        dict(beta=0.0),
    ],
)
def test_bn_before_flatten_gemm(kw: dict) -> None:
    model, feeds = bn_flatten_gemm(**kw)
    assert_pattern(model, feeds, ["bn_before"], gone=["BatchNormalization"])


def test_skip_bn_before_flatten_axis_2() -> None:
    model, _ = bn_flatten_gemm(axis=2, hw=(2, 2), c=3)  # [2, 3, 2, 2] -> [6, 4]: mixes batch and channel
    model.graph.node[-1].input[1] = "B2"
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 5), np.float32), "B2"))
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "B"][0])
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "C"][0])
    model.graph.node[-1].input[2] = "C2"
    model.graph.initializer.append(numpy_helper.from_array(np.ones((5,), np.float32), "C2"))
    assert_skipped(model, "channel_axis")


def test_skip_bn_before_gemm_trans_a() -> None:
    model, _ = bn_flatten_gemm(hw=(), c=3, trans_a=1, c_shape=None)  # [2, 3] -> A' = [3, 2]
    model.graph.node[-1].input[1] = "B2"
    model.graph.initializer.append(numpy_helper.from_array(np.ones((2, 5), np.float32), "B2"))
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "B"][0])
    assert_skipped(model, "channel_axis")


# ==============================================================================================
# BN -> Mul + Add (opt-in)
# ==============================================================================================
def lone_bn(
    shape: Sequence[Any] | None,
    *,
    dtype: Any = F32,
    param_dtype: Any = None,
    feed: Sequence[int] = (2, 3, 4, 4),
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", dtype, list(feed))
    x = "X"
    feeds = {"X": rnd(rng, feed, 1.0, dtype)}
    if shape is None:  # reshaped to a shape only known at run time: rank unknown
        gb.input("S", np.int64, [len(feed)])
        gb.node("Reshape", ["X", "S"], ["x2"])
        x = "x2"
        feeds["S"] = np.array(feed, np.int64)
    gb.node("Relu", [x], ["r"])
    bn(gb, "r", "Y", feed[1], rng, dtype=dtype, param_dtype=param_dtype)
    gb.output("Y", dtype, [None] * len(feed))
    return gb.model(17), feeds


@pytest.mark.parametrize("feed", [(2, 3, 4, 4), (2, 3), (2, 3, 5), (1, 3, 2, 2, 2)])
def test_bn_to_affine(feed: tuple[int, ...]) -> None:
    model, feeds = lone_bn(feed, feed=feed)
    folded = assert_pattern(model, feeds, ["bn_to_affine"], gone=["BatchNormalization"], bn_to_affine=True)
    assert count_ops(folded, "Mul") == 1 and count_ops(folded, "Add") == 1
    mul = [n for n in folded.graph.node if n.op_type == "Mul"][0]
    assert initializer(folded, mul.input[1]).shape == (3,) + (1,) * (len(feed) - 2)


def test_bn_to_affine_float16_with_float32_params() -> None:
    model, feeds = lone_bn((2, 3, 4, 4), dtype=F16, param_dtype=F32)
    folded = assert_pattern(model, feeds, ["bn_to_affine"], dtype=F16, bn_to_affine=True)
    assert all(t.data_type == TensorProto.FLOAT16 for t in folded.graph.initializer)


def test_bn_to_affine_off_by_default() -> None:
    model, _ = lone_bn((2, 3, 4, 4))
    assert_skipped(model, "unsupported_producer")


def test_bn_to_affine_unknown_rank_kept() -> None:
    model, _ = lone_bn(None)
    report = assert_skipped(model, "unsupported_producer", bn_to_affine=True)
    assert "Mul+Add" in report.skipped[0].message


def test_bn_to_affine_training_mode_kept() -> None:
    model, _ = lone_bn((2, 3, 4, 4))
    bnode = [n for n in model.graph.node if n.op_type == "BatchNormalization"][0]
    bnode.attribute.append(helper.make_attribute("training_mode", 1))
    bnode.output.extend(["rm", "rv"])
    assert_skipped(model, "training_mode", bn_to_affine=True)


def test_bn_to_affine_leaves_foldable_bns_to_folding() -> None:
    model, feeds = conv_chain(ops=[("bn", None)])
    assert_pattern(model, feeds, ["bn_after"], gone=["BatchNormalization", "Mul"], bn_to_affine=True)


# ==============================================================================================
# dequantized Conv weights
# ==============================================================================================
def dq_model(
    *,
    per_channel: bool = True,
    dtype: Any = np.int8,
    axis: int | None = 0,
    opset: int = 13,
    zero_point: bool = True,
    bias: bool = True,
    scale_shape: Sequence[int] | None = None,
    shared: bool = False,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cout, cin = 4, 3
    gb = GraphBuilder()
    gb.input("X", F32, [1, cin, 5, 5])
    info = np.iinfo(dtype)
    gb.const("Wq", rng.integers(max(info.min, -100), min(info.max, 100), (cout, cin, 3, 3)).astype(dtype))
    if scale_shape is not None:
        scale = rng.uniform(0.002, 0.01, scale_shape).astype(np.float32)
    else:
        scale = rng.uniform(0.002, 0.01, cout if per_channel else ()).astype(np.float32)
    ins = ["Wq", gb.const("Ws", scale)]
    if zero_point:
        zp = rng.integers(-3, 4, scale.shape) if dtype == np.int8 else rng.integers(120, 130, scale.shape)
        ins.append(gb.const("Wz", np.asarray(zp).astype(dtype)))
    gb.node("DequantizeLinear", ins, ["W"], name="dq", axis=axis)
    conv_ins = ["X", "W"] + ([gb.const("Bc", rnd(rng, [cout]))] if bias else [])
    gb.node("Conv", conv_ins, ["c"], name="conv", pads=[1, 1, 1, 1])
    add_bn(gb, "c", "Y", bn_stats(rng, cout), dtype=F32, bn_opset=9 if opset < 14 else 15, prefix="bn")
    if shared:
        gb.node("Conv", ["X", "W"], ["Y2"], name="conv2", pads=[1, 1, 1, 1])
        gb.output("Y2", F32, [None] * 4)
    gb.output("Y", F32, [None] * 4)
    return gb.model(opset), {"X": rnd(rng, [1, cin, 5, 5])}


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(bias=False),
        dict(zero_point=False),
        dict(dtype=np.uint8),
        dict(per_channel=False, axis=None),
        dict(per_channel=False, dtype=np.uint8, axis=1),
        dict(opset=17, per_channel=False, zero_point=False, bias=False),
    ],
)
def test_dequantized_weight(kw: dict) -> None:
    model, feeds = dq_model(**kw)
    folded = assert_pattern(model, feeds, ["dequantized_weight"], gone=["BatchNormalization"])
    np.testing.assert_array_equal(initializer(folded, "Wq"), initializer(model, "Wq"))  # integers untouched
    dq = [n for n in folded.graph.node if n.op_type == "DequantizeLinear"][0]
    assert initializer(folded, dq.input[1]).shape == (4,)
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]


def test_skip_dequantized_per_tensor_opset10() -> None:
    model, _ = dq_model(per_channel=False, axis=None, opset=10)
    assert_skipped(model, "dequantize_axis")


def test_skip_dequantized_scale_on_input_channel_axis() -> None:
    model, _ = dq_model(scale_shape=(3,), axis=1)  # per input channel: not per output channel
    assert_skipped(model, "dequantize_axis")


def test_skip_dequantized_weight_shared() -> None:
    model, _ = dq_model(shared=True)
    assert_skipped(model, "multiple_consumers")


def test_skip_dequantized_int32() -> None:
    model, _ = dq_model(zero_point=False)
    for t in model.graph.initializer:
        if t.name == "Wq":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int32), "Wq"))
    assert_skipped(model, "unsupported_dtype")


def test_skip_bn_after_residual_add_keeps_unsupported_producer() -> None:
    # pre-activation ResNet: Conv -> Add(residual) -> BN, the Add's output also used elsewhere
    model, _ = conv_chain(ops=[("add", (4, 1, 1)), ("bn", None)], cin=4)
    add = [n for n in model.graph.node if n.op_type == "Add"][0]
    add.input[1] = "X"
    model.graph.node.append(helper.make_node("Relu", [add.output[0]], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "unsupported_producer")


def test_skip_conv_add_bn_conv_output_shared() -> None:
    model, _ = conv_chain(ops=[("add", (4, 1, 1)), ("bn", None)])
    model.graph.node.append(helper.make_node("Relu", ["c0"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "multiple_consumers")


def test_patterns_inside_if_branch_and_function_bn_to_affine() -> None:
    """bn_to_affine inside a subgraph: the inserted Mul and its constants stay inside the branch."""
    rng = np.random.default_rng(7)
    outer = GraphBuilder()
    outer.input("X", F32, [1, 3, 4, 4])
    outer.input("cond", np.bool_, [])
    then = GraphBuilder()
    then.node("Relu", ["X"], ["r"])
    bn(then, "r", "ty", 3, rng)
    then.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 3, 4, 4]))
    then.output("ty", F32, [1, 3, 4, 4])
    other = GraphBuilder()
    other.node("Identity", ["X"], ["ey"])
    other.output("ey", F32, [1, 3, 4, 4])
    outer.node(
        "If", ["cond"], ["Y"], name="if", then_branch=then.graph("then"), else_branch=other.graph("else")
    )
    outer.output("Y", F32, [1, 3, 4, 4])
    feeds = {"X": rnd(rng, (1, 3, 4, 4)), "cond": np.array(True)}
    assert_pattern(outer.model(17), feeds, ["bn_to_affine"], gone=["BatchNormalization"], bn_to_affine=True)


def test_bn_before_conv_shared_weight_copy_on_write() -> None:
    model, feeds = bn_conv_model(bias=False)
    # a second Conv on the same weight, without a BN before it: its weight must not change
    model.graph.node.append(helper.make_node("Conv", ["X", "W"], ["Y2"], name="conv2"))
    model.graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [None] * 4))
    folded = assert_pattern(model, feeds, ["bn_before"], gone=["BatchNormalization"])
    np.testing.assert_array_equal(initializer(folded, "W"), initializer(model, "W"))
    conv = [n for n in folded.graph.node if n.name == "conv"][0]
    assert conv.input[1] != "W" and conv.input[0] == "X"


def test_bn_to_affine_legacy_opset6_explicit_broadcast() -> None:
    """Opset < 7 has no numpy broadcasting: the constants are [C] with broadcast=1, axis=1.
    (onnxruntime cannot run opset 6, and onnx's version converter rejects this legal form, so
    only the structure and the checker are verified here.)"""
    rng = np.random.default_rng(0)
    gb = GraphBuilder()
    gb.input("X", F32, [2, 3, 4, 4])
    gb.node("Relu", ["X"], ["r"])
    add_bn(gb, "r", "Y", bn_stats(rng, 3), dtype=F32, bn_opset=6, prefix="bn")
    gb.output("Y", F32, [2, 3, 4, 4])
    model = gb.model(6)
    check_model(model)
    folded, report = fold(model, bn_to_affine=True)
    assert [f.pattern for f in report.folded] == ["bn_to_affine"]
    check_model(folded)
    for n in folded.graph.node:
        if n.op_type in ("Mul", "Add"):
            attrs = {a.name: a.i for a in n.attribute}
            assert attrs == {"broadcast": 1, "axis": 1}
            assert initializer(folded, n.input[1]).shape == (3,)
    # the IR 3 rule: every initializer is also a graph input
    assert {t.name for t in folded.graph.initializer} <= {v.name for v in folded.graph.input}


def test_api_bn_to_affine_flag() -> None:
    """bnfold.fold passes bn_to_affine through, and its own verification accepts the rewrite."""
    import onnxruntime as ort

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 4, 4])
    rng = np.random.default_rng(0)
    params = [
        onnx.numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in (
            ("g", rng.normal(1, 0.5, 3)),
            ("b", rng.normal(0, 1, 3)),
            ("m", rng.normal(0, 1, 3)),
            ("v", rng.uniform(0.5, 2, 3)),
        )
    ]
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Relu", ["x"], ["r"]),
            onnx.helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["y"]),
        ],
        "g",
        [x],
        [y],
        params,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    plain = bnfold.fold(model, verify=False)
    assert [s.code for s in plain.report.skipped] == ["unsupported_producer"]
    result = bnfold.fold(model, bn_to_affine=True)
    assert [p.pattern for p in result.report.folded] == ["bn_to_affine"]
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Mul", "Add"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), opts).run(None, feed)[0]
    got = ort.InferenceSession(result.model.SerializeToString(), opts).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("count", [2, 3])
def test_conv_then_several_bns_is_rounded_once(seed: int, count: int) -> None:
    """Conv -> BN -> BN (-> BN): the BNs fold in one step, so every folded weight and bias is
    within half an ulp of the float64 value computed here (one rounding); folding them one after
    the other would round the weights once per BN."""
    model, feeds = conv_chain(ops=[("bn", None)] * count, cout=16, seed=seed)
    assert_pattern(model, feeds, ["bn_after"] + ["bn_after_chain"] * (count - 1), gone=["BatchNormalization"])
    folded = copy.deepcopy(model)
    fold_model(folded)
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    w, b = values["W"], values["Bc"]
    for i in range(count):
        g, beta, mean, var = (values[f"bn{i}_{k}"] for k in ("scale", "B", "mean", "var"))
        node = next(n for n in model.graph.node if n.name == f"bn{i}")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        s = g / np.sqrt(var + eps)
        w = w * s.reshape(-1, 1, 1, 1)
        b = b * s + (beta - s * mean)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    got = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in folded.graph.initializer}
    for exact, name in ((w, conv.input[1]), (b, conv.input[2])):
        ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
        assert np.all(np.abs(got[name] - exact) <= 0.5 * ulp * (1 + 1e-6)), name
