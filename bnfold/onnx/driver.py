"""The ONNX folding pass: walk every graph, subgraph and function body, ask the rules
(:mod:`bnfold.rules`) for a plan for each BatchNormalization and each Mul candidate (a decomposed
BN), apply the plans to the protobuf in place, and build the report.

Every BN that stays gets a :class:`~bnfold.report.SkippedBN` with a stable reason code; the pass
never raises for a model it can read. Dropping a BN gives the layer the BN's output name, so no
consumer is rewired and graph output names are kept. A Mul candidate that does not fold is reported
in ``FoldReport.skipped_affine`` (``SkippedBN.op == "Mul"``) only for the reasons of
:data:`bnfold.rules.decomposed_affine.REPORTED`; otherwise it is left alone silently.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx

from ..report import FoldedPair, FoldReport, Pattern, Reason, SkippedBN
from ..rules import REPORTED_MUL_CODES, Options, plan_bn, plan_merge, plan_mul
from ..rules.common import TARGET_OPS
from ..rules.plan import FoldAfter, FoldBefore, FoldBranches, FoldScale, Plan, Skip
from ..rules.view import AttributeRef, BadAttribute, NodeRef
from . import bulk
from .apply import apply_affine, apply_after, apply_before, apply_branches, apply_merge, apply_scale
from .edits import Scope
from .index import NameAllocator, all_names, free_uses, subgraphs
from .ops import ONNX_DOMAINS
from .tensor_store import MemoryStore, TensorStore
from .view import OnnxView


def _opset_map(imports: list[onnx.OperatorSetIdProto] | object) -> dict[str, int]:
    out: dict[str, int] = {}
    for imp in imports:  # type: ignore[union-attr]
        out["" if imp.domain in ONNX_DOMAINS else imp.domain] = imp.version
    return out


@dataclass(frozen=True)
class _Kept:
    """A BN the pass kept: its node index, its record in ``report.skipped``, and how many folds
    the report held when it was last asked."""

    index: int
    node: onnx.NodeProto
    record: int
    folds_seen: int


class _Pass:
    def __init__(
        self, model: onnx.ModelProto, store: TensorStore, options: Options, bulk: bool = True
    ) -> None:
        self.model = model
        self.store = store
        self.options = options
        self.folds_only = replace(options, bn_to_affine=False)  # until the folds' fixed point
        self.bulk = bulk
        self.names = NameAllocator(set())  # filled from the main graph's index in run()
        self.report = FoldReport()
        self.folded: set[tuple[str, int]] = set()  # (scope label, node index) of layers folded into
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
        view = OnnxView(scope, self.folded)
        if self.options.merge_branches:
            self.merge(view)
        candidates = []
        for idx, node in enumerate(nodes):
            op = node.op_type
            if idx in scope.removed_nodes:
                continue
            if (op == "BatchNormalization" or op == "Mul") and node.domain in ONNX_DOMAINS:
                candidates.append((idx, node, op))
        bns = [(i, n) for i, n, op in candidates if op == "BatchNormalization"]
        jobs = bulk.prepare(scope, view, self.store, bns) if self.bulk else {}
        record = functools.partial(self.record, scope)
        kept: list[_Kept] = []
        for idx, node, op in candidates:
            if idx in scope.removed_nodes:
                continue
            if op == "BatchNormalization":
                job = jobs.get(idx)
                if job is not None and bulk.rewrite(scope, idx, node, job, self.folded, record):
                    continue
                at = len(self.report.skipped)
                if not self.attempt(view, idx, node, self.ask_bn(view, self.folds_only), mul=False):
                    kept.append(_Kept(idx, node, at, len(self.report.folded)))
            else:
                self.attempt(view, idx, node, lambda ref: plan_mul(view, ref), mul=True)
        kept = self.revisit(view, kept)
        if self.options.bn_to_affine:
            self.rewrite_kept(view, kept)
        for idx in scope.subgraph_nodes:
            if idx in scope.removed_nodes:
                continue
            node = nodes[idx]
            for attr_name, g in subgraphs(node):
                label = f"{scope.label}/{node.name or f'{node.op_type}_{idx}'}.{attr_name}"
                self.process(self.scope(g, label, scope.opset, scope))
        scope.commit()

    def merge(self, view: OnnxView) -> None:
        """The first phase with ``merge_branches``: every Add that sums a block of branches, from
        the last one up (the top of a tree before the Adds under it), before any BN is folded."""
        scope = view.scope
        nodes = scope.proto.node
        adds = [i for i, n in enumerate(nodes) if n.op_type == "Add" and n.domain in ONNX_DOMAINS]
        for idx in reversed(adds):
            if idx in scope.removed_nodes:
                continue
            view.forget()
            try:
                plan = plan_merge(view, view.ref(idx, nodes[idx]))
            except Exception:  # noqa: BLE001 - an Add the merge cannot read is left as it is
                plan = None
            if plan is not None:
                apply_merge(view, plan, self.folded)
                target = view.node(plan.kept)
                for bn in plan.bns:
                    self.record(scope, view.node(bn), target, "Conv", Pattern.MERGED_BRANCHES)
                self.report.merged_convs += plan.convs_removed
            view.forget()

    def ask_bn(self, view: OnnxView, options: Options) -> Callable[[NodeRef], Plan | Skip | None]:
        return lambda ref: plan_bn(view, ref, options)

    def rewrite_kept(self, view: OnnxView, kept: list[_Kept]) -> None:
        """``bn_to_affine``: the BNs still kept once the folds reached their fixed point are asked
        with the rewrite allowed (so a BN a later fold makes foldable is folded, not rewritten); one
        rewritten loses its record, one refused again gets the refusal that names the rewrite."""
        gone: list[int] = []
        for k in kept:
            if k.index in view.scope.removed_nodes:
                continue
            at = len(self.report.skipped)
            if self.attempt(view, k.index, k.node, self.ask_bn(view, self.options), mul=False):
                gone.append(k.record)
            elif len(self.report.skipped) > at:  # the refusal naming the rewrite replaces the first
                self.report.skipped[k.record] = self.report.skipped.pop()
        for at in sorted(gone, reverse=True):
            del self.report.skipped[at]

    def revisit(self, view: OnnxView, kept: list[_Kept]) -> list[_Kept]:
        """The fixed point in one call: a BN kept before a later fold changed the graph is asked
        again (a BN -> Flatten -> MatMul -> BN: folding the second BN makes the MatMul a Gemm,
        which only then takes the first), until a round folds nothing. A BN that stays keeps its
        first record; one that folds now loses it. Returns the BNs still kept."""
        gone: list[int] = []
        while kept:
            progress = False
            still: list[_Kept] = []
            for k in kept:
                if k.index in view.scope.removed_nodes:
                    continue
                if len(self.report.folded) == k.folds_seen:
                    still.append(k)
                elif self.attempt(
                    view, k.index, k.node, self.ask_bn(view, self.folds_only), mul=False, report=False
                ):
                    gone.append(k.record)
                    progress = True
                else:
                    still.append(_Kept(k.index, k.node, k.record, len(self.report.folded)))
            kept = still
            if not progress:
                break
        for at in sorted(gone, reverse=True):
            del self.report.skipped[at]
        return [
            _Kept(k.index, k.node, k.record - sum(g < k.record for g in gone), k.folds_seen) for k in kept
        ]

    def attempt(
        self,
        view: OnnxView,
        idx: int,
        node: onnx.NodeProto,
        ask: Callable[[NodeRef], Plan | Skip | None],
        mul: bool,
        report: bool = True,
    ) -> bool:
        """Ask the rules about ``node`` (no mutation) and apply the plan, or report the refusal
        (unless ``report`` is off); True when it folded. A Mul candidate is reported only when its
        rule says so, never for an unreadable model."""
        scope = view.scope
        ref = view.ref(idx, node)
        view.forget()
        try:
            try:
                result = ask(ref)
            except AttributeRef as e:
                result = Skip(Reason.ATTRIBUTE_REF, f"{e}; its value is unknown inside the function")
            except BadAttribute as e:
                result = Skip(Reason.MALFORMED, str(e))
        except Exception as e:  # noqa: BLE001 - refuse what we cannot read, never crash
            result = None if mul else Skip(Reason.MALFORMED, f"cannot be analysed: {type(e).__name__}: {e}")
        folded = False
        if isinstance(result, Skip):
            if report and (not mul or result.code in REPORTED_MUL_CODES):
                self.skip(
                    scope, node, result.code, result.message, self.report.skipped_affine if mul else None
                )
        elif result is not None:
            self.apply(view, result)
            folded = True
        view.forget()
        return folded

    def apply(self, view: OnnxView, plan: Plan) -> None:
        scope = view.scope
        if isinstance(plan, FoldAfter):
            apply_after(view, plan, self.folded)
            anchor, target = view.node(plan.anchor), view.node(plan.target)
            self.record(scope, anchor, target, plan.target.op, plan.pattern)
            for later in plan.also:
                self.record(scope, view.node(later), target, plan.target.op, Pattern.BN_AFTER_CHAIN)
        elif isinstance(plan, FoldBranches):
            apply_branches(view, plan, self.folded)
            into = plan.join if len(plan.targets) > 1 else plan.targets[0]  # one layer: name it
            for bn_ref, pattern in (
                (plan.anchor, plan.pattern),
                *((b, Pattern.BN_AFTER_CHAIN) for b in plan.also),
            ):
                self.record(scope, view.node(bn_ref), view.node(into), into.op, pattern)
        elif isinstance(plan, FoldScale):
            bn = view.node(plan.bn)
            record_as = bn.name or bn.output[0]  # the BN node becomes the Add
            apply_scale(view, plan, self.folded)
            self.report.folded.append(
                FoldedPair(
                    record_as,
                    view.node(plan.target).name or view.node(plan.target).output[0],
                    plan.target.op,
                    scope.label,
                    plan.layer.pattern,
                )
            )
        elif isinstance(plan, FoldBefore):
            apply_before(view, plan, self.folded)
            self.record(scope, view.node(plan.bn), view.node(plan.target), plan.target.op, plan.layer.pattern)
        else:
            bn = view.node(plan.bn)
            mul = apply_affine(view, plan, self.names)
            self.record(scope, bn, mul, "Mul", Pattern.BN_TO_AFFINE)

    def skip(
        self,
        scope: Scope,
        bn: onnx.NodeProto,
        code: Reason,
        message: str,
        into: list[SkippedBN] | None = None,
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
        self, scope: Scope, anchor: onnx.NodeProto, target: onnx.NodeProto, kind: str, pattern: Pattern
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


def fold_model(
    model: onnx.ModelProto,
    store: TensorStore | None = None,
    *,
    bn_to_affine: bool = False,
    merge_branches: bool = False,
    bulk: bool = True,
) -> FoldReport:
    """Fold every foldable BN of ``model`` in place and return the report.

    ``store`` reads the tensors' data and makes the new tensors (default: a
    :class:`~bnfold.onnx.tensor_store.MemoryStore`, for models without external data). ``bn_to_affine``
    rewrites the BNs that cannot be folded (inference-mode, constant parameters, input rank
    provable) as ``Mul`` + ``Add`` (pattern ``bn_to_affine``). ``merge_branches`` first merges the
    parallel Conv / BN / identity branches of one input that a tree of Adds sums (RepVGG,
    MobileOne) into one Conv (pattern ``merged_branches``; ``FoldReport.merged_convs`` counts the
    Convs removed), then folds the BNs. ``bulk``: fold plain Conv -> BN
    pairs all at once (:mod:`bnfold.onnx.bulk`); False folds every BN one by one, with the same
    result (the tests compare both).
    """
    start = time.perf_counter()
    # The pass allocates many small objects and frees none that form cycles (see _Pass.run):
    # the cyclic collector would only re-scan the whole heap several times on a large model.
    collecting = gc.isenabled()
    gc.disable()
    try:
        report = _Pass(
            model,
            store or MemoryStore(),
            Options(bn_to_affine=bn_to_affine, merge_branches=merge_branches),
            bulk,
        ).run()
    finally:
        if collecting:
            gc.enable()
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["fold_model"]
