"""``sum_of_layers``: ``Add(layer_1, layer_2)`` -> BN, each layer's output read only by the Add:
``s * (a + b) + t = (s * a + t) + s * b``, so the scale goes into both weights and the shift into
the first layer's bias (each rounded once); the Add takes the BN's output name. Both outputs must
have the BN's channels on axis 1 and the same rank. A summand that is no layer (a residual, an
identity path) cannot absorb the scale: the BN stays (``identity_summand``).

Not a candidate (None; the BN's refusal stays ``unsupported_producer``): an Add with a constant
operand (:mod:`.chains`), of one value with itself, of two non-layers, or whose output has other
readers."""

from __future__ import annotations

import numpy as np

from ..errors import FoldError
from ..folding import BNAffine
from ..report import Pattern, Reason
from .bn_after import fold_layer
from .chains import with_following
from .common import BN, check_single_use, is_layer, producer_of
from .plan import FoldBranches, LayerEdit, Skip
from .view import GraphView, NodeRef, NotConstant


def _is_constant(view: GraphView, value: str) -> bool:
    try:
        view.constant(value)
    except NotConstant:
        return False
    return True


def _candidate(view: GraphView, bn: NodeRef) -> NodeRef | None:
    add = view.producer(bn.inputs[0])
    if add is None or not add.standard or add.op != "Add" or view.opset < 7:
        return None
    if len(add.inputs) != 2 or len(add.outputs) != 1 or add.inputs[0] == add.inputs[1] or not all(add.inputs):
        return None
    if any(_is_constant(view, v) for v in add.inputs):
        return None
    if not any(is_layer(view.producer(v)) for v in add.inputs):
        return None
    try:
        check_single_use(view, bn.inputs[0], released=bn.inputs[1:5])
    except FoldError:
        return None
    return add


def _fold(view: GraphView, bn: NodeRef, add: NodeRef, affine: BNAffine, after: list[NodeRef]) -> FoldBranches:
    for v in add.inputs:
        node = view.producer(v)
        if not is_layer(node):
            what = f"{node.op} '{node.label}'" if node is not None else "a graph input"
            raise FoldError(
                Reason.IDENTITY_SUMMAND,
                f"Add '{add.label}' sums a layer with '{v}' (from {what}): that path cannot absorb the "
                "BN's scale",
            )
    ranks: list[int] = []

    def scale_only(channels: int, out_rank: int) -> BNAffine:
        ranks.append(out_rank)
        return BNAffine(affine.scale, np.zeros_like(affine.shift))

    def whole(channels: int, out_rank: int) -> BNAffine:
        ranks.append(out_rank)
        return affine

    edits: list[LayerEdit] = []
    targets: list[NodeRef] = []
    for i, (v, part) in enumerate(zip(add.inputs, (whole, scale_only))):
        try:
            target = producer_of(view, v)
            edits.append(fold_layer(view, target, part))
        except FoldError as e:
            raise FoldError(e.code, f"Add '{add.label}' input {i} ('{v}'): {e.message}") from None
        targets.append(target)
    if ranks[0] != ranks[1]:
        raise FoldError(
            Reason.BROADCAST, f"Add '{add.label}' sums outputs of ranks {ranks[0]} and {ranks[1]}"
        )
    return FoldBranches(
        bn, add, tuple(edits), tuple(targets), Pattern.SUM_OF_LAYERS, (bn, *after), tuple(after)
    )


def plan(view: GraphView, bn: BN) -> FoldBranches | Skip | None:
    """The BN into both layers its Add sums; None when it is no such candidate."""
    add = _candidate(view, bn.node)
    if add is None:
        return None
    return with_following(view, bn, lambda affine, after: _fold(view, bn.node, add, affine, after))
