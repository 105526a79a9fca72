"""``bn_before_linear``: a BN on a 2-D input whose only consumer is a Gemm (``transA = 0``) or a
MatMul with a constant ``[C, N]`` weight, or a BN whose only consumer is ``Flatten(axis=1)`` read
only by a MatMul: ``(s * x + t) @ W = x @ (diag(s) W) + t @ W``, so the scale goes into the weight's
rows and the shift through the weight into the bias (a MatMul becomes a Gemm). Like
:mod:`.bn_before` (which takes BN -> Conv and BN -> Flatten -> Gemm), tried only when the BN cannot
fold into its producer for a reason about where it sits."""

from __future__ import annotations

from ..errors import FoldError
from ..folding import BNAffine, fold_gemm_input
from ..report import Pattern, Reason
from .bn_after import layer_tensors
from .common import BN, bias_of, constant
from .matmul import gemm_attributes
from .plan import FoldBefore, LayerEdit, Skip
from .view import GraphView, NodeRef


def _into(
    view: GraphView, bn: NodeRef, bypass: NodeRef, layer: NodeRef, affine: BNAffine, direct: bool
) -> FoldBefore:
    if len(layer.inputs) < 2 or not layer.inputs[1]:
        raise FoldError(Reason.MALFORMED, f"{layer.op} has no weight input")
    weight = constant(view, layer.inputs[1], Reason.WEIGHT_NOT_CONSTANT, "weight")
    if weight.ndim != 2:
        raise FoldError(Reason.WEIGHT_SHAPE, f"{layer.op} weight must be 2-D, got rank {weight.ndim}")
    if layer.op == "Gemm":
        if view.attr_int(layer, "transA", 0):
            raise FoldError(Reason.CHANNEL_AXIS, "Gemm transA=1: the BN channels are not the Gemm's features")
        c_name = layer.inputs[2] if len(layer.inputs) > 2 else ""
        trans_b = bool(view.attr_int(layer, "transB", 0))
        alpha, beta = view.attr_float(layer, "alpha", 1.0), view.attr_float(layer, "beta", 1.0)
    else:
        if len(layer.inputs) != 2:
            raise FoldError(Reason.MALFORMED, "MatMul must have two inputs")
        c_name, trans_b, alpha, beta = "", False, 1.0, 1.0
    c = bias_of(view, c_name, weight)
    k_dim = weight.shape[1] if trans_b else weight.shape[0]
    if direct and k_dim != affine.scale.shape[0]:
        raise FoldError(
            Reason.CHANNEL_MISMATCH, f"{layer.op} has {k_dim} input features, the BN {affine.scale.shape[0]}"
        )
    new_w, new_c = fold_gemm_input(
        weight, c if c is not None and beta != 0.0 else None, affine, trans_b, alpha, beta
    )
    tensors = layer_tensors(layer, new_w, new_c, layer.inputs[1], c_name if c is not None else None)
    edit = LayerEdit(
        Pattern.BN_BEFORE_LINEAR,
        tensors,
        retype=(layer, "Gemm") if layer.op == "MatMul" else None,
        attributes=gemm_attributes(view, layer),
    )
    return FoldBefore(bn, bypass, layer, edit)


def _reads_first(node: NodeRef | None, value: str, ops: tuple[str, ...]) -> bool:
    return (
        node is not None
        and node.standard
        and node.op in ops
        and bool(node.inputs)
        and node.inputs[0] == value
    )


def _forward(view: GraphView, bn: NodeRef, affine: BNAffine) -> FoldBefore | None:
    y = bn.outputs[0]
    cons = view.consumer(y)
    if _reads_first(cons, y, ("Gemm", "MatMul")):
        assert cons is not None
        if cons.op == "MatMul" and view.rank(bn.inputs[0]) != 2:
            return None  # a MatMul over more axes: the BN channels are not its features
        return _into(view, bn, cons, cons, affine, direct=True)
    if _reads_first(cons, y, ("Flatten",)) and cons is not None and len(cons.outputs) == 1:
        layer = view.consumer(cons.outputs[0])
        if not _reads_first(layer, cons.outputs[0], ("MatMul",)):
            return None  # Flatten -> Gemm is bn_before's
        assert layer is not None
        if view.attr_int(cons, "axis", 1) != 1:
            raise FoldError(
                Reason.CHANNEL_AXIS, "Flatten axis is not 1: the BN channels do not map onto features"
            )
        return _into(view, bn, cons, layer, affine, direct=False)
    return None


def plan(view: GraphView, bn: BN) -> FoldBefore | Skip | None:
    """The BN into the Gemm / MatMul after it; None when it is not followed by one."""
    try:
        return _forward(view, bn.node, bn.affine)
    except FoldError as e:
        return Skip(e.code, e.message)
