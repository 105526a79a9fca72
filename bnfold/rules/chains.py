"""``bn_after_chain``: a BN folded through a constant per-channel ``Add`` after the layer
(``Conv -> Add(b) -> BN``: the Add goes into the bias too), together with the BNs that directly
follow it (``Conv -> BN -> BN``: the layer is rounded once, not once per BN), or into a layer that
already absorbed an earlier fold."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from ..errors import FoldError
from ..folding import BNAffine, compose_affine
from ..report import Reason
from .common import BN, FLOAT_NP, bn_map, is_layer, producer_of, well_formed_bn
from .plan import Skip
from .view import AttributeRef, BadAttribute, GraphView, NodeRef, NotConstant

P = TypeVar("P")


def following_bns(
    view: GraphView, bn: NodeRef, affine: BNAffine, version: int
) -> tuple[list[NodeRef], BNAffine]:
    """The BNs that directly follow ``bn`` (each the only consumer of the one before, in inference
    mode, with constant parameters) and the affine map of ``bn`` and all of them."""
    after: list[NodeRef] = []
    y = bn.outputs[0]
    while True:
        nxt = view.consumer(y)
        if (
            nxt is None
            or nxt.op != "BatchNormalization"
            or not nxt.standard
            or not well_formed_bn(nxt)
            or nxt.inputs[0] != y
        ):
            break
        try:
            then, _ = bn_map(view, nxt, version)
        except (FoldError, AttributeRef, BadAttribute):
            break
        if then.scale.shape != affine.scale.shape:
            break
        affine = compose_affine(affine, then)
        after.append(nxt)
        y = nxt.outputs[0]
    return after, affine


def producer_chain(
    view: GraphView, x: str, released: Sequence[str] = ()
) -> tuple[NodeRef, tuple[NodeRef, np.ndarray] | None]:
    """The layer producing ``x``, directly or through ``Add(layer, constant)`` (then also that
    Add and its constant). ``released``: the BN's parameters, released by the fold."""
    node = view.producer(x)
    if node is None or node.op != "Add" or not node.standard:
        return producer_of(view, x, released=released), None
    if len(node.inputs) == 2 and len(node.outputs) == 1 and view.opset >= 7:
        for k in (0, 1):
            if not is_layer(view.producer(node.inputs[k])):
                continue
            try:
                const = view.constant(node.inputs[1 - k])
            except NotConstant:
                continue
            if const.dtype not in FLOAT_NP:
                continue
            producer_of(view, x, allow_add=True)  # the Add's output: the BN is its only use
            return producer_of(view, node.inputs[k]), (node, const)
    raise FoldError(Reason.UNSUPPORTED_PRODUCER, "follows an Add that is not a layer plus a constant")


def with_following(view: GraphView, bn: BN, attempt: Callable[[BNAffine, list[NodeRef]], P]) -> P | Skip:
    """``attempt(affine, BNs after)`` for ``bn`` with the BNs right after it folded in the same
    step, else for ``bn`` alone (what stops the fold may be the BNs after it); the refusal."""
    after, combined = following_bns(view, bn.node, bn.affine, bn.version)
    try:
        return attempt(combined, after)
    except FoldError as e:
        refusal = e
    if after:
        try:
            return attempt(bn.affine, [])
        except FoldError as e:
            refusal = e
    return Skip(refusal.code, refusal.message)
