"""``decomposed_affine``: ``Conv | ConvTranspose | Gemm | MatMul -> Mul(m) [-> Add(a)]`` with
constants that broadcast exactly along the output channel axis (a scalar, ``[C] + [1] * spatial``,
``[1, C, 1, ...]``): a BN an exporter decomposed. Both nodes go into the layer (the Mul alone when
the Add stops the fold).

A Mul that is not a layer times a float constant is no candidate (:func:`plan` returns None). A
candidate that does not fold is reported only for :data:`REPORTED` reasons (its constant is not
per channel, or the fold would not be finite): otherwise it is not a decomposed BN.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import FoldError
from ..folding import BNAffine, affine_of, channel_vector
from ..report import Pattern, Reason
from .bn_after import fold_layer
from .common import FLOAT_NP, is_layer, producer_of
from .plan import FoldAfter, Skip
from .view import GraphView, NodeRef, NotConstant

REPORTED = frozenset({Reason.BROADCAST, Reason.OVERFLOW, Reason.NON_FINITE})


def _add_after(view: GraphView, mul: NodeRef, m: np.ndarray) -> tuple[NodeRef, np.ndarray] | None:
    """The ``Add(constant)`` that is the Mul's only consumer, with its constant."""
    nxt = view.consumer(mul.outputs[0])
    if nxt is None or nxt.op != "Add" or not nxt.standard or len(nxt.inputs) != 2 or len(nxt.outputs) != 1:
        return None
    other = nxt.inputs[1] if nxt.inputs[0] == mul.outputs[0] else nxt.inputs[0]
    if other == mul.outputs[0]:
        return None
    try:
        a = view.constant(other)
    except NotConstant:
        return None
    return (nxt, a) if a.dtype == m.dtype else None


def _fold(view: GraphView, mul: NodeRef) -> FoldAfter | None:
    if len(mul.inputs) != 2 or len(mul.outputs) != 1 or view.opset < 7:
        return None
    side = next((k for k in (0, 1) if is_layer(view.producer(mul.inputs[k]))), None)
    if side is None:
        return None
    try:
        m = view.constant(mul.inputs[1 - side])
    except NotConstant:
        return None
    if m.dtype not in FLOAT_NP:
        return None
    target = producer_of(view, mul.inputs[side])
    add = _add_after(view, mul, m)

    def affine_for(with_add: bool) -> Callable[[int, int], BNAffine]:
        def make(channels: int, out_rank: int) -> BNAffine:
            mv = channel_vector(m, channels, out_rank, 1)
            av = channel_vector(add[1], channels, out_rank, 1) if with_add and add else None
            return affine_of(mv, av, channels)

        return make

    try:
        layer = fold_layer(view, target, affine_for(True))
        absorbed = (mul,) + ((add[0],) if add is not None else ())
    except FoldError:
        if add is None:
            raise
        layer = fold_layer(view, target, affine_for(False))  # the Mul alone
        absorbed = (mul,)
    return FoldAfter(mul, target, layer, Pattern.DECOMPOSED_AFFINE, absorbed)


def plan(view: GraphView, mul: NodeRef) -> FoldAfter | Skip | None:
    """The Mul (and the Add after it) into the layer before it; None when it is no candidate or
    its refusal is not worth reporting."""
    try:
        return _fold(view, mul)
    except FoldError as e:
        return Skip(e.code, e.message) if e.code in REPORTED else None
