"""The ONNX folding pass: find every BatchNormalization that directly follows a Conv,
ConvTranspose or Gemm, check that folding it is exact, and rewrite the protobuf in place.

Every BN that stays gets a :class:`~bnfold.report.SkippedBN` with a stable reason code; the pass
never raises for a model it can read. Dropping a BN gives the layer the BN's output name, so no
consumer is rewired and graph output names are kept.

Reason codes: ``training_mode``, ``spatial_mode``, ``attribute_ref``, ``malformed``,
``no_producer``, ``producer_outside_scope``, ``unsupported_producer``, ``graph_output``,
``multiple_consumers``, ``param_not_constant``, ``weight_not_constant``, ``bias_not_constant``,
``unsupported_dtype``, ``param_shape``, ``non_finite``, ``invalid_variance``,
``channel_mismatch``, ``invalid_group``, ``weight_shape``, ``bias_shape``, ``overflow``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import onnx

from .folding import BNAffine, FoldError, bn_affine, fold_conv, fold_conv_transpose, fold_gemm
from .graph import (
    ONNX_DOMAINS,
    AttributeRef,
    BadAttribute,
    BadTensor,
    Const,
    NameAllocator,
    NotConstant,
    Scope,
    all_names,
    attr_float,
    attr_int,
    free_uses,
    set_attr,
    subgraphs,
)
from .report import FoldedPair, FoldReport, SkippedBN

TARGET_OPS = ("Conv", "ConvTranspose", "Gemm")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


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


def _count(model: onnx.ModelProto) -> tuple[int, int]:
    """Total (nodes, initializers) over the graph, its subgraphs and the model's functions."""
    nodes = inits = 0

    def visit(g: onnx.GraphProto) -> None:
        nonlocal nodes, inits
        nodes += len(g.node)
        inits += len(g.initializer)
        for n in g.node:
            for _, sub in subgraphs(n):
                visit(sub)

    visit(model.graph)
    for f in model.functions:
        nodes += len(f.node)
        for n in f.node:
            for _, sub in subgraphs(n):
                visit(sub)
    return nodes, inits


class _Pass:
    def __init__(self, model: onnx.ModelProto, base_dir: str) -> None:
        self.model = model
        self.base_dir = base_dir
        self.names = NameAllocator(all_names(model))
        self.report = FoldReport()

    def run(self) -> FoldReport:
        model = self.model
        self.report.nodes_before, self.report.initializers_before = _count(model)
        top = Scope.build(
            model.graph, "main", _opset_map(model.opset_import), model.ir_version,
            self.base_dir, self.names,
        )
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
            scope = Scope.build(
                f, f"function {f.domain}:{f.name}", opset, model.ir_version, self.base_dir, self.names
            )
            self.process(scope)
        self.report.nodes_after, self.report.initializers_after = _count(model)
        return self.report

    def process(self, scope: Scope) -> None:
        nodes = scope.proto.node
        for idx in range(len(nodes)):
            node = nodes[idx]
            if node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS:
                try:
                    rewrite = self.prepare(scope, idx, node)
                except FoldError as e:
                    self.skip(scope, node, e.code, e.message)
                except Exception as e:  # noqa: BLE001 - refuse what we cannot read, never crash
                    self.skip(scope, node, "malformed", f"cannot be analysed: {type(e).__name__}: {e}")
                else:
                    rewrite()
        for idx in range(len(nodes)):
            if idx in scope.removed_nodes:
                continue
            node = nodes[idx]
            for attr_name, g in subgraphs(node):
                label = f"{scope.label}/{node.name or f'{node.op_type}_{idx}'}.{attr_name}"
                child = Scope.build(
                    g, label, scope.opset, scope.ir_version, scope.base_dir, scope.names, scope
                )
                self.process(child)
        scope.commit()

    def skip(self, scope: Scope, bn: onnx.NodeProto, code: str, message: str) -> None:
        x = bn.input[0] if bn.input else ""
        prod = scope.node_of(x) if x else None
        self.report.skipped.append(
            SkippedBN(
                bn=bn.name or (bn.output[0] if bn.output else ""),
                code=code,
                message=message,
                graph=scope.label,
                producer=(prod.name or prod.output[0]) if prod is not None else None,
                producer_op=prod.op_type if prod is not None else None,
            )
        )

    # ------------------------------------------------------------------------------------------
    def prepare(self, scope: Scope, idx: int, bn: onnx.NodeProto) -> Callable[[], None]:
        """Check that BN node ``idx`` folds into its producer and compute the folded tensors.

        Returns the rewrite (which cannot fail) or raises FoldError with the reason. Nothing in
        the graph changes before the rewrite runs.
        """
        if len(bn.input) < 5 or not all(bn.input[:5]) or not bn.output or not bn.output[0]:
            raise FoldError("malformed", "BatchNormalization needs inputs X, scale, B, mean, var and output Y")
        version = bn_version(scope.opset.get("", 1))
        try:
            self.check_inference_mode(bn, version)
            epsilon = attr_float(bn, "epsilon", 1e-5)
        except AttributeRef as e:
            raise FoldError("attribute_ref", f"{e}; its value is unknown inside the function") from None
        except BadAttribute as e:
            raise FoldError("malformed", str(e)) from None

        x = bn.input[0]
        target = self.producer_of(scope, x)
        params = [self.constant(scope, n, "param_not_constant", "BN parameter") for n in bn.input[1:5]]
        affine = bn_affine(*(p.value for p in params), epsilon=epsilon)
        try:
            plan = self.plan(scope, target, affine)
        except AttributeRef as e:
            raise FoldError("attribute_ref", f"{target.op_type}: {e}") from None
        except BadAttribute as e:
            raise FoldError("malformed", str(e)) from None
        return lambda: self.rewrite(scope, idx, bn, target, plan)

    def rewrite(self, scope: Scope, idx: int, bn: onnx.NodeProto, target: onnx.NodeProto,
                plan: Callable[[], None]) -> None:
        """Write the folded tensors and drop the BN (all checks passed, nothing here can fail)."""
        plan()
        old = target.output[0]
        target.output[0] = bn.output[0]
        pidx = scope.producer.pop(old)
        scope.producer[bn.output[0]] = pidx
        scope.uses[old] -= 1
        scope.removed_values.add(old)
        scope.removed_nodes.add(idx)
        for name in bn.input[1:5]:
            scope.release(name)
        self.report.folded.append(
            FoldedPair(
                bn=bn.name or bn.output[0],
                target=target.name or target.output[0],
                kind=target.op_type,
                graph=scope.label,
            )
        )

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

    @staticmethod
    def producer_of(scope: Scope, x: str) -> onnx.NodeProto:
        target = scope.node_of(x)
        if target is None:
            owner = scope.owner(x)
            if owner is not None and owner is not scope and owner.node_of(x) is not None:
                raise FoldError(
                    "producer_outside_scope",
                    f"input '{x}' is produced outside this subgraph",
                )
            raise FoldError("no_producer", f"input '{x}' is a graph input or initializer")
        if target.domain not in ONNX_DOMAINS or target.op_type not in TARGET_OPS:
            op = f"{target.domain}.{target.op_type}" if target.domain not in ONNX_DOMAINS else target.op_type
            raise FoldError("unsupported_producer", f"follows {op}, not Conv/ConvTranspose/Gemm")
        if len(target.output) != 1:
            raise FoldError("malformed", f"{target.op_type} must have exactly one output")
        if x in scope.outputs:
            raise FoldError("graph_output", f"'{x}' is also a graph output")
        if scope.uses[x] != 1:
            raise FoldError(
                "multiple_consumers", f"'{x}' has {scope.uses[x] - 1} consumer(s) besides the BN"
            )
        return target

    @staticmethod
    def constant(scope: Scope, name: str, code: str, what: str) -> Const:
        try:
            c = scope.constant(name)
        except BadTensor as e:
            raise FoldError("malformed", f"{what}: {e}") from None
        except NotConstant as e:
            raise FoldError(code, f"{what} is not constant: {e}") from None
        if c.value.dtype.name not in FLOAT_DTYPES:
            raise FoldError("unsupported_dtype", f"{what} '{name}' has dtype {c.value.dtype.name}")
        return c

    def plan(self, scope: Scope, target: onnx.NodeProto, affine: BNAffine):  # noqa: ANN201
        """Compute the folded constants; return a closure that writes them into the graph."""
        weight = self.constant(scope, target.input[1], "weight_not_constant", "weight") \
            if len(target.input) > 1 and target.input[1] else None
        if weight is None:
            raise FoldError("malformed", f"{target.op_type} has no weight input")
        bias_name = target.input[2] if len(target.input) > 2 else ""
        bias = self.constant(scope, bias_name, "bias_not_constant", "bias") if bias_name else None
        if bias is not None and bias.value.dtype != weight.value.dtype:
            raise FoldError("unsupported_dtype", "bias and weight have different dtypes")
        base = target.name or target.output[0]
        op = target.op_type
        opset = scope.opset.get("", 1)
        if op == "Gemm":
            trans_b = bool(attr_int(target, "transB", 0))
            beta = attr_float(target, "beta", 1.0)
            c = bias.value if bias is not None else None
            if c is not None and beta == 0.0:
                c = None  # beta * C contributes nothing
            new_w, new_b = fold_gemm(weight.value, c, affine, trans_b, beta)
        else:
            group = attr_int(target, "group", 1)
            fold = fold_conv if op == "Conv" else fold_conv_transpose
            new_w, new_b = fold(weight.value, bias.value if bias is not None else None, affine, group)

        def write() -> None:
            # Bias first: releasing a computed bias may leave the weight with a single user, which
            # then lets the weight be updated in place under its own name.
            scope.set_input(target, 2, new_b, bias, f"{base}_bias_folded" if bias is None else f"{bias.name}_folded")
            scope.set_input(target, 1, new_w, weight, f"{weight.name}_folded")
            if op == "Gemm":
                if any(a.name == "beta" for a in target.attribute):
                    set_attr(target, "beta", 1.0)
                if since_version(opset, (1, 6, 7)) < 7:
                    set_attr(target, "broadcast", 1)

        return write


def fold_model(model: onnx.ModelProto, base_dir: str = "") -> FoldReport:
    """Fold every foldable BN of ``model`` in place and return the report.

    ``base_dir`` is where external data of the model's tensors is read from.
    """
    start = time.perf_counter()
    report = _Pass(model, base_dir).run()
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["fold_model", "TARGET_OPS", "bn_version"]
