"""``dequantized_weight``: a Conv whose weight is ``DequantizeLinear(q, scale, zp)`` with a constant
int8/uint8 ``q``: the BN scale goes into a per-output-channel ``scale`` (a per-tensor scale is made
per channel, ``axis = 0``, from opset 13), the shift into the Conv bias; ``q`` is untouched."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import FoldError
from ..folding import BNAffine, fold_bias, fold_dequantized_scale
from ..report import Pattern, Reason
from .common import QUANT_DTYPES, constant, since_version
from .plan import AttributeEdit, LayerEdit, TensorEdit
from .view import BadTensor, GraphView, NodeRef, NotConstant


def is_dequantized(dq: NodeRef | None) -> bool:
    """The weight comes from a standard DequantizeLinear."""
    return dq is not None and dq.op == "DequantizeLinear" and dq.standard


def _quantized(view: GraphView, dq: NodeRef) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        q = view.constant(dq.inputs[0])
        zp = view.constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else None
    except BadTensor as e:
        raise FoldError(Reason.MALFORMED, f"quantized weight: {e}") from None
    except NotConstant as e:
        raise FoldError(Reason.WEIGHT_NOT_CONSTANT, f"quantized weight is not constant: {e}") from None
    if q.dtype.name not in QUANT_DTYPES:
        raise FoldError(
            Reason.UNSUPPORTED_DTYPE, f"quantized weight has dtype {q.dtype.name}, not int8/uint8"
        )
    if q.ndim < 3:
        raise FoldError(Reason.WEIGHT_SHAPE, f"Conv weight must have rank >= 3, got {q.ndim}")
    return q, zp


def _per_tensor(view: GraphView, dq: NodeRef, q: np.ndarray, sc: np.ndarray) -> bool:
    """Whether the scale is per tensor (else it is per output channel, axis 0)."""
    dq_version = since_version(view.opset, (10, 13, 19, 21, 23))
    axis = view.attr_int(dq, "axis", 1)
    axis = axis + q.ndim if axis < 0 else axis
    if sc.ndim == 0:
        if dq_version < 13:
            raise FoldError(
                Reason.DEQUANTIZE_AXIS, "per-tensor scale and DequantizeLinear-10 has no per-channel form"
            )
        return True
    if sc.ndim == 1 and axis == 0 and sc.shape[0] == q.shape[0]:
        return False
    raise FoldError(
        Reason.DEQUANTIZE_AXIS,
        f"scale of shape {list(sc.shape)} with axis {axis} is not per output channel (axis 0)",
    )


def fold_layer(
    view: GraphView, conv: NodeRef, dq: NodeRef, make_affine: Callable[[int, int], BNAffine]
) -> LayerEdit:
    """The per-channel map ``make_affine(C, rank)`` into the dequantize scale and the Conv bias."""
    w = conv.inputs[1]
    if view.is_graph_output(w) or view.uses(w) != 1:
        raise FoldError(Reason.MULTIPLE_CONSUMERS, f"the dequantized weight '{w}' has other consumers")
    if len(dq.inputs) < 2 or not dq.inputs[0] or not dq.inputs[1] or len(dq.outputs) != 1:
        raise FoldError(Reason.MALFORMED, "DequantizeLinear needs x and x_scale and one output")
    if view.attr_int(dq, "block_size", 0):
        raise FoldError(Reason.DEQUANTIZE_AXIS, "blocked quantization: the scale is not per output channel")
    q, zp = _quantized(view, dq)
    scale_name = dq.inputs[1]
    sc = constant(view, scale_name, Reason.WEIGHT_NOT_CONSTANT, "dequantize scale")
    cout = q.shape[0]
    per_tensor = _per_tensor(view, dq, q, sc)
    if zp is not None and (zp.dtype != q.dtype or zp.shape != sc.shape):
        raise FoldError(Reason.MALFORMED, "zero point does not match the quantized weight and its scale")
    bias_name = conv.inputs[2] if len(conv.inputs) > 2 else ""
    bias = constant(view, bias_name, Reason.BIAS_NOT_CONSTANT, "bias") if bias_name else None
    if bias is not None and bias.dtype != sc.dtype:
        raise FoldError(Reason.UNSUPPORTED_DTYPE, "bias and dequantize scale have different dtypes")
    group = view.attr_int(conv, "group", 1)
    if group < 1 or cout % group:
        raise FoldError(Reason.INVALID_GROUP, f"Conv output channels {cout} not divisible by group {group}")
    affine = make_affine(cout, q.ndim)
    if affine.scale.shape[0] != cout:
        raise FoldError(
            Reason.CHANNEL_MISMATCH, f"BN has {affine.scale.shape[0]} channels but the layer produces {cout}"
        )
    new_scale = fold_dequantized_scale(sc, affine)
    new_b = fold_bias(bias, affine, sc.dtype)
    tensors = [
        TensorEdit(
            conv,
            2,
            new_b,
            bias_name if bias is not None else None,
            f"{conv.label}_bias_folded" if bias is None else f"{bias_name}_folded",
        ),
        TensorEdit(dq, 1, new_scale, scale_name, f"{scale_name}_folded"),
    ]
    if per_tensor and zp is not None:
        zp_name = dq.inputs[2]
        tensors.append(
            TensorEdit(dq, 2, np.full((cout,), zp, dtype=zp.dtype), zp_name, f"{zp_name}_per_channel")
        )
    attributes = (AttributeEdit(dq, "axis", 0),) if per_tensor else ()
    return LayerEdit(Pattern.DEQUANTIZED_WEIGHT, tuple(tensors), attributes=attributes)
