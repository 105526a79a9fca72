"""torch.fx layout ops as the ONNX ops the ``slice`` and ``layout`` rules read (tried before the
mappings of :mod:`bnfold.torch.ops`; None leaves a node to them):

* ``x.transpose(a, b)``, ``x.permute(...)``, ``x.t()`` (and their torch / aten forms): Transpose
  with the full ``perm`` (the input's rank from the recorded shapes; a transposed constant is still
  read as a constant by the view);
* ``x[:, a:b]`` (``operator.getitem`` with slices and at most one ``...``), ``aten.slice.Tensor``,
  ``x.narrow(dim, start, length)`` (``start >= 0``): Slice with constant starts, ends, axes, steps;
* ``x.flatten(0, -2)`` of a rank >= 3 tensor (LeViT's tokens): ``Flatten(axis = rank - 1)``;
* ``x.flatten(s)`` with ``s >= 2`` to the last axis: Reshape to ``[0] * s + [-1]`` (0 copies the
  input's extent, as in ONNX);
* ``x.reshape(n, c, -1)`` / ``x.view(...)`` whose sizes are Python ints and reads of ``x``'s own
  size at the same position (``n, c = x.shape[:2]``, ``x.size(0)``, ``sym_size``): Reshape with 0
  for those (other reshapes stay with :mod:`.ops`: all-int ones, and 2-D ones, which it reads as a
  Flatten when the shapes say so);
* ``x.unsqueeze(d)``: Unsqueeze with axes ``[d]``.

``x.squeeze(d)`` is not mapped: torch leaves an axis of extent other than 1 in place, ONNX's
Squeeze would not.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import fx

from . import ops
from .batchnorm import bind

aten = torch.ops.aten
END = 2**63 - 1  # a Slice end that reads to the end of the axis

_TRANSPOSE = {torch.transpose, aten.transpose.int, "transpose"}
_PERMUTE = {torch.permute, aten.permute.default, "permute"}
_T = {torch.t, aten.t.default, "t"}
_SLICE = {aten.slice.Tensor}
_NARROW = {torch.narrow, aten.narrow.default, "narrow"}
_FLATTEN = {torch.flatten, aten.flatten.using_ints, "flatten"}
_RESHAPE = {torch.reshape, aten.view.default, aten.reshape.default, "view", "reshape"}
_UNSQUEEZE = {torch.unsqueeze, aten.unsqueeze.default, "unsqueeze"}
_SIZE_FUNCTIONS = {getattr(aten.sym_size, "int", None)} - {None}


def _ints(values: Sequence[object]) -> list[int] | None:
    """``values`` as Python ints, or None when one is not an int (a node, a symbol, a bool)."""
    out = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return out if len(out) == len(values) else None


def _rank(node: object) -> int | None:
    """The rank recorded on ``node`` when it is a tensor, else None."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    return len(shape) if shape is not None and hasattr(val, "dtype") else None


def layout_op(mapper: ops.Mapper, node: fx.Node) -> ops.Mapped | None:
    """``node`` as Transpose / Slice / Reshape / Unsqueeze, or None when it is none of those."""
    target = node.target
    if (
        node.op not in ("call_function", "call_method")
        or not node.args
        or not isinstance(node.args[0], fx.Node)
    ):
        return None
    if target in _TRANSPOSE or target in _PERMUTE or target in _T:
        return _transpose(node)
    if target is operator.getitem:
        return _getitem(node)
    if target in _SLICE or target in _NARROW:
        return _slice_call(node)
    if target in _FLATTEN:
        return _flatten(node)
    if target in _RESHAPE:
        return _reshape(node)
    if target in _UNSQUEEZE:
        dim = _ints([bind(node, ("input", "dim")).get("dim")])
        return None if dim is None else _with(node, "Unsqueeze", axes=dim)
    return None


def _with(
    node: fx.Node, op: str, attrs: dict[str, object] | None = None, **constants: Sequence[object]
) -> ops.Mapped:
    """``op`` on ``node``'s first argument; ``constants``: int64 inputs after it, in order."""
    x = node.args[0]
    assert isinstance(x, fx.Node)
    mapped = ops.Mapped(op, node, node.name, (x.name,), (ops.Slot(0, "input"),), attrs or {}, kind=op)
    for name, values in constants.items():
        key = f"{node.name}:{name}"
        mapped.virtual[key] = functools.partial(np.array, list(values), dtype=np.int64)
        mapped.inputs += (key,)
        mapped.slots += (None,)
    return mapped


def _transpose(node: fx.Node) -> ops.Mapped | None:
    rank = _rank(node.args[0])
    if rank is None:
        return None
    target = node.target
    if target in _T:
        perm = list(range(rank))[::-1]
    elif target in _TRANSPOSE:
        args = bind(node, ("input", "dim0", "dim1"))
        pair = _ints([args.get("dim0"), args.get("dim1")])
        if pair is None:
            return None
        perm = list(range(rank))
        i, j = pair[0] % rank, pair[1] % rank
        perm[i], perm[j] = perm[j], perm[i]
    else:
        rest = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims"),)
        dims = _ints(rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest)
        if dims is None or len(dims) != rank:
            return None
        perm = [d % rank for d in dims]
    return _with(node, "Transpose", {"perm": perm})


def _getitem(node: fx.Node) -> ops.Mapped | None:
    """``x[...]`` of a tensor with slices (and at most one Ellipsis) only."""
    if _rank(node.args[0]) is None or len(node.args) != 2:
        return None
    index = node.args[1]
    entries = list(index) if isinstance(index, tuple) else [index]
    bounds = [e for e in entries if isinstance(e, slice)]
    ellipses = len(entries) - len(bounds)
    if ellipses > 1 or (ellipses and Ellipsis not in entries):
        return None
    cut = entries.index(Ellipsis) if ellipses else len(entries)
    axes = list(range(cut)) + list(range(cut + 1 - len(entries), 0))
    return _sliced(node, [(axis, e.start, e.stop, e.step) for axis, e in zip(axes, bounds)])


def _slice_call(node: fx.Node) -> ops.Mapped | None:
    if node.target in _SLICE:
        args = bind(node, ("input", "dim", "start", "end", "step"))
        return _sliced(node, [(args.get("dim", 0), args.get("start"), args.get("end"), args.get("step", 1))])
    args = bind(node, ("input", "dim", "start", "length"))
    bounds = _ints([args.get("start"), args.get("length")])
    if bounds is None or bounds[0] < 0:  # a negative start would need the extent for the end
        return None
    return _sliced(node, [(args.get("dim"), bounds[0], bounds[0] + bounds[1], 1)])


def _sliced(node: fx.Node, cuts: list[tuple[object, object, object, object]]) -> ops.Mapped | None:
    """Slice with ``(axis, start, end, step)`` per cut (None: the default); None unless all ints."""
    rows: list[list[int]] = []
    for axis, start, end, step in cuts:
        row = _ints(
            [axis, 0 if start is None else start, END if end is None else end, 1 if step is None else step]
        )
        if row is None:
            return None
        if row[1:] != [0, END, 1]:  # else ``:`` on this axis
            rows.append(row)
    if not rows:
        return None
    axes, starts, ends, steps = ([r[k] for r in rows] for k in range(4))
    return _with(node, "Slice", starts=starts, ends=ends, axes=axes, steps=steps)


def _flatten(node: fx.Node) -> ops.Mapped | None:
    args = bind(node, ("input", "start_dim", "end_dim"))
    dims = _ints([args.get("start_dim", 0), args.get("end_dim", -1)])
    rank = _rank(node.args[0])
    if dims is not None and dims[0] == 0 and rank is not None and rank >= 3 and dims[1] in (-2, rank - 2):
        # LeViT's tokens: every axis but the last into one, [B, N, C] -> [B * N, C]
        return _with(node, "Flatten", {"axis": rank - 1})
    if dims is None or dims[0] < 2 or not (dims[1] == -1 or (rank is not None and dims[1] == rank - 1)):
        return None  # flatten(1) is ops' Flatten; other flattens from 0 and partial ones keep no channels
    return _with(node, "Reshape", shape=[0] * dims[0] + [-1])


def _reshape(node: fx.Node) -> ops.Mapped | None:
    x = node.args[0]
    rest = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("shape", node.kwargs.get("size")),)
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    if len(dims) == 2 or not any(isinstance(d, fx.Node) for d in dims):
        return None  # ops maps these (and reads a 2-D one as a Flatten when the shapes say so)
    shape: list[int] = []
    for i, d in enumerate(dims):
        if isinstance(d, fx.Node):
            if not _reads_size(d, x, i):
                return None
            shape.append(0)  # ONNX: copy the input's extent at i
        elif isinstance(d, int) and not isinstance(d, bool) and d != 0:
            shape.append(d)
        else:
            return None  # torch's 0 is an empty extent, ONNX's 0 a copy
    return _with(node, "Reshape", shape=shape)


def _reads_size(d: fx.Node, x: object, i: int) -> bool:
    """``d`` is the extent of ``x`` at axis ``i``: ``x.shape[i]``, ``x.size()[i]``, ``x.size(i)``,
    ``aten.sym_size.int(x, i)``."""
    args = d.args
    if d.op == "call_function" and d.target is operator.getitem and len(args) == 2 and args[1] == i:
        src = args[0]
        return (
            isinstance(src, fx.Node)
            and src.args[:1] == (x,)
            and (
                (src.op == "call_function" and src.target is getattr and src.args[1:] == ("shape",))
                or (src.op == "call_method" and src.target == "size" and len(src.args) == 1)
            )
        )
    if d.op == "call_method" and d.target == "size":
        return args == (x, i)
    return d.op == "call_function" and d.target in _SIZE_FUNCTIONS and args == (x, i)
