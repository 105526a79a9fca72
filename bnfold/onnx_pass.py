"""The ONNX folding pass: find every exact affine fold of an inference-mode BatchNormalization
(and of a BN that an exporter decomposed into Mul + Add), check that it is exact, and rewrite the
protobuf in place.

Patterns (``FoldedPair.pattern``):

* ``bn_after``: Conv / ConvTranspose / Gemm -> BN; the BN goes into the layer's weight and bias.
* ``bn_after_chain``: a BN folded through a constant per-channel ``Add`` (``Conv -> Add(b) -> BN``,
  the Add is absorbed into the bias too), or into a layer that already absorbed an earlier fold
  (``Conv -> BN -> BN``, ``Conv -> Mul -> BN``).
* ``matmul``: ``MatMul(A, W)`` (+ ``Add(b)``) -> BN with a constant 2-D ``W = [K, N]`` and ``A``
  provably 2-D (declared shapes, or through Gemm / Flatten / Reshape / rank-preserving ops), so the
  BN's channel axis is the MatMul's feature axis. The MatMul (and its Add) becomes one
  ``Gemm(A, W * s, s * b + t)``; an A of another rank is kept (``channel_axis``, ``unknown_rank``).
* ``decomposed_affine``: ``Conv | ConvTranspose | Gemm | MatMul -> Mul(m) [-> Add(a)]`` with
  constants that broadcast exactly along the output channel axis (a scalar, ``[C] + [1] * spatial``,
  ``[1, C, 1, ...]``); both nodes go into the layer.
* ``bn_before``: a BN whose only consumer is an unpadded Conv (any group; input 0), or a
  ``Flatten(axis=1)`` whose only consumer is a Gemm (``transA = 0``; the spatial size ``HW`` of each
  channel is ``K / C``, which any valid model fixes). Tried only when the BN cannot fold into its
  producer. A padded Conv is kept (``padding``): padded zeros would not get the BN's shift.
* ``dequantized_weight``: Conv whose weight is ``DequantizeLinear(q, scale, zp)`` with constant
  int8/uint8 ``q``: the BN scale goes into a per-output-channel ``scale`` (a per-tensor scale is
  made per channel, ``axis = 0``, from opset 13), the shift into the Conv bias; ``q`` is untouched.
* ``bn_to_affine`` (opt-in, ``fold_model(..., bn_to_affine=True)``): a BN that cannot be folded
  but is inference-mode with constant parameters becomes ``Mul(s) + Add(t)`` with constants shaped
  ``[C, 1, ..., 1]`` for the input's rank (which must be provable).

Every BN that stays gets a :class:`~bnfold.report.SkippedBN` with a stable reason code; the pass
never raises for a model it can read. Dropping a BN gives the layer the BN's output name, so no
consumer is rewired and graph output names are kept. A Mul candidate (a layer times a constant)
that does not fold is reported in ``FoldReport.skipped_affine`` (``SkippedBN.op == "Mul"``; not in
``skipped``, which lists BNs only) when its constant is not per-channel (``broadcast``) or the
fold would not be finite; otherwise it is left alone silently (it is not a decomposed BN).

Reason codes: ``training_mode``, ``spatial_mode``, ``attribute_ref``, ``malformed``,
``no_producer``, ``producer_outside_scope``, ``unsupported_producer``, ``graph_output``,
``multiple_consumers``, ``param_not_constant``, ``weight_not_constant``, ``bias_not_constant``,
``unsupported_dtype``, ``param_shape``, ``non_finite``, ``invalid_variance``,
``channel_mismatch``, ``invalid_group``, ``weight_shape``, ``bias_shape``, ``overflow``,
``channel_axis``, ``unknown_rank``, ``broadcast``, ``padding``, ``dequantize_axis``.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx

from .folding import (
    BNAffine,
    FoldError,
    affine_constants,
    affine_of,
    bn_affine,
    channel_vector,
    compose_add,
    compose_affine,
    fold_bias,
    fold_conv,
    fold_conv_input,
    fold_conv_many,
    fold_conv_transpose,
    fold_dequantized_scale,
    fold_gemm,
    fold_gemm_input,
)
from .onnx.attributes import AttributeRef, BadAttribute, attr, attr_float, attr_int, set_attr
from .onnx.constants import BadTensor, Const, NotConstant
from .onnx.edits import Scope
from .onnx.index import NameAllocator, all_names, free_uses, subgraphs
from .onnx.ops import ONNX_DOMAINS
from .onnx.tensor_store import MemoryStore, TensorStore
from .report import FoldedPair, FoldReport, SkippedBN

TARGET_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_FLOAT_NP = frozenset(np.dtype(ml_dtypes.bfloat16 if d == "bfloat16" else d) for d in FLOAT_DTYPES)
QUANT_DTYPES = ("int8", "uint8")
# refusals about where the BN sits (not about its parameters): a BN-before fold may still apply
STRUCTURAL = frozenset(
    {"no_producer", "unsupported_producer", "multiple_consumers", "graph_output", "producer_outside_scope"}
)
# refusals reported for a Mul candidate (others mean "not a decomposed BN": silent)
REPORTED_MUL_CODES = frozenset({"broadcast", "overflow", "non_finite"})


def since_version(opset: int, versions: tuple[int, ...]) -> int:
    """The operator version in force at ``opset`` given the versions it changed in."""
    return max((v for v in versions if v <= opset), default=versions[0])


def bn_version(opset: int) -> int:
    return since_version(opset, (1, 6, 7, 9, 14, 15))


def _opset_map(imports: list[onnx.OperatorSetIdProto] | object) -> dict[str, int]:
    out: dict[str, int] = {}
    for imp in imports:  # type: ignore[attr-defined]
        out["" if imp.domain in ONNX_DOMAINS else imp.domain] = imp.version
    return out


_BULK_MIN = 1  # BNs in a graph for the bulk path (a test raises it to compare both paths)
_BULK_MAX_WEIGHT = 64 << 10  # larger weights fold one by one: bulk copying would cost more than it saves
_BULK_DTYPES = {
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
}


@dataclass
class _BulkJob:
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


class _Pass:
    def __init__(self, model: onnx.ModelProto, store: TensorStore, *, bn_to_affine: bool = False) -> None:
        self.model = model
        self.store = store
        self.bn_to_affine = bn_to_affine
        self.names = NameAllocator(set())  # filled from the main graph's index in run()
        self.report = FoldReport()
        self.touched: set[tuple[str, int]] = set()  # (scope label, node index) of layers folded into
        self.scopes: list[Scope] = []  # every graph and function body, for the node counts

    def scope(
        self,
        proto: onnx.GraphProto | onnx.FunctionProto,
        label: str,
        opset: dict[str, int],
        parent: Scope | None = None,
    ) -> Scope:
        """Index ``proto`` (before it is rewritten) and count its nodes and initializers."""
        s = Scope.build(proto, label, opset, self.model.ir_version, self.store, self.names, parent)
        self.scopes.append(s)
        self.report.nodes_before += len(proto.node)
        if isinstance(proto, onnx.GraphProto):
            self.report.initializers_before += len(proto.initializer)
        return s

    def run(self) -> FoldReport:
        model = self.model
        top = self.scope(model.graph, "main", _opset_map(model.opset_import))
        self.names.reserve(all_names(model, top))
        # Training info graphs read and update main-graph initializers by name: count those
        # references as uses, so such tensors are neither removed nor overwritten in place.
        for info in model.training_info:
            for g in (info.initialization, info.algorithm):
                top.uses.update(free_uses(g))
            for binding in (*info.initialization_binding, *info.update_binding):
                top.uses.update(n for n in (binding.key, binding.value) if n)
        self.process(top)
        for f in model.functions:
            opset = _opset_map(model.opset_import)
            opset.update(_opset_map(f.opset_import))
            self.process(self.scope(f, f"function {f.domain}:{f.name}", opset))
        # Every graph the pass can change has a scope (removed nodes never carry subgraphs).
        for s in self.scopes:
            self.report.nodes_after += len(s.proto.node)
            if isinstance(s.proto, onnx.GraphProto):
                self.report.initializers_after += len(s.proto.initializer)
            s.close()
        return self.report

    def process(self, scope: Scope) -> None:
        nodes = scope.proto.node
        candidates = []
        for idx, node in enumerate(nodes):
            op = node.op_type
            if (op == "BatchNormalization" or op == "Mul") and node.domain in ONNX_DOMAINS:
                candidates.append((idx, node, op))
        bulk = self.bulk_prepare(scope, [(i, n) for i, n, op in candidates if op == "BatchNormalization"])
        for idx, node, op in candidates:
            if idx in scope.removed_nodes:
                continue
            if op == "BatchNormalization":
                job = bulk.get(idx)
                if job is not None and self.bulk_rewrite(scope, idx, node, job):
                    continue
                self.attempt(scope, node, lambda i=idx, n=node: self.prepare(scope, i, n))
            else:
                self.attempt(
                    scope,
                    node,
                    lambda i=idx, n=node: self.prepare_mul(scope, i, n),
                    reported=REPORTED_MUL_CODES,
                )
        for idx in scope.subgraph_nodes:
            if idx in scope.removed_nodes:
                continue
            node = nodes[idx]
            for attr_name, g in subgraphs(node):
                label = f"{scope.label}/{node.name or f'{node.op_type}_{idx}'}.{attr_name}"
                self.process(self.scope(g, label, scope.opset, scope))
        scope.commit()

    def attempt(
        self,
        scope: Scope,
        node: onnx.NodeProto,
        prepare: Callable[[], Callable[[], None] | None],
        reported: frozenset[str] | None = None,
    ) -> None:
        """Run ``prepare`` (checks, no mutation); on success run the rewrite it returns."""
        try:
            try:
                rewrite = prepare()
            except AttributeRef as e:
                raise FoldError("attribute_ref", f"{e}; its value is unknown inside the function") from None
            except BadAttribute as e:
                raise FoldError("malformed", str(e)) from None
        except FoldError as e:
            if reported is None or e.code in reported:
                self.skip(
                    scope,
                    node,
                    e.code,
                    e.message,
                    self.report.skipped if reported is None else self.report.skipped_affine,
                )
        except Exception as e:  # noqa: BLE001 - refuse what we cannot read, never crash
            if reported is None:
                self.skip(scope, node, "malformed", f"cannot be analysed: {type(e).__name__}: {e}")
        else:
            if rewrite is not None:
                rewrite()

    def skip(
        self, scope: Scope, bn: onnx.NodeProto, code: str, message: str, into: list[SkippedBN] | None = None
    ) -> None:
        x = bn.input[0] if bn.input else ""
        prod = scope.node_of(x) if x else None
        if bn.op_type == "Mul" and prod is not None and prod.op_type not in TARGET_OPS and len(bn.input) > 1:
            prod = scope.node_of(bn.input[1]) or prod  # the layer may be the Mul's second input
        (self.report.skipped if into is None else into).append(
            SkippedBN(
                bn=bn.name or (bn.output[0] if bn.output else ""),
                code=code,
                message=message,
                graph=scope.label,
                producer=(prod.name or prod.output[0]) if prod is not None else None,
                producer_op=prod.op_type if prod is not None else None,
                op=bn.op_type,
            )
        )

    def record(
        self, scope: Scope, anchor: onnx.NodeProto, target: onnx.NodeProto, kind: str, pattern: str
    ) -> None:
        self.report.folded.append(
            FoldedPair(
                bn=anchor.name or anchor.output[0],
                target=target.name or target.output[0],
                kind=kind,
                graph=scope.label,
                pattern=pattern,
            )
        )

    # ------------------------------------------------------------------------------------------
    # BatchNormalization
    # ------------------------------------------------------------------------------------------
    def prepare(self, scope: Scope, idx: int, bn: onnx.NodeProto) -> Callable[[], None]:
        """Check that BN node ``idx`` folds and compute the folded tensors.

        Returns the rewrite (which cannot fail) or raises FoldError with the reason. Nothing in
        the graph changes before the rewrite runs. Order: into the producer (``bn_after``,
        ``bn_after_chain``, ``matmul``, ``dequantized_weight``); else, when the refusal is about
        where the BN sits, into its consumer (``bn_before``); else, when enabled, ``bn_to_affine``.
        """
        if len(bn.input) < 5 or not all(bn.input[:5]) or not bn.output or not bn.output[0]:
            raise FoldError(
                "malformed", "BatchNormalization needs inputs X, scale, B, mean, var and output Y"
            )
        version = bn_version(scope.opset.get("", 1))
        self.check_inference_mode(bn, version)
        epsilon = attr_float(bn, "epsilon", 1e-5)
        params = [self.constant(scope, n, "param_not_constant", "BN parameter") for n in bn.input[1:5]]
        affine = bn_affine(*(p.value for p in params), epsilon=epsilon)
        after, combined = self.following_bns(scope, bn, affine, version)
        try:
            return self.backward(scope, idx, bn, combined, after)
        except FoldError as back:
            err = back
            if after:  # what stops the fold may be the BNs after it (an overflow): try it alone
                try:
                    return self.backward(scope, idx, bn, affine, [])
                except FoldError as alone:
                    err = back = alone
            if back.code in STRUCTURAL:
                try:
                    forward = self.forward(scope, idx, bn, affine)
                except FoldError as e:
                    err = FoldError(
                        e.code, f"{e.message} (and it cannot fold into its producer: {back.message})"
                    )
                else:
                    if forward is not None:
                        return forward
            if self.bn_to_affine:
                try:
                    return self.to_affine(scope, idx, bn, affine, version, params)
                except FoldError as e:
                    raise FoldError(
                        err.code, f"{err.message}; not rewritten as Mul+Add: {e.message}"
                    ) from None
            raise err  # noqa: B904 - the refusal with the most useful reason, not a new error

    # ------------------------------------------------------------------------------------------
    # Plain Conv -> BN pairs, computed in bulk
    # ------------------------------------------------------------------------------------------
    def bulk_prepare(self, scope: Scope, bns: list[tuple[int, onnx.NodeProto]]) -> dict[int, _BulkJob]:
        """Folded tensors for the BNs that plainly follow a Conv, computed for all at once.

        A shortcut for the commonest case only, with results identical to :meth:`prepare`: the BN
        and the Conv (weight up to _BULK_MAX_WEIGHT bytes) use initializers of this graph held as
        raw little-endian float16/32/64 data,
        the BN is the Conv output's only consumer, and no other fold can change that Conv first
        (its input is not a BN's output). Every other BN, and every pair the math refuses, takes
        the one-by-one path, which also gives the reasons.
        """
        if len(bns) < _BULK_MIN or self.store.spills or not isinstance(scope.proto, onnx.GraphProto):
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
                self.check_inference_mode(bn, version)
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
                or weight.nbytes > _BULK_MAX_WEIGHT
                or weight.ndim < 3
                or weight.shape[0] != channels
                or channels == 0
                or any(p.shape[0] != channels for p in bn_params)
                or group < 1
                or channels % group
            ):  # type: ignore[union-attr]
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
            job[0]: _BulkJob(*job[1:], result[0], result[1])
            for job, result in zip(jobs, folded)
            if result is not None
        }

    def bulk_rewrite(self, scope: Scope, idx: int, bn: onnx.NodeProto, job: _BulkJob) -> bool:
        """Apply a bulk-computed fold exactly as :meth:`backward` would; False (nothing done)
        if the graph around the pair changed since it was computed."""
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
        chained = (scope.label, job.target) in self.touched
        scope.set_input(
            target, 2, job.new_bias, bias, f"{base}_bias_folded" if bias is None else f"{bias.name}_folded"
        )
        scope.set_input(target, 1, job.new_weight, weight, f"{weight.name}_folded")
        self.absorb(scope, target, [(idx, bn)])
        self.record(scope, bn, target, "Conv", "bn_after_chain" if chained else "bn_after")
        return True

    @staticmethod
    def check_inference_mode(bn: onnx.NodeProto, version: int) -> None:
        if version in (1, 6) and not attr_int(bn, "is_test", 0):
            raise FoldError("training_mode", "is_test=0: the BN runs in training mode")
        if version >= 14 and attr_int(bn, "training_mode", 0):
            raise FoldError("training_mode", "training_mode=1: the BN uses batch statistics")
        extra = [o for o in bn.output[1:] if o]
        if extra:
            raise FoldError(
                "training_mode",
                f"declares training outputs ({', '.join(extra)}): the BN runs in training mode",
            )
        if version < 9 and attr_int(bn, "spatial", 1) == 0:
            raise FoldError("spatial_mode", "spatial=0: per-activation statistics, not per channel")

    def following_bns(
        self, scope: Scope, bn: onnx.NodeProto, affine: BNAffine, version: int
    ) -> tuple[list[tuple[int, onnx.NodeProto]], BNAffine]:
        """The BNs that directly follow ``bn`` (each the only consumer of the one before, in
        inference mode, with constant parameters) and the affine map of ``bn`` and all of them:
        folded together, the layer is rounded once rather than once per BN."""
        after: list[tuple[int, onnx.NodeProto]] = []
        y = bn.output[0]
        while True:
            found = scope.consumer_of(y)
            if found is None:
                break
            i, nxt = found
            if (
                nxt.op_type != "BatchNormalization"
                or nxt.domain not in ONNX_DOMAINS
                or len(nxt.input) < 5
                or not all(nxt.input[:5])
                or nxt.input[0] != y
                or not nxt.output
                or not nxt.output[0]
            ):
                break
            try:
                self.check_inference_mode(nxt, version)
                epsilon = attr_float(nxt, "epsilon", 1e-5)
                params = [
                    self.constant(scope, n, "param_not_constant", "BN parameter") for n in nxt.input[1:5]
                ]
                then = bn_affine(*(p.value for p in params), epsilon=epsilon)
            except (FoldError, AttributeRef, BadAttribute):
                break
            if then.scale.shape != affine.scale.shape:
                break
            affine = compose_affine(affine, then)
            after.append((i, nxt))
            y = nxt.output[0]
        return after, affine

    def backward(
        self,
        scope: Scope,
        idx: int,
        bn: onnx.NodeProto,
        affine: BNAffine,
        after: Sequence[tuple[int, onnx.NodeProto]] = (),
    ) -> Callable[[], None]:
        """BN into the layer before it, possibly through one constant per-channel Add; ``after``:
        BNs that follow it, folded in the same step (``affine`` is then the map of them all)."""
        target, add = self.producer_chain(scope, bn.input[0], released=bn.input[1:5])
        if add is None:
            make_affine: Callable[[int, int], BNAffine] = lambda c, r: affine  # noqa: E731
        else:
            add_const = add[2]

            def make_affine(channels: int, out_rank: int) -> BNAffine:
                return compose_add(channel_vector(add_const.value, channels, out_rank, 1), affine)

        kind = target.op_type
        write, pattern = self.plan(scope, target, make_affine)
        if pattern == "bn_after" and (
            add is not None or (scope.label, scope.producer[target.output[0]]) in self.touched
        ):
            pattern = "bn_after_chain"
        chain = ([] if add is None else [(add[0], add[1])]) + [(idx, bn)] + list(after)

        def rewrite() -> None:
            write()
            self.absorb(scope, target, chain)
            self.record(scope, bn, target, kind, pattern)
            for _, later in after:
                self.record(scope, later, target, kind, "bn_after_chain")

        return rewrite

    def producer_chain(
        self, scope: Scope, x: str, released: Sequence[str] = ()
    ) -> tuple[onnx.NodeProto, tuple[int, onnx.NodeProto, Const] | None]:
        """The layer producing ``x``, directly or through ``Add(layer, constant)``. ``released``:
        the BN's parameters, released by the fold (nodes computing them only from ``x``'s type or
        shape die with them and do not count as other consumers of ``x``)."""
        node = scope.node_of(x)
        if node is None or node.op_type != "Add" or node.domain not in ONNX_DOMAINS:
            return self.producer_of(scope, x, released=released), None
        if len(node.input) == 2 and len(node.output) == 1 and scope.opset.get("", 1) >= 7:
            for k in (0, 1):
                layer = scope.node_of(node.input[k])
                if layer is None or layer.domain not in ONNX_DOMAINS or layer.op_type not in TARGET_OPS:
                    continue
                try:
                    const = scope.constant(node.input[1 - k])
                except NotConstant:
                    continue
                if const.value.dtype not in _FLOAT_NP:
                    continue
                self.producer_of(scope, x, allow_add=True)  # the Add's output: BN is its only use
                target = self.producer_of(scope, node.input[k])
                return target, (scope.producer[x], node, const)
        raise FoldError("unsupported_producer", "follows an Add that is not a layer plus a constant")

    @staticmethod
    def producer_of(
        scope: Scope, x: str, allow_add: bool = False, released: Sequence[str] = ()
    ) -> onnx.NodeProto:
        target = scope.node_of(x)
        if target is None:
            owner = scope.owner(x)
            if owner is not None and owner is not scope and owner.node_of(x) is not None:
                raise FoldError(
                    "producer_outside_scope",
                    f"input '{x}' is produced outside this subgraph",
                )
            raise FoldError("no_producer", f"input '{x}' is a graph input or initializer")
        ops = TARGET_OPS + ("Add",) if allow_add else TARGET_OPS
        if target.domain not in ONNX_DOMAINS or target.op_type not in ops:
            op = f"{target.domain}.{target.op_type}" if target.domain not in ONNX_DOMAINS else target.op_type
            raise FoldError("unsupported_producer", f"follows {op}, not Conv/ConvTranspose/Gemm/MatMul")
        if len(target.output) != 1:
            raise FoldError("malformed", f"{target.op_type} must have exactly one output")
        if x in scope.outputs:
            raise FoldError("graph_output", f"'{x}' is also a graph output")
        uses = scope.uses[x]
        if uses != 1 and released:
            uses = scope.uses_after_release(x, released)
        if uses != 1:
            raise FoldError("multiple_consumers", f"'{x}' has {uses - 1} consumer(s) besides the BN")
        return target

    def absorb(self, scope: Scope, target: onnx.NodeProto, chain: list[tuple[int, onnx.NodeProto]]) -> None:
        """Drop the per-channel nodes ``chain`` after ``target`` (already folded into it): the
        layer takes the last one's output name; their other inputs are released."""
        old = target.output[0]
        final = chain[-1][1].output[0]
        target.output[0] = final
        pidx = scope.producer.pop(old)
        scope.removed_values.add(old)
        prev = old
        for i, node in chain:
            scope.removed_nodes.add(i)
            for inp in node.input:
                if not inp:
                    continue
                if inp == prev:
                    scope.uses[inp] -= 1
                else:
                    scope.release(inp)
            out = node.output[0]
            if out != final:
                scope.producer.pop(out, None)
                scope.removed_values.add(out)
            prev = out
        scope.producer[final] = pidx
        self.touched.add((scope.label, pidx))

    @staticmethod
    def constant(scope: Scope, name: str, code: str, what: str) -> Const:
        try:
            c = scope.constant(name)
        except BadTensor as e:
            raise FoldError("malformed", f"{what}: {e}") from None
        except NotConstant as e:
            raise FoldError(code, f"{what} is not constant: {e}") from None
        if c.value.dtype not in _FLOAT_NP:
            raise FoldError("unsupported_dtype", f"{what} '{name}' has dtype {c.value.dtype.name}")
        return c

    # ------------------------------------------------------------------------------------------
    # the layer side of a fold after it
    # ------------------------------------------------------------------------------------------
    def bias_of(self, scope: Scope, name: str, weight: Const) -> Const | None:
        """The layer's constant bias (None when ``name`` is empty), in the weight's dtype."""
        if not name:
            return None
        bias = self.constant(scope, name, "bias_not_constant", "bias")
        if bias.value.dtype != weight.value.dtype:
            raise FoldError("unsupported_dtype", "bias and weight have different dtypes")
        return bias

    def plan(
        self, scope: Scope, target: onnx.NodeProto, make_affine: Callable[[int, int], BNAffine]
    ) -> tuple[Callable[[], None], str]:
        """Compute the folded constants of ``target`` for the per-channel map ``make_affine(C,
        output rank)``; return a closure that writes them, and the pattern name."""
        op = target.op_type
        if len(target.input) < 2 or not target.input[1]:
            raise FoldError("malformed", f"{op} has no weight input")
        if op == "Conv":
            dq = scope.node_of(target.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.domain in ONNX_DOMAINS:
                return self.plan_dequantized(scope, target, dq, make_affine), "dequantized_weight"
        weight = self.constant(scope, target.input[1], "weight_not_constant", "weight")
        bias_name = target.input[2] if len(target.input) > 2 else ""
        if op == "MatMul" and (len(target.input) != 2 or not target.input[0]):
            raise FoldError("malformed", "MatMul must have two inputs")
        bias = self.bias_of(scope, bias_name, weight)
        base = target.name or target.output[0]
        opset = scope.opset.get("", 1)
        w = weight.value
        if op in ("Gemm", "MatMul"):
            if op == "MatMul":
                rank = scope.rank(target.input[0])
                if rank is None:
                    raise FoldError(
                        "unknown_rank",
                        "the MatMul input's rank is unknown, so the BN channel axis "
                        "may not be its feature axis",
                    )
                if rank != 2:
                    raise FoldError(
                        "channel_axis",
                        f"the MatMul input has rank {rank}: the BN channel axis (1) "
                        "is not the MatMul's feature axis",
                    )
                trans_b, beta = False, 1.0
            else:
                trans_b = bool(attr_int(target, "transB", 0))
                beta = attr_float(target, "beta", 1.0)
            if w.ndim != 2:
                raise FoldError("weight_shape", f"{op} weight must be 2-D, got rank {w.ndim}")
            affine = make_affine(w.shape[0] if trans_b else w.shape[1], 2)
            c = bias.value if bias is not None else None
            if c is not None and beta == 0.0:
                c = None  # beta * C contributes nothing
            new_w, new_b = fold_gemm(w, c, affine, trans_b, beta)
        else:
            group = attr_int(target, "group", 1)
            if w.ndim < 3:
                raise FoldError("weight_shape", f"{op} weight must have rank >= 3, got {w.ndim}")
            if group < 1:
                raise FoldError("invalid_group", f"group {group} is not positive")
            affine = make_affine(w.shape[0] if op == "Conv" else w.shape[1] * group, w.ndim)
            fold = fold_conv if op == "Conv" else fold_conv_transpose
            new_w, new_b = fold(w, bias.value if bias is not None else None, affine, group)

        def write() -> None:
            # Bias first: releasing a computed bias may leave the weight with a single user, which
            # then lets the weight be updated in place under its own name.
            scope.set_input(
                target, 2, new_b, bias, f"{base}_bias_folded" if bias is None else f"{bias.name}_folded"
            )
            scope.set_input(target, 1, new_w, weight, f"{weight.name}_folded")
            if op in ("Gemm", "MatMul"):
                target.op_type = "Gemm"
                if any(a.name == "beta" for a in target.attribute):
                    set_attr(target, "beta", 1.0)
                if since_version(opset, (1, 6, 7)) < 7:
                    set_attr(target, "broadcast", 1)

        return write, "matmul" if op == "MatMul" else "bn_after"

    def plan_dequantized(
        self,
        scope: Scope,
        conv: onnx.NodeProto,
        dq: onnx.NodeProto,
        make_affine: Callable[[int, int], BNAffine],
    ) -> Callable[[], None]:
        """Conv weight ``DequantizeLinear(q, scale, zp)``: the BN scale goes into ``scale``."""
        w = conv.input[1]
        if w in scope.outputs or scope.uses[w] != 1:
            raise FoldError("multiple_consumers", f"the dequantized weight '{w}' has other consumers")
        if len(dq.input) < 2 or not dq.input[0] or not dq.input[1] or len(dq.output) != 1:
            raise FoldError("malformed", "DequantizeLinear needs x and x_scale and one output")
        opset = scope.opset.get("", 1)
        dq_version = since_version(opset, (10, 13, 19, 21, 23))
        if attr_int(dq, "block_size", 0):
            raise FoldError("dequantize_axis", "blocked quantization: the scale is not per output channel")
        try:
            q = scope.constant(dq.input[0]).value
            zp_const = scope.constant(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        except BadTensor as e:
            raise FoldError("malformed", f"quantized weight: {e}") from None
        except NotConstant as e:
            raise FoldError("weight_not_constant", f"quantized weight is not constant: {e}") from None
        if q.dtype.name not in QUANT_DTYPES:
            raise FoldError("unsupported_dtype", f"quantized weight has dtype {q.dtype.name}, not int8/uint8")
        if q.ndim < 3:
            raise FoldError("weight_shape", f"Conv weight must have rank >= 3, got {q.ndim}")
        scale = self.constant(scope, dq.input[1], "weight_not_constant", "dequantize scale")
        cout = q.shape[0]
        axis = attr_int(dq, "axis", 1)
        axis = axis + q.ndim if axis < 0 else axis
        sc = scale.value
        if sc.ndim == 0:
            if dq_version < 13:
                raise FoldError(
                    "dequantize_axis", "per-tensor scale and DequantizeLinear-10 has no per-channel form"
                )
            per_tensor = True
        elif sc.ndim == 1 and axis == 0 and sc.shape[0] == cout:
            per_tensor = False
        else:
            raise FoldError(
                "dequantize_axis",
                f"scale of shape {list(sc.shape)} with axis {axis} is not per output channel (axis 0)",
            )
        zp = zp_const.value if zp_const is not None else None
        if zp is not None and (zp.dtype != q.dtype or zp.shape != sc.shape):
            raise FoldError("malformed", "zero point does not match the quantized weight and its scale")
        bias_name = conv.input[2] if len(conv.input) > 2 else ""
        bias = self.constant(scope, bias_name, "bias_not_constant", "bias") if bias_name else None
        if bias is not None and bias.value.dtype != sc.dtype:
            raise FoldError("unsupported_dtype", "bias and dequantize scale have different dtypes")
        group = attr_int(conv, "group", 1)
        if group < 1 or cout % group:
            raise FoldError("invalid_group", f"Conv output channels {cout} not divisible by group {group}")
        affine = make_affine(cout, q.ndim)
        if affine.scale.shape[0] != cout:
            raise FoldError(
                "channel_mismatch", f"BN has {affine.scale.shape[0]} channels but the layer produces {cout}"
            )
        new_scale = fold_dequantized_scale(sc, affine)
        new_b = fold_bias(bias.value if bias is not None else None, affine, sc.dtype)
        new_zp = np.full((cout,), zp, dtype=zp.dtype) if per_tensor and zp is not None else None
        base = conv.name or conv.output[0]

        def write() -> None:
            scope.set_input(
                conv, 2, new_b, bias, f"{base}_bias_folded" if bias is None else f"{bias.name}_folded"
            )
            scope.set_input(dq, 1, new_scale, scale, f"{scale.name}_folded")
            if new_zp is not None:
                scope.set_input(dq, 2, new_zp, zp_const, f"{zp_const.name}_per_channel")  # type: ignore[union-attr]
            if per_tensor:
                set_attr(dq, "axis", 0)

        return write

    # ------------------------------------------------------------------------------------------
    # decomposed BN: layer -> Mul(m) [-> Add(a)]
    # ------------------------------------------------------------------------------------------
    def prepare_mul(self, scope: Scope, idx: int, mul: onnx.NodeProto) -> Callable[[], None] | None:
        if len(mul.input) != 2 or len(mul.output) != 1 or scope.opset.get("", 1) < 7:
            return None
        side = None
        for k in (0, 1):
            layer = scope.node_of(mul.input[k])
            if layer is not None and layer.domain in ONNX_DOMAINS and layer.op_type in TARGET_OPS:
                side = k
                break
        if side is None:
            return None
        try:
            m = scope.constant(mul.input[1 - side])
        except NotConstant:
            return None
        if m.value.dtype not in _FLOAT_NP:
            return None
        target = self.producer_of(scope, mul.input[side])
        add = None
        nxt = scope.consumer_of(mul.output[0])
        if nxt is not None:
            aidx, anode = nxt
            if (
                anode.op_type == "Add"
                and anode.domain in ONNX_DOMAINS
                and len(anode.input) == 2
                and len(anode.output) == 1
            ):
                other = anode.input[1] if anode.input[0] == mul.output[0] else anode.input[0]
                if other != mul.output[0]:
                    try:
                        a = scope.constant(other)
                    except NotConstant:
                        a = None
                    if a is not None and a.value.dtype == m.value.dtype:
                        add = (aidx, anode, a)

        def affine_for(with_add: bool) -> Callable[[int, int], BNAffine]:
            def make(channels: int, out_rank: int) -> BNAffine:
                mv = channel_vector(m.value, channels, out_rank, 1)
                av = channel_vector(add[2].value, channels, out_rank, 1) if with_add and add else None
                return affine_of(mv, av, channels)

            return make

        try:
            write, _ = self.plan(scope, target, affine_for(True))
            chain = [(idx, mul)] + ([(add[0], add[1])] if add is not None else [])
        except FoldError:
            if add is None:
                raise
            write, _ = self.plan(scope, target, affine_for(False))  # the Mul alone
            chain = [(idx, mul)]

        kind = target.op_type

        def rewrite() -> None:
            write()
            self.absorb(scope, target, chain)
            self.record(scope, mul, target, kind, "decomposed_affine")

        return rewrite

    # ------------------------------------------------------------------------------------------
    # BN before a layer
    # ------------------------------------------------------------------------------------------
    def forward(
        self, scope: Scope, idx: int, bn: onnx.NodeProto, affine: BNAffine
    ) -> Callable[[], None] | None:
        """BN into its only consumer; None when that is not a Conv or Flatten -> Gemm."""
        y = bn.output[0]
        c = scope.consumer_of(y)
        if c is None:
            return None
        cidx, cons = c
        if cons.domain not in ONNX_DOMAINS or not cons.input or cons.input[0] != y:
            return None
        if cons.op_type == "Conv":
            return self.forward_conv(scope, idx, bn, cidx, cons, affine)
        if cons.op_type == "Flatten" and len(cons.output) == 1:
            g = scope.consumer_of(cons.output[0])
            if g is None:
                return None
            gidx, gemm = g
            if gemm.op_type != "Gemm" or gemm.domain not in ONNX_DOMAINS or gemm.input[0] != cons.output[0]:
                return None
            return self.forward_gemm(scope, idx, bn, cidx, cons, gidx, gemm, affine)
        return None

    def _drop_bn_before(
        self, scope: Scope, idx: int, bn: onnx.NodeProto, cidx: int, cons: onnx.NodeProto
    ) -> None:
        """The consumer reads the BN's input directly; the BN goes."""
        x, y = bn.input[0], bn.output[0]
        cons.input[0] = x
        scope.consumer[x] = cidx
        scope.uses[y] -= 1
        scope.removed_values.add(y)
        scope.producer.pop(y, None)
        scope.removed_nodes.add(idx)
        for name in bn.input[1:5]:
            scope.release(name)

    def forward_conv(
        self, scope: Scope, idx: int, bn: onnx.NodeProto, cidx: int, conv: onnx.NodeProto, affine: BNAffine
    ) -> Callable[[], None]:
        auto_pad = attr(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        pads = attr(conv, "pads", None)
        if auto_pad not in ("NOTSET", "VALID") or (auto_pad == "NOTSET" and pads and any(pads)):
            raise FoldError(
                "padding",
                f"the Conv after the BN pads its input (auto_pad={auto_pad}, pads={list(pads or [])}): "
                "the padded zeros would not get the BN's shift",
            )
        if len(conv.input) < 2 or not conv.input[1]:
            raise FoldError("malformed", "Conv has no weight input")
        weight = self.constant(scope, conv.input[1], "weight_not_constant", "weight")
        bias_name = conv.input[2] if len(conv.input) > 2 else ""
        bias = self.bias_of(scope, bias_name, weight)
        group = attr_int(conv, "group", 1)
        new_w, new_b = fold_conv_input(weight.value, bias.value if bias is not None else None, affine, group)
        base = conv.name or conv.output[0]

        def rewrite() -> None:
            scope.set_input(
                conv, 2, new_b, bias, f"{base}_bias_folded" if bias is None else f"{bias.name}_folded"
            )
            scope.set_input(conv, 1, new_w, weight, f"{weight.name}_folded")
            self._drop_bn_before(scope, idx, bn, cidx, conv)
            self.touched.add((scope.label, cidx))
            self.record(scope, bn, conv, "Conv", "bn_before")

        return rewrite

    def forward_gemm(
        self,
        scope: Scope,
        idx: int,
        bn: onnx.NodeProto,
        fidx: int,
        flatten: onnx.NodeProto,
        gidx: int,
        gemm: onnx.NodeProto,
        affine: BNAffine,
    ) -> Callable[[], None]:
        if attr_int(flatten, "axis", 1) != 1:
            raise FoldError(
                "channel_axis", "Flatten axis is not 1: the BN channels do not map onto Gemm features"
            )
        if attr_int(gemm, "transA", 0):
            raise FoldError("channel_axis", "Gemm transA=1: the BN channels do not map onto Gemm features")
        if len(gemm.input) < 2 or not gemm.input[1]:
            raise FoldError("malformed", "Gemm has no B input")
        weight = self.constant(scope, gemm.input[1], "weight_not_constant", "weight")
        c_name = gemm.input[2] if len(gemm.input) > 2 else ""
        c = self.bias_of(scope, c_name, weight)
        trans_b = bool(attr_int(gemm, "transB", 0))
        alpha = attr_float(gemm, "alpha", 1.0)
        beta = attr_float(gemm, "beta", 1.0)
        cv = c.value if c is not None and beta != 0.0 else None
        new_w, new_c = fold_gemm_input(weight.value, cv, affine, trans_b, alpha, beta)
        base = gemm.name or gemm.output[0]
        opset = scope.opset.get("", 1)

        def rewrite() -> None:
            scope.set_input(gemm, 2, new_c, c, f"{base}_bias_folded" if c is None else f"{c.name}_folded")
            scope.set_input(gemm, 1, new_w, weight, f"{weight.name}_folded")
            if any(a.name == "beta" for a in gemm.attribute):
                set_attr(gemm, "beta", 1.0)
            if since_version(opset, (1, 6, 7)) < 7:
                set_attr(gemm, "broadcast", 1)
            self._drop_bn_before(scope, idx, bn, fidx, flatten)
            self.touched.add((scope.label, gidx))
            self.record(scope, bn, gemm, "Gemm", "bn_before")

        return rewrite

    # ------------------------------------------------------------------------------------------
    # BN -> Mul + Add
    # ------------------------------------------------------------------------------------------
    def to_affine(
        self, scope: Scope, idx: int, bn: onnx.NodeProto, affine: BNAffine, version: int, params: list[Const]
    ) -> Callable[[], None]:
        x, y = bn.input[0], bn.output[0]
        rank = scope.rank(x)
        if rank is None:
            raise FoldError("unknown_rank", f"the rank of '{x}' is unknown")
        elem = scope.elem_type(x)
        if elem:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        elif version < 15:
            dtype = params[0].value.dtype  # BN < 15: X and the parameters share one type
        else:
            raise FoldError("unsupported_dtype", f"the element type of '{x}' is unknown")
        if dtype not in _FLOAT_NP:
            raise FoldError("unsupported_dtype", f"'{x}' has dtype {dtype.name}")
        legacy = scope.opset.get("", 1) < 7
        s, t = affine_constants(affine, 2 if legacy else rank, dtype)
        base = bn.name or y

        def rewrite() -> None:
            mul_out = self.names.fresh(f"{y}_scaled")
            mul = onnx.helper.make_node("Mul", [x, ""], [mul_out], name=self.names.fresh(f"{base}_mul"))
            old_params = list(bn.input[1:5])
            bn.op_type = "Add"
            bn.domain = ""
            del bn.attribute[:]
            del bn.input[:]
            bn.input.extend([mul_out, ""])
            del bn.output[1:]
            if legacy:  # opset < 7: broadcasting is explicit, [C] along axis 1
                for n in (mul, bn):
                    n.attribute.extend(
                        [onnx.helper.make_attribute("broadcast", 1), onnx.helper.make_attribute("axis", 1)]
                    )
            scope.set_input(mul, 1, s, None, f"{base}_scale_affine")
            scope.set_input(bn, 1, t, None, f"{base}_shift_affine")
            scope.uses[mul_out] += 1
            if scope.consumer.get(x) == idx:
                del scope.consumer[x]
            scope.inserted.setdefault(idx, []).append(mul)
            for name in old_params:
                scope.release(name)
            self.record(scope, bn, mul, "Mul", "bn_to_affine")

        return rewrite


def fold_model(
    model: onnx.ModelProto, store: TensorStore | None = None, *, bn_to_affine: bool = False
) -> FoldReport:
    """Fold every foldable BN of ``model`` in place and return the report.

    ``store`` reads the tensors' data and makes the new tensors (default: a
    :class:`~bnfold.onnx.tensor_store.MemoryStore`, for models without external data). ``bn_to_affine``
    rewrites the BNs that cannot be folded (inference-mode, constant parameters, input rank
    provable) as ``Mul`` + ``Add`` (pattern ``bn_to_affine``).
    """
    start = time.perf_counter()
    # The pass allocates many small objects and frees none that form cycles (see _Pass.run):
    # the cyclic collector would only re-scan the whole heap several times on a large model.
    collecting = gc.isenabled()
    gc.disable()
    try:
        report = _Pass(model, store or MemoryStore(), bn_to_affine=bn_to_affine).run()
    finally:
        if collecting:
            gc.enable()
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["fold_model", "TARGET_OPS", "bn_version"]
