"""``split``: ``layer -> Split(axis = channels) -> BN`` on a part: the BN folds into that part's
channel range of the layer (the other channels get scale 1 and shift 0, which round to
themselves), and the Split's output takes the BN's name. Each part's BN folds on its own, so each
range is rounded once. The layer's output must be read only by the Split; the split sizes must be
constant (or an even split)."""

from __future__ import annotations

import numpy as np

from ..errors import FoldError
from ..folding import BNAffine
from ..report import Pattern, Reason
from .bn_after import fold_layer
from .common import BN, check_single_use, producer_of
from .plan import FoldBranches, Skip
from .view import GraphView, NodeRef, NotConstant


def _sizes(view: GraphView, split: NodeRef) -> list[int] | None:
    """The split sizes when given (input from Split-13, else the attribute); None: an even split."""
    if view.opset >= 13 and len(split.inputs) > 1 and split.inputs[1]:
        try:
            return [int(v) for v in view.constant(split.inputs[1]).reshape(-1)]
        except NotConstant:
            raise FoldError(
                Reason.UNSUPPORTED_PRODUCER, f"Split '{split.label}' has computed sizes"
            ) from None
    value = view.attr(split, "split", None)
    return None if value is None else [int(v) for v in value]  # type: ignore[attr-defined]


def _part(view: GraphView, bn: NodeRef, split: NodeRef, affine: BNAffine) -> FoldBranches:
    x = bn.inputs[0]
    index = split.outputs.index(x)
    axis = view.attr_int(split, "axis", 0)
    if axis < 0:
        rank = view.rank(split.inputs[0])
        if rank is None:
            raise FoldError(Reason.UNKNOWN_RANK, f"Split '{split.label}' axis {axis} of an unknown rank")
        axis += rank
    if axis != 1:
        raise FoldError(Reason.CHANNEL_AXIS, f"Split '{split.label}' splits axis {axis}, not the channels")
    if view.is_graph_output(x):
        raise FoldError(Reason.GRAPH_OUTPUT, f"'{x}' is also a graph output")
    check_single_use(view, x, released=bn.inputs[1:5])
    sizes = _sizes(view, split)
    layer = producer_of(view, split.inputs[0])
    part = affine.scale.shape[0]

    def make(channels: int, out_rank: int) -> BNAffine:
        parts = sizes or ([channels // len(split.outputs)] * len(split.outputs))
        if sum(parts) != channels or len(parts) != len(split.outputs) or parts[index] != part:
            raise FoldError(
                Reason.CHANNEL_MISMATCH,
                f"Split '{split.label}' parts {parts} of {channels} channels: part {index} is not the BN's {part}",
            )
        start = sum(parts[:index])
        scale, shift = np.ones(channels), np.zeros(channels)
        scale[start : start + part] = affine.scale
        shift[start : start + part] = affine.shift
        return BNAffine(scale, shift)

    edit = fold_layer(view, layer, make)
    return FoldBranches(bn, split, (edit,), (layer,), Pattern.SPLIT, (bn,), output=index)


def plan(view: GraphView, bn: BN) -> FoldBranches | Skip | None:
    """The BN into its channel range of the layer before the Split; None when it follows none."""
    split = view.producer(bn.node.inputs[0])
    if split is None or not split.standard or split.op != "Split" or not split.inputs:
        return None
    try:
        return _part(view, bn.node, split, bn.affine)
    except FoldError as e:
        return Skip(e.code, e.message)
