"""The rewrite primitives the folding pass needs: replace a constant input, release a value, drop
what becomes unused; all removals are applied in one rebuild at the end (:meth:`Scope.commit`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .constants import Const
from .index import subgraphs_present
from .shapes import ShapeIndex


class Scope(ShapeIndex):
    """An indexed graph or function body that the pass rewrites."""

    def uses_after_release(self, name: str, released: Iterable[str]) -> int:
        """References to ``name`` that remain once each of ``released`` is released once and what
        that leaves unused is removed (as :meth:`release` would do); nothing is changed."""
        drop: Counter[str] = Counter()
        dead: set[int] = set()

        def simulate(n: str) -> None:
            drop[n] += 1
            if n not in self.producer or n in self.outputs or self.uses[n] - drop[n] > 0:
                return
            i = self.producer[n]
            node = self.proto.node[i]
            if i in dead or i in self.removed_nodes or subgraphs_present(node):
                return
            if any(self.uses[o] - drop[o] > 0 or o in self.outputs for o in node.output if o):
                return
            dead.add(i)
            for inp in node.input:
                if inp:
                    simulate(inp)

        for r in released:
            simulate(r)
        return self.uses[name] - drop[name]

    def set_input(
        self, node: onnx.NodeProto, index: int, array: np.ndarray, old: Const | None, base: str
    ) -> None:
        """Make input ``index`` of ``node`` (a node of this scope) the constant ``array``.

        Overwrites ``old`` in place when this node is its only user and the shape is unchanged;
        otherwise adds a new constant (copy-on-write) and releases the reference to ``old``.
        """
        if (
            old is not None
            and old.kind != "computed"
            and old.scope.uses[old.name] == 1
            and old.name not in old.scope.outputs
            and old.value.shape == array.shape
        ):
            old.scope._overwrite(old, array)
            return
        name = self.names.fresh(base)
        self._add_constant(name, array)
        while len(node.input) <= index:
            node.input.append("")
        if old is not None:
            self.release(old.name)
        elif node.input[index]:
            self.release(node.input[index])
        node.input[index] = name
        self.uses[name] += 1

    def _overwrite(self, const: Const, array: np.ndarray) -> None:
        new = self.store.write(const.name, array)
        if const.kind == "initializer":
            tensor = self.proto.initializer[self.initializers[const.name]]
            doc = tensor.doc_string
            tensor.CopyFrom(new)
            tensor.doc_string = doc
        else:
            node = self.node_of(const.name)
            assert node is not None
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("value", new))
        const.value = array

    def _add_constant(self, name: str, array: np.ndarray) -> None:
        if self.is_function or (self.parent is not None and self.ir_version < 4):
            tensor = numpy_helper.from_array(array, name)
            # Function bodies have no initializers; IR < 4 requires initializers to be listed as
            # graph inputs, which a subgraph (If branch, Loop/Scan body) cannot take: a Constant.
            self.new_constants[name] = onnx.helper.make_node(
                "Constant", [], [name], value=tensor, name=f"{name}_const"
            )
            self._cache[name] = Const(name, self, "constant_node", array)
            return
        graph = self.proto
        tensor = self.store.write(name, array)
        self.initializers[name] = len(graph.initializer)
        graph.initializer.append(tensor)
        if self.ir_version < 4:
            # IR < 4: every initializer is also listed as a graph input.
            graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(array.shape)))
            self.inputs.add(name)

    def release(self, name: str) -> None:
        """Drop one reference to ``name``; remove what becomes unused (cascading up constants)."""
        owner = self if name in self.initializers else self.owner(name)
        if owner is None:
            return
        if owner is not self:
            self.uses[name] -= 1
            owner.release(name)
            return
        self.uses[name] -= 1
        if self.uses[name] > 0 or name in self.outputs:
            return
        if name in self.initializers:
            if name in self.inputs and self.ir_version >= 4:
                return  # a real graph input: never dropped
            self.removed_initializers.add(name)
            self.removed_values.add(name)
        elif name in self.new_constants:
            del self.new_constants[name]
            self._cache.pop(name, None)
        elif name in self.producer:
            idx = self.producer[name]
            node = self.proto.node[idx]
            if idx in self.removed_nodes or any(
                self.uses[o] > 0 or o in self.outputs for o in node.output if o
            ):
                return
            if subgraphs_present(node):
                return
            self.removed_nodes.add(idx)
            self.removed_values.update(o for o in node.output if o)
            for inp in node.input:
                if inp:
                    self.release(inp)

    def remove_node(self, node_index: int) -> None:
        """Remove a node whose outputs are already rewired, releasing its inputs."""
        self.removed_nodes.add(node_index)
        for inp in self.proto.node[node_index].input:
            if inp:
                self.release(inp)

    def commit(self) -> None:
        """Apply all removals and additions in one rebuild of each list touched."""
        proto = self.proto
        if self.removed_nodes and not self.new_constants and not self.inserted:
            _delete_indices(proto.node, self.removed_nodes)
        elif self.removed_nodes or self.new_constants or self.inserted:
            kept: list[onnx.NodeProto] = []
            for i, n in enumerate(proto.node):
                kept.extend(self.inserted.get(i, ()))
                if i not in self.removed_nodes:
                    kept.append(n)
            del proto.node[:]
            proto.node.extend(self.new_constants.values())
            proto.node.extend(kept)
        if isinstance(proto, onnx.GraphProto):
            gone = self.removed_initializers
            if gone:
                _delete_where(proto.initializer, lambda t: t.name in gone)
                if any(v.name in gone for v in proto.input):
                    kept_i = [v for v in proto.input if v.name not in gone]
                    del proto.input[:]
                    proto.input.extend(kept_i)
            if self.removed_values and any(v.name in self.removed_values for v in proto.value_info):
                kept_v = [v for v in proto.value_info if v.name not in self.removed_values]
                del proto.value_info[:]
                proto.value_info.extend(kept_v)
        elif self.removed_values and any(v.name in self.removed_values for v in proto.value_info):
            kept_v = [v for v in proto.value_info if v.name not in self.removed_values]
            del proto.value_info[:]
            proto.value_info.extend(kept_v)


def _delete_indices(field: Any, indices: Iterable[int]) -> None:
    """Delete the items at ``indices`` of a repeated message field, run by run from the end."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    for start, stop in reversed(runs):
        del field[start:stop]


def _delete_where(field: Any, doomed: Callable[[Any], bool]) -> None:
    """Delete the items of a repeated message field for which ``doomed`` holds, run by run from
    the end: no item is copied (rebuilding the list would copy every kept tensor)."""
    _delete_indices(field, [i for i, item in enumerate(field) if doomed(item)])
