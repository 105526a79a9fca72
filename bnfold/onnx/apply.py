"""Applying rule plans to the protobuf graph of a :class:`Scope` (cannot fail)."""

from __future__ import annotations

import onnx

from ..rules.plan import FoldAfter, FoldBefore, FoldBranches, FoldScale, LayerEdit, MergeBranches, ToAffine
from .attributes import set_attr
from .edits import Scope
from .index import NameAllocator
from .view import OnnxView


def apply_layer(view: OnnxView, edit: LayerEdit) -> None:
    """Write the new constants of a layer (in order), then its op type and attributes."""
    scope = view.scope
    for t in edit.tensors:
        old = view.const(t.old) if t.old is not None else None
        scope.set_input(view.node(t.node), t.index, t.value, old, t.name)
    if edit.retype is not None:
        view.node(edit.retype[0]).op_type = edit.retype[1]
    for a in edit.attributes:
        node = view.node(a.node)
        if a.if_present and not any(x.name == a.name for x in node.attribute):
            continue
        set_attr(node, a.name, a.value)


def absorb(
    scope: Scope,
    target: onnx.NodeProto,
    chain: list[tuple[int, onnx.NodeProto]],
    folded: set[tuple[str, int]],
    output: int = 0,
) -> None:
    """Drop the per-channel nodes ``chain`` after ``target`` (already folded into it): the layer
    (its output ``output``) takes the last one's output name; their other inputs are released."""
    old = target.output[output]
    final = chain[-1][1].output[0]
    target.output[output] = final
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
        for extra in node.output[1:]:  # an unread Dropout mask goes with its node
            if extra:
                scope.producer.pop(extra, None)
                scope.removed_values.add(extra)
        out = node.output[0]
        if out != final:
            scope.producer.pop(out, None)
            scope.removed_values.add(out)
        prev = out
    scope.producer[final] = pidx
    folded.add((scope.label, pidx))


def apply_after(view: OnnxView, plan: FoldAfter, folded: set[tuple[str, int]]) -> None:
    """A fold into the layer before: new constants, then the absorbed nodes go."""
    target = view.node(plan.target)
    chain = [(ref.key, view.node(ref)) for ref in plan.absorbed]
    # Shape/Size readers of the values that go (the rules admit them only where the shape is the
    # final one's): they read the name that stays.
    gone = [target.output[0]] + [node.output[0] for _, node in chain[:-1]]
    readers = [(v, view.metadata_reads(v)) for v in gone if view.scope.uses[v] > 1]
    apply_layer(view, plan.layer)
    absorb(view.scope, target, chain, folded)
    for value, reads in readers:
        view.reread(reads, value, target.output[0])


def apply_branches(view: OnnxView, plan: FoldBranches, folded: set[tuple[str, int]]) -> None:
    """A fold into the layers a Concat or Add joins: their new constants, then the absorbed nodes go
    and the join takes the last one's output name."""
    join = view.node(plan.join)
    chain = [(ref.key, view.node(ref)) for ref in plan.absorbed]
    gone = [join.output[plan.output]] + [node.output[0] for _, node in chain[:-1]]
    readers = [(v, view.metadata_reads(v)) for v in gone if view.scope.uses[v] > 1]
    for edit in plan.layers:
        apply_layer(view, edit)
    absorb(view.scope, join, chain, folded, plan.output)
    for value, reads in readers:
        view.reread(reads, value, join.output[plan.output])
    folded.update((view.scope.label, t.key) for t in plan.targets)


def apply_before(view: OnnxView, plan: FoldBefore, folded: set[tuple[str, int]]) -> None:
    """A fold into the layer after: new constants; the consumer reads the BN's input; the BN goes."""
    apply_layer(view, plan.layer)
    scope = view.scope
    bn, cons = view.node(plan.bn), view.node(plan.bypass)
    x, y = bn.input[0], bn.output[0]
    cons.input[0] = x
    scope.consumer[x] = plan.bypass.key
    scope.uses[y] -= 1
    scope.removed_values.add(y)
    scope.producer.pop(y, None)
    scope.removed_nodes.add(plan.bn.key)
    for name in bn.input[1:5]:
        scope.release(name)
    folded.add((scope.label, plan.target.key))


def apply_affine(view: OnnxView, plan: ToAffine, names: NameAllocator) -> onnx.NodeProto:
    """The BN becomes ``Add(Mul(x, scale), shift)`` (the BN node itself turns into the Add, which
    keeps its name and output); returns the new Mul."""
    scope = view.scope
    idx = plan.bn.key
    bn = view.node(plan.bn)
    x, y = bn.input[0], bn.output[0]
    base = bn.name or y
    mul_out = names.fresh(f"{y}_scaled")
    mul = onnx.helper.make_node("Mul", [x, ""], [mul_out], name=names.fresh(f"{base}_mul"))
    old_params = list(bn.input[1:5])
    bn.op_type = "Add"
    bn.domain = ""
    del bn.attribute[:]
    del bn.input[:]
    bn.input.extend([mul_out, ""])
    del bn.output[1:]
    if plan.legacy:  # opset < 7: broadcasting is explicit, [C] along axis 1
        for n in (mul, bn):
            n.attribute.extend(
                [onnx.helper.make_attribute("broadcast", 1), onnx.helper.make_attribute("axis", 1)]
            )
    scope.set_input(mul, 1, plan.scale, None, f"{base}_scale_affine")
    scope.set_input(bn, 1, plan.shift, None, f"{base}_shift_affine")
    scope.uses[mul_out] += 1
    if scope.consumer.get(x) == idx:
        del scope.consumer[x]
    scope.inserted.setdefault(idx, []).append(mul)
    for name in old_params:
        scope.release(name)
    return mul


def apply_scale(view: OnnxView, plan: FoldScale, folded: set[tuple[str, int]]) -> None:
    """The layer's new weight; the BN node becomes ``Add(x, shift)`` (same name and output)."""
    apply_layer(view, plan.layer)
    scope = view.scope
    bn = view.node(plan.bn)
    old_params = list(bn.input[1:5])
    bn.op_type = "Add"  # the BN's domain ("" or "ai.onnx") is the default one: left as it is
    del bn.attribute[:]
    del bn.input[1:]
    bn.input.append("")
    del bn.output[1:]
    scope.set_input(bn, 1, plan.shift, None, f"{bn.name or bn.output[0]}_shift")
    for name in old_params:
        scope.release(name)
    folded.add((scope.label, plan.target.key))


def apply_merge(view: OnnxView, plan: MergeBranches, folded: set[tuple[str, int]]) -> None:
    """Merged branches: the kept Conv's new constants and the output name ``plan.output``; the
    other Convs, the BNs and the Adds go (the values between them with them), their other inputs
    are released."""
    scope = view.scope
    kept = view.node(plan.kept)
    apply_layer(view, plan.layer)
    gone = [(ref.key, view.node(ref)) for ref in plan.removed]
    between = {kept.output[0]} | {o for _, node in gone for o in node.output if o}
    between.discard(plan.output)
    scope.removed_nodes.update(i for i, _ in gone)
    for _, node in gone:
        for name in node.input:
            if not name:
                continue
            if name in between:
                scope.uses[name] -= 1
            else:
                scope.release(name)
    for name in between:
        scope.producer.pop(name, None)
        scope.removed_values.add(name)
    kept.output[0] = plan.output
    scope.producer[plan.output] = plan.kept.key
    x = kept.input[0]
    if scope.uses[x] == 1:
        scope.consumer[x] = plan.kept.key
    folded.add((scope.label, plan.kept.key))
