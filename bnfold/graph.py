"""An index over one ONNX graph or function body, built in a single scan, and the few rewrite
primitives the folding pass needs (replace a constant input, release a value, drop dead constants).

A :class:`Scope` never rescans its graph: use counts are kept up to date as the pass rewrites, and
all removals are applied in one rebuild at the end (:meth:`Scope.commit`).

Use counts cover every reference to a name: node inputs, graph outputs, and references from nested
subgraphs (``If``/``Loop``/``Scan`` bodies) to names of an enclosing scope.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadInput
from .onnx.tensor_store import TensorStore

ONNX_DOMAINS = ("", "ai.onnx")

# Ops whose outputs are computed from constants when all their inputs are constant: small helper
# subgraphs that exporters emit for weights and biases (torch's dynamo exporter builds a bias-less
# conv's zero bias with Shape -> Expand -> CastLike). Deterministic, no subgraphs, no randomness.
EVALUABLE_OPS = frozenset(
    {
        "Identity",
        "Cast",
        "CastLike",
        "Shape",
        "Size",
        "Expand",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Gather",
        "Slice",
        "ConstantOfShape",
        "Transpose",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Sqrt",
        "Reciprocal",
        "Flatten",
        "Tile",
        "Range",
        "Abs",
    }
)
# Inputs of which only the type matters (CastLike's ``target_type``).
TYPE_ONLY_INPUTS = {("CastLike", 1)}
# Inputs of which only the shape matters: evaluated from a fully static declared shape.
SHAPE_ONLY_INPUTS = {("Shape", 0), ("Size", 0)}
MAX_EVALUATED_NODES = 64
# Ops whose output 0 has the element type of input 0 (used to find CastLike's target type).
SAME_TYPE_OPS = frozenset(
    {
        "Identity",
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Mish",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Softplus",
        "Softsign",
        "Softmax",
        "LogSoftmax",
        "Clip",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "Neg",
        "Abs",
        "Sqrt",
        "Exp",
        "Log",
        "Erf",
        "Reciprocal",
        "MaxPool",
        "AveragePool",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Dropout",
        "Pad",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Slice",
        "Split",
        "Expand",
        "Tile",
        "Gather",
        "Resize",
        "Upsample",
        "DepthToSpace",
        "SpaceToDepth",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceL2",
    }
)
MAX_EVALUATED_ELEMENTS = 1 << 26
# Ops whose output 0 has the rank of input 0 (used to prove a MatMul's activations are 2-D).
RANK_PRESERVING_OPS = frozenset(
    {
        "Identity",
        "Cast",
        "CastLike",
        "Relu",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Mish",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Softplus",
        "Softsign",
        "Softmax",
        "LogSoftmax",
        "Clip",
        "Neg",
        "Abs",
        "Sqrt",
        "Exp",
        "Log",
        "Erf",
        "Reciprocal",
        "Dropout",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "Conv",
        "ConvTranspose",
        "MaxPool",
        "AveragePool",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
    }
)
# Elementwise ops with multidirectional broadcasting: the output rank is the largest input rank.
BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean"})


class AttributeRef(Exception):
    """An attribute refers to an enclosing function's attribute (``ref_attr_name``)."""


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of attribute ``name`` of ``node`` or ``default``; raises AttributeRef for refs."""
    for a in node.attribute:
        if a.name == name:
            if a.ref_attr_name:
                raise AttributeRef(f"attribute '{name}' refers to function attribute '{a.ref_attr_name}'")
            return onnx.helper.get_attribute_value(a)
    return default


class BadAttribute(Exception):
    """An attribute has the wrong type for its operator (a malformed model)."""


def _typed_attr(node: onnx.NodeProto, name: str, kind: int) -> onnx.AttributeProto | None:
    for a in node.attribute:
        if a.name == name:
            if a.ref_attr_name:
                raise AttributeRef(f"attribute '{name}' refers to function attribute '{a.ref_attr_name}'")
            t = a.type
            if t == onnx.AttributeProto.UNDEFINED:  # very old models: infer from the field set
                t = (
                    onnx.AttributeProto.FLOAT
                    if a.HasField("f")
                    else onnx.AttributeProto.INT
                    if a.HasField("i")
                    else t
                )
            if t != kind:
                want = "float" if kind == onnx.AttributeProto.FLOAT else "int"
                raise BadAttribute(f"attribute '{name}' of {node.op_type} must be a single {want}")
            return a
    return None


def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    """An INT attribute or ``default``; AttributeRef for refs, BadAttribute for another type."""
    a = _typed_attr(node, name, onnx.AttributeProto.INT)
    return default if a is None else int(a.i)


def attr_float(node: onnx.NodeProto, name: str, default: float) -> float:
    """A FLOAT attribute or ``default``; AttributeRef for refs, BadAttribute for another type."""
    a = _typed_attr(node, name, onnx.AttributeProto.FLOAT)
    return default if a is None else float(a.f)


def set_attr(node: onnx.NodeProto, name: str, value: float | int) -> None:
    """Set (or add) a scalar attribute."""
    for a in node.attribute:
        if a.name == name:
            if a.type == onnx.AttributeProto.FLOAT:
                a.f = float(value)
            else:
                a.i = int(value)
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


_GRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_NO_SUBGRAPH_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "Gemm",
        "MatMul",
        "Relu",
        "Add",
        "Mul",
        "Constant",
        "Identity",
        "Reshape",
        "Flatten",
        "Concat",
        "Clip",
    }
)


def may_have_subgraphs(node: onnx.NodeProto) -> bool:
    """False for a node that certainly has no graph attribute (cheap: no attribute scan)."""
    return bool(node.attribute) and (node.op_type not in _NO_SUBGRAPH_OPS or node.domain not in ONNX_DOMAINS)


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The graph-valued attributes of ``node`` as ``(attribute name, graph)``."""
    if not node.attribute or (node.op_type in _NO_SUBGRAPH_OPS and node.domain in ONNX_DOMAINS):
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


@dataclass
class Const:
    """A value that is a compile-time constant, and where it comes from."""

    name: str
    scope: Scope  # the scope that defines it
    kind: str  # "initializer", "constant_node", "computed"
    value: np.ndarray


class NotConstant(Exception):
    """A value is not a constant; the message says why."""


CACHE_LIMIT = 1 << 20  # constants up to this many bytes stay cached for repeated lookups


class BadTensor(NotConstant):
    """A constant whose data cannot be read (corrupt, missing external data, bad type)."""


def _read(name: str, load: Callable[[], np.ndarray]) -> np.ndarray:
    try:
        return np.asarray(load())
    except NotConstant:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/onnx raise many types for corrupt tensors
        raise BadTensor(f"'{name}' cannot be read: {type(exc).__name__}: {exc}") from None


def _np_to_tensor_type(dtype: np.dtype) -> int:
    if dtype.name == "bfloat16":
        return onnx.TensorProto.BFLOAT16
    return onnx.helper.np_dtype_to_tensor_dtype(dtype)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.ref_attr_name:
            raise NotConstant(f"Constant '{node.name}' refers to a function attribute")
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    raise NotConstant(f"Constant '{node.name}' holds no numeric tensor")


@dataclass
class Scope:
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
    ) -> Scope:
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

    def owner(self, name: str) -> Scope | None:
        """The scope (this or an enclosing one) that defines ``name``."""
        s: Scope | None = self
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

    def constant(self, name: str) -> Const:
        """Resolve ``name`` to a constant or raise NotConstant with the reason."""
        c = self._cache.get(name)
        if c is not None:
            return c
        index = self.initializers.get(name)
        if index is None:
            owner = self.owner(name)
            if owner is None:
                raise NotConstant(f"'{name}' is not defined")
            if owner is not self:
                return owner.constant(name)
        if index is not None:  # an initializer of this scope: the common case, checked first
            if name in self.inputs and self.ir_version >= 4:
                raise NotConstant(f"'{name}' is a graph input (an initializer callers may override)")
            tensor = self.proto.initializer[index]
            try:
                value = np.asarray(self.store.read(tensor))
            except BadInput as exc:
                raise BadTensor(str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - numpy/onnx raise many types for corrupt tensors
                raise BadTensor(f"'{name}' cannot be read: {type(exc).__name__}: {exc}") from None
            c = Const(name, self, "initializer", value)
        elif name in self.producer:
            node = self.proto.node[self.producer[name]]
            if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
                c = Const(name, self, "constant_node", _read(name, lambda: _constant_node_value(node)))
            else:
                c = Const(name, self, "computed", self._evaluate(name))
        else:
            raise NotConstant(f"'{name}' is a graph input")
        if c.value.nbytes <= CACHE_LIMIT:  # large weights are read once per fold, not retained
            self._cache[name] = c
        return c

    def close(self) -> None:
        """Drop the cached constants (they refer back to this scope): the index can be freed
        without the cyclic garbage collector."""
        self._cache.clear()

    def initializer_constant(self, name: str, value: np.ndarray) -> Const:
        """The constant for initializer ``name`` of this scope whose current ``value`` the caller
        has just read from the graph (what :meth:`constant` would return, without reading again)."""
        c = self._cache.get(name)
        if c is None:
            c = Const(name, self, "initializer", value)
            if value.nbytes <= CACHE_LIMIT:
                self._cache[name] = c
        return c

    def elem_type(self, name: str) -> int:
        """The ONNX element type of ``name``, else 0.

        Declared types (inputs, outputs, value_info of this or an enclosing scope) first; then a
        cheap local inference through the producer for ops whose output type is fixed by an input
        or an attribute (no shape inference pass over the model).
        """
        for _ in range(MAX_EVALUATED_NODES):
            t = self._declared_type(name)
            if t:
                return t
            owner = self.owner(name)
            if owner is None:
                return 0
            if name in owner.initializers:
                return owner.proto.initializer[owner.initializers[name]].data_type
            node = owner.node_of(name)
            if node is None or node.domain not in ONNX_DOMAINS:
                return 0
            op = node.op_type
            try:
                if op == "Constant":
                    return _np_to_tensor_type(_constant_node_value(node).dtype)
                if op == "Cast":
                    return attr_int(node, "to", 0)
            except (NotConstant, AttributeRef, BadAttribute):
                return 0
            if op in ("Shape", "Size"):
                return onnx.TensorProto.INT64
            if op == "CastLike" and len(node.input) > 1:
                name = node.input[1]
            elif op in SAME_TYPE_OPS and node.input and (node.output[0] == name or op == "Split"):
                name = node.input[0]
            else:
                return 0
        return 0

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

    def rank(self, name: str) -> int | None:
        """The rank of ``name`` if it is provable, else None.

        Declared shapes (inputs, outputs, value_info of this or an enclosing scope) first, then a
        short walk up the producers (at most MAX_EVALUATED_NODES steps; rank-preserving ops,
        broadcasting elementwise ops, Gemm/Flatten (2), Reshape to a constant shape, MatMul of
        known ranks >= 2, constants). No shape inference pass over the model.
        """
        steps = [0]

        def walk(n: str) -> int | None:
            if n in self._ranks:
                return self._ranks[n]
            steps[0] += 1
            if steps[0] > MAX_EVALUATED_NODES:
                return None
            r = self._rank_step(n, walk)
            if r is not None:
                self._ranks[n] = r
            return r

        return walk(name)

    def _rank_step(self, name: str, walk: Callable[[str], int | None]) -> int | None:
        r = self._declared_rank(name)
        if r is not None:
            return r
        owner = self.owner(name)
        if owner is None:
            return None
        if name in owner.initializers:
            return len(owner.proto.initializer[owner.initializers[name]].dims)
        node = owner.node_of(name)
        if node is None or node.domain not in ONNX_DOMAINS or not node.output or node.output[0] != name:
            return None
        op = node.op_type
        try:
            if op == "Constant":
                return int(owner.constant(name).value.ndim)
            if op in ("Gemm", "Flatten"):
                return 2
            if op == "Reshape" and len(node.input) > 1:
                return int(owner.constant(node.input[1]).value.size)
        except NotConstant:
            return None
        ins = [i for i in node.input if i]
        if op in RANK_PRESERVING_OPS and ins:
            return walk(ins[0]) if owner is self else owner.rank(ins[0])
        look = walk if owner is self else owner.rank
        if op in BROADCAST_OPS and ins:
            ranks = [look(i) for i in ins]
            return None if any(x is None for x in ranks) else max(ranks)  # type: ignore[type-var]
        if op == "MatMul" and len(ins) == 2:
            ra, rb = look(ins[0]), look(ins[1])
            if ra is not None and rb is not None and ra >= 2 and rb >= 2:
                return max(ra, rb)
        return None

    def _declared(self, name: str, stop_at_definer: bool) -> onnx.TypeProto.Tensor | None:
        """The tensor type declared for ``name`` (graph inputs/outputs, value_info) in this scope or
        an enclosing one; with ``stop_at_definer`` only up to the scope that defines ``name``."""
        s: Scope | None = self
        while s is not None:
            if s._declared_types is None:
                proto = s.proto
                if isinstance(proto, onnx.GraphProto):
                    infos = (*proto.input, *proto.value_info, *proto.output)
                else:
                    infos = tuple(getattr(proto, "value_info", ()))
                s._declared_types = {
                    v.name: v.type.tensor_type for v in infos if v.type.HasField("tensor_type")
                }
            found = s._declared_types.get(name)
            if found is not None:
                return found
            if stop_at_definer and s.defines(name):
                return None
            s = s.parent
        return None

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        """The declared shape of ``name`` if every dimension is a fixed number, else None."""
        tt = self._declared(name, stop_at_definer=False)
        if tt is None or not tt.HasField("shape"):
            return None
        dims = []
        for d in tt.shape.dim:
            if not d.HasField("dim_value") or d.dim_value < 0:
                return None
            dims.append(int(d.dim_value))
        return tuple(dims)

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

    def _declared_rank(self, name: str) -> int | None:
        tt = self._declared(name, stop_at_definer=True)
        return len(tt.shape.dim) if tt is not None and tt.HasField("shape") else None

    def _declared_type(self, name: str) -> int:
        tt = self._declared(name, stop_at_definer=False)
        return tt.elem_type if tt is not None else 0

    def _evaluate(self, name: str) -> np.ndarray:
        """Evaluate the small constant-only subgraph that computes ``name``."""
        order: list[int] = []
        leaves: dict[str, np.ndarray] = {}
        type_only: dict[str, int] = {}
        shape_only: dict[str, tuple[int, ...]] = {}
        seen: set[str] = set()

        def visit(value: str) -> None:
            if value in type_only:
                # Only its type is known (a CastLike target elsewhere): its value is not constant.
                raise NotConstant(f"'{value}' is not constant; only its type is known")
            if value in seen or not value:
                return
            seen.add(value)
            idx = self.producer.get(value)
            node = None if idx is None else self.proto.node[idx]
            if node is None or node.op_type == "Constant":
                leaves[value] = self.constant(value).value
                return
            if node.domain not in ONNX_DOMAINS or node.op_type not in EVALUABLE_OPS:
                raise NotConstant(f"'{value}' is computed by {node.op_type}")
            if len(order) >= MAX_EVALUATED_NODES:
                raise NotConstant(f"'{name}' is computed by a subgraph too large to evaluate")
            for k, inp in enumerate(node.input):
                shape_needed = (node.op_type, k) in SHAPE_ONLY_INPUTS
                if not inp or not (shape_needed or (node.op_type, k) in TYPE_ONLY_INPUTS):
                    visit(inp)
                    continue
                if inp not in type_only:
                    try:
                        visit(inp)
                        continue  # a real constant
                    except NotConstant:
                        t = self.elem_type(inp)
                        if not t:
                            raise
                        type_only[inp] = t
                        seen.add(inp)
                if shape_needed and inp not in shape_only:
                    dims = self.static_shape(inp)
                    if dims is None:
                        raise NotConstant(f"'{inp}' has no fixed declared shape")
                    shape_only[inp] = dims
            order.append(idx)

        visit(name)
        order.sort()
        return self._run_reference(name, order, leaves, type_only, shape_only)

    def _run_reference(
        self,
        name: str,
        order: list[int],
        leaves: dict[str, np.ndarray],
        type_only: dict[str, int],
        shape_only: dict[str, tuple[int, ...]],
    ) -> np.ndarray:
        from onnx.reference import ReferenceEvaluator

        feeds = dict(leaves)
        for inp, t in type_only.items():
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t)
            # a placeholder: right type, and the declared shape where only the shape is read
            # (zero strides: no memory); its values are never read (visit() refuses that)
            feeds[inp] = (
                np.broadcast_to(np.zeros((), dtype), shape_only[inp])
                if inp in shape_only
                else np.zeros((0,), dtype=dtype)
            )
        graph = onnx.helper.make_graph(
            [self.proto.node[i] for i in order],
            "bnfold_const",
            [
                onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None)
                for k, v in feeds.items()
            ],
            [onnx.helper.make_value_info(name, onnx.TypeProto())],
        )
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.opset.items()]
        model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=self.ir_version or 8)
        try:
            (result,) = ReferenceEvaluator(model).run(None, feeds)
        except Exception as exc:  # the reference evaluator raises many types  # noqa: BLE001 - reported, never raised
            raise NotConstant(f"'{name}' could not be evaluated: {exc}") from None
        result = np.asarray(result)
        if result.size > MAX_EVALUATED_ELEMENTS:
            raise NotConstant(f"'{name}' evaluates to a tensor too large to fold")
        return result

    # ----- rewriting -------------------------------------------------------------------------
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
            kept = []
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


def subgraphs_present(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
