"""Embedded weights kept in the model file.

A large single-file model is parsed without copying its big tensors: the main graph's
initializers with a large ``raw_data`` are cut out of the bytes given to protobuf (a *skeleton*),
and each becomes a *virtual external tensor* (data_location EXTERNAL, location SOURCE_LOCATION,
offset/length of its bytes in the model file). Folded tensors are kept as numpy arrays
(location MEMORY_LOCATION). :class:`Embedded` stands in for the spill file: the pass reads
through it (``holds``/``read``) and stores into it (``store_array``). Saving writes the file in
pieces: the re-serialized skeleton with corrected length prefixes, untouched tensors copied
from the source file (``copy_file_range``), folded ones from memory. The bytes are those
``onnx.save`` writes for the same model loaded and folded in memory: protobuf writes known
fields in field-number order, so ``raw_data`` (9) goes before the first field numbered above 9.

Both locations begin with a NUL character, which no real external data location may contain
(resolve_location refuses it): a virtual tensor can never be mistaken for real external data,
nor read through a path that a later save may have replaced (reads go through the descriptor
opened at load, i.e. the original file even after an in-place save renamed a new one over it).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BadInput
from ..onnx.tensor_store import _NATIVE, raw_to_array
from .external_data import copy_range, entries, iter_tensors, set_external, write_all
from .wire import RAW_TAG, Piece, WireError, fields, varint, varint_bytes

SOURCE_LOCATION = "\0bnfold:source"  # bytes at offset/length in the model file itself
MEMORY_LOCATION = "\0bnfold:memory"  # a folded array held in memory; offset = its index

PlanPiece = Piece | tuple[int, int]
"""A piece of a planned file: bytes-like, or ``(offset, length)`` of the model file."""
_Held = dict[int, tuple[list[tuple[str, str]], tuple[str, int, int]]]


class Embedded:
    """The weights of a model loaded by :func:`bnfold.storage.wire.split_model`: virtual external
    tensors read from the model file (through the descriptor opened at load), and folded tensors
    held in memory.

    It takes the spill file's place while folding (``holds``/``read``/``store_array``), and
    :func:`plan_embedded` + :func:`write_pieces` / :meth:`materialize` put the bytes back into a
    complete model.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self._cleanup = weakref.finalize(self, os.close, self.fd)
        self.arrays: list[np.ndarray] = []

    def close(self) -> None:
        self._cleanup()

    def mark(self, tensor: onnx.TensorProto, offset: int, length: int) -> None:
        """Make ``tensor`` (its raw_data cut out) a virtual external tensor."""
        set_external(tensor, SOURCE_LOCATION, offset, length)

    def holds(self, tensor: onnx.TensorProto) -> bool:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or not tensor.external_data:
            return False
        loc = tensor.external_data[0].value
        return loc in (SOURCE_LOCATION, MEMORY_LOCATION)

    def _where(self, tensor: onnx.TensorProto) -> tuple[str, int, int]:
        e = entries(tensor)
        return e["location"], int(e["offset"]), int(e["length"])

    def raw(self, tensor: onnx.TensorProto) -> bytes | memoryview:
        """The tensor's data bytes (a view of the array for a folded tensor)."""
        loc, offset, length = self._where(tensor)
        if loc == MEMORY_LOCATION:
            return _array_bytes(self.arrays[offset])
        return self._pread(offset, length)

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise BadInput(f"{self.path}: the model file became shorter while it was being read")
        return data

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        loc, offset, length = self._where(tensor)
        if loc == MEMORY_LOCATION:
            return self.arrays[offset]
        return raw_to_array(tensor, self._pread(offset, length))

    def store_array(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A tensor named ``name`` holding ``array``: numeric arrays stay in memory until saved,
        others are embedded at once (numpy_helper.from_array, as without this class)."""
        dtype = array.dtype
        if dtype not in _NATIVE_DTYPES:
            return numpy_helper.from_array(array, name)
        tensor = onnx.TensorProto()  # the fields from_array sets, minus raw_data
        tensor.dims.extend(array.shape)
        if name:
            tensor.name = name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
        self.arrays.append(array)
        set_external(tensor, MEMORY_LOCATION, len(self.arrays) - 1, array.nbytes)
        return tensor

    def embed(self, tensor: onnx.TensorProto) -> None:
        """Put the data back into ``tensor`` as raw_data (the tensor it was before loading)."""
        data = self.raw(tensor)
        _unmark(tensor)
        tensor.raw_data = bytes(data)

    def write_to(self, tensor: onnx.TensorProto, fd: int) -> int:
        """Append the data of a tensor held here to fd ``fd``; returns its length."""
        loc, offset, length = self._where(tensor)
        if loc == MEMORY_LOCATION:
            data = _array_bytes(self.arrays[offset])
            write_all(fd, data)
            return len(data)
        copy_range(self.fd, fd, offset, length)
        return length

    def materialize(self, model: onnx.ModelProto) -> None:
        """Make ``model`` complete: every tensor held here gets its raw_data back."""
        for t in iter_tensors(model):
            if self.holds(t):
                self.embed(t)


_NATIVE_DTYPES = frozenset(_NATIVE.values())


def _array_bytes(array: np.ndarray) -> memoryview:
    """The bytes numpy_helper.from_array would store for ``array``, without copying when possible."""
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.reshape(-1).view(np.uint8).data  # (bfloat16 has no buffer format of its own)


def _unmark(tensor: onnx.TensorProto) -> None:
    del tensor.external_data[:]
    tensor.ClearField("data_location")


class LayoutError(Exception):
    """The serialized skeleton is not laid out as expected (the caller writes it plainly)."""


def plan_embedded(model: onnx.ModelProto, embedded: Embedded) -> tuple[list[PlanPiece], int]:
    """The pieces of ``model`` serialized with every tensor ``embedded`` holds put back inline.

    Pieces are bytes-like (written as they are) or ``(offset, length)`` of the model file
    (copied from it); the second item is the total size. Tensors held outside the main graph's
    initializers (a folded Constant, a subgraph) are embedded in ``model`` first. Raises LayoutError
    if protobuf's output does not look as expected (nothing is lost: the caller materializes).
    """
    inits = model.graph.initializer
    for t in iter_tensors(model, initializers=False):
        if embedded.holds(t):
            embedded.embed(t)
    held: _Held = {}
    try:
        for k, t in enumerate(inits):
            if t.data_location == onnx.TensorProto.EXTERNAL and embedded.holds(t):
                held[k] = ([(e.key, e.value) for e in t.external_data], embedded._where(t))
                _unmark(t)
        stub = model.SerializeToString()
    finally:
        for k, (saved, _) in held.items():
            t = inits[k]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in saved:
                e = t.external_data.add()
                e.key, e.value = key, value
    if not held:
        return [stub], len(stub)
    try:
        return _splice(stub, held, embedded)
    except WireError:
        raise LayoutError("unreadable") from None


def _splice(stub: bytes, held: _Held, embedded: Embedded) -> tuple[list[PlanPiece], int]:
    view = memoryview(stub)
    graph = [f for f in fields(stub, 0, len(stub)) if f[0] == 7]
    if len(graph) != 1:
        raise LayoutError("graph")
    _, _, gstart, gv, gend = graph[0]
    body: list[PlanPiece] = []
    last, grow, index = gv, 0, 0
    for num, _wt, fstart, vstart, vend in fields(stub, gv, gend):
        if num != 5:
            continue
        if index in held:
            _, (loc, offset, length) = held[index]
            at, prev = vend, 0
            for n, _w, f0, _v0, _v1 in fields(stub, vstart, vend):
                if n == 9 or n < prev:
                    raise LayoutError("tensor fields out of order")
                if n > 9 and at == vend:
                    at = f0
                prev = n
            data = (offset, length) if loc == SOURCE_LOCATION else _array_bytes(embedded.arrays[offset])
            new_len = (vend - vstart) + 1 + len(varint_bytes(length)) + length
            tag_end = varint(stub, fstart)[1]
            prefix = varint_bytes(new_len)
            body += [
                view[last:tag_end],
                prefix,
                view[vstart:at],
                RAW_TAG + varint_bytes(length),
                data,
                view[at:vend],
            ]
            grow += (tag_end - fstart + len(prefix) + new_len) - (vend - fstart)
            last = vend
        index += 1
    if index <= max(held):
        raise LayoutError("initializer count")
    body.append(view[last:gend])
    tag_end = varint(stub, gstart)[1]
    pieces: list[PlanPiece] = [view[:tag_end], varint_bytes(gend - gv + grow), *body, view[gend:]]
    total = sum(p[1] if isinstance(p, tuple) else len(p) for p in pieces)
    return pieces, total


def write_pieces(fd: int, pieces: list[PlanPiece], source_fd: int) -> None:
    """Write :func:`plan_embedded`'s pieces to ``fd``: small ones gathered, file ranges copied
    in the kernel, arrays straight from their memory."""
    pending: list[Piece] = []
    pending_size = 0
    for p in pieces:
        if isinstance(p, tuple) or len(p) >= 1 << 16:
            if pending:
                write_all(fd, b"".join(pending))
                pending, pending_size = [], 0
            if isinstance(p, tuple):
                copy_range(source_fd, fd, p[0], p[1])
            else:
                write_all(fd, p)
        else:
            pending.append(p)
            pending_size += len(p)
            if pending_size >= 1 << 20:
                write_all(fd, b"".join(pending))
                pending, pending_size = [], 0
    if pending:
        write_all(fd, b"".join(pending))
