"""Checks shared by the fold rules: the BN itself, the layer it folds into, constant operands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..errors import FoldError
from ..folding import BNAffine, bn_affine
from ..report import Reason
from .view import BadTensor, GraphView, NodeRef, NotConstant

TARGET_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
FLOAT_NP = frozenset(np.dtype(ml_dtypes.bfloat16 if d == "bfloat16" else d) for d in FLOAT_DTYPES)
QUANT_DTYPES = ("int8", "uint8")
# refusals about where the BN sits (not about its parameters): a BN-before fold may still apply
STRUCTURAL = frozenset(
    {
        Reason.NO_PRODUCER,
        Reason.UNSUPPORTED_PRODUCER,
        Reason.MULTIPLE_CONSUMERS,
        Reason.GRAPH_OUTPUT,
        Reason.PRODUCER_OUTSIDE_SCOPE,
    }
)


def since_version(opset: int, versions: tuple[int, ...]) -> int:
    """The operator version in force at ``opset`` given the versions it changed in."""
    return max((v for v in versions if v <= opset), default=versions[0])


def bn_version(opset: int) -> int:
    """The BatchNormalization version in force at ``opset``."""
    return since_version(opset, (1, 6, 7, 9, 14, 15))


@dataclass(frozen=True)
class BN:
    """A BatchNormalization that passed the common checks: its operator version, its affine map
    (float64) and the dtype of its parameters."""

    node: NodeRef
    version: int
    affine: BNAffine
    param_dtype: np.dtype


def check_inference_mode(view: GraphView, bn: NodeRef, version: int) -> None:
    """FoldError ``training_mode`` / ``spatial_mode`` unless ``bn`` runs in inference mode."""
    if version in (1, 6) and not view.attr_int(bn, "is_test", 0):
        raise FoldError(Reason.TRAINING_MODE, "is_test=0: the BN runs in training mode")
    if version >= 14 and view.attr_int(bn, "training_mode", 0):
        raise FoldError(Reason.TRAINING_MODE, "training_mode=1: the BN uses batch statistics")
    extra = [o for o in bn.outputs[1:] if o]
    if extra:
        raise FoldError(
            Reason.TRAINING_MODE,
            f"declares training outputs ({', '.join(extra)}): the BN runs in training mode",
        )
    if version < 9 and view.attr_int(bn, "spatial", 1) == 0:
        raise FoldError(Reason.SPATIAL_MODE, "spatial=0: per-activation statistics, not per channel")


def well_formed_bn(bn: NodeRef) -> bool:
    """Inputs X, scale, B, mean, var and output Y are all named."""
    return len(bn.inputs) >= 5 and all(bn.inputs[:5]) and bool(bn.outputs) and bool(bn.outputs[0])


def bn_map(view: GraphView, bn: NodeRef, version: int) -> tuple[BNAffine, np.dtype]:
    """The affine map of an inference-mode BN with constant parameters, and their dtype."""
    check_inference_mode(view, bn, version)
    epsilon = view.attr_float(bn, "epsilon", 1e-5)
    params = [constant(view, n, Reason.PARAM_NOT_CONSTANT, "BN parameter") for n in bn.inputs[1:5]]
    gamma, beta, mean, var = params
    return bn_affine(gamma, beta, mean, var, epsilon=epsilon), gamma.dtype


def read_bn(view: GraphView, bn: NodeRef) -> BN:
    """The checks every BN rule needs first; raises FoldError with the reason."""
    if not well_formed_bn(bn):
        raise FoldError(
            Reason.MALFORMED, "BatchNormalization needs inputs X, scale, B, mean, var and output Y"
        )
    version = bn_version(view.opset)
    affine, dtype = bn_map(view, bn, version)
    return BN(bn, version, affine, dtype)


def constant(view: GraphView, name: str, code: Reason, what: str) -> np.ndarray:
    """The float constant ``name``; FoldError ``code`` when it is not constant."""
    try:
        value = view.constant(name)
    except BadTensor as e:
        raise FoldError(Reason.MALFORMED, f"{what}: {e}") from None
    except NotConstant as e:
        raise FoldError(code, f"{what} is not constant: {e}") from None
    if value.dtype not in FLOAT_NP:
        raise FoldError(Reason.UNSUPPORTED_DTYPE, f"{what} '{name}' has dtype {value.dtype.name}")
    return value


def bias_of(view: GraphView, name: str, weight: np.ndarray) -> np.ndarray | None:
    """The layer's constant bias (None when ``name`` is empty), in the weight's dtype."""
    if not name:
        return None
    bias = constant(view, name, Reason.BIAS_NOT_CONSTANT, "bias")
    if bias.dtype != weight.dtype:
        raise FoldError(Reason.UNSUPPORTED_DTYPE, "bias and weight have different dtypes")
    return bias


def producer_of(view: GraphView, x: str, allow_add: bool = False, released: Sequence[str] = ()) -> NodeRef:
    """The layer computing ``x``, of which the fold is the only user. ``released``: values the fold
    releases (nodes computing them only from ``x``'s type or shape do not count as users). A view
    with a ``check_layer(node)`` method may refuse the layer there (raising FoldError)."""
    target = view.producer(x)
    if target is None:
        if view.produced_outside(x):
            raise FoldError(Reason.PRODUCER_OUTSIDE_SCOPE, f"input '{x}' is produced outside this subgraph")
        raise FoldError(Reason.NO_PRODUCER, f"input '{x}' is a graph input or initializer")
    ops = TARGET_OPS + ("Add",) if allow_add else TARGET_OPS
    if not target.standard or target.op not in ops:
        op = f"{target.domain}.{target.op}" if not target.standard else target.op
        raise FoldError(Reason.UNSUPPORTED_PRODUCER, f"follows {op}, not Conv/ConvTranspose/Gemm/MatMul")
    if len(target.outputs) != 1:
        raise FoldError(Reason.MALFORMED, f"{target.op} must have exactly one output")
    if view.is_graph_output(x):
        raise FoldError(Reason.GRAPH_OUTPUT, f"'{x}' is also a graph output")
    check_single_use(view, x, released)
    # optional on a view: a front end's own limit on the layers it maps (torch: nn.Linear's rank)
    check_layer = getattr(view, "check_layer", None)
    if check_layer is not None:
        check_layer(target)
    return target


def check_single_use(view: GraphView, x: str, released: Sequence[str] = ()) -> None:
    """FoldError ``multiple_consumers`` unless the fold is the only reader of ``x``'s values:
    nodes reading only its shape or type (:meth:`GraphView.metadata_reads`) do not count, nor
    references that only ``released`` values make (see :func:`producer_of`)."""
    uses = view.uses(x)
    if uses != 1 and released:
        uses = view.uses_after_release(x, released)
    if uses != 1 and view.uses(x) - len(view.metadata_reads(x)) == 1:
        return
    if uses != 1:
        raise FoldError(Reason.MULTIPLE_CONSUMERS, f"'{x}' has {uses - 1} consumer(s) besides the BN")


def is_layer(node: NodeRef | None) -> bool:
    """A standard Conv, ConvTranspose, Gemm or MatMul."""
    return node is not None and node.standard and node.op in TARGET_OPS


def layer_rank(view: GraphView, layer: NodeRef) -> int | None:
    """The rank of ``layer``'s output: known to the view, else (Conv, ConvTranspose) its constant
    weight's rank; None when neither is known."""
    rank = view.rank(layer.outputs[0]) if layer.outputs else None
    if rank is None and layer.op in ("Conv", "ConvTranspose") and len(layer.inputs) > 1 and layer.inputs[1]:
        try:
            return int(view.constant(layer.inputs[1]).ndim)
        except NotConstant:
            return None
    return rank
