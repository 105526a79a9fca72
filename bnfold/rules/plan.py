"""What a rule returns: a plan the front end applies to its own graph, or a skip with a reason.

A plan holds the new constants (computed, rounded once) and says which nodes go away and which
output name stays; applying it cannot fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..report import Pattern, Reason
from .view import NodeRef


@dataclass(frozen=True)
class Skip:
    """A refusal: a stable reason code and a one-line message."""

    code: Reason
    message: str


@dataclass(frozen=True)
class TensorEdit:
    """Input ``index`` of ``node`` becomes the constant ``value``. ``old``: the constant it replaces
    (overwritten in place when nothing else reads it), or None; ``name``: the new tensor's name
    when one is made (made unique by the front end)."""

    node: NodeRef
    index: int
    value: np.ndarray
    old: str | None
    name: str


@dataclass(frozen=True)
class AttributeEdit:
    """Set scalar attribute ``name`` of ``node`` (only when it is already there, with
    ``if_present``)."""

    node: NodeRef
    name: str
    value: float | int
    if_present: bool = False


@dataclass(frozen=True)
class LayerEdit:
    """The layer side of a fold: new constants in order (bias first), then the layer's new op type
    (``Gemm`` for a MatMul) and attributes."""

    pattern: Pattern
    tensors: tuple[TensorEdit, ...]
    retype: tuple[NodeRef, str] | None = None
    attributes: tuple[AttributeEdit, ...] = ()


@dataclass(frozen=True)
class FoldAfter:
    """Per-channel nodes after ``target`` fold into it: ``absorbed`` (in graph order) go away and
    the layer takes the last one's output name. ``anchor`` is reported with ``pattern``; ``also``
    (BNs after it, folded in the same step) are reported as ``bn_after_chain``."""

    anchor: NodeRef
    target: NodeRef
    layer: LayerEdit
    pattern: Pattern
    absorbed: tuple[NodeRef, ...]
    also: tuple[NodeRef, ...] = ()


@dataclass(frozen=True)
class FoldBranches:
    """A BN after a node joining layers (a Concat along channels, an Add of two layers) folds into
    each of them: ``layers`` are their edits (each computed and rounded once); ``join`` (its output
    ``output``) takes the last absorbed node's output name and ``absorbed`` (the BN, then ``also``:
    BNs after it, folded in the same step) go. Also a node between one layer and the BN that stays
    (a pool, a Split part)."""

    anchor: NodeRef
    join: NodeRef
    layers: tuple[LayerEdit, ...]
    targets: tuple[NodeRef, ...]
    pattern: Pattern
    absorbed: tuple[NodeRef, ...]
    also: tuple[NodeRef, ...] = ()
    output: int = 0


@dataclass(frozen=True)
class FoldScale:
    """A BN's scale folds into ``target`` (``layer``: its new weight) and the BN becomes
    ``Add(shift)`` on its own input, keeping its output name (there is no bias to take the shift)."""

    bn: NodeRef
    target: NodeRef
    layer: LayerEdit
    shift: np.ndarray


@dataclass(frozen=True)
class FoldBefore:
    """A BN folds into the layer after it: ``bypass`` (the layer, or the Flatten before a Gemm)
    reads the BN's input instead, and the BN goes."""

    bn: NodeRef
    bypass: NodeRef
    target: NodeRef
    layer: LayerEdit


@dataclass(frozen=True)
class ToAffine:
    """A BN rewritten as ``Mul(scale)`` then ``Add(shift)`` (``legacy``: opset < 7, explicit
    broadcast along axis 1)."""

    bn: NodeRef
    scale: np.ndarray
    shift: np.ndarray
    legacy: bool


@dataclass(frozen=True)
class MergeBranches:
    """Parallel branches of one input that a tree of Adds sums become one Conv: ``kept`` (a branch
    Conv with the largest kernel) takes ``layer`` (the merged weight and bias) and the output name
    ``output`` (the root Add's, or the last BN's after it); ``removed`` (the other branch Convs, the
    BNs, the Adds) go. ``bns``: the BNs merged away (reported with pattern ``merged_branches``);
    ``convs_removed``: how many Convs went."""

    root: NodeRef
    kept: NodeRef
    layer: LayerEdit
    removed: tuple[NodeRef, ...]
    bns: tuple[NodeRef, ...]
    convs_removed: int
    output: str


Plan = FoldAfter | FoldBefore | ToAffine | FoldBranches | FoldScale
