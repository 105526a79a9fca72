"""``merged_branches`` (opt-in, ``merge_branches``): the parallel branches of one input that a tree
of Adds sums (RepVGG, MobileOne, FastViT's MobileOneBlock, RepGhost, ACNet) become one Conv.

A leaf of the tree (see :mod:`.branches`) is ``Conv(x)`` with a constant weight and optional bias,
optionally followed by an inference BN; ``BN(x)``; or ``x`` itself. Every Conv reads the same
``x`` with the same group and strides, no dilation on a kernel axis wider than one, and is centred
on the largest kernel ``K`` (pads ``P``): for a kernel ``k`` with pads ``p``, on every axis and at
both ends, ``P - p = (K - k) / 2``. So every branch computes the same output positions and

    sum_i BN_i(W_i * x + b_i) + BN_id(x) = W * x + b,
    W = sum_i s_i W_i (zero-padded to K, centred) + s_id * I,   b = sum_i (s_i b_i + t_i) + t_id,

where ``I`` is a centred one-hot kernel: output channel ``c`` reads input index ``c mod (Cin/group)``
of its group (an identity needs stride 1, ``Cout == Cin`` and ``P = (K - 1) / 2``: the size kept).
BNs right after the root Add compose in too. Everything is computed in float64 from the original
tensors and rounded once into the weight's dtype. The kept Conv is the first leaf with the largest
kernel on every axis; it takes the output name of the root Add (or of the last BN after it); the
other Convs, the branch BNs and the Adds go.

:func:`plan` is the merge of one root Add (None when it is no block: no Conv leaf, a constant
summand, nothing to remove). The BN rules :func:`needs_flag` (flag off: the BN would merge) and
:func:`refusal` (flag on: why its block did not merge) explain the BNs of a block that stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import FoldError
from ..folding import BNAffine
from ..report import Pattern, Reason
from ..rounding import round_to_dtype
from .bn_after import layer_tensors
from .branches import (
    MAX_LEAVES,
    Branch,
    Leaf,
    classify,
    is_add,
    is_constant,
    leaf_affine,
    not_a_branch,
    read_branch,
    tree,
)
from .chains import following_bns
from .common import BN, bn_version
from .plan import LayerEdit, MergeBranches, Skip
from .view import AttributeRef, BadAttribute, GraphView, NodeRef

# what reading a block may raise besides FoldError: the BN rules then leave the BN's reason alone
_UNREADABLE = (AttributeRef, BadAttribute)


@dataclass(frozen=True)
class Identity:
    """An identity branch: ``bn`` on ``x`` (its map ``affine``), or ``x`` itself (both None)."""

    bn: NodeRef | None
    affine: BNAffine | None


@dataclass(frozen=True)
class Block:
    """A tree of Adds whose branches can merge: ``kept`` indexes ``branches``; ``after``: the BNs
    right after the root (their map ``after_map``)."""

    root: NodeRef
    adds: tuple[NodeRef, ...]
    branches: tuple[Branch, ...]
    identities: tuple[Identity, ...]
    kept: int
    kernel: tuple[int, ...]
    after: tuple[NodeRef, ...]
    after_map: BNAffine | None

    @property
    def bns(self) -> tuple[NodeRef, ...]:
        """Every BN that goes: the branches' (conv ones first), then those after the root."""
        found = [b.bn for b in self.branches if b.bn is not None]
        found += [i.bn for i in self.identities if i.bn is not None]
        return (*found, *self.after)


def _geometry(branches: Sequence[Branch]) -> tuple[int, tuple[int, ...]]:
    """The kept branch and the largest kernel; FoldError unless the branches fit one kernel."""
    first = branches[0]
    for b in branches[1:]:
        where = f"Conv '{b.conv.label}' and Conv '{first.conv.label}'"
        if b.weight.dtype != first.weight.dtype:
            raise FoldError(
                Reason.UNSUPPORTED_DTYPE,
                f"{where} have weights of dtypes {b.weight.dtype.name} and {first.weight.dtype.name}",
            )
        if b.weight.ndim != first.weight.ndim:
            raise FoldError(Reason.BRANCH_MISMATCH, f"{where} have kernels of different ranks")
        if b.group != first.group:
            raise FoldError(Reason.BRANCH_MISMATCH, f"{where} have groups {b.group} and {first.group}")
        if b.weight.shape[:2] != first.weight.shape[:2]:
            raise FoldError(
                Reason.BRANCH_MISMATCH,
                f"{where} have weights [{b.weight.shape[0]}, {b.weight.shape[1]}, ...] and "
                f"[{first.weight.shape[0]}, {first.weight.shape[1]}, ...]: other channels",
            )
        if b.strides != first.strides:
            raise FoldError(
                Reason.BRANCH_MISMATCH,
                f"{where} have strides {list(b.strides)} and {list(first.strides)}",
            )
    kernel = tuple(max(k) for k in zip(*(b.kernel for b in branches)))
    kept = next((i for i, b in enumerate(branches) if b.kernel == kernel), None)
    if kept is None:
        raise FoldError(
            Reason.BRANCH_MISMATCH, f"no branch has the largest kernel {list(kernel)} on every axis"
        )
    big = branches[kept]
    n = len(kernel)
    for b in branches:
        for axis, (big_k, k) in enumerate(zip(kernel, b.kernel)):
            for end in (0, n):
                gap = big.pads[axis + end] - b.pads[axis + end]
                if 2 * gap != big_k - k:
                    raise FoldError(
                        Reason.BRANCH_PADDING,
                        f"Conv '{b.conv.label}' (kernel {list(b.kernel)}, pads {list(b.pads)}) is not "
                        f"centred on Conv '{big.conv.label}' (kernel {list(kernel)}, pads {list(big.pads)})",
                    )
    return kept, kernel


def _check_identity(block_conv: Branch, kernel: tuple[int, ...], x: str) -> None:
    """FoldError ``identity_branch`` unless an identity of ``x`` is a kernel of ``block_conv``'s."""
    label = block_conv.conv.label
    if any(s != 1 for s in block_conv.strides):
        raise FoldError(
            Reason.IDENTITY_BRANCH,
            f"an identity branch of '{x}' next to Conv '{label}' with strides {list(block_conv.strides)}",
        )
    cout, cin = block_conv.weight.shape[0], block_conv.weight.shape[1] * block_conv.group
    if cout != cin:
        raise FoldError(
            Reason.IDENTITY_BRANCH,
            f"an identity branch of '{x}' next to Conv '{label}' from {cin} to {cout} channels",
        )
    n = len(kernel)
    if any(2 * block_conv.pads[a + e] != kernel[a] - 1 for a in range(n) for e in (0, n)):
        raise FoldError(
            Reason.IDENTITY_BRANCH,
            f"an identity branch of '{x}' next to Conv '{label}' (kernel {list(kernel)}, pads "
            f"{list(block_conv.pads)}), which does not keep the size",
        )


def analyse(view: GraphView, root: NodeRef) -> Block | None:
    """The block under the Add ``root``; None when it is none; FoldError when it cannot merge."""
    if not is_add(root, view.opset):
        return None
    found = tree(view, root)
    if found is None:
        return None
    adds, values = found
    leaves = [classify(view, v) for v in values]
    convs = [leaf for leaf in leaves if leaf.conv is not None]
    if not convs:
        return None
    if any(leaf.conv is None and leaf.bn is None and is_constant(view, leaf.value) for leaf in leaves):
        return None  # a constant summand (a bias Add): not a block of branches
    x = convs[0].conv.inputs[0]  # type: ignore[union-attr]
    for leaf in leaves:
        if leaf.conv is not None and leaf.conv.inputs[0] != x:
            raise FoldError(
                Reason.BRANCH_MISMATCH,
                f"Conv '{leaf.conv.label}' reads '{leaf.conv.inputs[0]}', the other branches '{x}'",
            )
        if leaf.conv is None and leaf.value != x:
            raise not_a_branch(view, leaf.value, x)
    branches = [read_branch(view, leaf) for leaf in convs]
    kept, kernel = _geometry(branches)
    identities: list[Identity] = []
    for leaf in leaves:
        if leaf.conv is None:
            _check_identity(branches[kept], kernel, x)
            channels = branches[kept].weight.shape[0]
            affine = leaf_affine(view, leaf.bn, channels, "the block") if leaf.bn is not None else None
            identities.append(Identity(leaf.bn, affine))
    channels = branches[kept].weight.shape[0]
    start = BNAffine(np.ones(channels), np.zeros(channels))
    after, combined = following_bns(view, root, start, bn_version(view.opset))
    block = Block(
        root,
        tuple(adds),
        tuple(branches),
        tuple(identities),
        kept,
        kernel,
        tuple(after),
        combined if after else None,
    )
    if len(branches) < 2 and not block.bns:
        return None  # Conv(x) + x alone: no conv and no BN would go
    return block


def merged(block: Block, after: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The merged weight and bias in float64 (with the BNs after the root when ``after``)."""
    big = block.branches[block.kept]
    cout, cin_g = big.weight.shape[0], big.weight.shape[1]
    weight = np.zeros((cout, cin_g, *block.kernel))
    bias = np.zeros(cout)
    for b in block.branches:
        w = b.weight.astype(np.float64)
        c = b.bias.astype(np.float64) if b.bias is not None else np.zeros(cout)
        if b.affine is not None:
            w = w * b.affine.scale.reshape((cout,) + (1,) * (w.ndim - 1))
            c = b.affine.scale * c + b.affine.shift
        window = tuple(
            slice((big_k - k) // 2, (big_k - k) // 2 + k) for big_k, k in zip(block.kernel, b.kernel)
        )
        weight[(slice(None), slice(None), *window)] += w
        bias += c
    centre = tuple((k - 1) // 2 for k in block.kernel)
    channels = np.arange(cout)
    for ident in block.identities:
        scale = ident.affine.scale if ident.affine is not None else np.ones(cout)
        weight[(channels, channels % cin_g, *centre)] += scale
        if ident.affine is not None:
            bias += ident.affine.shift
    if after and block.after_map is not None:
        weight *= block.after_map.scale.reshape((cout,) + (1,) * (weight.ndim - 1))
        bias = block.after_map.scale * bias + block.after_map.shift
    return weight, bias


def _plan(block: Block) -> MergeBranches:
    big = block.branches[block.kept]
    dtype = big.weight.dtype
    try:
        weight, bias = merged(block)
        new_w, new_b = round_to_dtype(weight, dtype), round_to_dtype(bias, dtype)
    except FoldError:
        if not block.after:
            raise
        block = replace(block, after=(), after_map=None)  # those BNs then fold on their own
        weight, bias = merged(block, after=False)
        new_w, new_b = round_to_dtype(weight, dtype), round_to_dtype(bias, dtype)
    tensors = layer_tensors(big.conv, new_w, new_b, big.weight_name, big.bias_name or None)
    others = tuple(b.conv for i, b in enumerate(block.branches) if i != block.kept)
    output = block.after[-1].outputs[0] if block.after else block.root.outputs[0]
    return MergeBranches(
        block.root,
        big.conv,
        LayerEdit(Pattern.MERGED_BRANCHES, tensors),
        (*others, *block.bns, *block.adds),
        block.bns,
        len(others),
        output,
    )


def plan(view: GraphView, root: NodeRef) -> MergeBranches | Skip | None:
    """The branches under the Add ``root`` merged into one Conv, the refusal, or None when the Add
    sums no block of branches."""
    try:
        block = analyse(view, root)
        return None if block is None else _plan(block)
    except FoldError as e:
        return Skip(e.code, f"Add '{root.label}': {e.message}")


# ----- the BN rules: why a BN of a block stays ------------------------------------------------------
def _roots(view: GraphView, bn: NodeRef) -> list[NodeRef]:
    """The Adds above ``bn`` (a summand of the first), from the top of their tree down."""
    add = view.consumer(bn.outputs[0])
    if not is_add(add, view.opset):
        return []
    assert add is not None
    chain = [add]
    while True:
        up = view.consumer(chain[-1].outputs[0])
        if not is_add(up, view.opset) or len(chain) > MAX_LEAVES:
            break
        assert up is not None
        chain.append(up)
    return chain[::-1]


def _role(view: GraphView, bn: NodeRef) -> str:
    leaf: Leaf = classify(view, bn.outputs[0])
    return "branch" if leaf.conv is not None else "identity branch"


def needs_flag(view: GraphView, bn: BN) -> Skip | None:
    """With ``merge_branches`` off: ``needs_merge_branches`` for a BN its block would merge."""
    for root in _roots(view, bn.node):
        try:
            block = analyse(view, root)
        except (FoldError, *_UNREADABLE):
            continue
        if block is not None and bn.node in block.bns:
            return Skip(
                Reason.NEEDS_MERGE_BRANCHES,
                f"{_role(view, bn.node)} of Add '{root.label}' (RepVGG-style block): folds with "
                "--merge-branches",
            )
    return None


def refusal(view: GraphView, bn: BN) -> Skip | None:
    """With ``merge_branches`` on: why the block of the BN (the largest tree above it) did not merge."""
    for root in _roots(view, bn.node):
        try:
            block = analyse(view, root)
            if block is not None:
                _plan(block)  # (a merged value out of the dtype's range)
                return None
        except FoldError as e:
            return Skip(e.code, f"{_role(view, bn.node)} of Add '{root.label}' not merged: {e.message}")
        except _UNREADABLE:
            return None
    return None
