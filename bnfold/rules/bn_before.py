"""``bn_before``: a BN whose only consumer is an unpadded Conv (any group; input 0), or a
``Flatten(axis=1)`` whose only consumer is a Gemm (``transA = 0``; the spatial size ``HW`` of each
channel is ``K / C``, which any valid model fixes). Tried only when the BN cannot fold into its
producer for a reason about where it sits. A padded Conv is kept (``padding``): padded zeros would
not get the BN's shift."""

from __future__ import annotations

from ..errors import FoldError
from ..folding import BNAffine, fold_conv_input, fold_gemm_input
from ..report import Pattern, Reason
from .bn_after import layer_tensors
from .common import BN, bias_of, constant
from .matmul import gemm_attributes
from .plan import FoldBefore, LayerEdit, Skip
from .view import GraphView, NodeRef


def _into_conv(view: GraphView, bn: NodeRef, conv: NodeRef, affine: BNAffine) -> FoldBefore:
    auto_pad = view.attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    pads = view.attr(conv, "pads", None)
    if auto_pad not in ("NOTSET", "VALID") or (auto_pad == "NOTSET" and pads and any(pads)):  # type: ignore[arg-type]
        raise FoldError(
            Reason.PADDING,
            f"the Conv after the BN pads its input (auto_pad={auto_pad}, pads={list(pads or [])}): "  # type: ignore[call-overload]
            "the padded zeros would not get the BN's shift",
        )
    if len(conv.inputs) < 2 or not conv.inputs[1]:
        raise FoldError(Reason.MALFORMED, "Conv has no weight input")
    weight = constant(view, conv.inputs[1], Reason.WEIGHT_NOT_CONSTANT, "weight")
    bias_name = conv.inputs[2] if len(conv.inputs) > 2 else ""
    bias = bias_of(view, bias_name, weight)
    group = view.attr_int(conv, "group", 1)
    new_w, new_b = fold_conv_input(weight, bias, affine, group)
    tensors = layer_tensors(conv, new_w, new_b, conv.inputs[1], bias_name if bias is not None else None)
    return FoldBefore(bn, conv, conv, LayerEdit(Pattern.BN_BEFORE, tensors))


def _into_gemm(view: GraphView, bn: NodeRef, flatten: NodeRef, gemm: NodeRef, affine: BNAffine) -> FoldBefore:
    if view.attr_int(flatten, "axis", 1) != 1:
        raise FoldError(
            Reason.CHANNEL_AXIS, "Flatten axis is not 1: the BN channels do not map onto Gemm features"
        )
    if view.attr_int(gemm, "transA", 0):
        raise FoldError(Reason.CHANNEL_AXIS, "Gemm transA=1: the BN channels do not map onto Gemm features")
    if len(gemm.inputs) < 2 or not gemm.inputs[1]:
        raise FoldError(Reason.MALFORMED, "Gemm has no B input")
    weight = constant(view, gemm.inputs[1], Reason.WEIGHT_NOT_CONSTANT, "weight")
    c_name = gemm.inputs[2] if len(gemm.inputs) > 2 else ""
    c = bias_of(view, c_name, weight)
    trans_b = bool(view.attr_int(gemm, "transB", 0))
    alpha = view.attr_float(gemm, "alpha", 1.0)
    beta = view.attr_float(gemm, "beta", 1.0)
    cv = c if c is not None and beta != 0.0 else None
    new_w, new_c = fold_gemm_input(weight, cv, affine, trans_b, alpha, beta)
    tensors = layer_tensors(gemm, new_w, new_c, gemm.inputs[1], c_name if c is not None else None)
    layer = LayerEdit(Pattern.BN_BEFORE, tensors, attributes=gemm_attributes(view, gemm))
    return FoldBefore(bn, flatten, gemm, layer)


def _forward(view: GraphView, bn: NodeRef, affine: BNAffine) -> FoldBefore | None:
    y = bn.outputs[0]
    cons = view.consumer(y)
    if cons is None or not cons.standard or not cons.inputs or cons.inputs[0] != y:
        return None
    if cons.op == "Conv":
        return _into_conv(view, bn, cons, affine)
    if cons.op == "Flatten" and len(cons.outputs) == 1:
        gemm = view.consumer(cons.outputs[0])
        if gemm is None or gemm.op != "Gemm" or not gemm.standard or gemm.inputs[0] != cons.outputs[0]:
            return None
        return _into_gemm(view, bn, cons, gemm, affine)
    return None


def plan(view: GraphView, bn: BN) -> FoldBefore | Skip | None:
    """The BN into its only consumer; None when that is not a Conv or a Flatten -> Gemm."""
    try:
        return _forward(view, bn.node, bn.affine)
    except FoldError as e:
        return Skip(e.code, e.message)
