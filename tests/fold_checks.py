"""Checks shared by the end-to-end tests of the ONNX pass (tests/rules, tests/onnx).

Every positive check verifies the fold count, that the BN is gone, ``onnx.checker`` (full check)
and the numerics of original vs folded computed here: onnxruntime with every optimization off,
or (for what onnxruntime's CPU provider cannot run: bfloat16, float64 Conv, BN opset 1/6) a
float64 torch evaluation of the original Conv+BN against the folded layer, within the bound
that rounding the folded tensors once allows. bnfold's own verification is never used.

Every negative check verifies the reason code, that the BN and its layer are untouched and that
no exception escapes.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx_builders import (
    BF16,
    F16,
    F32,
    F64,
    Built,
    GraphBuilder,
    add_bn,
    assert_f64_equivalent,
    assert_ort_equivalent,
    bn_stats,
    check_model,
    count_ops,
)

import bnfold
from bnfold.onnx.driver import fold_model


def fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bnfold.FoldReport]:
    out = copy.deepcopy(model)
    report = fold_model(out)
    return out, report


def ort_runnable(b: Built) -> bool:
    opset = {o.domain: o.version for o in b.model.opset_import}.get("", 1)
    if b.dtype == BF16 or opset < 7:
        return False
    if b.dtype == F64:
        return all(n.op_type not in ("Conv", "ConvTranspose") for n in b.model.graph.node)
    return True


def assert_folds(b: Built, n: int = 1, *, f64: bool | None = None) -> onnx.ModelProto:
    """Fold ``b``; check count, BN gone, checker and numerics. Returns the folded model."""
    check_model(b.model)
    folded, report = fold(b.model)
    assert len(report.folded) == n, report.skipped
    assert not report.skipped, report.skipped
    assert count_ops(folded, "BatchNormalization") == count_ops(b.model, "BatchNormalization") - n
    check_model(folded)
    if ort_runnable(b):
        assert_ort_equivalent(b.model, folded, b.feeds, b.dtype)
    if f64 or (f64 is None and not ort_runnable(b)) or b.dtype == F16:
        assert_f64_equivalent(b.model, folded, b.feeds, b.dtype)
    # tensor dtypes never change
    before = {t.name: t.data_type for t in b.model.graph.initializer}
    for t in folded.graph.initializer:
        if t.name in before:
            assert t.data_type == before[t.name], t.name
    return folded


def _shared_weight_model(*, ir_version: int | None = None, opset: int = 17, second_bn: bool = True) -> Built:
    """Two convs on one weight and bias; conv1 -> BN1; conv2 -> BN2 (different stats) or nothing."""
    rng = np.random.default_rng(7)
    gb = GraphBuilder()
    gb.input("X", F32, [1, 3, 5, 5])
    gb.const("W", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32))
    gb.const("Bc", rng.normal(0, 1, 4).astype(np.float32))
    gb.node("Conv", ["X", "W", "Bc"], ["c1"], name="conv1", kernel_shape=[3, 3])
    gb.node("Conv", ["X", "W", "Bc"], ["c2"], name="conv2", kernel_shape=[3, 3])
    add_bn(gb, "c1", "Y1", bn_stats(rng, 4), dtype=F32, bn_opset=min(opset, 15), prefix="bn1")
    if second_bn:
        add_bn(gb, "c2", "Y2", bn_stats(rng, 4), dtype=F32, bn_opset=min(opset, 15), prefix="bn2")
    else:
        gb.node("Identity", ["c2"], ["Y2"], name="id2")
    gb.output("Y1", F32, [1, 4, 3, 3])
    gb.output("Y2", F32, [1, 4, 3, 3])
    feeds = {"X": rng.normal(0, 1, (1, 3, 5, 5)).astype(np.float32)}
    return Built(gb.model(opset, ir_version), feeds, F32)
