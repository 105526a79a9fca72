"""``bn_after_passthrough``: a BN folded into the layer before it through ops that a per-channel
affine passes through unchanged: ``Identity``, ``Dropout`` in inference, and a pair of
``Transpose`` that cancel (``layer [-> Add(b)] -> Identity | Dropout | Transpose, Transpose ... ->
BN``). The pass-through ops compute the identity: they go away with the BN, and the layer takes
the BN's output name. Kept: a Dropout that may train (``training_mode``) or whose mask is read
(``dropout_mask``), a Transpose that the next one does not undo (``channel_axis``), a value on the
way with another reader (``multiple_consumers``, ``graph_output``)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import FoldError
from ..report import Reason
from . import bn_after
from .common import BN, since_version
from .plan import FoldAfter, Skip
from .view import GraphView, NodeRef, NotConstant

PASSTHROUGH_OPS = ("Identity", "Dropout", "Transpose")


def is_passthrough(node: NodeRef | None) -> bool:
    """A standard Identity, Dropout or Transpose with one input and a first output."""
    return (
        node is not None
        and node.standard
        and node.op in PASSTHROUGH_OPS
        and bool(node.inputs)
        and bool(node.inputs[0])
        and bool(node.outputs)
    )


def _only_reader(view: GraphView, value: str) -> None:
    """The next node on the way is the only reader of ``value``."""
    if view.is_graph_output(value):
        raise FoldError(Reason.GRAPH_OUTPUT, f"'{value}' is also a graph output")
    uses = view.uses(value)
    if uses != 1:
        raise FoldError(Reason.MULTIPLE_CONSUMERS, f"'{value}' has {uses - 1} consumer(s) besides the BN")


def check_dropout(view: GraphView, node: NodeRef) -> None:
    """FoldError unless the Dropout ``node`` is the identity: inference mode, no mask read."""
    version = since_version(view.opset, (1, 6, 7, 10, 12, 13, 22))
    if version < 7 and not view.attr_int(node, "is_test", 0):
        raise FoldError(Reason.TRAINING_MODE, f"Dropout '{node.label}' has is_test=0: it drops values")
    if version >= 12 and len(node.inputs) > 2 and node.inputs[2]:
        try:
            mode = view.constant(node.inputs[2])
        except NotConstant:
            raise FoldError(
                Reason.TRAINING_MODE, f"Dropout '{node.label}': training_mode is not a constant"
            ) from None
        if mode.size != 1 or bool(mode.reshape(-1)[0]):
            raise FoldError(Reason.TRAINING_MODE, f"Dropout '{node.label}' runs with training_mode=true")
    mask = node.outputs[1] if len(node.outputs) > 1 else ""
    if mask and (view.uses(mask) or view.is_graph_output(mask)):
        raise FoldError(
            Reason.DROPOUT_MASK, f"Dropout '{node.label}' returns its mask '{mask}', which is read"
        )


def _perm(view: GraphView, node: NodeRef) -> list[int]:
    """The Transpose's permutation (the default reverses the axes, which needs the rank)."""
    perm = view.attr(node, "perm", None)
    if perm is not None:
        return [int(p) for p in perm]  # type: ignore[attr-defined]
    rank = view.rank(node.inputs[0])
    if rank is None:
        raise FoldError(
            Reason.UNKNOWN_RANK, f"Transpose '{node.label}' reverses the axes of an input of unknown rank"
        )
    return list(range(rank))[::-1]


def walk(view: GraphView, x: str) -> list[NodeRef]:
    """The pass-through ops computing the BN input ``x``, from the layer side; FoldError for one
    that does not pass a per-channel affine through unchanged (the Transposes on the way must
    compose to the identity)."""
    through: list[NodeRef] = []
    composed: list[int] | None = None  # x = transpose(current value, composed)
    while is_passthrough(node := view.producer(x)):
        assert node is not None
        _only_reader(view, x)
        if node.op == "Dropout":
            check_dropout(view, node)
        elif node.op == "Transpose":
            perm = _perm(view, node)
            if composed is None:
                composed = perm
            elif len(perm) != len(composed) or sorted(perm) != list(range(len(perm))):
                raise FoldError(Reason.MALFORMED, f"Transpose '{node.label}' has perm {perm}")
            else:
                composed = [perm[a] for a in composed]
        through.insert(0, node)
        x = node.inputs[0]
    if composed is not None and composed != list(range(len(composed))):
        names = ", ".join(n.label for n in through if n.op == "Transpose")
        raise FoldError(
            Reason.CHANNEL_AXIS,
            f"the Transposes between the layer and the BN ({names}) do not cancel: "
            "the BN channel axis is not the layer's",
        )
    return through


def plan(view: GraphView, bn: BN) -> FoldAfter | Skip | None:
    """The BN into the layer before the pass-through ops; None when its producer is none."""
    if not is_passthrough(view.producer(bn.node.inputs[0])):
        return None
    try:
        through: Sequence[NodeRef] = walk(view, bn.node.inputs[0])
    except FoldError as e:
        return Skip(e.code, e.message)
    return bn_after.fold_after(view, bn, through)
