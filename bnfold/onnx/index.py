"""An index over one ONNX graph or function body, built in a single scan: producers, consumers,
use counts and names.

Use counts cover every reference to a name: node inputs, graph outputs, and references from nested
subgraphs (``If``/``Loop``/``Scan`` bodies) to names of an enclosing scope. The index never rescans
its graph: the pass keeps the counts up to date as it rewrites (:mod:`bnfold.onnx.edits`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self, cast

import onnx

from .ops import NO_GRAPH_ATTRIBUTE_OPS, ONNX_DOMAINS
from .tensor_store import TensorStore

if TYPE_CHECKING:
    from .constants import Const
    from .edits import Scope

_GRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def may_have_subgraphs(node: onnx.NodeProto) -> bool:
    """False for a node that certainly has no graph attribute (cheap: no attribute scan)."""
    return bool(node.attribute) and (
        node.op_type not in NO_GRAPH_ATTRIBUTE_OPS or node.domain not in ONNX_DOMAINS
    )


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The graph-valued attributes of ``node`` as ``(attribute name, graph)``."""
    if not node.attribute or (node.op_type in NO_GRAPH_ATTRIBUTE_OPS and node.domain in ONNX_DOMAINS):
        return  # fast path: standard ops that never carry graphs
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def free_uses(graph: onnx.GraphProto) -> Counter[str]:
    """References from ``graph`` (and its nested subgraphs) to names it does not define."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined.update(t.name for t in graph.sparse_initializer)
    uses: Counter[str] = Counter()
    for node in graph.node:
        defined.update(node.output)
        uses.update(n for n in node.input if n)
        for _, g in subgraphs(node):
            uses.update(free_uses(g))
    uses.update(v.name for v in graph.output)
    for name in defined:
        uses.pop(name, None)
    uses.pop("", None)
    return uses


def _graph_names(g: onnx.GraphProto, names: set[str]) -> None:
    names.update(v.name for v in g.input)
    names.update(v.name for v in g.output)
    names.update(t.name for t in g.initializer)
    _node_names(g.node, names)


def _node_names(nodes: Iterable[onnx.NodeProto], names: set[str]) -> None:
    for node in nodes:
        names.update(node.input)
        names.update(node.output)
        for _, g in subgraphs(node):
            _graph_names(g, names)


def all_names(model: onnx.ModelProto, top: Scope) -> set[str]:
    """Every value name used anywhere in the model (graphs, subgraphs, functions). ``top``: the
    main graph's index, built before any rewrite, which already holds the main graph's names."""
    names = top.all_names()
    for f in model.functions:
        names.update(f.input)
        names.update(f.output)
        _node_names(f.node, names)
    names.discard("")
    return names


class NameAllocator:
    """Hands out value names that are unused anywhere in the model, deterministically."""

    def __init__(self, taken: set[str]) -> None:
        self._taken = taken

    def reserve(self, names: Iterable[str]) -> None:
        """Mark ``names`` as taken."""
        self._taken.update(names)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name


def subgraphs_present(node: onnx.NodeProto) -> bool:
    """True when ``node`` has a graph-valued attribute (scans every attribute)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


@dataclass
class ScopeIndex:
    """One graph or function body with its index.

    ``uses`` counts references to every name visible here, including from nested subgraphs; a
    name's authoritative count is the one in the scope that defines it.
    """

    proto: onnx.GraphProto | onnx.FunctionProto
    label: str
    opset: dict[str, int]
    ir_version: int
    store: TensorStore
    names: NameAllocator
    parent: Scope | None = None
    producer: dict[str, int] = field(default_factory=dict)
    uses: Counter[str] = field(default_factory=Counter)
    initializers: dict[str, int] = field(default_factory=dict)
    inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)
    removed_nodes: set[int] = field(default_factory=set)
    removed_initializers: set[str] = field(default_factory=set)
    removed_values: set[str] = field(default_factory=set)
    # Constant nodes added by the pass (function bodies, IR < 4 subgraphs), inserted at commit;
    # they are indexed like any other constant so a later fold (a BN chain) can use them.
    new_constants: dict[str, onnx.NodeProto] = field(default_factory=dict)
    # index of the last node of this scope that reads a name (meaningful when its use count is 1);
    # kept up to date by the pass when it rewires an input
    consumer: dict[str, int] = field(default_factory=dict)
    # nodes added by the pass, inserted before the node of the given index at commit
    inserted: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    subgraph_nodes: list[int] = field(default_factory=list)  # indices of nodes that carry subgraphs
    _ranks: dict[str, int] = field(default_factory=dict)
    _declared_types: dict[str, onnx.TypeProto.Tensor] | None = None
    _cache: dict[str, Const] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        proto: onnx.GraphProto | onnx.FunctionProto,
        label: str,
        opset: dict[str, int],
        ir_version: int,
        store: TensorStore,
        names: NameAllocator,
        parent: Scope | None = None,
    ) -> Self:
        """Index ``proto`` in one scan."""
        s = cls(proto, label, opset, ir_version, store, names, parent)
        if isinstance(proto, onnx.GraphProto):
            s.inputs = {v.name for v in proto.input}
            s.outputs = {v.name for v in proto.output}
            s.initializers = {t.name: i for i, t in enumerate(proto.initializer)}
            referenced = [v.name for v in proto.output]
        else:
            s.inputs = set(proto.input)
            s.outputs = set(proto.output)
            referenced = list(proto.output)
        producer = s.producer
        consumer = s.consumer
        uses = s.uses
        with_graphs = s.subgraph_nodes
        for i, node in enumerate(proto.node):
            for out in node.output:
                producer[out] = i
            inputs = tuple(node.input)
            referenced.extend(inputs)
            consumer.update(dict.fromkeys(inputs, i))
            if may_have_subgraphs(node):
                found = False
                for _, g in subgraphs(node):
                    found = True
                    uses.update(free_uses(g))
                if found:
                    with_graphs.append(i)
        uses.update(referenced)
        uses.pop("", None)
        producer.pop("", None)
        consumer.pop("", None)
        return s

    def all_names(self) -> set[str]:
        """Every name defined or read in this scope and its subgraphs (call before rewriting)."""
        names = set(self.producer)
        names.update(self.uses, self.initializers, self.inputs, self.outputs)
        for i in self.subgraph_nodes:
            for _, g in subgraphs(self.proto.node[i]):
                _graph_names(g, names)
        names.discard("")
        return names

    # ----- lookups -------------------------------------------------------------------------
    @property
    def is_function(self) -> bool:
        return isinstance(self.proto, onnx.FunctionProto)

    def defines(self, name: str) -> bool:
        return (
            name in self.producer
            or name in self.initializers
            or name in self.inputs
            or name in self.new_constants
        )

    @property
    def as_scope(self) -> Scope:
        """This index as the :class:`~bnfold.onnx.edits.Scope` it is part of (the class built)."""
        return cast("Scope", self)

    def owner(self, name: str) -> Scope | None:
        """The scope (this or an enclosing one) that defines ``name``."""
        s: Scope | None = self.as_scope
        while s is not None:
            if s.defines(name):
                return s
            s = s.parent
        return None

    def node_of(self, name: str) -> onnx.NodeProto | None:
        i = self.producer.get(name)
        return self.new_constants.get(name) if i is None else self.proto.node[i]

    def is_overridable(self, name: str) -> bool:
        """An initializer that is also a graph input in an IR >= 4 model: callers may override it."""
        return name in self.initializers and name in self.inputs and self.ir_version >= 4

    def consumer_of(self, name: str) -> tuple[int, onnx.NodeProto] | None:
        """The only node of this scope reading ``name`` (``None`` unless there is exactly one use,
        by a node of this scope, and ``name`` is not a graph output)."""
        if self.uses[name] != 1 or name in self.outputs:
            return None
        i = self.consumer.get(name)
        if i is None or i in self.removed_nodes:
            return None
        node = self.proto.node[i]
        return (i, node) if name in node.input else None
