"""Checks shared by the tests of the folds beyond Conv -> BN (issue 6).

Every positive check verifies the fold count and pattern, the nodes that must be gone,
``onnx.checker`` (full check) and the numerics of original vs folded computed here with
onnxruntime and every optimization off (``ORT_DISABLE_ALL``); bnfold's own verification is never
used. Every negative check verifies the reason code and that the model is byte-identical.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx_builders import (
    F32,
    GraphBuilder,
    add_bn,
    assert_ort_equivalent,
    bn_stats,
    cast,
    check_model,
    count_ops,
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


def bn_affine64(model: onnx.ModelProto, prefix: str = "bn") -> tuple[np.ndarray, np.ndarray]:
    """The scale ``s`` and shift ``t`` of BN ``prefix`` computed here in float64 from the model's
    parameters and epsilon (the reference the folds are checked against)."""
    from onnx_builders import initializer

    g, beta, mean, var = (
        initializer(model, f"{prefix}_{k}").astype(np.float64) for k in ("scale", "B", "mean", "var")
    )
    node = next(n for n in model.graph.node if n.name == prefix)
    eps = next((float(a.f) for a in node.attribute if a.name == "epsilon"), 1e-5)
    s = g / np.sqrt(var + eps)
    return s, beta - s * mean


def assert_rounded_once(got: np.ndarray, exact: np.ndarray, what: str = "") -> None:
    """``got`` is the float64 ``exact`` rounded once into ``got``'s dtype: within half an ulp (plus
    a few float64 ulps for the evaluation of ``exact`` itself)."""
    assert got.shape == exact.shape, (what, got.shape, exact.shape)
    ulp = np.spacing(np.abs(exact).astype(got.dtype)).astype(np.float64)
    err = np.abs(got.astype(np.float64) - exact)
    bound = 0.5 * ulp * (1 + 1e-6) + 4 * np.spacing(np.abs(exact))
    assert np.all(err <= bound), (what, float(np.max(err / ulp)))
