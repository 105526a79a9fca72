"""Applying rule plans to a GraphModule (cannot fail for the plans the fx view leads to).

New constants go where the layer reads them: a called module gets a folded copy with new
``weight`` / ``bias`` parameters (under its own name when this is its only call, else under a
fresh one, so the other calls keep the original); a function call gets its tensor replaced in
place when nothing else reads it, else a new ``get_attr`` parameter. The absorbed nodes are erased
(with the ``getitem`` nodes of aten's tuple-valued batch norm) and their users read the layer;
:meth:`FxApplier.finish` drops the getters, tensors and modules the folds left unused.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import fx, nn

from ..rules.plan import (
    FoldAfter,
    FoldBefore,
    FoldBranches,
    FoldScale,
    LayerEdit,
    MergeBranches,
    Plan,
    TensorEdit,
)
from ..rules.view import NodeRef
from .batchnorm import path_of
from .ops import TRANSPOSES, Mapped
from .tensors import del_attr, erased, get_attr, set_attr, set_submodule, to_torch
from .view import FxView


def _is_aten(target: object) -> bool:
    return isinstance(target, torch._ops.OpOverload)


class FxApplier:
    """Applies plans to the GraphModule of ``view`` (a private copy the caller owns)."""

    def __init__(self, view: FxView) -> None:
        self.view = view
        self.gm = view.gm
        self._fresh = 0
        self.touched: list[fx.Node] = []  # get_attr nodes a fold may have left unused

    def apply(self, plan: Plan) -> None:
        """Apply a FoldAfter, FoldBefore or FoldBranches plan, then refresh the view."""
        if isinstance(plan, FoldAfter):
            self._after(plan)
        elif isinstance(plan, FoldBefore):
            self._before(plan)
        elif isinstance(plan, FoldBranches):
            self._branches(plan)
        elif isinstance(plan, FoldScale):
            self._scale(plan)
        else:
            raise TypeError(f"the fx front end does not apply {type(plan).__name__} plans")
        self.view.refresh()

    # ----- plans ----------------------------------------------------------------------------------
    def _after(self, plan: FoldAfter) -> None:
        view = self.view
        absorbed = [view.info(ref) for ref in plan.absorbed]
        layer = view.node(plan.target)
        self.layer(plan.layer)
        absorbed[-1].result.replace_all_uses_with(layer)
        for m in reversed(absorbed):
            self._erase(m)
        view.folded.add(layer)

    def _branches(self, plan: FoldBranches) -> None:
        """Each joined layer takes its part of the BN; the join's output ``plan.output`` (of a
        concat or an add of layers, a pool or resize that stays, a split's part) takes the BN's
        place."""
        view = self.view
        absorbed = [view.info(ref) for ref in plan.absorbed]
        join = view.output_node(plan.join, plan.output)
        for edit in plan.layers:
            self.layer(edit)
        absorbed[-1].result.replace_all_uses_with(join)
        for m in reversed(absorbed):
            self._erase(m)
        view.folded.update(view.node(t) for t in plan.targets)

    def _scale(self, plan: FoldScale) -> None:
        """The layer takes the BN's scale; the BN becomes ``x + shift`` on its own input."""
        view = self.view
        bn = view.info(plan.bn)
        x = view.value_node(bn.inputs[0])
        assert x is not None
        self.layer(plan.layer)
        weight = _any_tensor(self.gm)
        name = self._fresh_name(f"{bn.node.name}_shift")
        set_attr(self.gm, name, nn.Parameter(to_torch(np.asarray(plan.shift), weight), requires_grad=False))
        graph = self.gm.graph
        with graph.inserting_before(bn.node):
            shifted = graph.call_function(torch.add, (x, graph.get_attr(name)))
        bn.result.replace_all_uses_with(shifted)
        self._erase(bn)
        view.folded.add(view.node(plan.target))

    def _before(self, plan: FoldBefore) -> None:
        view = self.view
        bn = view.info(plan.bn)
        x = view.value_node(bn.inputs[0])
        assert x is not None
        self.layer(plan.layer)
        view.node(plan.bypass).replace_input_with(bn.result, x)
        self._erase(bn)
        view.folded.add(view.node(plan.target))

    def merge(self, plan: MergeBranches) -> None:
        """Merged branches: the kept conv takes the merged weight and bias (a copy of its module
        when that is called elsewhere too), the readers of the block's output read the kept conv,
        and the other convs, the BNs and the adds are erased; then the view is refreshed."""
        view = self.view
        kept = view.info(plan.kept)
        gone = [view.info(ref) for ref in plan.removed]
        out = next(m for m in gone if m.result.name == plan.output)
        self.layer(plan.layer)
        out.result.replace_all_uses_with(kept.result)
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        for m in sorted(gone, key=lambda m: order[m.node], reverse=True):
            self._erase(m)
        view.folded.add(kept.node)
        view.refresh()

    def _erase(self, m: Mapped) -> None:
        """Erase an absorbed node (with its getitems); its constant inputs may become unused."""
        graph = self.gm.graph
        self.touched.extend(a for a in m.node.all_input_nodes if a.op == "get_attr")
        for n in [*m.extra, m.result, m.node]:
            if not erased(n) and not n.users:
                graph.erase_node(n)

    # ----- layers --------------------------------------------------------------------------------
    def layer(self, edit: LayerEdit) -> None:
        """Install the new constants of a layer, then its new op type and attributes."""
        view = self.view
        by_node: dict[int, list[TensorEdit]] = {}
        for t in edit.tensors:
            by_node.setdefault(t.node.key, []).append(t)
        for edits in by_node.values():
            m = view.info(edits[0].node)
            if m.module is not None:
                self._module_params(m, edits)
            else:
                for t in edits:
                    self._function_input(m, t)
        if edit.retype is not None:
            self._retype(edit.retype[0], edit.retype[1])
        for a in edit.attributes:
            m = view.info(a.node)
            present = a.name in m.node.kwargs
            if a.if_present and not present:
                continue
            if m.op != "Gemm" or m.module is not None or a.name not in ("alpha", "beta"):
                raise TypeError(f"cannot set attribute {a.name} of {m.label} in a torch.fx graph")
            m.node.update_kwarg(a.name, a.value)

    def _module_params(self, m: Mapped, edits: list[TensorEdit]) -> None:
        """A folded copy of the called module takes the new parameters."""
        node = m.node
        path = path_of(node)
        mod = self.gm.get_submodule(path)
        clone = copy.deepcopy(mod)
        weight = mod.get_parameter("weight")
        trainable = bool(weight.requires_grad)
        for t in edits:
            slot = m.slots[t.index]
            assert slot is not None and slot.pos == -1
            setattr(clone, slot.name, nn.Parameter(to_torch(t.value, weight), requires_grad=trainable))
        calls = sum(1 for n in self.gm.graph.nodes if n.op == "call_module" and n.target == path)
        target = path if calls == 1 else self._fresh_name(path)
        if "." in target:
            set_submodule(self.gm, target, clone)
        else:
            self.gm.add_submodule(target, clone)
        node.target = target

    def _function_input(self, m: Mapped, t: TensorEdit) -> None:
        """Input ``t.index`` of a call becomes ``t.value``: in place when only it reads the old
        tensor, else through a new ``get_attr``."""
        node = m.node
        slot = m.slots[t.index]
        assert slot is not None and slot.pos >= 0
        args, kwargs = list(node.args), dict(node.kwargs)
        old = (
            kwargs.get(slot.name) if slot.name in kwargs else args[slot.pos] if slot.pos < len(args) else None
        )
        like = get_attr(self.gm, path_of(old)) if isinstance(old, fx.Node) and _getter(old) else None
        device_of = like if isinstance(like, torch.Tensor) else _any_tensor(self.gm)
        value = nn.Parameter(to_torch(np.asarray(t.value), device_of), requires_grad=False)
        if isinstance(old, fx.Node) and _getter(old) and t.old == old.name and self._reads(path_of(old)) == 1:
            set_attr(self.gm, path_of(old), value)
            return
        name = self._fresh_name(f"{node.name}_{slot.name}")
        set_attr(self.gm, name, value)
        with self.gm.graph.inserting_before(node):
            getter = self.gm.graph.get_attr(name)
        if isinstance(old, fx.Node) and (old.op == "get_attr" or old.target in TRANSPOSES):
            self.touched.append(old)
        if slot.name in kwargs or slot.pos > len(args):
            kwargs[slot.name] = getter
        elif slot.pos == len(args):
            args.append(getter)
        else:
            args[slot.pos] = getter
        node.args, node.kwargs = tuple(args), kwargs

    def _retype(self, ref: NodeRef, op: str) -> None:
        """A MatMul (with its bias now as a third argument) becomes ``addmm(bias, x, w)``."""
        m = self.view.info(ref)
        if m.op == op:
            return
        assert m.op == "MatMul" and op == "Gemm"
        node = m.node
        x, w, b = node.args[:3]
        node.target = torch.ops.aten.addmm.default if _is_aten(node.target) else torch.addmm
        node.op = "call_function"
        node.args, node.kwargs = (b, x, w), {}

    # ----- names and clean-up -----------------------------------------------------------------------
    def _reads(self, target: str) -> int:
        """References to the tensor at ``target`` through every getter of it."""
        return sum(len(n.users) for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == target)

    def _fresh_name(self, base: str) -> str:
        base = base.replace(".", "_")
        while True:
            self._fresh += 1
            name = f"{base}_bnfold{self._fresh}"
            if not hasattr(self.gm, name):
                return name

    def finish(self) -> None:
        """Drop what the folds left unused: getters, their tensors, modules no longer called."""
        gm = self.gm
        graph = gm.graph
        dropped: set[str] = set()
        work = list(self.touched)
        while work:
            node = work.pop(0)
            if erased(node) or node.users:
                continue
            if node.op == "get_attr":
                dropped.add(path_of(node))
            else:  # a transposition of a constant: what it read may be unused now
                work.extend(node.all_input_nodes)
            graph.erase_node(node)
        still_read = {n.target for n in graph.nodes if n.op == "get_attr"}
        for target in sorted(dropped - still_read):
            del_attr(gm, target)
        graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()


def _getter(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _any_tensor(gm: nn.Module) -> torch.Tensor:
    """A tensor of ``gm`` (for the device of a new one), else a CPU scalar."""
    found = next(iter(gm.parameters()), None)
    return found if found is not None else next(iter(gm.buffers()), torch.zeros(()))
