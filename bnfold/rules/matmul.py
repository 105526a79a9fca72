"""``matmul``: ``MatMul(A, W)`` (+ ``Add(b)``) -> BN with a constant 2-D ``W = [K, N]`` and ``A``
provably 2-D (declared shapes, or through Gemm / Flatten / Reshape / rank-preserving ops), so the
BN's channel axis is the MatMul's feature axis. The MatMul (and its Add) becomes one
``Gemm(A, W * s, s * b + t)``; an ``A`` of another rank is kept (``channel_axis``, ``unknown_rank``)."""

from __future__ import annotations

from ..errors import FoldError
from ..report import Reason
from .common import since_version
from .plan import AttributeEdit
from .view import GraphView, NodeRef


def check_inputs(target: NodeRef) -> None:
    """A MatMul has exactly two inputs."""
    if len(target.inputs) != 2 or not target.inputs[0]:
        raise FoldError(Reason.MALFORMED, "MatMul must have two inputs")


def check_rank(view: GraphView, target: NodeRef) -> None:
    """The MatMul's activations are provably 2-D: the BN's channels are its features."""
    rank = view.rank(target.inputs[0])
    if rank is None:
        raise FoldError(
            Reason.UNKNOWN_RANK,
            "the MatMul input's rank is unknown, so the BN channel axis may not be its feature axis",
        )
    if rank != 2:
        raise FoldError(
            Reason.CHANNEL_AXIS,
            f"the MatMul input has rank {rank}: the BN channel axis (1) is not the MatMul's feature axis",
        )


def gemm_attributes(view: GraphView, gemm: NodeRef) -> tuple[AttributeEdit, ...]:
    """A folded Gemm (or a MatMul made one) has ``beta = 1``, and ``broadcast = 1`` before Gemm-7."""
    edits: tuple[AttributeEdit, ...] = (AttributeEdit(gemm, "beta", 1.0, if_present=True),)
    if since_version(view.opset, (1, 6, 7)) < 7:
        edits += (AttributeEdit(gemm, "broadcast", 1),)
    return edits
