"""torch.fx nodes as ONNX ``Split`` and the spatial ops the fold rules read (:mod:`bnfold.rules.split`,
:mod:`bnfold.rules.spatial`); :class:`~bnfold.torch.ops.Mapper` asks :func:`map_function` and
:func:`map_module` about what it does not map itself.

* ``Split`` (``axis``, the sizes as input 1): ``torch.split`` / ``x.split`` (sizes, or one size),
  ``torch.chunk`` / ``x.chunk``, aten ``split.Tensor``, ``split.sizes``, ``split_with_sizes``,
  ``chunk``. One size and chunks become sizes from the split axis' recorded length (unknown
  without it: the sizes are then not constant). The parts are the ``getitem`` nodes reading the
  result (:class:`Parts`); a result read otherwise, or a part indexed twice, is no Split.
* ``Resize`` (``mode``, ``coordinate_transformation_mode``, ``axes`` = the spatial axes):
  ``nn.Upsample``, ``F.interpolate`` (nearest, nearest-exact, linear, bilinear, trilinear,
  bicubic; not ``area``), aten ``upsample_*`` and ``_upsample_*`` (``vec`` and ``default``).
* ``MaxPool`` (the indices a second output): ``nn.MaxPool1d/2d/3d``, ``F.max_pool*``
  (``return_indices``), ``F.max_pool*_with_indices``, aten ``max_pool*`` and
  ``max_pool*_with_indices``.
* ``AveragePool`` (``count_include_pad``, torch's default 1; ``pads``; ``ceil_mode``):
  ``nn.AvgPool1d/2d/3d``, ``F.avg_pool*``, aten ``avg_pool*``; not with ``divisor_override``
  (no mean).
* ``GlobalAveragePool``: adaptive average pools to output size 1 (module, function, aten); other
  sizes are not mapped.
* ``ReduceMean`` (axes as input 1, ``keepdims``): ``x.mean`` / ``torch.mean`` / aten ``mean.dim`` /
  ``mean.default``; not with a ``dtype``.

What this module does not map stays an op of its own name, which the rules refuse.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..rules.view import NotConstant
from .batchnorm import bind, path_of
from .ops import Mapped, Slot

aten = torch.ops.aten


@dataclass
class Parts(Mapped):
    """A node with several outputs, read by ``getitem`` nodes: ``parts`` holds the one reading
    each output, by index (None where nothing reads it)."""

    parts: tuple[fx.Node | None, ...] = ()


def outputs(mapped: Mapped) -> tuple[fx.Node | None, ...]:
    """The nodes whose users read each output of ``mapped``, by output index."""
    return mapped.parts if isinstance(mapped, Parts) else (mapped.result,)


def _packets(*names: str) -> list[Any]:
    """The aten overload packets of ``names`` that this torch has."""
    return [p for p in (getattr(aten, n, None) for n in names) if p is not None]


def _overloads(*names: str) -> set[object]:
    return {getattr(p, o) for p in _packets(*names) for o in p.overloads() if o not in ("out", "vec_out")}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(value: object, n: int) -> list[int] | None:
    """``value`` as ``n`` integers (an int repeated, or a list of ints), else None."""
    if _is_int(value):
        return [value] * n
    if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
        items = [int(v) for v in value]
        return items * n if len(items) == 1 and n > 1 else items if len(items) == n else None
    return None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The concrete shape recorded on ``node`` (torch.export or shape propagation), else None."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    return None if shape is None else len(shape)


def getitem_parts(node: fx.Node, count: int | None) -> tuple[fx.Node | None, ...] | None:
    """The ``getitem`` users of the tuple-valued ``node`` by index (``count`` outputs when known);
    None when it is read other than by indexing with a constant, or an output is indexed twice."""
    found: dict[int, fx.Node] = {}
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or len(user.args) != 2:
            return None
        index = user.args[1]
        if not _is_int(index):
            return None
        if index < 0:
            if count is None:
                return None
            index += count
        if index < 0 or (count is not None and index >= count) or index in found:
            return None
        found[index] = user
    total = count if count is not None else max(found, default=-1) + 1
    return tuple(found.get(i) for i in range(total))


def _lazy_ints(mapped: Mapped, name: str, values: Sequence[int] | None, why: str) -> str:
    """A constant int64 input (named so that no fx node can have the name); ``values`` None: one
    that is not constant, because of ``why``."""
    key = f"{mapped.node.name}:{name}"
    if values is None:

        def unknown() -> np.ndarray:
            raise NotConstant(why)

        mapped.virtual[key] = unknown
    else:
        mapped.virtual[key] = functools.partial(np.array, list(values), dtype=np.int64)
    return key


# ----- Split ------------------------------------------------------------------------------------
_SPLIT_TARGETS = {torch.split, "split", *_overloads("split", "split_with_sizes")}
_CHUNK_TARGETS = {torch.chunk, "chunk", *_overloads("chunk")}
_SPLIT_SIZE_KEYS = ("split_size_or_sections", "split_size", "split_sizes", "sections", "chunks")


def _split_sizes(spec: object, chunks: bool, length: int | None) -> list[int] | None:
    """The part sizes of a split by ``spec`` (sizes, or one size; ``chunks``: a number of chunks)
    along an axis of ``length`` (None: unknown)."""
    if isinstance(spec, (list, tuple)):
        return None if chunks or not all(_is_int(v) for v in spec) else [int(v) for v in spec]
    if not _is_int(spec) or length is None or spec <= 0 or length <= 0:
        return None
    size = -(-length // spec) if chunks else spec
    full, rest = divmod(length, size)
    return [size] * full + ([rest] if rest else [])


def _split(node: fx.Node, chunks: bool) -> Mapped | None:
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("tensor"))
    spec = (
        node.args[1]
        if len(node.args) > 1
        else next((node.kwargs[k] for k in _SPLIT_SIZE_KEYS if k in node.kwargs), None)
    )
    axis = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(x, fx.Node) or not _is_int(axis):
        return None
    shape = _shape(x)
    length = None
    if shape is not None and -len(shape) <= axis < len(shape):
        length = shape[axis]
    sizes = _split_sizes(spec, chunks, length)
    parts = getitem_parts(node, None if sizes is None else len(sizes))
    if parts is None or (isinstance(spec, (list, tuple)) and sizes is None):
        return None
    mapped = Parts("Split", node, node.name, attrs={"axis": axis}, kind="Split", parts=parts)
    why = f"{node.name} splits by {spec!r} along an axis of unknown length"
    mapped.inputs = (x.name, _lazy_ints(mapped, "split", sizes, why))
    mapped.slots = (Slot(0, "input"), None)
    return mapped


# ----- Resize ------------------------------------------------------------------------------------
# torch's interpolation modes as ONNX Resize: (mode, coordinate_transformation_mode without
# align_corners, nearest_mode); the linear and cubic modes take "align_corners" when it is set
_MODES: dict[str, tuple[str, str, str]] = {
    "nearest": ("nearest", "asymmetric", "floor"),
    "nearest-exact": ("nearest", "half_pixel", "round_prefer_ceil"),
    "linear": ("linear", "half_pixel", ""),
    "bilinear": ("linear", "half_pixel", ""),
    "trilinear": ("linear", "half_pixel", ""),
    "bicubic": ("cubic", "half_pixel", ""),
}
# aten's upsample ops: (mode, spatial rank, antialias); the linear ones read align_corners (arg 2)
_ATEN_RESIZE: dict[object, tuple[str, int, bool]] = {}
for _name, _mode, _n, _aa in (
    ("upsample_nearest1d", "nearest", 1, False),
    ("upsample_nearest2d", "nearest", 2, False),
    ("upsample_nearest3d", "nearest", 3, False),
    ("_upsample_nearest_exact1d", "nearest-exact", 1, False),
    ("_upsample_nearest_exact2d", "nearest-exact", 2, False),
    ("_upsample_nearest_exact3d", "nearest-exact", 3, False),
    ("upsample_linear1d", "linear", 1, False),
    ("upsample_bilinear2d", "bilinear", 2, False),
    ("upsample_trilinear3d", "trilinear", 3, False),
    ("upsample_bicubic2d", "bicubic", 2, False),
    ("_upsample_bilinear2d_aa", "bilinear", 2, True),
    ("_upsample_bicubic2d_aa", "bicubic", 2, True),
):
    _ATEN_RESIZE.update(dict.fromkeys(_overloads(_name), (_mode, _n, _aa)))
_INTERPOLATE = (
    "input",
    "size",
    "scale_factor",
    "mode",
    "align_corners",
    "recompute_scale_factor",
    "antialias",
)


def _resize(
    node: fx.Node, x: object, label: str, mode: object, align: object, spatial: int | None, aa: object
) -> Mapped | None:
    """A Resize of the spatial axes of ``x`` (``spatial`` of them when known)."""
    if not isinstance(x, fx.Node) or not isinstance(mode, str) or mode not in _MODES:
        return None
    if align not in (None, False, True) or aa not in (False, True):
        return None
    onnx_mode, coordinates, nearest = _MODES[mode]
    if align and onnx_mode != "nearest":
        coordinates = "align_corners"
    rank = _rank(x)
    if rank is None and spatial is not None:
        rank = spatial + 2
    attrs: dict[str, object] = {
        "mode": onnx_mode,
        "coordinate_transformation_mode": coordinates,
        "antialias": int(bool(aa)),
        # torch resizes the axes after the channels; unknown rank: a negative axis the rule refuses
        "axes": list(range(2, rank)) if rank is not None else [-1],
    }
    if nearest:
        attrs["nearest_mode"] = nearest
    if onnx_mode == "cubic":
        attrs["cubic_coeff_a"] = -0.75
    return Mapped("Resize", node, label, (x.name,), (Slot(0, "input"),), attrs, kind="Resize")


def _count(value: object) -> int | None:
    """How many spatial axes a size or scale argument names (None for a scalar or nothing)."""
    return len(value) if isinstance(value, (list, tuple)) else None


def _interpolate(node: fx.Node) -> Mapped | None:
    args = bind(node, _INTERPOLATE)
    spatial = _count(args.get("size")) or _count(args.get("scale_factor"))
    mode, align, aa = args.get("mode", "nearest"), args.get("align_corners"), args.get("antialias", False)
    return _resize(node, args.get("input"), node.name, mode, align, spatial, aa)


def _aten_resize(node: fx.Node) -> Mapped | None:
    mode, spatial, aa = _ATEN_RESIZE[node.target]
    align: object = None
    if not mode.startswith("nearest"):
        align = node.args[2] if len(node.args) > 2 else node.kwargs.get("align_corners")
        if not isinstance(align, bool):
            return None
    return _resize(node, node.args[0] if node.args else None, node.name, mode, align, spatial, aa)


# ----- pools ------------------------------------------------------------------------------------
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_ARGS = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "ceil_mode",
    "count_include_pad",
    "divisor_override",
)
_MAX_FUNCTIONS: dict[object, tuple[int, bool]] = {  # (spatial rank, returns indices)
    F.max_pool1d: (1, False),
    F.max_pool2d: (2, False),
    F.max_pool3d: (3, False),
    F.max_pool1d_with_indices: (1, True),
    F.max_pool2d_with_indices: (2, True),
    F.max_pool3d_with_indices: (3, True),
    torch.max_pool1d: (1, False),
    torch.max_pool2d: (2, False),
    torch.max_pool3d: (3, False),
    torch.max_pool1d_with_indices: (1, True),
}
for _n in (1, 2, 3):
    _MAX_FUNCTIONS.update(dict.fromkeys(_overloads(f"max_pool{_n}d"), (_n, False)))
    _MAX_FUNCTIONS.update(dict.fromkeys(_overloads(f"max_pool{_n}d_with_indices"), (_n, True)))
_AVG_FUNCTIONS: dict[object, int] = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_GLOBAL_FUNCTIONS: dict[object, int] = {
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
}
for _n in (1, 2, 3):
    _AVG_FUNCTIONS.update(dict.fromkeys(_overloads(f"avg_pool{_n}d"), _n))
    _GLOBAL_FUNCTIONS.update(
        dict.fromkeys(_overloads(f"adaptive_avg_pool{_n}d", f"_adaptive_avg_pool{_n}d"), _n)
    )
_MAX_MODULES: dict[type[nn.Module], int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVG_MODULES: dict[type[nn.Module], int] = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_GLOBAL_MODULES: dict[type[nn.Module], int] = {
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
}


def _window(args: dict[str, object], n: int, dilation: bool) -> dict[str, object] | None:
    """ONNX pool attributes from torch's (stride None or []: the kernel), None when not integers."""
    kernel = _ints(args.get("kernel_size"), n)
    stride = args.get("stride")
    strides = kernel if stride is None or stride == [] else _ints(stride, n)
    pads = _ints(args.get("padding", 0), n)
    ceil = args.get("ceil_mode", False)
    if kernel is None or strides is None or pads is None or not isinstance(ceil, bool):
        return None
    attrs: dict[str, object] = {"kernel_shape": kernel, "strides": strides, "pads": pads + pads}
    attrs["ceil_mode"] = int(ceil)
    if dilation:
        dilations = _ints(args.get("dilation", 1), n)
        if dilations is None:
            return None
        attrs["dilations"] = dilations
    return attrs


def _max_pool(node: fx.Node, label: str, args: dict[str, object], n: int, indices: object) -> Mapped | None:
    x, attrs = args.get("input"), _window(args, n, dilation=True)
    if not isinstance(x, fx.Node) or attrs is None or not isinstance(indices, bool):
        return None
    if not indices:
        return Mapped("MaxPool", node, label, (x.name,), (Slot(0, "input"),), attrs, kind="MaxPool")
    parts = getitem_parts(node, 2)
    if parts is None:
        return None
    return Parts(
        "MaxPool",
        node,
        label,
        (x.name,),
        (Slot(0, "input"),),
        attrs,
        out=parts[0],
        kind="MaxPool",
        parts=parts,
    )


def _avg_pool(node: fx.Node, label: str, args: dict[str, object], n: int) -> Mapped | None:
    x, attrs = args.get("input"), _window(args, n, dilation=False)
    count = args.get("count_include_pad", True)  # torch's default: padded zeros count
    if not isinstance(x, fx.Node) or attrs is None or not isinstance(count, bool):
        return None
    if args.get("divisor_override") is not None:
        return None  # a sum over a fixed divisor, not a mean
    attrs["count_include_pad"] = int(count)
    return Mapped("AveragePool", node, label, (x.name,), (Slot(0, "input"),), attrs, kind="AveragePool")


def _global_pool(node: fx.Node, label: str, x: object, size: object, n: int) -> Mapped | None:
    if not isinstance(x, fx.Node) or _ints(size, n) != [1] * n:
        return None  # an output size other than 1 is no global pool
    return Mapped("GlobalAveragePool", node, label, (x.name,), (Slot(0, "input"),), kind="GlobalAveragePool")


# ----- ReduceMean ---------------------------------------------------------------------------------
_MEAN_TARGETS = {torch.mean, "mean", *_overloads("mean")}


def _mean(node: fx.Node) -> Mapped | None:
    args = bind(node, ("input", "dim", "keepdim", "dtype"))
    if node.target is aten.mean.default:
        args = bind(node, ("input", "dtype"))
    x, dim, keep = args.get("input"), args.get("dim"), args.get("keepdim", False)
    if not isinstance(x, fx.Node) or args.get("dtype") is not None or not isinstance(keep, bool):
        return None
    axes = [dim] if _is_int(dim) else list(dim) if isinstance(dim, (list, tuple)) else None
    if dim is not None and (axes is None or not all(_is_int(a) for a in axes)):
        return None
    mapped = Mapped("ReduceMean", node, node.name, attrs={"keepdims": int(keep)}, kind="ReduceMean")
    mapped.inputs = (x.name,) if axes is None else (x.name, _lazy_ints(mapped, "axes", axes, ""))
    mapped.slots = (Slot(0, "input"),) + ((None,) if axes is not None else ())
    return mapped


# ----- entry points -------------------------------------------------------------------------------
def map_function(node: fx.Node) -> Mapped | None:
    """``node`` (a call_function or call_method) as Split or a spatial op, else None."""
    target = node.target
    if target in _SPLIT_TARGETS or target in _CHUNK_TARGETS:
        return _split(node, chunks=target in _CHUNK_TARGETS)
    if target is F.interpolate:
        return _interpolate(node)
    if target in _ATEN_RESIZE:
        return _aten_resize(node)
    if target in _MAX_FUNCTIONS:
        n, indices = _MAX_FUNCTIONS[target]
        args = bind(node, _POOL_ARGS)
        return _max_pool(node, node.name, args, n, args.get("return_indices", False) or indices)
    if target in _AVG_FUNCTIONS:
        return _avg_pool(node, node.name, bind(node, _AVG_ARGS), _AVG_FUNCTIONS[target])
    if target in _GLOBAL_FUNCTIONS:
        args = bind(node, ("input", "output_size"))
        n = _GLOBAL_FUNCTIONS[target]
        return _global_pool(node, node.name, args.get("input"), args.get("output_size"), n)
    if target in _MEAN_TARGETS:
        return _mean(node)
    return None


def _spatial_rank(mod: nn.Module, classes: dict[type[nn.Module], int]) -> int | None:
    """The spatial rank of ``mod`` when it is one of ``classes`` with its class's own forward."""
    for cls, n in classes.items():
        if isinstance(mod, cls) and type(mod).forward is cls.forward:
            return n
    return None


def map_module(node: fx.Node, mod: nn.Module) -> Mapped | None:
    """A call of ``mod`` (a torch.nn pool or Upsample with its own forward) as a spatial op, else
    None."""
    path = path_of(node)
    x = node.args[0] if node.args else None
    m: Any = mod  # the module's hyperparameters
    found: Mapped | None = None
    window = {
        "input": x,
        "kernel_size": getattr(m, "kernel_size", None),
        "stride": getattr(m, "stride", None),
    }
    window.update(padding=getattr(m, "padding", 0), ceil_mode=getattr(m, "ceil_mode", False))
    if _spatial_rank(mod, {nn.Upsample: 0}) is not None:
        spatial = _count(m.size) or _count(m.scale_factor)
        found = _resize(node, x, path, m.mode, m.align_corners, spatial, False)
    elif (n := _spatial_rank(mod, _MAX_MODULES)) is not None:
        found = _max_pool(node, path, {**window, "dilation": m.dilation}, n, m.return_indices)
    elif (n := _spatial_rank(mod, _AVG_MODULES)) is not None:
        window.update(
            count_include_pad=m.count_include_pad, divisor_override=getattr(m, "divisor_override", None)
        )
        found = _avg_pool(node, path, window, n)
    elif (n := _spatial_rank(mod, _GLOBAL_MODULES)) is not None:
        found = _global_pool(node, path, x, m.output_size, n)
    if found is not None:
        found.module = path
    return found
