"""Reading a block of parallel branches for :mod:`.merged_branches`: the tree of single-consumer
Adds above a root Add, its leaves (``Conv(x)`` with an optional inference BN after it, ``BN(x)``, or
``x`` itself), and each branch conv's constants and geometry (kernel, strides, resolved pads).

Nothing here computes a merged tensor; every refusal is a FoldError with its reason."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FoldError
from ..folding import BNAffine
from ..report import Reason
from . import dequantized_weight
from .common import bias_of, bn_map, bn_version, constant, well_formed_bn
from .view import BadAttribute, GraphView, NodeRef, NotConstant

MAX_LEAVES = 32  # a bigger sum is not a block of branches


def is_add(node: NodeRef | None, opset: int) -> bool:
    """A standard two-input Add with multidirectional broadcasting (opset >= 7)."""
    return (
        node is not None
        and node.standard
        and node.op == "Add"
        and opset >= 7
        and len(node.inputs) == 2
        and len(node.outputs) == 1
        and all(node.inputs)
        and bool(node.outputs[0])
    )


def is_conv(node: NodeRef | None) -> bool:
    """A standard Conv with a weight and one output."""
    return (
        node is not None
        and node.standard
        and node.op == "Conv"
        and len(node.inputs) >= 2
        and bool(node.inputs[0])
        and bool(node.inputs[1])
        and len(node.outputs) == 1
    )


def is_bn(node: NodeRef | None) -> bool:
    """A standard, well-formed BatchNormalization with a single output."""
    return (
        node is not None
        and node.standard
        and node.op == "BatchNormalization"
        and well_formed_bn(node)
        and not any(node.outputs[1:])
    )


def only_read_by_the_tree(view: GraphView, value: str) -> bool:
    """``value`` has one reader (the next node up) and is not a graph output."""
    return view.uses(value) == 1 and not view.is_graph_output(value)


def tree(view: GraphView, root: NodeRef) -> tuple[list[NodeRef], list[str]] | None:
    """The Adds of the tree under ``root`` (root first) and its leaf values, left to right; None
    when it has more than :data:`MAX_LEAVES` leaves."""
    adds: list[NodeRef] = []
    leaves: list[str] = []
    stack: list[str | NodeRef] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, NodeRef):
            adds.append(item)
            stack.extend(reversed(item.inputs))
            continue
        node = view.producer(item)
        if is_add(node, view.opset) and only_read_by_the_tree(view, item):
            assert node is not None
            stack.append(node)
        else:
            leaves.append(item)
            if len(leaves) > MAX_LEAVES:
                return None
    return adds, leaves


@dataclass(frozen=True)
class Leaf:
    """One summand: a branch conv (``conv``, with ``bn`` after it or None), or an identity branch
    (``conv`` None) on ``value`` through ``bn`` or as it is."""

    value: str
    conv: NodeRef | None
    bn: NodeRef | None


def classify(view: GraphView, value: str) -> Leaf:
    """What the summand ``value`` is (a conv is a branch only when the tree alone reads it)."""
    node = view.producer(value)
    if is_conv(node) and only_read_by_the_tree(view, value):
        return Leaf(value, node, None)
    if is_bn(node) and only_read_by_the_tree(view, value):
        assert node is not None
        inner = node.inputs[0]
        conv = view.producer(inner)
        if is_conv(conv) and only_read_by_the_tree(view, inner):
            return Leaf(value, conv, node)
        return Leaf(inner, None, node)
    return Leaf(value, None, None)


def not_a_branch(view: GraphView, value: str, x: str) -> FoldError:
    """Why the summand read as ``value`` is no branch of ``x``."""
    node = view.producer(value)
    if node is not None and (is_conv(node) or is_bn(node) or is_add(node, view.opset)):
        if view.is_graph_output(value):
            return FoldError(Reason.GRAPH_OUTPUT, f"branch output '{value}' is also a graph output")
        if view.uses(value) > 1:
            return FoldError(
                Reason.MULTIPLE_CONSUMERS,
                f"branch output '{value}' ({node.op} '{node.label}') has other readers besides the Add",
            )
    what = f"{node.op} '{node.label}'" if node is not None else "a graph input or constant"
    return FoldError(
        Reason.BRANCH_MISMATCH, f"it also sums '{value}' (from {what}), which is no branch of '{x}'"
    )


def leaf_affine(view: GraphView, bn: NodeRef, channels: int, what: str) -> BNAffine:
    """The affine map of a branch BN with ``channels`` channels."""
    try:
        affine, _ = bn_map(view, bn, bn_version(view.opset))
    except FoldError as e:
        raise FoldError(e.code, f"BN '{bn.label}': {e.message}") from None
    if affine.scale.shape[0] != channels:
        raise FoldError(
            Reason.CHANNEL_MISMATCH,
            f"BN '{bn.label}' has {affine.scale.shape[0]} channels, {what} {channels}",
        )
    return affine


@dataclass(frozen=True)
class Branch:
    """A branch conv as the merge reads it; ``pads``: begin then end per spatial axis, resolved."""

    conv: NodeRef
    bn: NodeRef | None
    affine: BNAffine | None
    weight: np.ndarray
    bias: np.ndarray | None
    weight_name: str
    bias_name: str
    group: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])


def _text(view: GraphView, node: NodeRef, name: str, default: str) -> str:
    value = view.attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _ints(view: GraphView, node: NodeRef, name: str, default: list[int]) -> tuple[int, ...]:
    value = view.attr(node, name, None)
    if value is None:
        return tuple(default)
    try:
        return tuple(int(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise BadAttribute(f"{name} of {node.label} is not a list of integers") from None


def _pads(
    view: GraphView, conv: NodeRef, kernel: tuple[int, ...], strides: tuple[int, ...]
) -> tuple[int, ...]:
    n = len(kernel)
    auto = _text(view, conv, "auto_pad", "NOTSET")
    if auto == "NOTSET":
        pads = _ints(view, conv, "pads", [0] * (2 * n))
        if len(pads) != 2 * n:
            raise FoldError(Reason.MALFORMED, f"Conv '{conv.label}' has {len(pads)} pads for {n} axes")
        return pads
    if auto == "VALID":
        return (0,) * (2 * n)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise FoldError(Reason.MALFORMED, f"Conv '{conv.label}' has auto_pad {auto}")
    if any(s != 1 for s in strides):
        raise FoldError(
            Reason.BRANCH_PADDING,
            f"Conv '{conv.label}' has auto_pad {auto} with strides {list(strides)}: its pads depend on "
            "the input size",
        )
    small = [(k - 1) // 2 for k in kernel]
    big = [k - 1 - s for k, s in zip(kernel, small)]
    return tuple(small + big) if auto == "SAME_UPPER" else tuple(big + small)


def read_branch(view: GraphView, leaf: Leaf) -> Branch:
    """The constants and geometry of a branch conv (and the map of its BN)."""
    conv = leaf.conv
    assert conv is not None
    weight_name = conv.inputs[1]
    if dequantized_weight.is_dequantized(view.producer(weight_name)):
        raise FoldError(
            Reason.WEIGHT_NOT_CONSTANT, f"Conv '{conv.label}' has a dequantized weight: not merged"
        )
    try:
        weight = constant(view, weight_name, Reason.WEIGHT_NOT_CONSTANT, f"weight of Conv '{conv.label}'")
        bias_name = conv.inputs[2] if len(conv.inputs) > 2 else ""
        bias = bias_of(view, bias_name, weight)
    except FoldError as e:
        raise FoldError(e.code, f"Conv '{conv.label}': {e.message}") from None
    if weight.ndim < 3:
        raise FoldError(Reason.WEIGHT_SHAPE, f"Conv '{conv.label}' weight has rank {weight.ndim}")
    cout = weight.shape[0]
    if bias is not None and bias.shape != (cout,):
        raise FoldError(Reason.BIAS_SHAPE, f"Conv '{conv.label}' bias has shape {list(bias.shape)}")
    for label, array in (("weight", weight), ("bias", bias)):
        if array is not None and not np.isfinite(array.astype(np.float64)).all():
            raise FoldError(Reason.NON_FINITE, f"Conv '{conv.label}' {label} contains NaN or Inf")
    group = view.attr_int(conv, "group", 1)
    if group < 1 or cout % group:
        raise FoldError(Reason.INVALID_GROUP, f"Conv '{conv.label}' has group {group} for {cout} channels")
    spatial = weight.ndim - 2
    kernel = tuple(int(k) for k in weight.shape[2:])
    strides = _ints(view, conv, "strides", [1] * spatial)
    dilations = _ints(view, conv, "dilations", [1] * spatial)
    if len(strides) != spatial or len(dilations) != spatial:
        raise FoldError(Reason.MALFORMED, f"Conv '{conv.label}' strides or dilations do not fit its kernel")
    if any(d != 1 and k > 1 for k, d in zip(kernel, dilations)):
        raise FoldError(
            Reason.BRANCH_MISMATCH, f"Conv '{conv.label}' is dilated ({list(dilations)}): not merged"
        )
    pads = _pads(view, conv, kernel, strides)
    affine = leaf_affine(view, leaf.bn, cout, "its Conv") if leaf.bn is not None else None
    return Branch(
        conv,
        leaf.bn,
        affine,
        weight,
        bias,
        weight_name,
        bias_name if bias is not None else "",
        group,
        strides,
        dilations,
        pads,
    )


def is_constant(view: GraphView, value: str) -> bool:
    """Whether ``value`` is a constant."""
    try:
        view.constant(value)
    except NotConstant:
        return False
    return True
