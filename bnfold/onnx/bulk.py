"""The bulk path for the commonest case, plain Conv -> BN pairs: their folded tensors are computed
for a whole graph at once (:func:`prepare`) and applied exactly as the one-by-one path would
(:func:`rewrite`), with identical bytes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..errors import FoldError
from ..folding import fold_conv_many
from ..report import Pattern
from ..rules.common import bn_version, check_inference_mode
from ..rules.view import AttributeRef, BadAttribute
from .apply import absorb
from .attributes import attr_float, attr_int
from .edits import Scope
from .ops import ONNX_DOMAINS
from .tensor_store import TensorStore
from .view import OnnxView

BULK_MAX_WEIGHT = 64 << 10  # larger weights fold one by one: bulk copying would cost more than it saves
_BULK_DTYPES: dict[int, np.dtype] = {
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
}


@dataclass
class Job:
    """A Conv -> BN fold computed in bulk: the Conv's node index, the weight and bias (names and
    values) it was computed from, and the folded tensors."""

    target: int
    weight: str
    bias: str
    weight_value: np.ndarray
    bias_value: np.ndarray | None
    new_weight: np.ndarray
    new_bias: np.ndarray


def _plain_initializer(scope: Scope, initializers: Any, name: str) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer of ``scope`` (not a graph input) stored as
    raw float16/32/64 bytes of the right length; else None. ``initializers``: the graph's
    initializer list (looked up once by the caller)."""
    i = scope.initializers.get(name)
    if i is None or name in scope.inputs:
        return None
    t = initializers[i]
    dtype = _BULK_DTYPES.get(t.data_type)
    if (
        dtype is None
        or t.data_location == onnx.TensorProto.EXTERNAL
        or not t.HasField("raw_data")
        or t.HasField("segment")
    ):
        return None
    raw = t.raw_data
    dims = t.dims
    if len(dims) == 1:  # BN parameters and biases: no reshape
        return np.frombuffer(raw, dtype=dtype) if dims[0] * dtype.itemsize == len(raw) else None
    shape = tuple(dims)
    if len(raw) != math.prod(shape) * dtype.itemsize:
        return None
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def prepare(
    scope: Scope, view: OnnxView, store: TensorStore, bns: list[tuple[int, onnx.NodeProto]]
) -> dict[int, Job]:
    """Folded tensors for the BNs that plainly follow a Conv, computed for all at once.

    A shortcut for the commonest case only, with results identical to the one-by-one path: the BN
    and the Conv (weight up to BULK_MAX_WEIGHT bytes) use initializers of this graph held as raw
    little-endian float16/32/64 data, the BN is the Conv output's only consumer, and no other fold
    can change that Conv first (its input is not a BN's output). Every other BN, and every pair the
    math refuses, takes the one-by-one path, which also gives the reasons.
    """
    if not bns or store.spills or not isinstance(scope.proto, onnx.GraphProto):
        return {}
    version = bn_version(scope.opset.get("", 1))
    nodes = scope.proto.node
    initializers = scope.proto.initializer
    jobs: list[tuple[int, int, str, str, np.ndarray, np.ndarray | None]] = []
    weights: list[np.ndarray] = []
    biases: list[np.ndarray | None] = []
    params: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    epsilons: list[float] = []
    targets: set[int] = set()
    for idx, bn in bns:
        inputs = bn.input
        if len(inputs) < 5 or len(bn.output) != 1:
            continue
        x = inputs[0]
        t_idx = scope.producer.get(x)
        if t_idx is None or t_idx in targets or scope.uses[x] != 1 or x in scope.outputs:
            continue
        conv = nodes[t_idx]
        if (
            conv.op_type != "Conv"
            or conv.domain not in ONNX_DOMAINS
            or len(conv.output) != 1
            or len(conv.input) < 2
        ):
            continue
        source = scope.node_of(conv.input[0])
        if source is not None and source.op_type == "BatchNormalization":
            continue  # that BN may fold into this Conv's input side first
        following = scope.consumer_of(bn.output[0])
        if following is not None and following[1].op_type == "BatchNormalization":
            continue  # folded together with the BN after it, one by one
        try:
            check_inference_mode(view, view.ref(idx, bn), version)
            epsilon = attr_float(bn, "epsilon", 1e-5)
            group = attr_int(conv, "group", 1)
        except (FoldError, AttributeRef, BadAttribute):
            continue
        bn_params = [_plain_initializer(scope, initializers, name) for name in inputs[1:5]]
        if any(p is None or p.ndim != 1 for p in bn_params):
            continue
        channels = bn_params[0].shape[0]  # type: ignore[union-attr]
        weight = _plain_initializer(scope, initializers, conv.input[1])
        if (
            weight is None
            or weight.nbytes > BULK_MAX_WEIGHT
            or weight.ndim < 3
            or weight.shape[0] != channels
            or channels == 0
            or any(p.shape[0] != channels for p in bn_params)  # type: ignore[union-attr]
            or group < 1
            or channels % group
        ):
            continue
        bias_name = conv.input[2] if len(conv.input) > 2 else ""
        bias = _plain_initializer(scope, initializers, bias_name) if bias_name else None
        if bias_name and (bias is None or bias.dtype != weight.dtype or bias.shape != (channels,)):
            continue
        targets.add(t_idx)
        jobs.append((idx, t_idx, conv.input[1], bias_name, weight, bias))
        weights.append(weight)
        biases.append(bias)
        params.append(tuple(bn_params))  # type: ignore[arg-type]
        epsilons.append(epsilon)
    folded = fold_conv_many(weights, biases, params, epsilons)
    return {
        job[0]: Job(*job[1:], result[0], result[1]) for job, result in zip(jobs, folded) if result is not None
    }


def rewrite(
    scope: Scope,
    idx: int,
    bn: onnx.NodeProto,
    job: Job,
    folded: set[tuple[str, int]],
    record: Callable[[onnx.NodeProto, onnx.NodeProto, str, Pattern], None],
) -> bool:
    """Apply a bulk-computed fold exactly as the one-by-one path would; False (nothing done) if the
    graph around the pair changed since it was computed."""
    x = bn.input[0]
    if scope.producer.get(x) != job.target or scope.uses[x] != 1:
        return False
    target = scope.proto.node[job.target]
    bias_name = target.input[2] if len(target.input) > 2 else ""
    if target.input[1] != job.weight or bias_name != job.bias:
        return False
    weight = scope.initializer_constant(job.weight, job.weight_value)
    bias = scope.initializer_constant(job.bias, job.bias_value) if job.bias_value is not None else None
    base = target.name or target.output[0]
    chained = (scope.label, job.target) in folded
    scope.set_input(
        target, 2, job.new_bias, bias, f"{base}_bias_folded" if bias is None else f"{bias.name}_folded"
    )
    scope.set_input(target, 1, job.new_weight, weight, f"{weight.name}_folded")
    absorb(scope, target, [(idx, bn)], folded)
    record(bn, target, "Conv", Pattern.BN_AFTER_CHAIN if chained else Pattern.BN_AFTER)
    return True
