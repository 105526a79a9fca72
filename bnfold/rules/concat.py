"""``concat``: ``Concat(layer_1, ..., layer_n)`` along the channel axis -> BN. The BN's affine map is
split by channel ranges and each part folds into its layer (each rounded once; the BN's own
epsilon, as every part comes from its one map); the Concat takes the BN's output name. Every
input must be a foldable layer whose output only the Concat reads: otherwise the whole BN stays
(no partial rewrite), with the reason of the first input that stops it."""

from __future__ import annotations

from ..errors import FoldError
from ..folding import BNAffine
from ..report import Pattern, Reason
from .bn_after import fold_layer
from .chains import with_following
from .common import BN, check_single_use, producer_of
from .plan import FoldBranches, LayerEdit, Skip
from .view import GraphView, NodeRef


def _channel_axis(view: GraphView, concat: NodeRef) -> None:
    """FoldError unless ``concat`` joins along axis 1 (the BN's channels)."""
    if view.attr(concat, "axis", None) is None and view.opset >= 4:
        raise FoldError(Reason.MALFORMED, f"Concat '{concat.label}' has no axis")
    axis = view.attr_int(concat, "axis", 1)  # the default before Concat-4
    if axis < 0:
        rank = view.rank(concat.outputs[0])
        if rank is None:
            raise FoldError(Reason.UNKNOWN_RANK, f"Concat '{concat.label}' axis {axis} of an unknown rank")
        axis += rank
    if axis != 1:
        raise FoldError(
            Reason.CHANNEL_AXIS, f"Concat '{concat.label}' joins along axis {axis}, not the BN's channels"
        )


def _split(
    view: GraphView, bn: NodeRef, concat: NodeRef, affine: BNAffine, after: list[NodeRef]
) -> FoldBranches:
    if view.is_graph_output(bn.inputs[0]):
        raise FoldError(Reason.GRAPH_OUTPUT, f"'{bn.inputs[0]}' is also a graph output")
    check_single_use(view, bn.inputs[0], released=bn.inputs[1:5])
    _channel_axis(view, concat)
    total = affine.scale.shape[0]
    cursor = [0]

    def part(channels: int, out_rank: int) -> BNAffine:
        start = cursor[0]
        if start + channels > total:
            raise FoldError(
                Reason.CHANNEL_MISMATCH, f"the Concat inputs have more channels than the BN's {total}"
            )
        cursor[0] = start + channels
        return BNAffine(affine.scale[start : start + channels], affine.shift[start : start + channels])

    edits: list[LayerEdit] = []
    targets: list[NodeRef] = []
    for i, x in enumerate(concat.inputs):
        try:
            if not x:
                raise FoldError(Reason.MALFORMED, "an empty input")
            target = producer_of(view, x)
            edits.append(fold_layer(view, target, part))
        except FoldError as e:
            raise FoldError(e.code, f"Concat '{concat.label}' input {i} ('{x}'): {e.message}") from None
        targets.append(target)
    if cursor[0] != total:
        raise FoldError(
            Reason.CHANNEL_MISMATCH, f"the Concat inputs have {cursor[0]} channels, the BN {total}"
        )
    return FoldBranches(bn, concat, tuple(edits), tuple(targets), Pattern.CONCAT, (bn, *after), tuple(after))


def plan(view: GraphView, bn: BN) -> FoldBranches | Skip | None:
    """The BN split into the layers its Concat joins; None when it does not follow a Concat."""
    concat = view.producer(bn.node.inputs[0])
    if concat is None or not concat.standard or concat.op != "Concat" or len(concat.outputs) != 1:
        return None
    return with_following(view, bn, lambda affine, after: _split(view, bn.node, concat, affine, after))
