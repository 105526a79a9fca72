"""``bn_after``: Conv / ConvTranspose / Gemm -> BN; the BN goes into the layer's weight and bias,
and the layer takes the BN's output name (no consumer is rewired, graph output names are kept).

:func:`fold_layer` is the layer side of every fold after a layer (also used by the chains, the
MatMul and the decomposed-BN rules); :func:`plan` is the rule for a BN after its producer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import FoldError
from ..folding import (
    BNAffine,
    channel_vector,
    compose_add,
    fold_conv,
    fold_conv_transpose,
    fold_gemm,
)
from ..report import Pattern, Reason
from . import chains, dequantized_weight, matmul
from .common import BN, bias_of, constant
from .plan import FoldAfter, LayerEdit, Skip, TensorEdit
from .view import GraphView, NodeRef


def fold_layer(view: GraphView, target: NodeRef, make_affine: Callable[[int, int], BNAffine]) -> LayerEdit:
    """The folded constants of ``target`` for the per-channel map ``make_affine(C, output rank)``."""
    op = target.op
    if len(target.inputs) < 2 or not target.inputs[1]:
        raise FoldError(Reason.MALFORMED, f"{op} has no weight input")
    if op == "Conv":
        dq = view.producer(target.inputs[1])
        if dequantized_weight.is_dequantized(dq):
            assert dq is not None
            return dequantized_weight.fold_layer(view, target, dq, make_affine)
    weight_name = target.inputs[1]
    w = constant(view, weight_name, Reason.WEIGHT_NOT_CONSTANT, "weight")
    bias_name = target.inputs[2] if len(target.inputs) > 2 else ""
    if op == "MatMul":
        matmul.check_inputs(target)
    bias = bias_of(view, bias_name, w)
    if op in ("Gemm", "MatMul"):
        if op == "MatMul":
            matmul.check_rank(view, target)
            trans_b, beta = False, 1.0
        else:
            trans_b = bool(view.attr_int(target, "transB", 0))
            beta = view.attr_float(target, "beta", 1.0)
        if w.ndim != 2:
            raise FoldError(Reason.WEIGHT_SHAPE, f"{op} weight must be 2-D, got rank {w.ndim}")
        affine = make_affine(w.shape[0] if trans_b else w.shape[1], 2)
        c = bias
        if c is not None and beta == 0.0:
            c = None  # beta * C contributes nothing
        new_w, new_b = fold_gemm(w, c, affine, trans_b, beta)
    else:
        group = view.attr_int(target, "group", 1)
        if w.ndim < 3:
            raise FoldError(Reason.WEIGHT_SHAPE, f"{op} weight must have rank >= 3, got {w.ndim}")
        if group < 1:
            raise FoldError(Reason.INVALID_GROUP, f"group {group} is not positive")
        affine = make_affine(w.shape[0] if op == "Conv" else w.shape[1] * group, w.ndim)
        fold = fold_conv if op == "Conv" else fold_conv_transpose
        new_w, new_b = fold(w, bias, affine, group)
    # Bias first: releasing a computed bias may leave the weight with a single user, which then
    # lets the weight be updated in place under its own name.
    tensors = layer_tensors(target, new_w, new_b, weight_name, bias_name if bias is not None else None)
    if op in ("Gemm", "MatMul"):
        return LayerEdit(
            Pattern.MATMUL if op == "MatMul" else Pattern.BN_AFTER,
            tensors,
            retype=(target, "Gemm"),
            attributes=matmul.gemm_attributes(view, target),
        )
    return LayerEdit(Pattern.BN_AFTER, tensors)


def layer_tensors(
    layer: NodeRef, new_w: np.ndarray, new_b: np.ndarray, weight: str, bias: str | None
) -> tuple[TensorEdit, TensorEdit]:
    """The new bias (input 2) then the new weight (input 1) of ``layer``; ``bias``: the name of the
    bias replaced, None when the layer had none."""
    return (
        TensorEdit(layer, 2, new_b, bias, f"{layer.label}_bias_folded" if bias is None else f"{bias}_folded"),
        TensorEdit(layer, 1, new_w, weight, f"{weight}_folded"),
    )


def backward(
    view: GraphView,
    bn: NodeRef,
    affine: BNAffine,
    after: Sequence[NodeRef] = (),
    through: Sequence[NodeRef] = (),
) -> FoldAfter:
    """BN into the layer before it, possibly through one constant per-channel Add; ``after``: BNs
    that follow it, folded in the same step (``affine`` is then the map of them all); ``through``:
    pass-through ops between the layer (or its Add) and the BN, which go too."""
    x = through[0].inputs[0] if through else bn.inputs[0]
    target, add = chains.producer_chain(view, x, released=bn.inputs[1:5])
    if add is not None and target.op == "MatMul" and not matmul.per_feature(add[1]):
        return _matmul_add(view, bn, affine, target, add[0], add[1], after, through)
    if add is None:
        make_affine: Callable[[int, int], BNAffine] = lambda c, r: affine  # noqa: E731
    else:
        add_value = add[1]

        def make_affine(channels: int, out_rank: int) -> BNAffine:
            return compose_add(channel_vector(add_value, channels, out_rank, 1), affine)

    layer = fold_layer(view, target, make_affine)
    pattern = layer.pattern
    if through:
        pattern = Pattern.BN_AFTER_PASSTHROUGH
    elif pattern == Pattern.BN_AFTER and (add is not None or view.folded_into(target)):
        pattern = Pattern.BN_AFTER_CHAIN
    absorbed = ((add[0],) if add is not None else ()) + tuple(through) + (bn,) + tuple(after)
    return FoldAfter(bn, target, layer, pattern, absorbed, tuple(after))


def _matmul_add(
    view: GraphView,
    bn: NodeRef,
    affine: BNAffine,
    target: NodeRef,
    add: NodeRef,
    value: np.ndarray,
    after: Sequence[NodeRef],
    through: Sequence[NodeRef],
) -> FoldAfter:
    """``MatMul -> Add(C) -> BN`` with ``C`` of rank 2 and more than one row: the Add stays with
    ``s * C + t`` and takes the BN's output name (:func:`matmul.fold_add`)."""
    matmul.check_inputs(target)
    matmul.check_rank(view, target)
    if value.ndim > 2:
        raise FoldError(
            Reason.BROADCAST, f"the Add constant of shape {list(value.shape)} raises the MatMul output's rank"
        )
    layer = matmul.fold_add(view, target, add, value, affine, Pattern.MATMUL_ADD)
    pattern = Pattern.BN_AFTER_PASSTHROUGH if through else Pattern.MATMUL_ADD
    return FoldAfter(bn, add, layer, pattern, (*through, bn, *after), tuple(after))


def plan(view: GraphView, bn: BN) -> FoldAfter | Skip:
    """The BN (with the BNs right after it) into its producer; alone if those stop the fold."""
    return fold_after(view, bn)


def fold_after(view: GraphView, bn: BN, through: Sequence[NodeRef] = ()) -> FoldAfter | Skip:
    """:func:`plan`, through the pass-through ops ``through`` (see :mod:`.passthrough`)."""
    after, combined = chains.following_bns(view, bn.node, bn.affine, bn.version)
    try:
        return backward(view, bn.node, combined, after, through)
    except FoldError as back:
        refusal = back
    if after:  # what stops the fold may be the BNs after it (an overflow): try it alone
        try:
            return backward(view, bn.node, bn.affine, [], through)
        except FoldError as alone:
            refusal = alone
    return Skip(refusal.code, refusal.message)
