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
