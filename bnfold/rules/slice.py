"""``slice``: ``layer -> Slice(axis = channels) -> BN`` on a part, the layer's output read only by
Slices along the channels: the BN folds into that part's channel range of the layer (the other
channels get scale 1 and shift 0, which round to themselves) and the Slice takes the BN's output
name. Each part's BN folds on its own, so each range is rounded once.

A Slice reads its starts, ends, axes and steps from inputs (Slice-10 and later) or attributes
(Slice-1); negative and out-of-range indices are resolved against the layer's channel count as
ONNX does. Kept: a Slice of the layer output along another axis (``channel_axis``), with a step
other than 1 on the channels (``slice_step``) or computed bounds (``computed_slice``), another
Slice reading channels of the BN's part (``overlapping_slices``; other Slices may overlap each
other: their channels keep their values), a reader of the layer output that is not a Slice or a
metadata reader, or a second reader of the part (``multiple_consumers``, ``graph_output``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FoldError
from ..folding import BNAffine
from ..report import Pattern, Reason
from .bn_after import fold_layer
from .chains import with_following
from .common import BN, check_single_use, is_layer, layer_rank
from .plan import FoldBranches, Skip
from .view import GraphView, NodeRef, NotConstant

# an end at least this large reads to the end of its axis (exporters write INT32_MAX or INT64_MAX)
TO_THE_END = 2**31 - 1


@dataclass(frozen=True)
class Bounds:
    """A Slice of the layer output along the channels: ``[start, end)`` as written, step 1."""

    node: NodeRef
    start: int
    end: int

    def resolve(self, channels: int) -> tuple[int, int]:
        """The channel range ``[start, end)`` it reads from ``channels`` channels (ONNX clamping)."""

        def clamp(i: int) -> int:
            return min(max(i + channels if i < 0 else i, 0), channels)

        start, end = clamp(self.start), clamp(self.end)
        return start, max(start, end)


def _ints(view: GraphView, node: NodeRef, index: int, what: str) -> list[int] | None:
    """The constant integer list at input ``index`` (None when the input is absent)."""
    if len(node.inputs) <= index or not node.inputs[index]:
        return None
    try:
        return [int(v) for v in view.constant(node.inputs[index]).reshape(-1)]
    except NotConstant:
        raise FoldError(Reason.COMPUTED_SLICE, f"Slice '{node.label}' has computed {what}") from None


def _bounds(view: GraphView, node: NodeRef, rank: int | None) -> Bounds:
    """The channel bounds of the Slice ``node`` of a rank-``rank`` value; FoldError when it slices
    another axis, steps, or has bounds that are not constant."""
    if view.opset >= 10:
        starts, ends = _ints(view, node, 1, "starts"), _ints(view, node, 2, "ends")
        axes, steps = _ints(view, node, 3, "axes"), _ints(view, node, 4, "steps")
        if starts is None or ends is None:
            raise FoldError(Reason.MALFORMED, f"Slice '{node.label}' has no starts or ends")
    else:
        raw = [view.attr(node, k, None) for k in ("starts", "ends", "axes")]
        if raw[0] is None or raw[1] is None:
            raise FoldError(Reason.MALFORMED, f"Slice '{node.label}' has no starts or ends")
        starts, ends, axes = ([int(v) for v in r] if r is not None else None for r in raw)  # type: ignore[attr-defined]
        steps = None
    assert starts is not None and ends is not None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise FoldError(
            Reason.MALFORMED, f"Slice '{node.label}' has starts, ends, axes, steps of different lengths"
        )
    channel: Bounds | None = None
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if axis < 0 and rank is None:
            raise FoldError(Reason.UNKNOWN_RANK, f"Slice '{node.label}' axis {axis} of an unknown rank")
        axis = axis + rank if axis < 0 and rank is not None else axis
        if axis == 1:
            if step != 1:
                raise FoldError(Reason.SLICE_STEP, f"Slice '{node.label}' steps {step} along the channels")
            channel = Bounds(node, start, end)
        elif not (start == 0 and end >= TO_THE_END and step == 1):
            raise FoldError(
                Reason.CHANNEL_AXIS, f"Slice '{node.label}' slices axis {axis}, not only the channels"
            )
    return channel or Bounds(node, 0, TO_THE_END)


def _siblings(view: GraphView, layer_out: str, part: NodeRef) -> list[NodeRef]:
    """The Slices reading ``layer_out`` besides ``part``; FoldError for any other reader of its
    values (metadata readers aside)."""
    if view.is_graph_output(layer_out):
        raise FoldError(Reason.GRAPH_OUTPUT, f"'{layer_out}' is also a graph output")
    metadata = {ref.key for ref, _ in view.metadata_reads(layer_out)}
    readers = [r for r in view.readers(layer_out) if r.key not in metadata]
    others = [r for r in readers if r.op != "Slice" or not r.standard or r.inputs[0] != layer_out]
    if others or len(readers) + len(view.metadata_reads(layer_out)) != view.uses(layer_out):
        what = f"{others[0].op} '{others[0].label}'" if others else "a reader that is not a Slice"
        raise FoldError(Reason.MULTIPLE_CONSUMERS, f"'{layer_out}' is also read by {what}")
    return [r for r in readers if r.key != part.key]


def _part(
    view: GraphView, bn: NodeRef, part: NodeRef, affine: BNAffine, after: list[NodeRef]
) -> FoldBranches:
    x = part.outputs[0]
    layer_out = part.inputs[0]
    layer = view.producer(layer_out)
    assert layer is not None
    if len(layer.outputs) != 1:
        raise FoldError(Reason.MALFORMED, f"{layer.op} must have exactly one output")
    if view.is_graph_output(x):
        raise FoldError(Reason.GRAPH_OUTPUT, f"'{x}' is also a graph output")
    check_single_use(view, x, released=bn.inputs[1:5])
    siblings = _siblings(view, layer_out, part)
    rank = layer_rank(view, layer)
    mine = _bounds(view, part, rank)
    others = [_bounds(view, s, rank) for s in siblings]
    check_layer = getattr(view, "check_layer", None)  # a front end's limit (see common.producer_of)
    if check_layer is not None:
        check_layer(layer)
    width = affine.scale.shape[0]

    def make(channels: int, out_rank: int) -> BNAffine:
        start, end = mine.resolve(channels)
        if end - start != width:
            raise FoldError(
                Reason.CHANNEL_MISMATCH,
                f"Slice '{part.label}' reads channels [{start}, {end}) of {channels}, not the BN's {width}",
            )
        for other in others:
            lo, hi = other.resolve(channels)
            if lo < end and start < hi:
                raise FoldError(
                    Reason.OVERLAPPING_SLICES,
                    f"Slice '{other.node.label}' reads channels [{lo}, {hi}), which overlap "
                    f"[{start}, {end}) of '{part.label}'",
                )
        scale, shift = np.ones(channels), np.zeros(channels)
        scale[start:end] = affine.scale
        shift[start:end] = affine.shift
        return BNAffine(scale, shift)

    edit = fold_layer(view, layer, make)
    return FoldBranches(bn, part, (edit,), (layer,), Pattern.SLICE, (bn, *after), tuple(after))


def plan(view: GraphView, bn: BN) -> FoldBranches | Skip | None:
    """The BN into its channel range of the layer before the Slice; None when it follows none."""
    part = view.producer(bn.node.inputs[0])
    if part is None or not part.standard or part.op != "Slice" or not part.inputs or not part.outputs:
        return None
    if not is_layer(view.producer(part.inputs[0])):
        return None  # not this pattern: what bn_after said stands
    return with_following(view, bn, lambda affine, after: _part(view, bn.node, part, affine, after))
