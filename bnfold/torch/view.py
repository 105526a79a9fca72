"""The torch.fx implementation of :class:`~bnfold.rules.view.GraphView` over a GraphModule.

Values are fx node names (and the names :mod:`bnfold.torch.ops` gives module parameters and
Python scalars); nodes are :class:`~bnfold.rules.view.NodeRef` records with ONNX op types
(:func:`bnfold.torch.ops.Mapper.map`), keyed by a number the view gives each fx node. Constants are
``get_attr`` tensors and module parameters and buffers, as numpy; ranks and dtypes come from
``node.meta`` (``val`` from torch.export, ``tensor_meta`` from shape propagation), None otherwise.
Every fx user of a value counts as a use. The view reads the graph as it is now: after a plan is
applied, :meth:`FxView.refresh` drops what it had mapped.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import fx, nn

from ..errors import FoldError
from ..report import Reason
from ..rules.view import BadAttribute, NodeRef, NotConstant
from .batchnorm import path_of
from .ops import TRANSPOSES, Lazy, Mapped, Mapper
from .ops_spatial import outputs
from .tensors import get_attr, to_numpy

OPSET = 21  # the operator semantics the mapped nodes follow (BatchNormalization-15, Gemm-13)

# Reads of a tensor's metadata, which a fold does not change: ``x.shape``, ``x.ndim``, ``x.dtype``,
# ``x.device`` (getattr nodes), ``x.size()``, ``x.dim()``, ``x.numel()`` (method calls), and the
# torch.export forms (aten.sym_size / sym_numel / sym_stride / sym_storage_offset).
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device"})
# Methods whose second argument is read for its shape or dtype only (``y.reshape_as(x)``).
_LIKE_METHODS = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})
_LIKE_FUNCTIONS = frozenset(
    getattr(torch.ops.aten, name).default for name in ("reshape_as", "view_as", "expand_as", "type_as")
)


def _metadata_functions() -> frozenset[object]:
    aten = torch.ops.aten
    found: set[object] = {torch.numel}
    for name in ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset"):
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        found.add(packet)
        for overload in packet.overloads():
            found.add(getattr(packet, overload))
    return frozenset(found)


_METADATA_FUNCTIONS = _metadata_functions()


def metadata_position(user: fx.Node, value: fx.Node) -> int | None:
    """The argument position at which ``user`` reads nothing of ``value`` but its shape, rank,
    dtype or device (0 for ``value.shape``, 1 for ``y.reshape_as(value)``), else None."""
    if _references(value, user) != 1:
        return None
    like = user.target in _LIKE_METHODS if user.op == "call_method" else user.target in _LIKE_FUNCTIONS
    if like and len(user.args) == 2 and user.args[1] is value:
        return 1
    return 0 if user.args and user.args[0] is value and _reads_metadata(user) else None


def _reads_metadata(user: fx.Node) -> bool:
    """Whether ``user`` reads only the metadata of its first argument."""
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) == 2 and user.args[1] in _METADATA_ATTRIBUTES
    if user.op == "call_method":
        return user.target in _METADATA_METHODS
    return user.op == "call_function" and user.target in _METADATA_FUNCTIONS


def _references(value: fx.Node, user: fx.Node) -> int:
    """How many times ``user`` reads ``value`` (in its args and kwargs)."""
    count = 0

    def visit(n: fx.Node) -> fx.Node:
        nonlocal count
        count += n is value
        return n

    fx.node.map_arg((user.args, user.kwargs), visit)
    return count


def _meta(node: fx.Node) -> tuple[int, torch.dtype] | None:
    """The rank and dtype recorded on ``node`` (by torch.export or shape propagation)."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape, dtype = getattr(val, "shape", None), getattr(val, "dtype", None)
    if shape is None or not isinstance(dtype, torch.dtype):
        return None
    return len(shape), dtype


def _np_dtype(dtype: torch.dtype) -> np.dtype | None:
    try:
        return to_numpy(torch.empty(0, dtype=dtype)).dtype
    except (TypeError, RuntimeError):
        return None


class FxView:
    """A GraphModule as the rules see it. ``folded``: the fx nodes of the layers that absorbed a
    fold in this pass."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.folded: set[fx.Node] = set()
        self._keys: dict[fx.Node, int] = {}
        self._nodes: dict[int, fx.Node] = {}
        self._counter = itertools.count()
        self.refresh()

    # ----- for the driver and the applier ------------------------------------------------------
    def refresh(self) -> None:
        """Forget what was mapped: the graph or its modules changed."""
        self.modules: dict[str, nn.Module] = dict(self.gm.named_modules())
        self.by_name: dict[str, fx.Node] = {n.name: n for n in self.gm.graph.nodes}
        self._mapped: dict[fx.Node, Mapped] = {}
        self._virtual: dict[str, Lazy] = {}  # values without a node of their own, by name
        self._mapper = Mapper(self.gm, self.modules, self.constant)

    def mapped(self, node: fx.Node) -> Mapped:
        """``node`` as an ONNX op (cached until :meth:`refresh`)."""
        found = self._mapped.get(node)
        if found is None:
            found = self._mapped[node] = self._mapper.map(node)
            self._virtual.update(found.virtual)
        return found

    def key(self, node: fx.Node) -> int:
        """The number that stands for ``node`` in a NodeRef."""
        k = self._keys.get(node)
        if k is None:
            k = self._keys[node] = next(self._counter)
            self._nodes[k] = node
        return k

    def node(self, ref: NodeRef) -> fx.Node:
        """The fx node of ``ref``."""
        return self._nodes[ref.key]

    def info(self, ref: NodeRef) -> Mapped:
        """The mapping ``ref`` was built from."""
        return self.mapped(self.node(ref))

    def ref(self, node: fx.Node) -> NodeRef:
        """``node`` as a rule sees it (an output nothing reads is named ``""``)."""
        m = self.mapped(node)
        names = tuple("" if out is None else out.name for out in outputs(m))
        return NodeRef(self.key(node), m.op, "", m.inputs, names, m.label)

    def output_node(self, ref: NodeRef, index: int) -> fx.Node:
        """The node whose users read output ``index`` of ``ref`` (a getitem of a Split part)."""
        out = outputs(self.info(ref))[index]
        assert out is not None, f"output {index} of {ref.label} is not read"
        return out

    def value_node(self, value: str) -> fx.Node | None:
        """The fx node named ``value`` (None for a parameter, a scalar or an absent input)."""
        return self.by_name.get(value)

    # ----- GraphView -----------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return OPSET

    def producer(self, value: str) -> NodeRef | None:
        node = self.by_name.get(value)
        if node is None or node.op in ("placeholder", "get_attr", "output"):
            return None
        if node.op == "call_function" and node.target is operator.getitem:
            source = node.args[0]
            if isinstance(source, fx.Node) and node in outputs(self.mapped(source)):
                return self.ref(source)  # an output of a tuple-valued op (batch norm, split, pool)
        return self.ref(node)

    def produced_outside(self, value: str) -> bool:
        return False

    def consumer(self, value: str) -> NodeRef | None:
        node = self.by_name.get(value)
        if node is None or self.uses(value) != 1 or self.is_graph_output(value):
            return None
        (user,) = node.users
        return self.ref(user)

    def uses(self, value: str) -> int:
        node = self.by_name.get(value)
        if node is None:
            return 1
        return sum(_references(node, u) for u in node.users)

    def readers(self, value: str) -> tuple[NodeRef, ...]:
        node = self.by_name.get(value)
        if node is None:
            return ()
        return tuple(self.ref(u) for u in node.users if u.op != "output" for _ in range(_references(node, u)))

    def uses_after_release(self, value: str, released: Sequence[str]) -> int:
        return self.uses(value)

    def metadata_reads(self, value: str) -> tuple[tuple[NodeRef, int], ...]:
        node = self.by_name.get(value)
        if node is None:
            return ()
        found = ((u, metadata_position(u, node)) for u in node.users)
        return tuple((self.ref(u), k) for u, k in found if k is not None)

    def is_graph_output(self, value: str) -> bool:
        node = self.by_name.get(value)
        return node is not None and any(u.op == "output" for u in node.users)

    def constant(self, value: str) -> np.ndarray:
        node = self.by_name.get(value)
        if node is None:
            read = self._virtual.get(value)
            if read is None:
                raise NotConstant(f"'{value}' is not a graph value")
            return read()
        if node.op == "get_attr":
            tensor = get_attr(self.gm, path_of(node))
            if isinstance(tensor, torch.Tensor):
                return to_numpy(tensor)
            raise NotConstant(f"'{node.target}' is a {type(tensor).__name__}, not a tensor")
        if node.op == "placeholder":
            raise NotConstant(f"'{value}' is a graph input")
        if node.op == "call_function" and node.target in TRANSPOSES and isinstance(node.args[0], fx.Node):
            return self._transposed(node)
        raise NotConstant(f"'{value}' is computed by {self.mapped(node).kind or node.op}")

    def _transposed(self, node: fx.Node) -> np.ndarray:
        source = node.args[0]
        assert isinstance(source, fx.Node)
        base = self.constant(source.name)
        if node.target is torch.ops.aten.permute.default:
            return np.transpose(base, tuple(node.args[1]))  # type: ignore[arg-type]
        if node.target is torch.ops.aten.transpose.int:
            return np.swapaxes(base, int(node.args[1]), int(node.args[2]))  # type: ignore[arg-type]
        return base.T

    def rank(self, value: str) -> int | None:
        node = self.by_name.get(value)
        if node is None or node.op == "get_attr":
            try:
                return self.constant(value).ndim
            except NotConstant:
                return None
        meta = _meta(node)
        return None if meta is None else meta[0]

    def static_shape(self, value: str) -> tuple[int, ...] | None:
        """The shape torch.export recorded (``meta["val"]``) when every dimension is a number: the
        exported program's guards fix it. Shapes from example inputs (``tensor_meta`` of shape
        propagation after symbolic_trace) hold for those inputs only: None."""
        node = self.by_name.get(value)
        shape = getattr(node.meta.get("val"), "shape", None) if node is not None else None
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return tuple(int(d) for d in shape)

    def dtype(self, value: str) -> np.dtype | None:
        node = self.by_name.get(value)
        if node is None or node.op == "get_attr":
            try:
                return self.constant(value).dtype
            except NotConstant:
                return None
        meta = _meta(node)
        return None if meta is None else _np_dtype(meta[1])

    def attr(self, node: NodeRef, name: str, default: object = None) -> object:
        return self.info(node).attrs.get(name, default)

    def attr_int(self, node: NodeRef, name: str, default: int) -> int:
        value = self.info(node).attrs.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadAttribute(f"{name} of {node.label} is not a constant integer")
        return value

    def attr_float(self, node: NodeRef, name: str, default: float) -> float:
        value = self.info(node).attrs.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadAttribute(f"{name} of {node.label} is not a constant number")
        return float(value)

    def folded_into(self, node: NodeRef) -> bool:
        return self.node(node) in self.folded

    # ----- a torch limit on layers (see bnfold.rules.common.producer_of) ---------------------------
    def check_layer(self, layer: NodeRef) -> None:
        """FoldError unless a BN after ``layer`` normalizes its feature axis: ``nn.Linear`` applies
        to the last axis, a BN to axis 1, so the Linear's output must be provably 2-D."""
        if self.info(layer).kind != "Linear":
            return
        rank = self.rank(layer.outputs[0])
        if rank is None:
            raise FoldError(Reason.UNKNOWN_RANK, "cannot tell the Linear output's rank: pass example_inputs")
        if rank != 2:
            raise FoldError(
                Reason.CHANNEL_AXIS,
                f"Linear output has rank {rank}; BatchNorm1d normalizes axis 1, not the feature axis",
            )
