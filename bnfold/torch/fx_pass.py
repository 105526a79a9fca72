"""The torch.fx folding pass: the shared fold rules (:mod:`bnfold.rules`) applied to a GraphModule.

Works on the three graph dialects torch produces:

* ``symbolic_trace``: ``call_module`` Conv/Linear/BN nodes, or ``F.conv*``/``F.linear`` +
  ``F.batch_norm`` calls on ``get_attr`` parameters (user subclasses of ``nn.Conv*``/``nn.BatchNorm*``
  are traced through to these functional calls, so extra behaviour in their ``forward`` stays in
  the graph);
* ``torch.export`` / ``ExportedProgram.module()``: ``aten.conv*`` + ``aten.batch_norm``;
* decomposed: ``aten.convolution`` + ``aten._native_batch_norm_legit_no_training`` + ``getitem``.

The graph is read through :class:`~bnfold.torch.view.FxView` (fx nodes as ONNX ops), every BN and
every Mul candidate is planned by the rules exactly as in the ONNX pass, and the plans are applied
by :class:`~bnfold.torch.apply.FxApplier`. Torch-only refusals (``custom_forward``,
``no_running_stats``, ``training_mode`` of a module) are checked before the rules are asked.
Folding happens per graph node, never by mutating a shared module or tensor: a conv module called
at several places gets a folded copy for the one call followed by BN; a parameter read by several
nodes is copied. The math is :mod:`bnfold.folding` (float64, rounded once into the layer's dtype).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import fx

from ..errors import FoldError
from ..report import FoldedPair, FoldReport, Pattern, Reason, SkippedBN
from ..rules import REPORTED_MUL_CODES, Options, plan_bn, plan_merge, plan_mul
from ..rules.plan import FoldAfter, FoldBefore, FoldBranches, FoldScale, Plan, Skip
from ..rules.view import AttributeRef, BadAttribute, NodeRef
from .apply import FxApplier
from .batchnorm import TorchSkip, bn_call, is_bn
from .tensors import erased
from .view import FxView

GRAPH = "fx"  # FoldedPair.graph / SkippedBN.graph of every fold in a GraphModule


class FxFolder:
    """Fold every foldable BN of a GraphModule in place (the caller passes a private copy)."""

    def __init__(self, gm: fx.GraphModule, options: Options | None = None) -> None:
        self.gm = gm
        self.options = options or Options()
        self.report = FoldReport()
        self.view = FxView(gm)
        self.applier = FxApplier(self.view)

    def run(self) -> FoldReport:
        start = time.perf_counter()
        graph = self.gm.graph
        view = self.view
        self.report.nodes_before = len(graph.nodes)
        if self.options.merge_branches:
            self._merge()
        for node in list(graph.nodes):
            if erased(node):
                continue
            if is_bn(node, view.modules):
                try:
                    bn_call(node, view.modules)
                except TorchSkip as e:
                    self._skip(node, e.code, e.message)
                    continue
                self._attempt(node, lambda ref: plan_bn(view, ref, self.options), mul=False)
            elif view.mapped(node).op == "Mul":
                self._attempt(node, lambda ref: plan_mul(view, ref), mul=True)
        self.applier.finish()
        self.report.nodes_after = len(graph.nodes)
        self.report.seconds = time.perf_counter() - start
        return self.report

    def _merge(self) -> None:
        """Merge every block of branches an add sums (from the last add up), before the BNs."""
        view = self.view
        for node in reversed(list(self.gm.graph.nodes)):
            if erased(node) or view.mapped(node).op != "Add":
                continue
            try:
                plan = plan_merge(view, view.ref(node))
            except Exception:  # noqa: BLE001 - an add the merge cannot read is left as it is
                plan = None
            if plan is None:
                continue
            target = view.info(plan.kept)
            labels = [view.info(ref).label for ref in plan.bns]
            self.applier.merge(plan)
            self.report.folded.extend(
                FoldedPair(label, target.label, target.kind, GRAPH, Pattern.MERGED_BRANCHES)
                for label in labels
            )
            self.report.merged_convs += plan.convs_removed

    def _attempt(self, node: fx.Node, ask: Callable[[NodeRef], Plan | Skip | None], mul: bool) -> None:
        """Ask the rules about ``node`` and apply the plan, or report the refusal (a Mul candidate
        only for the reasons its rule reports)."""
        try:
            try:
                result = ask(self.view.ref(node))
            except FoldError as e:
                result = Skip(e.code, e.message)
            except (AttributeRef, BadAttribute) as e:
                result = Skip(Reason.MALFORMED, str(e))
        except Exception as e:  # noqa: BLE001 - refuse what we cannot read, never crash
            result = None if mul else Skip(Reason.MALFORMED, f"cannot be analysed: {type(e).__name__}: {e}")
        if isinstance(result, Skip):
            if not mul or result.code in REPORTED_MUL_CODES:
                self._skip(node, result.code, result.message, mul)
        elif result is not None:
            self._apply(result)

    def _apply(self, plan: Plan) -> None:
        view = self.view
        if isinstance(plan, FoldAfter):
            target = view.info(plan.target)
            pairs = [(plan.anchor, plan.pattern)] + [(later, Pattern.BN_AFTER_CHAIN) for later in plan.also]
        elif isinstance(plan, FoldBefore):
            target = view.info(plan.target)
            pairs = [(plan.bn, Pattern.BN_BEFORE)]
        elif isinstance(plan, FoldScale):
            target = view.info(plan.target)
            pairs = [(plan.bn, plan.layer.pattern)]
        elif isinstance(plan, FoldBranches):  # into the join, or its one layer (as the ONNX pass)
            target = view.info(plan.join if len(plan.targets) > 1 else plan.targets[0])
            pairs = [(plan.anchor, plan.pattern)] + [(later, Pattern.BN_AFTER_CHAIN) for later in plan.also]
        else:
            raise TypeError(f"the fx front end does not apply {type(plan).__name__} plans")
        labels = [(view.info(ref).label, pattern) for ref, pattern in pairs]
        self.applier.apply(plan)
        for label, pattern in labels:
            self.report.folded.append(FoldedPair(label, target.label, target.kind, GRAPH, pattern))

    def _skip(self, node: fx.Node, code: Reason, message: str, mul: bool = False) -> None:
        inp = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        label = node.target if node.op == "call_module" else node.name
        (self.report.skipped_affine if mul else self.report.skipped).append(
            SkippedBN(
                str(label),
                Reason(code),
                message,
                GRAPH,
                inp.name if inp is not None else None,
                (inp.op if inp is not None else None),
                op="Mul" if mul else "BatchNormalization",
            )
        )


def fold_graph_module(gm: fx.GraphModule, options: Options | None = None) -> FoldReport:
    """Fold every foldable BN of ``gm`` in place and return the report (``options``: what the
    caller allows beyond exact folds, e.g. ``merge_branches``)."""
    return FxFolder(gm, options).run()
