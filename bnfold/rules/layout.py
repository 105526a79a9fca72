"""``layout``: ``layer [-> Add(constant)] -> Transpose | Reshape | Flatten | Unsqueeze | Squeeze ->
BN``, one such op between, which keeps the BN's channel axis (axis 1 of its input) on the layer's
feature axis (axis 1 of a Conv / ConvTranspose output, the last axis of a MatMul or torch Linear
output) element for element. The op stays and takes the BN's output name; the BN folds into the
layer:

* Conv, ConvTranspose, Gemm / Linear, and a MatMul on 2-D activations (made a Gemm): into the
  weight and the bias, as after the layer itself (``Conv [N, C, L] -> Unsqueeze(-1) -> BN2d``,
  ``Conv -> Reshape([0, C, -1]) -> BN1d``, ``Conv -> Transpose([0, 1, 3, 2]) -> BN``);
* a MatMul on activations of rank > 2 (``[B, T, K] @ [K, C] -> Transpose([0, 2, 1]) -> BN1d``):
  the scale into the weight's columns; the shift into the constant of an ``Add`` right after the
  MatMul, which stays (``s * b + t``), else the BN becomes ``Add(shift)`` shaped ``[C, 1, ...]``.

How axis 1 maps back: a Transpose's ``perm[1]``; an Unsqueeze that inserts no axis at 1; a
Squeeze's second kept axis; a Flatten whose trailing axes are the feature axis alone; a Reshape
whose leading extent is the product of the axes before the feature axis and whose extent at 1 is
the feature axis (copied with 0, the BN's channel count, or -1 once the rest is 1s; literal
extents need the input's fixed shape). Kept: an op that moves, splits or merges the channels
(``channel_axis``), a shape that cannot be proven (``unknown_shape``, ``unknown_rank``), a value
on the way with another reader (``multiple_consumers``, ``graph_output``). A MatMul right before a
Flatten / Reshape is :mod:`.matmul_reshaped`'s."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import FoldError
from ..folding import BNAffine
from ..report import Pattern, Reason
from . import matmul
from .bn_after import fold_layer
from .chains import with_following
from .common import BN, FLOAT_NP, check_single_use, is_layer, layer_rank, since_version
from .plan import FoldBranches, FoldScale, LayerEdit, Skip
from .view import GraphView, NodeRef, NotConstant

LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Unsqueeze", "Squeeze")


def _ints(view: GraphView, op: NodeRef, name: str, index: int, since: int) -> list[int] | None:
    """An integer list read from input ``index`` (opset >= ``since``) or attribute ``name``; None
    when absent; FoldError ``unknown_shape`` when computed."""
    if view.opset >= since:
        if len(op.inputs) <= index or not op.inputs[index]:
            return None
        try:
            return [int(v) for v in view.constant(op.inputs[index]).reshape(-1)]
        except NotConstant:
            raise FoldError(Reason.UNKNOWN_SHAPE, f"{op.op} '{op.label}' has a computed {name}") from None
    value = view.attr(op, name, None)
    return None if value is None else [int(v) for v in value]  # type: ignore[attr-defined]


def _need(rank: int | None, op: NodeRef, why: str) -> int:
    if rank is None:
        raise FoldError(Reason.UNKNOWN_RANK, f"{op.op} '{op.label}' {why} of an input of unknown rank")
    return rank


def _moved(op: NodeRef, what: str, feature: int) -> FoldError:
    return FoldError(
        Reason.CHANNEL_AXIS,
        f"{op.op} '{op.label}' {what}: the BN's channel axis is not the layer's feature axis {feature}",
    )


def _transpose(view: GraphView, op: NodeRef, rank: int | None, feature: int) -> int:
    perm = view.attr(op, "perm", None)
    axes = list(range(_need(rank, op, "reverses the axes")))[::-1] if perm is None else [int(p) for p in perm]  # type: ignore[attr-defined]
    if sorted(axes) != list(range(len(axes))) or len(axes) < 2:
        raise FoldError(Reason.MALFORMED, f"Transpose '{op.label}' has perm {axes}")
    if axes[1] != feature:
        raise _moved(op, f"(perm {axes}) puts axis {axes[1]} on the BN's channels", feature)
    return len(axes)


def _unsqueeze(view: GraphView, op: NodeRef, rank: int | None, feature: int) -> int | None:
    axes = _ints(view, op, "axes", 1, 13)
    if not axes:
        raise FoldError(Reason.MALFORMED, f"Unsqueeze '{op.label}' has no axes")
    out_rank = None if rank is None else rank + len(axes)
    if any(a < 0 for a in axes):
        out_rank = _need(out_rank, op, "has negative axes")
        axes = [a + out_rank if a < 0 else a for a in axes]
    if 1 in axes:
        raise _moved(op, "inserts the BN's channel axis", feature)
    if (0 if 0 in axes else 1) != feature:
        raise _moved(op, f"(axes {axes}) puts axis {0 if 0 in axes else 1} on the BN's channels", feature)
    return out_rank


def _squeeze(
    view: GraphView, op: NodeRef, rank: int | None, feature: int, shape: Sequence[int] | None
) -> int | None:
    axes = _ints(view, op, "axes", 1, 13)
    if axes is None:
        if shape is None:
            raise FoldError(
                Reason.UNKNOWN_SHAPE, f"Squeeze '{op.label}' without axes of an input of unknown shape"
            )
        axes = [i for i, d in enumerate(shape) if d == 1]
    if any(a < 0 for a in axes):
        axes = [a + _need(rank, op, "has negative axes") if a < 0 else a for a in axes]
    kept = [i for i in range(max([1, *axes]) + 3) if i not in axes][:2]
    if kept[1] != feature:
        raise _moved(op, f"(axes {axes}) puts axis {kept[1]} on the BN's channels", feature)
    return None if rank is None else rank - len(set(axes))


def _flatten(
    view: GraphView, op: NodeRef, rank: int | None, feature: int, shape: Sequence[int] | None
) -> int:
    axis = view.attr_int(op, "axis", 1)
    axis = axis + _need(rank, op, f"axis {axis}") if axis < 0 else axis
    if axis != feature:
        raise _moved(op, f"(axis {axis}) flattens axes {axis}.. into the BN's channels", feature)
    trailing = shape is not None and math.prod(shape[axis + 1 :]) == 1
    if not trailing and _need(rank, op, f"(axis {axis}) flattens") != axis + 1:
        raise _moved(op, f"(axis {axis}) merges the axes after {axis} into the BN's channels", feature)
    return 2


def _reshape(
    view: GraphView, op: NodeRef, rank: int | None, feature: int, shape: Sequence[int] | None, channels: int
) -> int:
    target = _ints(view, op, "shape", 1, 5)
    if target is None:
        raise FoldError(Reason.MALFORMED, f"Reshape '{op.label}' has no shape")
    copy = not (since_version(view.opset, (1, 5, 13, 14, 19, 21)) >= 14 and view.attr_int(op, "allowzero", 0))
    if len(target) < 2:
        raise _moved(op, f"to {target} leaves no channel axis", feature)
    if shape is not None:  # every extent known: compare the extents
        dims = [shape[i] if v == 0 and copy and i < len(shape) else v for i, v in enumerate(target)]
        if dims.count(-1) == 1:
            known = math.prod(d for d in dims if d != -1)
            dims[dims.index(-1)] = math.prod(shape) // known if known else -1
        if dims[0] == math.prod(shape[:feature]) and dims[1] == shape[feature]:
            return len(target)
        raise _moved(op, f"to {target} of {list(shape)} gives {dims}", feature)
    ones_after = all(v == 1 for v in target[2:]) and rank == feature + 1
    lead = target[0] == 0 and copy and feature == 1
    second = (target[1] == 0 and copy and feature == 1) or target[1] == channels
    if target[0] == -1 and second and ones_after:
        lead = True
    if target[1] == -1 and lead and ones_after:
        second = True
    if lead and second:
        return len(target)
    if (target[1] > 0 and target[1] != channels) or (copy and 0 in target[:2] and feature != 1):
        raise _moved(op, f"to {target} splits or merges the channels", feature)
    raise FoldError(
        Reason.UNKNOWN_SHAPE,
        f"Reshape '{op.label}' to {target}: the input's shape is not fixed, so its channel axis is not provable",
    )


def maps_back(view: GraphView, op: NodeRef, rank: int | None, feature: int, channels: int) -> int | None:
    """FoldError unless axis 1 of ``op``'s output is axis ``feature`` of its rank-``rank`` input,
    element for element (``channels``: the BN's); returns the output's rank when known."""
    shape = view.static_shape(op.inputs[0])
    if shape is not None:
        rank = len(shape)
    if op.op == "Transpose":
        return _transpose(view, op, rank, feature)
    if op.op == "Unsqueeze":
        return _unsqueeze(view, op, rank, feature)
    if op.op == "Squeeze":
        return _squeeze(view, op, rank, feature, shape)
    if op.op == "Flatten":
        return _flatten(view, op, rank, feature, shape)
    return _reshape(view, op, rank, feature, shape, channels)


def _source(view: GraphView, value: str) -> tuple[NodeRef, NodeRef | None] | None:
    """The layer computing ``value`` and the ``Add(MatMul, constant)`` on the way, if any."""
    node = view.producer(value)
    if is_layer(node):
        assert node is not None
        return node, None
    if node is None or not node.standard or node.op != "Add" or len(node.inputs) != 2:
        return None
    for k in (0, 1):
        mm = view.producer(node.inputs[k])
        if mm is not None and mm.standard and mm.op == "MatMul":
            return mm, node
    return None


def _features(view: GraphView, layer: NodeRef) -> int | None:
    """The layer's output channels from its constant weight, else None (the fold finds out)."""
    try:
        w = view.constant(layer.inputs[1]) if len(layer.inputs) > 1 and layer.inputs[1] else None
    except NotConstant:
        return None
    if w is None or w.ndim < 2:
        return None
    if layer.op == "Conv":
        return int(w.shape[0])
    if layer.op == "ConvTranspose":
        return int(w.shape[1]) * view.attr_int(layer, "group", 1)
    if layer.op == "Gemm" and view.attr_int(layer, "transB", 0):
        return int(w.shape[0])
    return int(w.shape[-1])


def _only_reader(view: GraphView, value: str) -> None:
    if view.is_graph_output(value):
        raise FoldError(Reason.GRAPH_OUTPUT, f"'{value}' is also a graph output")
    check_single_use(view, value)


def _fold(
    view: GraphView, bn: BN, op: NodeRef, layer: NodeRef, add: NodeRef | None
) -> FoldBranches | FoldScale:
    try:
        return _plan(view, bn, op, layer, add)
    except FoldError as e:
        if e.code != Reason.CHANNEL_MISMATCH:
            raise
        raise FoldError(
            Reason.CHANNEL_AXIS,
            f"{op.op} '{op.label}' splits or merges the layer's channels into the BN's "
            f"{bn.affine.scale.shape[0]}: {e.message}",
        ) from None


def _plan(
    view: GraphView, bn: BN, op: NodeRef, layer: NodeRef, add: NodeRef | None
) -> FoldBranches | FoldScale:
    value = op.inputs[0]
    if len(layer.outputs) != 1:
        raise FoldError(Reason.MALFORMED, f"{layer.op} must have exactly one output")
    _only_reader(view, value)
    if add is not None:
        _only_reader(view, layer.outputs[0])
    x = bn.node.inputs[0]
    if view.is_graph_output(x):
        raise FoldError(Reason.GRAPH_OUTPUT, f"'{x}' is also a graph output")
    check_single_use(view, x, released=bn.node.inputs[1:5])
    channels = bn.affine.scale.shape[0]
    features = _features(view, layer)
    if features is not None and features != channels:
        raise FoldError(
            Reason.CHANNEL_AXIS,
            f"{op.op} '{op.label}' gives the BN {channels} channels from the layer's {features}: "
            "it splits or merges the channels",
        )
    if layer.op in ("Conv", "ConvTranspose"):
        rank, feature = layer_rank(view, layer), 1
    else:
        rank = _need(view.rank(value), op, f"follows {layer.op} '{layer.label}': the feature axis")
        feature = rank - 1
    out_rank = maps_back(view, op, rank, feature, channels)
    if add is not None:
        k = 1 if add.inputs[0] == layer.outputs[0] else 0
        try:
            constant = view.constant(add.inputs[k])
        except NotConstant as e:
            raise FoldError(
                Reason.UNSUPPORTED_PRODUCER, f"the Add after the MatMul adds no constant: {e}"
            ) from None
        if constant.dtype not in FLOAT_NP:
            raise FoldError(Reason.UNSUPPORTED_DTYPE, f"the Add constant has dtype {constant.dtype.name}")

        def attempt(affine: BNAffine, after: list[NodeRef]) -> FoldBranches:
            edit = matmul.fold_add(view, layer, add, constant, affine, Pattern.LAYOUT)
            return FoldBranches(
                bn.node, op, (edit,), (layer,), Pattern.LAYOUT, (bn.node, *after), tuple(after)
            )

        return _or_raise(with_following(view, bn, attempt))
    if layer.op == "MatMul" and rank != 2:
        if out_rank is None:
            raise FoldError(Reason.UNKNOWN_RANK, f"the rank of the output of {op.op} '{op.label}' is unknown")
        weight, shift = matmul.scaled_weight(view, layer, bn.affine)
        shaped = shift.reshape((channels,) + (1,) * (out_rank - 2))
        return FoldScale(bn.node, layer, LayerEdit(Pattern.LAYOUT, (weight,)), shaped)

    def into_layer(affine: BNAffine, after: list[NodeRef]) -> FoldBranches:
        edit = fold_layer(view, layer, lambda c, r: affine)
        return FoldBranches(bn.node, op, (edit,), (layer,), Pattern.LAYOUT, (bn.node, *after), tuple(after))

    return _or_raise(with_following(view, bn, into_layer))


def _or_raise(result: FoldBranches | Skip) -> FoldBranches:
    if isinstance(result, Skip):
        raise FoldError(result.code, result.message)
    return result


def plan(view: GraphView, bn: BN) -> FoldBranches | FoldScale | Skip | None:
    """The BN into the layer before one channel-keeping layout op; None when it follows none."""
    op = view.producer(bn.node.inputs[0])
    if op is None or not op.standard or op.op not in LAYOUT_OPS or not op.inputs or not op.inputs[0]:
        return None
    source = _source(view, op.inputs[0])
    if source is None or view.opset < 7:
        return None
    layer, add = source
    if add is None and layer.op == "MatMul" and op.op in ("Flatten", "Reshape"):
        return None  # matmul_reshaped's pattern: its answer stands
    try:
        return _fold(view, bn, op, layer, add)
    except FoldError as e:
        return Skip(e.code, e.message)
