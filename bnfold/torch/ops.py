"""torch.fx nodes as the ONNX operators the fold rules know.

:meth:`Mapper.map` describes one fx node as an ONNX op (``Conv``, ``ConvTranspose``, ``Gemm``,
``MatMul``, ``Add``, ``Mul``, ``Flatten``, ``Reshape``, ``Concat``, ``Identity`` for identity and
inference-mode dropout, ``BatchNormalization``) with its inputs by
value name, its ONNX attributes and, per input, where that input lives in the fx graph (a call's
argument, or a parameter of the called module). A ``view`` / ``reshape`` whose recorded shapes
make it ``[N, C*...]`` is a ``Flatten(axis=1)``; ``permute`` / ``t`` / ``transpose`` of a constant
(:data:`TRANSPOSES`) are read as constants by the view. Anything else keeps its own name as op type, so
the rules refuse it (``unsupported_producer``). Values are fx node names; what a rule reads as a
constant without a node of its own (a module's parameters, a Python scalar, the ones of a BN
without ``weight``) gets a name that no fx node can have (it contains ``.`` or ``:``).

A BatchNorm that :func:`bnfold.torch.batchnorm.bn_call` refuses is no ``BatchNormalization``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..rules.view import NotConstant
from . import ops_layout  # the hook in Mapper.map (ops_layout imports this module back)
from .batchnorm import BN_FUNCTIONS, TorchSkip, bind, bn_call, path_of, target_name
from .tensors import to_numpy

aten = torch.ops.aten

Lazy = Callable[[], np.ndarray]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONVOLUTION_ARGS = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
)
_LINEAR_ARGS = ("input", "weight", "bias")
_CONV_FUNCTIONS: dict[object, tuple[str, tuple[str, ...]]] = {
    F.conv1d: ("Conv", _CONV_ARGS),
    F.conv2d: ("Conv", _CONV_ARGS),
    F.conv3d: ("Conv", _CONV_ARGS),
    F.conv_transpose1d: ("ConvTranspose", _CONVT_ARGS),
    F.conv_transpose2d: ("ConvTranspose", _CONVT_ARGS),
    F.conv_transpose3d: ("ConvTranspose", _CONVT_ARGS),
    aten.conv1d.default: ("Conv", _CONV_ARGS),
    aten.conv2d.default: ("Conv", _CONV_ARGS),
    aten.conv3d.default: ("Conv", _CONV_ARGS),
    aten.conv_transpose1d.default: ("ConvTranspose", _CONVT_ARGS),
    aten.conv_transpose2d.input: ("ConvTranspose", _CONVT_ARGS),
    aten.conv_transpose3d.input: ("ConvTranspose", _CONVT_ARGS),
    aten.convolution.default: ("convolution", _CONVOLUTION_ARGS),
}
_LINEAR_FUNCTIONS = {F.linear, aten.linear.default}
_ADDMM_FUNCTIONS = {torch.addmm, aten.addmm.default}
_MATMUL_TARGETS = {
    operator.matmul,
    torch.matmul,
    torch.mm,
    aten.matmul.default,
    aten.mm.default,
    "matmul",
    "mm",
}
_ADD_TARGETS = {operator.add, torch.add, aten.add.Tensor, "add"}
_MUL_TARGETS = {operator.mul, torch.mul, aten.mul.Tensor, "mul"}
_FLATTEN_TARGETS = {torch.flatten, aten.flatten.using_ints, "flatten"}
_RESHAPE_TARGETS = {torch.reshape, aten.view.default, aten.reshape.default, "view", "reshape"}
_CAT_TARGETS = {torch.cat, torch.concat, aten.cat.default}
_DROPOUT_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    torch.dropout,
    aten.dropout.default,
}
# transpositions of a constant are constants too (a decomposed nn.Linear reads permute(weight))
TRANSPOSES = {aten.permute.default, aten.t.default, aten.transpose.int}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYER_FORWARDS = {c.forward for c in _CONV_MODULES + _CONVT_MODULES + (nn.Linear,)}


@dataclass(frozen=True)
class Slot:
    """Where an input of a mapped node lives: argument ``pos`` (keyword ``name``) of a call, or,
    with ``pos == -1``, parameter ``name`` of the called module."""

    pos: int
    name: str


@dataclass
class Mapped:
    """One fx node as an ONNX op. ``node``: the call; ``out``: the node whose users read the
    result (a ``getitem`` for aten's tuple-valued batch norm, whose other ``getitem`` nodes are
    ``extra``); ``kind``: the op type reported for a fold into it (``Linear`` for ``nn.Linear``)."""

    op: str
    node: fx.Node
    label: str
    inputs: tuple[str, ...] = ()
    slots: tuple[Slot | None, ...] = ()
    attrs: dict[str, object] = field(default_factory=dict)
    out: fx.Node | None = None
    extra: tuple[fx.Node, ...] = ()
    module: str | None = None
    kind: str = ""
    virtual: dict[str, Lazy] = field(default_factory=dict)

    @property
    def result(self) -> fx.Node:
        """The node whose users read this op's result."""
        return self.out if self.out is not None else self.node


# ----- mapping ------------------------------------------------------------------------------------
def _ntuple(value: object, n: int) -> object:
    if isinstance(value, int):
        return [value] * n
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return list(value)
    return value  # not a constant: reading it as an integer list fails


def _conv_attrs(
    groups: object, stride: object, padding: object, dilation: object, spatial: int
) -> dict[str, object]:
    attrs: dict[str, object] = {"group": groups, "strides": _ntuple(stride, spatial)}
    attrs["dilations"] = _ntuple(dilation, spatial)
    if isinstance(padding, str):
        attrs["auto_pad"] = "VALID" if padding == "valid" else "SAME_UPPER"
    else:
        pads = _ntuple(padding, spatial)
        attrs["pads"] = pads + pads if isinstance(pads, list) else pads
    return attrs


class Mapper:
    """Maps fx nodes to :class:`Mapped` records for one GraphModule (its modules as of now)."""

    def __init__(
        self, gm: fx.GraphModule, modules: dict[str, nn.Module], constant: Callable[[str], np.ndarray]
    ) -> None:
        self.gm = gm
        self.modules = modules
        self.constant = constant  # the constant value of a graph value (raises when there is none)

    def map(self, node: fx.Node) -> Mapped:
        """``node`` as an ONNX op (its own name as op type when the rules know no such op)."""
        if node.op == "call_module":
            mod = self.modules.get(path_of(node))
            if mod is None:
                return self._unknown(node)
            return self._module(node, mod)
        if node.op not in ("call_function", "call_method"):
            return Mapped(node.op, node, node.name, kind=node.op)
        return ops_layout.layout_op(self, node) or self._function(node) or self._unknown(node)

    def _unknown(self, node: fx.Node) -> Mapped:
        inputs = tuple(n.name for n in node.all_input_nodes)
        return Mapped(target_name(node), node, node.name, inputs, kind=target_name(node))

    def _value(self, mapped: Mapped, arg: object, name: str) -> str:
        """The value name of argument ``arg`` (a node, a Python number, or None: absent)."""
        if isinstance(arg, fx.Node):
            return arg.name
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            key = f"{mapped.node.name}:{name}"
            mapped.virtual[key] = functools.partial(np.array, float(arg), dtype=np.float64)
            return key
        return ""

    def _call(self, mapped: Mapped, args: dict[str, object], order: tuple[tuple[int, str], ...]) -> Mapped:
        """Fill the inputs and slots of a call from its bound arguments, in ONNX input order."""
        mapped.inputs = tuple(self._value(mapped, args.get(name), name) for _, name in order)
        mapped.slots = tuple(Slot(pos, name) for pos, name in order)
        return mapped

    # ----- modules ------------------------------------------------------------------------------
    def _module(self, node: fx.Node, mod: nn.Module) -> Mapped:
        path = path_of(node)
        x = node.args[0].name if node.args and isinstance(node.args[0], fx.Node) else ""
        layer = isinstance(mod, _CONV_MODULES + _CONVT_MODULES + (nn.Linear,))
        if layer and type(mod).forward in _LAYER_FORWARDS:
            op = (
                "Gemm"
                if isinstance(mod, nn.Linear)
                else "Conv"
                if isinstance(mod, _CONV_MODULES)
                else "ConvTranspose"
            )
            mapped = Mapped(op, node, path, module=path, kind="Linear" if op == "Gemm" else op)
            mapped.inputs = (x, self._param(mapped, mod, "weight"), self._param(mapped, mod, "bias"))
            mapped.slots = (Slot(0, "input"), Slot(-1, "weight"), Slot(-1, "bias"))
            if op == "Gemm":
                mapped.attrs = {"transB": 1}
            else:
                conv: Any = mod  # a Conv module's hyperparameters (typed as Tensor | Module)
                spatial = len(conv.kernel_size)
                mapped.attrs = _conv_attrs(conv.groups, conv.stride, conv.padding, conv.dilation, spatial)
                if op == "ConvTranspose":
                    mapped.attrs["output_padding"] = list(conv.output_padding)
            return mapped
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return self._bn_module(node, mod, x)
        if isinstance(mod, nn.Identity) or (
            isinstance(mod, nn.modules.dropout._DropoutNd) and not mod.training
        ):  # what an inference-mode Dropout computes
            return Mapped("Identity", node, path, (x,), (Slot(0, "input"),), module=path, kind="Identity")
        if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
            return Mapped("Flatten", node, path, (x,), (Slot(0, "input"),), {"axis": 1}, module=path)
        from .ops_spatial import map_module  # the pools and Upsample (a sibling module)

        inputs = tuple(n.name for n in node.all_input_nodes)
        name = type(mod).__name__  # as "<class> module", never an ONNX op (nn.Flatten(0, 1) is no Flatten)
        return map_module(node, mod) or Mapped(f"{name} module", node, path, inputs, module=path, kind=name)

    def _param(self, mapped: Mapped, mod: nn.Module, name: str) -> str:
        tensor = getattr(mod, name, None)
        if tensor is None:
            return ""
        key = f"{mapped.label}.{name}"
        mapped.virtual[key] = functools.partial(to_numpy, tensor)
        return key

    def _bn_module(self, node: fx.Node, mod: nn.Module, x: str) -> Mapped:
        path = path_of(node)
        try:
            bn_call(node, self.modules)
        except TorchSkip:
            return Mapped(type(mod).__name__, node, path, (x,), module=path, kind=type(mod).__name__)
        mapped = Mapped("BatchNormalization", node, path, module=path, kind="BatchNormalization")
        mean, var = self._param(mapped, mod, "running_mean"), self._param(mapped, mod, "running_var")
        gamma = self._param(mapped, mod, "weight") or self._filled(mapped, "weight", mean, 1.0)
        beta = self._param(mapped, mod, "bias") or self._filled(mapped, "bias", mean, 0.0)
        mapped.inputs = (x, gamma, beta, mean, var)
        mapped.attrs = {"epsilon": float(getattr(mod, "eps", 1e-5)), "training_mode": 0}
        return mapped

    def _filled(self, mapped: Mapped, name: str, like: str, fill: float) -> str:
        """A constant like ``like`` (read when needed) filled with ``fill``: a BN without weight."""
        key = f"{mapped.node.name}:{name}"
        reader = mapped.virtual.get(like)
        constant = self.constant  # the view's reader, for a mean that is a graph value

        def make() -> np.ndarray:
            base = reader() if reader is not None else constant(like)
            return np.full(base.shape, fill, dtype=base.dtype)

        mapped.virtual[key] = make
        return key

    # ----- functions and methods ------------------------------------------------------------------
    def _function(self, node: fx.Node) -> Mapped | None:
        target = node.target
        if target in _CONV_FUNCTIONS:
            return self._conv(node, *_CONV_FUNCTIONS[target])
        if target in _LINEAR_FUNCTIONS:
            mapped = Mapped("Gemm", node, node.name, attrs={"transB": 1}, kind="Linear")
            return self._call(mapped, bind(node, _LINEAR_ARGS), ((0, "input"), (1, "weight"), (2, "bias")))
        if target in _ADDMM_FUNCTIONS:
            args = bind(node, ("input", "mat1", "mat2"))
            mapped = Mapped("Gemm", node, node.name, kind="Gemm")
            mapped.attrs = {"transB": 0, "alpha": args.get("alpha", 1.0), "beta": args.get("beta", 1.0)}
            return self._call(mapped, args, ((1, "mat1"), (2, "mat2"), (0, "input")))
        if target in _MATMUL_TARGETS:
            mapped = Mapped("MatMul", node, node.name, kind="MatMul")
            self._call(mapped, bind(node, ("input", "other")), ((0, "input"), (1, "other")))
            mapped.slots += (Slot(2, "bias"),)  # where the bias goes when it becomes a Gemm
            return mapped
        if target in _ADD_TARGETS or target in _MUL_TARGETS:
            args = bind(node, ("input", "other"))
            if len(node.args) != 2 or args.get("alpha", 1) != 1:
                return None
            op = "Add" if target in _ADD_TARGETS else "Mul"
            return self._call(Mapped(op, node, node.name, kind=op), args, ((0, "input"), (1, "other")))
        if target in _FLATTEN_TARGETS:
            args = bind(node, ("input", "start_dim", "end_dim"))
            if args.get("start_dim", 0) != 1 or args.get("end_dim", -1) != -1:
                return None
            return self._call(Mapped("Flatten", node, node.name, attrs={"axis": 1}), args, ((0, "input"),))
        if target in _RESHAPE_TARGETS:
            flat = _flattens(node)
            mapped = Mapped(
                "Flatten" if flat else "Reshape", node, node.name, attrs={"axis": 1} if flat else {}
            )
            self._call(mapped, bind(node, ("input",)), ((0, "input"),))
            shape = None if flat else _target_shape(node)
            if shape is not None:  # the shape as ONNX Reshape's second input (-1 kept, no 0s)
                key = f"{node.name}:shape"
                mapped.virtual[key] = functools.partial(np.array, shape, dtype=np.int64)
                mapped.inputs += (key,)
                mapped.slots += (None,)
            return mapped
        if target in BN_FUNCTIONS:
            return self._bn_function(node)
        if target in _CAT_TARGETS:
            return self._cat(node)
        if target in _DROPOUT_FUNCTIONS:
            args = bind(node, ("input", "p", "training"))
            if args.get("training", True) is not False:  # F.dropout trains by default
                return None
            return self._call(Mapped("Identity", node, node.name, kind="Identity"), args, ((0, "input"),))
        from .ops_spatial import map_function  # Split and the spatial ops (a sibling module)

        return map_function(node)

    def _cat(self, node: fx.Node) -> Mapped | None:
        """``torch.cat(tensors, dim)`` as Concat: every part a node, the axis a constant."""
        args = bind(node, ("tensors", "dim"))
        parts, axis = args.get("tensors"), args.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, fx.Node) for p in parts):
            return None
        if not isinstance(axis, int):
            return None
        inputs = tuple(p.name for p in parts if isinstance(p, fx.Node))
        return Mapped("Concat", node, node.name, inputs, attrs={"axis": axis}, kind="Concat")

    def _conv(self, node: fx.Node, op: str, names: tuple[str, ...]) -> Mapped:
        args = bind(node, names)
        if op == "convolution":
            transposed = args.get("transposed")
            if not isinstance(transposed, bool):
                return self._unknown(node)
            op = "ConvTranspose" if transposed else "Conv"
        spatial = self._spatial(args.get("weight"))
        order = ((0, "input"), (names.index("weight"), "weight"), (names.index("bias"), "bias"))
        mapped = self._call(Mapped(op, node, node.name, kind=op), args, order)
        mapped.attrs = _conv_attrs(
            args.get("groups", 1),
            args.get("stride", 1),
            args.get("padding", 0),
            args.get("dilation", 1),
            spatial,
        )
        if op == "ConvTranspose":
            mapped.attrs["output_padding"] = _ntuple(args.get("output_padding", 0), spatial)
        return mapped

    def _bn_function(self, node: fx.Node) -> Mapped | None:
        try:
            out, extra = bn_call(node, self.modules)
        except TorchSkip:
            return None
        names = BN_FUNCTIONS[node.target]
        args = bind(node, names)
        mapped = Mapped(
            "BatchNormalization", node, node.name, out=out, extra=extra, kind="BatchNormalization"
        )
        x, gamma, beta, mean, var = (
            self._value(mapped, args.get(k), k)
            for k in ("input", "weight", "bias", "running_mean", "running_var")
        )
        gamma = gamma or self._filled(mapped, "weight", mean, 1.0)
        beta = beta or self._filled(mapped, "bias", mean, 0.0)
        mapped.inputs = (x, gamma, beta, mean, var)
        mapped.attrs = {"epsilon": float(args.get("eps", 1e-5)), "training_mode": 0}  # type: ignore[arg-type]
        return mapped

    def _spatial(self, weight: object) -> int:
        """The spatial rank of a convolution, from its weight (1 when unknown)."""
        if isinstance(weight, fx.Node):
            try:
                return max(self.constant(weight.name).ndim - 2, 1)
            except NotConstant:  # its recorded shape, else 1
                val = weight.meta.get("val", weight.meta.get("tensor_meta"))
                shape = getattr(val, "shape", None)
                if shape is not None:
                    return max(len(shape) - 2, 1)
        return 1


def _shape(node: object) -> tuple[int, ...] | None:
    """The concrete shape recorded on ``node`` (None when unknown or symbolic)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def _target_shape(node: fx.Node) -> list[int] | None:
    """The shape a ``reshape`` / ``view`` asks for when it is all Python ints without zeros
    (``x.reshape(-1, 6)``, ``torch.reshape(x, (-1, 6))``, ``aten.view(x, [-1, 6])``), else None."""
    rest = node.args[1:]
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d != 0 for d in dims):
        return None
    return [int(d) for d in dims]  # type: ignore[arg-type]


def _flattens(node: fx.Node) -> bool:
    """A view / reshape whose recorded shapes make it ``Flatten(axis=1)``: ``[N, C, ...]`` to
    ``[N, C * ...]``."""
    before, after = _shape(node.args[0] if node.args else None), _shape(node)
    return (
        before is not None
        and after is not None
        and len(before) >= 2
        and after == (before[0], int(np.prod(before[1:])))
    )
