"""``bn_after_spatial``: a BN folded into the layer before ops that act on each channel alone and
commute with a per-channel affine ``s * x + t``; the ops stay, the last one takes the BN's output
name. Exact:

* ``Resize`` / ``Upsample`` that keep the channel axis (scale 1 there): nearest picks values;
  linear and cubic weights sum to one per output. Not ``tf_crop_and_resize`` (an extrapolation
  value does not get the affine) nor ``tf_half_pixel_for_nn``.
* ``GlobalAveragePool``; ``ReduceMean`` over axes other than the channels; ``AveragePool`` unless it
  counts padded zeros (``count_include_pad = 1`` with padding or ``ceil_mode``: ``padding``).
* ``MaxPool`` / ``GlobalMaxPool`` when every scale is >= 0 (a negative one turns max into min:
  ``negative_scale``).
* ``Identity`` and inference ``Dropout`` on the way (they stay too).

Never through ``Pad`` (not an op here: the border would need the shift). The layer is a Conv,
ConvTranspose, Gemm or MatMul read only by the first op."""

from __future__ import annotations

import numpy as np

from ..errors import FoldError
from ..folding import BNAffine
from ..report import Pattern, Reason
from .bn_after import fold_layer
from .chains import with_following
from .common import BN, check_single_use, is_layer, producer_of
from .passthrough import check_dropout
from .plan import FoldBranches, Skip
from .view import GraphView, NodeRef, NotConstant

RESIZE_OPS = ("Resize", "Upsample")
MEAN_OPS = ("GlobalAveragePool", "ReduceMean", "AveragePool")
MAX_OPS = ("MaxPool", "GlobalMaxPool")
SPATIAL_OPS = RESIZE_OPS + MEAN_OPS + MAX_OPS
_ALONG = ("Identity", "Dropout")


def _text(view: GraphView, node: NodeRef, name: str, default: str) -> str:
    value = view.attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _ints(view: GraphView, node: NodeRef, index: int | None, attribute: str) -> list[int] | None:
    """Integer list from input ``index`` when given (a constant), else from ``attribute``."""
    if index is not None and len(node.inputs) > index and node.inputs[index]:
        try:
            return [int(v) for v in view.constant(node.inputs[index]).reshape(-1)]
        except NotConstant:
            raise FoldError(
                Reason.UNSUPPORTED_PRODUCER, f"{node.op} '{node.label}': input {index} is not constant"
            ) from None
    value = view.attr(node, attribute, None)
    return None if value is None else [int(v) for v in value]  # type: ignore[attr-defined]


def _channel_kept(node: NodeRef, ratio: float | None) -> None:
    if ratio is not None and ratio != 1.0:
        raise FoldError(
            Reason.CHANNEL_AXIS, f"{node.op} '{node.label}' resizes the channel axis: it mixes channels"
        )


def _check_resize(view: GraphView, node: NodeRef, channels: int) -> None:
    mode = _text(view, node, "mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear", "cubic"):
        raise FoldError(Reason.UNSUPPORTED_PRODUCER, f"{node.op} '{node.label}' has mode {mode}")
    coordinates = _text(view, node, "coordinate_transformation_mode", "half_pixel")
    if coordinates in ("tf_crop_and_resize", "tf_half_pixel_for_nn"):
        raise FoldError(
            Reason.UNSUPPORTED_PRODUCER,
            f"{node.op} '{node.label}' uses {coordinates}: not a per-channel interpolation the BN commutes with",
        )
    axes = _ints(view, node, None, "axes")
    if axes is not None:
        rank = view.rank(node.inputs[0])
        if any(a < 0 for a in axes) and rank is None:
            raise FoldError(
                Reason.UNKNOWN_RANK, f"{node.op} '{node.label}' has negative axes of an unknown rank"
            )
        if any((a + rank if a < 0 and rank is not None else a) == 1 for a in axes):
            raise FoldError(
                Reason.CHANNEL_AXIS, f"{node.op} '{node.label}' resizes axes {axes}: the channels too"
            )
        return
    if node.op == "Upsample" and view.attr(node, "scales", None) is not None:
        scales = [float(v) for v in view.attr(node, "scales", [])]  # type: ignore[attr-defined]
        _channel_kept(node, scales[1] if len(scales) > 1 else None)
        return
    index = 1 if node.op == "Upsample" or view.opset < 11 else 2
    names = list(node.inputs[index:]) if node.op == "Resize" else list(node.inputs[1:2])
    for k, name in enumerate(names):
        if not name:
            continue
        try:
            value = view.constant(name).reshape(-1)
        except NotConstant:
            raise FoldError(
                Reason.UNSUPPORTED_PRODUCER, f"{node.op} '{node.label}': '{name}' is not constant"
            ) from None
        if value.size == 0:
            continue
        sizes = k == 1 and node.op == "Resize"
        if sizes and _text(view, node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            raise FoldError(
                Reason.CHANNEL_AXIS, f"{node.op} '{node.label}' keeps an aspect ratio over every axis"
            )
        if value.size > 1:
            _channel_kept(node, float(value[1]) / channels if sizes else float(value[1]))
        return
    raise FoldError(
        Reason.UNSUPPORTED_PRODUCER,
        f"{node.op} '{node.label}' has no scales or sizes to show that it keeps the channel axis",
    )


def _check_mean(view: GraphView, node: NodeRef) -> None:
    if node.op == "AveragePool" and view.attr_int(node, "count_include_pad", 0):
        pads = _ints(view, node, None, "pads") or []
        auto_pad = _text(view, node, "auto_pad", "NOTSET")
        if any(pads) or auto_pad not in ("NOTSET", "VALID") or view.attr_int(node, "ceil_mode", 0):
            raise FoldError(
                Reason.PADDING,
                f"AveragePool '{node.label}' counts padded zeros in its mean (count_include_pad=1): "
                "they would not get the BN's shift",
            )
    if node.op == "ReduceMean":
        axes = _ints(view, node, 1 if view.opset >= 18 else None, "axes")
        if not axes:
            if view.opset >= 18 and view.attr_int(node, "noop_with_empty_axes", 0):
                return
            raise FoldError(
                Reason.CHANNEL_AXIS, f"ReduceMean '{node.label}' reduces every axis, the channels too"
            )
        rank = view.rank(node.inputs[0])
        if any(a < 0 for a in axes):
            if rank is None:
                raise FoldError(
                    Reason.UNKNOWN_RANK, f"ReduceMean '{node.label}' has negative axes of an unknown rank"
                )
            axes = [a + rank if a < 0 else a for a in axes]
        if 1 in axes or (0 in axes and not view.attr_int(node, "keepdims", 1)):
            raise FoldError(
                Reason.CHANNEL_AXIS,
                f"ReduceMean '{node.label}' over axes {axes} moves or reduces the channels",
            )


def _check_max(view: GraphView, node: NodeRef, affine: BNAffine) -> None:
    indices = node.outputs[1] if len(node.outputs) > 1 else ""
    read = bool(indices) and (view.uses(indices) > 0 or view.is_graph_output(indices))
    if np.any(affine.scale < 0) or (read and np.any(affine.scale <= 0)):
        raise FoldError(
            Reason.NEGATIVE_SCALE,
            f"{node.op} '{node.label}' before the BN: a negative scale would turn its max into a min",
        )


def _ops(view: GraphView, bn: NodeRef) -> list[NodeRef]:
    """The ops between the layer and the BN, from the layer side (none when no spatial op)."""
    ops: list[NodeRef] = []
    x = bn.inputs[0]
    while (node := view.producer(x)) is not None:
        if not node.standard or node.op not in SPATIAL_OPS + _ALONG or not node.inputs:
            break
        ops.insert(0, node)
        x = node.inputs[0]
    if not any(n.op in SPATIAL_OPS for n in ops):
        return []
    for node in ops[1:]:  # the values between them (the BN's input: by the caller)
        v = node.inputs[0]
        if view.is_graph_output(v):
            raise FoldError(Reason.GRAPH_OUTPUT, f"'{v}' is also a graph output")
        if view.uses(v) != 1:
            raise FoldError(Reason.MULTIPLE_CONSUMERS, f"'{v}' has other readers besides the BN's chain")
    return ops


def _fold(
    view: GraphView, bn: NodeRef, ops: list[NodeRef], affine: BNAffine, after: list[NodeRef]
) -> FoldBranches:
    channels = affine.scale.shape[0]
    for node in ops:
        if node.op == "Dropout":
            check_dropout(view, node)
        elif node.op in RESIZE_OPS:
            _check_resize(view, node, channels)
        elif node.op in MEAN_OPS:
            _check_mean(view, node)
        elif node.op in MAX_OPS:
            _check_max(view, node, affine)
    x = ops[0].inputs[0]
    producer = view.producer(x)
    if not is_layer(producer):
        what = producer.op if producer is not None else "a graph input"
        raise FoldError(
            Reason.UNSUPPORTED_PRODUCER,
            f"{ops[0].op} '{ops[0].label}' before the BN reads {what}, not a layer",
        )
    layer = producer_of(view, x)
    edit = fold_layer(view, layer, lambda c, r: affine)
    return FoldBranches(bn, ops[-1], (edit,), (layer,), Pattern.BN_AFTER_SPATIAL, (bn, *after), tuple(after))


def plan(view: GraphView, bn: BN) -> FoldBranches | Skip | None:
    """The BN into the layer before the spatial ops; None when it does not follow one."""
    try:
        ops = _ops(view, bn.node)
        if not ops:
            return None
        if view.is_graph_output(bn.node.inputs[0]):
            raise FoldError(Reason.GRAPH_OUTPUT, f"'{bn.node.inputs[0]}' is also a graph output")
        check_single_use(view, bn.node.inputs[0], released=bn.node.inputs[1:5])
    except FoldError as e:
        return Skip(e.code, e.message)
    return with_following(view, bn, lambda affine, after: _fold(view, bn.node, ops, affine, after))
