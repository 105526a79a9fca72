"""The fold rules, one module per pattern, and the order in which they are tried (data, below).

A rule reads the graph through :class:`~bnfold.rules.view.GraphView` only and returns a plan
(:mod:`bnfold.rules.plan`) or a :class:`~bnfold.rules.plan.Skip` with its reason; each front end
applies plans to its own graph. Patterns (``FoldedPair.pattern``):

* ``bn_after`` (:mod:`.bn_after`): Conv / ConvTranspose / Gemm -> BN.
* ``bn_after_chain`` (:mod:`.chains`): through a constant per-channel Add, several BNs in a row, or
  into a layer that already absorbed an earlier fold.
* ``bn_after_passthrough`` (:mod:`.passthrough`): through Identity, inference Dropout or a pair of
  Transposes that cancel (they go with the BN).
* ``concat`` (:mod:`.concat`): Concat of layers along channels -> BN, split by channel ranges.
* ``sum_of_layers`` (:mod:`.sum_of_layers`): Add(layer, layer) -> BN.
* ``bn_after_spatial`` (:mod:`.spatial`): through Resize, pools and ReduceMean, which stay.
* ``split`` (:mod:`.split`): layer -> Split along channels -> BN on a part, into its channel range.
* ``matmul_reshaped`` (:mod:`.matmul_reshaped`): MatMul -> Flatten/Reshape to [M, C] -> BN (LeViT):
  the scale into the weight, the BN becomes Add(shift).
* ``matmul`` (:mod:`.matmul`): MatMul (+ Add) -> BN with 2-D activations, rewritten as one Gemm.
* ``matmul_add`` (:mod:`.matmul`): MatMul -> Add(constant ``[M, N]`` / ``[M, 1]``) -> BN: the Add
  stays with ``s * C + t``.
* ``dequantized_weight`` (:mod:`.dequantized_weight`): Conv with a DequantizeLinear weight.
* ``bn_before`` (:mod:`.bn_before`): BN -> unpadded Conv, or BN -> Flatten -> Gemm.
* ``bn_before_linear`` (:mod:`.bn_before_linear`): BN (2-D) -> Gemm / MatMul, BN -> Flatten -> MatMul.
* ``slice`` (:mod:`.slice`): layer -> Slices along channels (disjoint from the part) -> BN on a part.
* ``layout`` (:mod:`.layout`): layer [-> Add] -> one channel-keeping Transpose / Reshape / Flatten /
  Unsqueeze / Squeeze -> BN (the op stays).
* ``bn_to_affine`` (:mod:`.bn_to_affine`, opt-in): an unfoldable BN as Mul + Add.
* ``merged_branches`` (:mod:`.merged_branches`, opt-in): the parallel Conv / BN / identity branches
  of one input that a tree of Adds sums become one Conv (RepVGG, MobileOne); planned per root Add
  (:func:`plan_merge`) before the BNs, so its BNs are rounded once. Its BN rules only explain the
  BNs of such a block that stay.
* ``decomposed_affine`` (:mod:`.decomposed_affine`): layer -> Mul(m) [-> Add(a)].

The reason codes are :class:`~bnfold.report.Reason`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import FoldError
from ..report import Reason
from . import (
    bn_after,
    bn_before,
    bn_before_linear,
    bn_to_affine,
    concat,
    decomposed_affine,
    layout,
    matmul_reshaped,
    merged_branches,
    passthrough,
    spatial,
    split,
    sum_of_layers,
)
from . import slice as slices
from .common import BN, STRUCTURAL, read_bn
from .plan import FoldAfter, MergeBranches, Plan, Skip
from .view import GraphView, NodeRef


@dataclass(frozen=True)
class Options:
    """What the caller allows beyond exact folds."""

    bn_to_affine: bool = False
    merge_branches: bool = False


@dataclass(frozen=True)
class Rule:
    """One BN rule in the ordered set: tried when ``tried(first refusal, options)`` holds (the
    first rule always is; its refusal says where the BN sits); when it refuses too,
    ``explain(refusal so far, its refusal)`` is the refusal reported."""

    name: str
    plan: Callable[[GraphView, BN], Plan | Skip | None]
    tried: Callable[[Skip, Options], bool]
    explain: Callable[[Skip, Skip], Skip]


def _into_consumer_too(before: Skip, now: Skip) -> Skip:
    return Skip(now.code, f"{now.message} (and it cannot fold into its producer: {before.message})")


def _not_rewritten(before: Skip, now: Skip) -> Skip:
    return Skip(before.code, f"{before.message}; not rewritten as Mul+Add: {now.message}")


def _instead(before: Skip, now: Skip) -> Skip:
    return now  # a rule for what the BN follows says more than "unsupported producer"


def _merge_off(first: Skip, options: Options) -> bool:
    return not options.merge_branches and first.code in STRUCTURAL


def _merge_on(first: Skip, options: Options) -> bool:
    return options.merge_branches and first.code in STRUCTURAL


def _producer_unsupported(first: Skip, options: Options) -> bool:
    return first.code == Reason.UNSUPPORTED_PRODUCER


# The order is policy: into the producer (bn_after, chains, matmul, dequantized_weight); through
# what the producer is when bn_after does not take it (passthrough, concat, sum_of_layers, spatial, matmul_reshaped, split); else, when the first refusal is
# about where the BN sits, into its consumer (bn_before); else through a Slice or a layout op
# (slice, layout: after bn_before, which took such BNs before they existed); a BN of a block of
# branches (RepVGG) then says why it stays: it needs merge_branches, or (flag on) why its block
# did not merge; else, when enabled, Mul+Add.
BN_RULES: tuple[Rule, ...] = (
    Rule("bn_after", bn_after.plan, tried=lambda s, o: True, explain=lambda before, now: now),
    Rule("passthrough", passthrough.plan, tried=_producer_unsupported, explain=_instead),
    Rule("concat", concat.plan, tried=_producer_unsupported, explain=_instead),
    Rule("sum_of_layers", sum_of_layers.plan, tried=_producer_unsupported, explain=_instead),
    Rule("spatial", spatial.plan, tried=_producer_unsupported, explain=_instead),
    Rule("matmul_reshaped", matmul_reshaped.plan, tried=_producer_unsupported, explain=_instead),
    Rule("split", split.plan, tried=_producer_unsupported, explain=_instead),
    Rule("bn_before", bn_before.plan, tried=lambda s, o: s.code in STRUCTURAL, explain=_into_consumer_too),
    Rule(
        "bn_before_linear",
        bn_before_linear.plan,
        tried=lambda s, o: s.code in STRUCTURAL,
        explain=_into_consumer_too,
    ),
    Rule("slice", slices.plan, tried=_producer_unsupported, explain=_instead),
    Rule("layout", layout.plan, tried=_producer_unsupported, explain=_instead),
    Rule("merge_hint", merged_branches.needs_flag, tried=_merge_off, explain=_instead),
    Rule("merge_refusal", merged_branches.refusal, tried=_merge_on, explain=_instead),
    Rule("bn_to_affine", bn_to_affine.plan, tried=lambda s, o: o.bn_to_affine, explain=_not_rewritten),
)

REPORTED_MUL_CODES: frozenset[Reason] = decomposed_affine.REPORTED


def plan_bn(view: GraphView, bn: NodeRef, options: Options) -> Plan | Skip:
    """The first plan of :data:`BN_RULES` for the BatchNormalization ``bn``, or the refusal."""
    try:
        checked = read_bn(view, bn)
    except FoldError as e:
        return Skip(e.code, e.message)
    first: Skip | None = None
    refusal: Skip | None = None
    for rule in BN_RULES:
        if first is not None and not rule.tried(first, options):
            continue
        result = rule.plan(view, checked)
        if result is None:
            continue
        if not isinstance(result, Skip):
            return result
        first = first or result
        refusal = result if refusal is None else rule.explain(refusal, result)
    assert refusal is not None  # the first rule never returns None
    return refusal


def plan_merge(view: GraphView, add: NodeRef) -> MergeBranches | None:
    """The merge of the branches the Add ``add`` sums, or None (its refusal is reported on the
    block's BNs that stay, by the BN rules)."""
    result = merged_branches.plan(view, add)
    return result if isinstance(result, MergeBranches) else None


def plan_mul(view: GraphView, mul: NodeRef) -> FoldAfter | Skip | None:
    """A decomposed BN (a layer times a constant): its plan, a refusal worth reporting, or None."""
    return decomposed_affine.plan(view, mul)


__all__ = ["BN_RULES", "Options", "Rule", "plan_bn", "plan_merge", "plan_mul"]
