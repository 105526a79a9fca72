"""The ONNX implementation of :class:`~bnfold.rules.view.GraphView` over a :class:`Scope`.

It also remembers the constants the rules read (:meth:`OnnxView.const`), so that applying a plan
replaces exactly the tensors the plan was computed from, without reading them again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..rules.view import NodeRef
from .attributes import attr, attr_float, attr_int
from .constants import Const
from .edits import Scope
from .ops import ONNX_DOMAINS, SHAPE_ONLY_INPUTS, TYPE_ONLY_INPUTS

METADATA_INPUTS = SHAPE_ONLY_INPUTS | TYPE_ONLY_INPUTS
_METADATA_OPS = frozenset(op for op, _ in METADATA_INPUTS)


class OnnxView:
    """One scope as the rules see it. ``folded``: ``(scope label, node index)`` of the layers that
    absorbed a fold in this pass (shared by every scope's view)."""

    def __init__(self, scope: Scope, folded: set[tuple[str, int]]) -> None:
        self.scope = scope
        self._folded = folded
        self._read: dict[str, Const] = {}
        self._metadata: dict[str, list[tuple[int, int]]] | None = None  # built on first use

    # ----- for the driver ----------------------------------------------------------------------
    def forget(self) -> None:
        """Drop the constants remembered for the last candidate."""
        self._read.clear()

    def const(self, name: str) -> Const:
        """The constant ``name`` as the rules last read it."""
        return self._read[name]

    def node(self, ref: NodeRef) -> onnx.NodeProto:
        """The protobuf node of ``ref``."""
        scope = self.scope
        return scope.proto.node[ref.key] if ref.key >= 0 else scope.new_constants[ref.outputs[0]]

    def reread(self, readers: Sequence[tuple[NodeRef, int]], old: str, new: str) -> None:
        """The metadata readers of ``old`` (those not removed since) read ``new`` instead."""
        scope = self.scope
        index = self._metadata_index()
        for ref, k in readers:
            node = scope.proto.node[ref.key]
            if ref.key in scope.removed_nodes or node.input[k] != old:
                continue
            node.input[k] = new
            scope.uses[old] -= 1
            scope.uses[new] += 1
            index[old].remove((ref.key, k))
            index.setdefault(new, []).append((ref.key, k))

    def _metadata_index(self) -> dict[str, list[tuple[int, int]]]:
        if self._metadata is None:
            found: dict[str, list[tuple[int, int]]] = {}
            for i, node in enumerate(self.scope.proto.node):
                if node.op_type in _METADATA_OPS and node.domain in ONNX_DOMAINS:
                    for k, name in enumerate(node.input):
                        if name and (node.op_type, k) in METADATA_INPUTS:
                            found.setdefault(name, []).append((i, k))
            self._metadata = found
        return self._metadata

    @staticmethod
    def ref(index: int, node: onnx.NodeProto) -> NodeRef:
        """``node`` (at ``index`` in its graph, -1 for a constant the pass added) as a rule sees it."""
        return NodeRef(index, node.op_type, node.domain, tuple(node.input), tuple(node.output), node.name)

    # ----- GraphView -----------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return self.scope.opset.get("", 1)

    def producer(self, value: str) -> NodeRef | None:
        scope = self.scope
        i = scope.producer.get(value)
        if i is not None:
            return self.ref(i, scope.proto.node[i])
        added = scope.new_constants.get(value)
        return None if added is None else self.ref(-1, added)

    def produced_outside(self, value: str) -> bool:
        owner = self.scope.owner(value)
        return owner is not None and owner is not self.scope and owner.node_of(value) is not None

    def consumer(self, value: str) -> NodeRef | None:
        found = self.scope.consumer_of(value)
        return None if found is None else self.ref(*found)

    def uses(self, value: str) -> int:
        return self.scope.uses[value]

    def metadata_reads(self, value: str) -> tuple[tuple[NodeRef, int], ...]:
        nodes = self.scope.proto.node
        removed = self.scope.removed_nodes
        return tuple(
            (self.ref(i, nodes[i]), k)
            for i, k in self._metadata_index().get(value, ())
            if i not in removed and nodes[i].input[k] == value
        )

    def readers(self, value: str) -> tuple[NodeRef, ...]:
        nodes = self.scope.proto.node
        removed = self.scope.removed_nodes
        return tuple(
            self.ref(i, node)
            for i, node in enumerate(nodes)
            if i not in removed
            for name in node.input
            if name == value
        )

    def uses_after_release(self, value: str, released: Sequence[str]) -> int:
        return self.scope.uses_after_release(value, released)

    def is_graph_output(self, value: str) -> bool:
        return value in self.scope.outputs

    def constant(self, value: str) -> np.ndarray:
        c = self.scope.constant(value)
        self._read[value] = c
        return c.value

    def rank(self, value: str) -> int | None:
        return self.scope.rank(value)

    def static_shape(self, value: str) -> tuple[int, ...] | None:
        return self.scope.static_shape(value)

    def dtype(self, value: str) -> np.dtype | None:
        elem = self.scope.elem_type(value)
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else None

    def attr(self, node: NodeRef, name: str, default: object = None) -> object:
        return attr(self.node(node), name, default)

    def attr_int(self, node: NodeRef, name: str, default: int) -> int:
        return attr_int(self.node(node), name, default)

    def attr_float(self, node: NodeRef, name: str, default: float) -> float:
        return attr_float(self.node(node), name, default)

    def folded_into(self, node: NodeRef) -> bool:
        return (self.scope.label, node.key) in self._folded
