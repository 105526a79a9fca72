"""``matmul_reshaped``: LeViT's ``bn(linear(x).flatten(0, 1))``: ``MatMul(A, W)`` with ``A`` of any
rank >= 2, then ``Flatten(axis = rank - 1)`` or ``Reshape`` to ``[M, C]`` (``C`` = the MatMul's
features), then a BN over ``C``. The BN's channels are the MatMul's features, so its scale goes into
the columns of ``W``; there is no bias to take the shift, so the BN becomes ``Add(shift)`` on the
reshaped value (both rounded once into ``W``'s dtype). Kept: a Flatten or Reshape that mixes tokens
into the features (``channel_axis``), a rank that cannot be proven (``unknown_rank``)."""

from __future__ import annotations

from ..errors import FoldError
from ..folding import BNAffine, fold_gemm
from ..report import Pattern, Reason
from .bn_after import fold_layer
from .common import BN, check_single_use, constant
from .plan import FoldBranches, FoldScale, LayerEdit, Skip, TensorEdit
from .view import GraphView, NodeRef, NotConstant


def _check_reshape(view: GraphView, reshape: NodeRef, rank: int, features: int) -> None:
    """FoldError unless ``reshape`` maps a rank-``rank`` value with ``features`` last to
    ``[M, features]``."""
    if reshape.op == "Flatten":
        axis = view.attr_int(reshape, "axis", 1)
        if axis < 0:
            axis += rank
        if axis != rank - 1:
            raise FoldError(
                Reason.CHANNEL_AXIS,
                f"Flatten '{reshape.label}' (axis {axis}) of a rank-{rank} MatMul output mixes tokens "
                "into the BN's channels",
            )
        return
    if len(reshape.inputs) < 2 or not reshape.inputs[1]:
        raise FoldError(Reason.MALFORMED, f"Reshape '{reshape.label}' has no shape")
    try:
        shape = [int(v) for v in view.constant(reshape.inputs[1]).reshape(-1)]
    except NotConstant:
        # the dynamo exporter's flatten(0, 1) with a dynamic batch: Concat([B * N], [C])
        if _ends_in(view, reshape.inputs[1], features) and view.rank(reshape.outputs[0]) == 2:
            return
        raise FoldError(
            Reason.CHANNEL_AXIS,
            f"Reshape '{reshape.label}' has a computed shape not provably [M, {features}]",
        ) from None
    if len(shape) != 2 or shape[1] != features:
        raise FoldError(
            Reason.CHANNEL_AXIS,
            f"Reshape '{reshape.label}' to {shape}: the BN's channels are not the MatMul's {features} features",
        )


def _ends_in(view: GraphView, shape: str, features: int) -> bool:
    """The computed shape ``shape`` is a Concat whose last part is a constant ending in
    ``features``: its last entry is ``features`` (a row-major reshape of ``[..., C]`` to ``[M, C]``
    keeps every element's feature index)."""
    concat = view.producer(shape)
    if concat is None or not concat.standard or concat.op != "Concat" or not concat.inputs:
        return False
    if view.attr_int(concat, "axis", 0) not in (0, -1) or not concat.inputs[-1]:
        return False
    try:
        last = view.constant(concat.inputs[-1]).reshape(-1)
    except NotConstant:
        return False
    return last.size > 0 and int(last[-1]) == features


def _fold(view: GraphView, bn: BN, reshape: NodeRef, matmul: NodeRef) -> FoldScale:
    if len(matmul.inputs) != 2 or not all(matmul.inputs) or len(matmul.outputs) != 1:
        raise FoldError(Reason.MALFORMED, "MatMul must have two inputs and one output")
    rank = view.rank(matmul.inputs[0])
    if rank is None:
        raise FoldError(Reason.UNKNOWN_RANK, f"the rank of the MatMul input '{matmul.inputs[0]}' is unknown")
    w = constant(view, matmul.inputs[1], Reason.WEIGHT_NOT_CONSTANT, "weight")
    if w.ndim != 2 or rank < 2:
        raise FoldError(Reason.WEIGHT_SHAPE, f"MatMul of ranks {rank} and {w.ndim}: not a Linear")
    _check_reshape(view, reshape, rank, w.shape[1])
    m = matmul.outputs[0]
    if view.is_graph_output(m):
        raise FoldError(Reason.GRAPH_OUTPUT, f"'{m}' is also a graph output")
    check_single_use(view, m)
    new_w, shift = fold_gemm(w, None, BNAffine(bn.affine.scale, bn.affine.shift), False, 1.0)
    weight = TensorEdit(matmul, 1, new_w, matmul.inputs[1], f"{matmul.inputs[1]}_folded")
    return FoldScale(bn.node, matmul, LayerEdit(Pattern.MATMUL_RESHAPED, (weight,)), shift)


def _fold_linear(view: GraphView, bn: BN, reshape: NodeRef, linear: NodeRef, rank: int) -> FoldBranches:
    """A torch ``nn.Linear`` on tokens (a Gemm whose input has rank >= 3, which an ONNX Gemm
    cannot have): the whole BN into its weight and bias, the Flatten/Reshape stays."""
    m = linear.outputs[0]
    if view.is_graph_output(m):
        raise FoldError(Reason.GRAPH_OUTPUT, f"'{m}' is also a graph output")
    check_single_use(view, m)
    edit = fold_layer(view, linear, lambda c, r: bn.affine)
    w = constant(view, linear.inputs[1], Reason.WEIGHT_NOT_CONSTANT, "weight")
    features = w.shape[0] if view.attr_int(linear, "transB", 0) else w.shape[1]
    _check_reshape(view, reshape, rank, features)
    edit = LayerEdit(Pattern.MATMUL_RESHAPED, edit.tensors, edit.retype, edit.attributes)
    return FoldBranches(bn.node, reshape, (edit,), (linear,), Pattern.MATMUL_RESHAPED, (bn.node,))


def plan(view: GraphView, bn: BN) -> FoldScale | FoldBranches | Skip | None:
    """The BN's scale into the MatMul before a Flatten/Reshape, its shift as an Add (a torch
    Linear on tokens takes both); None when it does not follow such a pair."""
    reshape = view.producer(bn.node.inputs[0])
    if reshape is None or not reshape.standard or reshape.op not in ("Flatten", "Reshape") or view.opset < 7:
        return None
    layer = view.producer(reshape.inputs[0]) if reshape.inputs else None
    if layer is None or not layer.standard or layer.op not in ("MatMul", "Gemm"):
        return None
    try:
        if layer.op == "MatMul":
            return _fold(view, bn, reshape, layer)
        rank = view.rank(layer.inputs[0]) if layer.inputs else None
        if rank is None or rank < 3:
            return None  # an ONNX Gemm (2-D): bn_after's and layout's
        return _fold_linear(view, bn, reshape, layer, rank)
    except FoldError as e:
        return Skip(e.code, e.message)
