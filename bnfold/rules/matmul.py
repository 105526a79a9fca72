"""``matmul``: ``MatMul(A, W)`` (+ ``Add(b)``) -> BN with a constant 2-D ``W = [K, N]`` and ``A``
provably 2-D (declared shapes, or through Gemm / Flatten / Reshape / rank-preserving ops), so the
BN's channel axis is the MatMul's feature axis. The MatMul (and its Add) becomes one
``Gemm(A, W * s, s * b + t)``; an ``A`` of another rank is kept (``channel_axis``, ``unknown_rank``).

``matmul_add`` (:func:`fold_add`): an Add whose constant is not per feature (``[M, N]``, ``[M, 1]``)
cannot be a Gemm bias; the MatMul and the Add stay, ``W``'s columns take the scale and the Add's
constant becomes ``s * C + t`` (each rounded once in its own dtype)."""

from __future__ import annotations

import numpy as np

from ..errors import FoldError
from ..folding import BNAffine, fold_constant, fold_gemm
from ..report import Pattern, Reason
from .common import FLOAT_NP, constant, since_version
from .plan import AttributeEdit, LayerEdit, TensorEdit
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


def per_feature(value: np.ndarray) -> bool:
    """An Add constant a Gemm bias can take after a 2-D MatMul: rank <= 2, one row (``[N]``,
    ``[1, N]``, a scalar); anything else is for :func:`fold_add` (or refused there)."""
    return value.ndim < 2 or (value.ndim == 2 and value.shape[0] == 1)


def scaled_weight(view: GraphView, matmul: NodeRef, affine: BNAffine) -> tuple[TensorEdit, np.ndarray]:
    """The MatMul's constant ``[K, C]`` weight with its columns scaled (rounded once), and the
    shift ``t`` rounded to the weight's dtype (for a BN that becomes ``Add(t)``)."""
    if len(matmul.inputs) != 2 or not all(matmul.inputs) or len(matmul.outputs) != 1:
        raise FoldError(Reason.MALFORMED, "MatMul must have two inputs and one output")
    w = constant(view, matmul.inputs[1], Reason.WEIGHT_NOT_CONSTANT, "weight")
    if w.ndim != 2:
        raise FoldError(Reason.WEIGHT_SHAPE, f"MatMul weight must be 2-D, got rank {w.ndim}")
    new_w, shift = fold_gemm(w, None, affine, False, 1.0)
    return TensorEdit(matmul, 1, new_w, matmul.inputs[1], f"{matmul.inputs[1]}_folded"), shift


def fold_add(
    view: GraphView, matmul: NodeRef, add: NodeRef, value: np.ndarray, affine: BNAffine, pattern: Pattern
) -> LayerEdit:
    """``MatMul -> Add(value)`` followed by ``affine`` on the MatMul's features (the last axis): the
    weight's columns take the scale, the Add's constant becomes ``s * value + t``; both stay."""
    weight, _ = scaled_weight(view, matmul, affine)
    k = 1 if add.inputs[0] == matmul.outputs[0] else 0
    if value.dtype not in FLOAT_NP or value.dtype != weight.value.dtype:
        raise FoldError(
            Reason.UNSUPPORTED_DTYPE, f"the Add constant '{add.inputs[k]}' has dtype {value.dtype}"
        )
    rank = view.rank(add.outputs[0]) if add.outputs else None
    if rank is None:
        raise FoldError(Reason.UNKNOWN_RANK, f"the rank of the Add output of '{add.label}' is unknown")
    folded = fold_constant(value, affine, rank - 1, rank)
    name = add.inputs[k]
    bias = TensorEdit(add, k, folded, name, f"{name}_folded")
    return LayerEdit(pattern, (bias, weight))
