"""External data (models > 2 GB) in bounded memory.

A model is loaded without its external data. The pass reads only the tensors a fold needs
(:func:`read_external`), each one on its own; folded tensors are written to a spill file as soon
as they are made (:class:`Spill`), so they never accumulate in memory. Saving
(:func:`save_external`) streams every untouched tensor from its source file into the output's
data file with ``copy_file_range`` (no user-space buffer) and appends the folded ones from the
spill file. Peak memory tracks the largest folded tensor, not the model.

External data locations must stay inside the model's folder: absolute paths, ``..`` components
and symlinks that resolve elsewhere are refused (:func:`check_locations`).

A large single-file model gets the same treatment for its embedded weights (:class:`Embedded`,
"Embedded weights" below): they stay in the model file until saved, and the saved file has the
bytes ``onnx.save`` would write.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadInput
from .onnx.tensor_store import _NATIVE, MemoryStore, raw_to_array

ALIGN = 4096  # offsets in written data files are page aligned (mmap-friendly)
EXTERNAL_THRESHOLD = 1024  # tensors at least this large go to the data file when writing external data
PROTO_LIMIT = 2**31 - 2**20  # protobuf's 2 GiB limit, with a margin


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


_PLAIN_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "Gemm",
        "MatMul",
        "Relu",
        "Clip",
        "Add",
        "Mul",
        "Sub",
        "Div",
        "Identity",
        "Reshape",
        "Flatten",
        "Concat",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Sigmoid",
        "Softmax",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
    }
)


def iter_tensors(model: onnx.ModelProto, initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and Constant/attribute tensors, all graphs
    (without the main graph's initializers if ``initializers`` is False)."""

    def graph_tensors(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        yield from _node_tensors(g.node)

    def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:
        for n in nodes:
            if n.op_type in _PLAIN_OPS and n.domain in ("", "ai.onnx"):
                continue  # standard ops whose attributes are never tensors or graphs
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from graph_tensors(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from graph_tensors(g)

    if initializers:
        yield from model.graph.initializer
    yield from _node_tensors(model.graph.node)
    for f in model.functions:
        yield from _node_tensors(f.node)


def external_bytes(model: onnx.ModelProto) -> int:
    """Total bytes the model's tensors keep in external files (from their recorded lengths)."""
    total = 0
    for t in iter_tensors(model):
        if is_external(t):
            length = _entries(t).get("length")
            total += int(length) if length and length.isdigit() else 0
    return total


def resolve_location(base_dir: str, location: str) -> Path:
    """The file an external location names, refusing anything outside ``base_dir``."""
    if not location:
        raise BadInput("external data entry without a location")
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        raise BadInput(
            f"external data location '{_short(location)}' is absolute; it must be relative to the model's folder"
        )
    if "\0" in location:
        raise BadInput(f"external data location '{_short(location)}' contains a NUL character")
    parts = Path(location.replace("\\", "/")).parts
    if ".." in parts:
        raise BadInput(f"external data location '{_short(location)}' leaves the model's folder ('..')")
    base = Path(base_dir).resolve()
    try:
        path = (base / location).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a name too long, a symlink loop
        raise BadInput(
            f"external data location '{_short(location)}' cannot be resolved ({_reason(exc)})"
        ) from None
    if path != base and base not in path.parents:
        raise BadInput(
            f"external data location '{_short(location)}' resolves outside the model's folder (symlink)"
        )
    return path


def check_locations(model: onnx.ModelProto, base_dir: str) -> None:
    """Refuse unsafe or missing external data, entries pointing past the end of their file, and
    lengths that do not fit the tensor's shape; an entry without a length gets its tensor's size."""
    sizes: dict[Path, int] = {}
    for t in iter_tensors(model):
        if not is_external(t):
            continue
        e = _entries(t)
        path = resolve_location(base_dir, e.get("location", ""))
        if path not in sizes:
            try:
                if not path.is_file():
                    raise BadInput(
                        f"external data file '{_short(e.get('location', ''))}' of tensor '{t.name}' is missing"
                    )
                sizes[path] = path.stat().st_size
            except OSError as exc:
                raise BadInput(
                    f"external data file '{_short(e.get('location', ''))}' of tensor '{t.name}' cannot be read ({_reason(exc)})"
                ) from None
        offset, length = _span(t, e, sizes[path])
        if offset + length > sizes[path]:
            raise BadInput(
                f"external data of tensor '{t.name}' ends at byte {offset + length} but "
                f"'{_short(e.get('location', ''))}' has {sizes[path]} bytes (truncated file?)"
            )
        expected = _expected_bytes(t)
        if expected is not None and "length" not in e and length >= expected:
            entry = t.external_data.add()  # no length: the tensor's own size (as onnxruntime reads it)
            entry.key, entry.value = "length", str(expected)
            length = expected
        if expected is not None and length != expected:
            raise BadInput(
                f"external data of tensor '{t.name}' is {length} bytes, but its shape "
                f"{'x'.join(map(str, t.dims)) or 'scalar'} needs {expected}"
            )


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _expected_bytes(t: onnx.TensorProto) -> int | None:
    """Bytes a tensor of fixed-size numeric type must have, None for other types."""
    dtype = _NATIVE.get(t.data_type)
    if dtype is None:
        return None
    count = 1
    for d in t.dims:
        count *= int(d)
    return count * np.dtype(dtype).itemsize


def _span(t: onnx.TensorProto, e: dict[str, str], file_size: int) -> tuple[int, int]:
    raw_offset, raw_length = e.get("offset", "0"), e.get("length")
    for value in (raw_offset, raw_length):
        if value is not None and not (value.isascii() and value.isdigit()):
            if value.strip().lstrip("-").isdigit() and value.strip().startswith("-"):
                raise BadInput(f"tensor '{t.name}' has a negative external data offset/length")
            raise BadInput(f"tensor '{t.name}' has a malformed external data offset/length ({value!r})")
    offset = int(raw_offset)
    length = int(raw_length) if raw_length is not None else file_size - offset
    if offset < 0 or length < 0:
        raise BadInput(f"tensor '{t.name}' has a negative external data offset/length")
    return offset, length


def read_external(tensor: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """The tensor's value, reading just its bytes from the external file."""
    e = _entries(tensor)
    path = resolve_location(base_dir, e.get("location", ""))
    try:
        size = path.stat().st_size
        offset, length = _span(tensor, e, size)
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
    except OSError as exc:
        raise BadInput(f"cannot read external data of tensor '{tensor.name}': {exc.strerror}") from None
    if len(raw) != length:
        raise BadInput(f"external data of tensor '{tensor.name}' is truncated")
    return raw_to_array(tensor, raw)


class Spill:
    """A temporary file that holds folded tensors until the model is saved.

    Created in the folder the result will be saved to, it becomes the output's data file at the
    first save there (:meth:`adopt`): the folded tensors are then written once, not copied.
    Tensors stored here keep referring to it by its first name (:meth:`holds`); reads go through
    the open file, so they stay right whatever later happens to the name.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        from .io import signals_deferred  # (io imports graph, which imports this module)

        with signals_deferred():  # the file is removed when this object goes away, whatever happens
            fd, name = tempfile.mkstemp(prefix=".bnfold-spill-", suffix=".data", dir=folder)
            self.path = Path(name)
            self._file = os.fdopen(fd, "w+b")
            self._cleanup = weakref.finalize(self, _remove, self._file, self.path)
        self._location = name  # what stored tensors name as their location
        self.adopted = False
        self.size = 0

    def store_array(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A tensor named ``name`` whose value ``array`` is written here, never into a proto."""
        tensor = onnx.TensorProto(
            name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape)
        )
        data = memoryview(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)).cast(
            "B"
        )
        pad = (-self.size) % ALIGN
        self._file.write(b"\0" * pad)
        offset = self.size + pad
        self._file.write(data)
        self.size = offset + len(data)
        _set_external(tensor, self._location, offset, len(data))
        return tensor

    def holds(self, tensor: onnx.TensorProto) -> bool:
        """True if ``tensor``'s data was moved to this spill file."""
        return is_external(tensor) and _entries(tensor).get("location") == self._location

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The value of a tensor stored here."""
        e = _entries(tensor)
        self._file.flush()
        offset, length = int(e["offset"]), int(e["length"])
        raw = os.pread(self._file.fileno(), length, offset)
        if len(raw) != length:
            raise BadInput(f"the data of folded tensor '{tensor.name}' is truncated")
        return raw_to_array(tensor, raw)

    def write_to(self, tensor: onnx.TensorProto, fd: int) -> int:
        """Append the data of a tensor stored here to fd ``fd``; returns its length."""
        e = _entries(tensor)
        self._file.flush()
        length = int(e["length"])
        _copy_range(self._file.fileno(), fd, int(e["offset"]), length)
        return length

    def can_adopt(self, folder: Path) -> bool:
        """True if this file may become a data file in ``folder`` (it is there, not yet adopted)."""
        if self.adopted:
            return False
        try:
            return os.path.samefile(self.path.parent, folder)
        except OSError:
            return False

    def fileno(self) -> int:
        self._file.flush()
        return self._file.fileno()

    def adopt(self, target: Path) -> None:
        """Rename this file to ``target``: it is an output data file from now on, never removed
        here (its tensors stay readable through the open file)."""
        os.replace(self.path, target)
        self._cleanup.detach()
        self._cleanup = weakref.finalize(self, self._file.close)
        self.path = target
        self.adopted = True

    def close(self) -> None:
        self._cleanup()


def _remove(file: object, path: Path) -> None:
    if not file.closed:  # type: ignore[attr-defined]
        file.close()  # type: ignore[attr-defined]
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[: 1 << 30])
        view = view[n:]


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of fd ``src`` to the current end of fd ``dst``."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, length - done, offset + done)
        except OSError:
            n = 0
        if n == 0:  # not supported across these files, or EOF: fall back to a buffered copy
            os.lseek(src, offset + done, os.SEEK_SET)
            chunk = os.read(src, min(length - done, 1 << 24))
            if not chunk:
                raise BadInput("external data ended early while copying")
            _write_all(dst, chunk)
            n = len(chunk)
        done += n


def _is_open_source(target: Path, sources: dict[str, int]) -> bool:
    """True if ``target`` exists and is one of the files (open as ``sources``) data is read from."""
    try:
        st = os.stat(target)
    except OSError:
        return False
    return any(os.path.samestat(st, os.fstat(fd)) for fd in sources.values())


def _restore(undo: list[tuple[onnx.TensorProto, list[tuple[str, str]] | None, bytes | None]]) -> None:
    for t, entries, raw in reversed(undo):
        del t.external_data[:]
        if raw is not None:
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw
        else:
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in entries or []:
                e = t.external_data.add()
                e.key, e.value = k, v


def save_external(model: onnx.ModelProto, path: Path, base_dir: str, spill: Spill | None) -> bool:
    """Write ``model`` at ``path`` with its tensors in ``<name>.data`` beside it, atomically.

    Tensors already external are read from ``base_dir`` (or the spill file) and streamed;
    inline tensors of at least EXTERNAL_THRESHOLD bytes move to the data file too. The data file is
    renamed into place before the model file, so a reader never sees a model without its data.

    ``model`` keeps referring to where its data was (its sources stay valid, whatever later
    happens to the written files), unless the new data file replaced one of those sources
    (saving in place): then it refers to the new data file, and True is returned.
    """
    from .io import signals_deferred

    folder = path.parent
    data_name = f"{path.name}.data"
    fd, tmp_data = -1, ""
    fd_model, tmp_model = -1, ""
    sources: dict[str, int] = {}
    undo: list[tuple[onnx.TensorProto, list[tuple[str, str]] | None, bytes | None]] = []
    written = replaces_source = False
    # A spill file in this folder becomes the data file: folded tensors stay where they are,
    # the others are appended after them.
    adopt = isinstance(spill, Spill) and spill.can_adopt(folder)
    try:
        if adopt:
            fd = spill.fileno()  # type: ignore[union-attr]
            pos = spill.size  # type: ignore[union-attr]
            os.lseek(fd, pos, os.SEEK_SET)  # (a failed earlier save may have moved it)
        else:
            with signals_deferred():  # a Ctrl-C cannot land between creating a temp file and noting its name
                fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=folder)
            pos = 0
        with signals_deferred():
            fd_model, tmp_model = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        for t in iter_tensors(model):
            if is_external(t):
                pad = (-pos) % ALIGN
                if adopt and spill.holds(t):  # type: ignore[union-attr]  # already in the data file
                    e = _entries(t)
                    undo.append((t, [(x.key, x.value) for x in t.external_data], None))
                    _set_external(t, data_name, int(e["offset"]), int(e["length"]))
                    continue
                if spill is not None and spill.holds(t):  # a folded tensor (or an Embedded one)
                    if pad:
                        _write_all(fd, b"\0" * pad)
                    pos += pad
                    length = spill.write_to(t, fd)
                    undo.append((t, [(x.key, x.value) for x in t.external_data], None))
                    _set_external(t, data_name, pos, length)
                    pos += length
                    continue
                e = _entries(t)
                src = str(resolve_location(base_dir, e.get("location", "")))
                if src not in sources:
                    sources[src] = os.open(src, os.O_RDONLY)
                offset, length = _span(t, e, os.fstat(sources[src]).st_size)
                if pad:
                    _write_all(fd, b"\0" * pad)
                pos += pad
                _copy_range(sources[src], fd, offset, length)
                undo.append((t, [(x.key, x.value) for x in t.external_data], None))
                _set_external(t, data_name, pos, length)
                pos += length
            elif t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_THRESHOLD:
                raw = t.raw_data
                pad = (-pos) % ALIGN
                _write_all(fd, b"\0" * pad)
                _write_all(fd, raw)
                pos += pad
                undo.append((t, None, raw))
                t.ClearField("raw_data")
                _set_external(t, data_name, pos, len(raw))
                pos += len(raw)
        os.fsync(fd)
        closing, fd = fd, -1  # forget it first: a Ctrl-C here must not close it twice below
        if not adopt:
            os.close(closing)
        with os.fdopen(fd_model, "wb") as f:
            fd_model = -1
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        for tmp in (spill.path if adopt else tmp_data, tmp_model):  # type: ignore[union-attr]
            os.chmod(tmp, 0o644)
        replaces_source = _is_open_source(folder / data_name, sources)
        with signals_deferred():  # Ctrl-C/SIGTERM cannot split the pair: old pair or new pair
            if adopt:
                spill.adopt(folder / data_name)  # type: ignore[union-attr]
            else:
                os.replace(tmp_data, folder / data_name)
            os.replace(tmp_model, path)
            written = True
        if not replaces_source:
            _restore(undo)
        return replaces_source
    except BaseException:
        if not (written and replaces_source):
            _restore(undo)  # the model in memory keeps referring to its old (still valid) data
        if adopt:
            fd = -1  # the spill's own file stays open
            if not spill.adopted:  # type: ignore[union-attr]  # drop what was appended to it
                try:
                    os.ftruncate(spill.fileno(), spill.size)  # type: ignore[union-attr]
                except OSError:
                    pass
        for f_ in (fd, fd_model):
            if f_ >= 0:
                try:
                    os.close(f_)
                except OSError:  # already closed (interrupted right after a close): the cleanup goes on
                    pass
        for tmp in (tmp_data, tmp_model):
            try:
                if tmp:
                    os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    finally:
        for src_fd in sources.values():
            os.close(src_fd)


# --- Embedded weights kept in the model file -------------------------------------------------
#
# A large single-file model is parsed without copying its big tensors: the main graph's
# initializers with a large ``raw_data`` are cut out of the bytes given to protobuf (a *skeleton*),
# and each becomes a *virtual external tensor* (data_location EXTERNAL, location SOURCE_LOCATION,
# offset/length of its bytes in the model file). Folded tensors are kept as numpy arrays
# (location MEMORY_LOCATION). :class:`Embedded` stands in for the spill file: the pass reads
# through it (``holds``/``read``) and stores into it (``store_array``). Saving writes the file in
# pieces: the re-serialized skeleton with corrected length prefixes, untouched tensors copied
# from the source file (``copy_file_range``), folded ones from memory. The bytes are those
# ``onnx.save`` writes for the same model loaded and folded in memory: protobuf writes known
# fields in field-number order, so ``raw_data`` (9) goes before the first field numbered above 9.
#
# Both locations begin with a NUL character, which no real external data location may contain
# (resolve_location refuses it): a virtual tensor can never be mistaken for real external data,
# nor read through a path that a later save may have replaced (reads go through the descriptor
# opened at load, i.e. the original file even after an in-place save renamed a new one over it).

SOURCE_LOCATION = "\0bnfold:source"  # bytes at offset/length in the model file itself
MEMORY_LOCATION = "\0bnfold:memory"  # a folded array held in memory; offset = its index
LAZY_MIN_BYTES = 16 * 1024  # an initializer's raw_data at least this large is left in the file
LAZY_MIN_FRACTION = 0.5  # ...and only if such tensors make up this share of the file

_RAW_TAG = bytes([(9 << 3) | 2])  # TensorProto.raw_data, length-delimited
# TensorProto fields (number -> allowed wire types) a tensor left in the file may have: anything
# else (segment 3, external_data 13, data_location 14, an unknown field, a known field with the
# wrong wire type) keeps it embedded, so that serializing its stub is exactly protobuf's own.
_TENSOR_WIRE = {
    1: (0, 2),
    2: (0,),
    4: (5, 2),
    5: (0, 2),
    6: (2,),
    7: (0, 2),
    8: (2,),
    9: (2,),
    10: (1, 2),
    11: (0, 2),
    12: (2,),
    16: (2,),
}


class WireError(Exception):
    """Bytes that are not the protobuf this module expects (the caller takes the plain path)."""


def _varint(buf, pos: int) -> tuple[int, int]:
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = buf[pos]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos + 1
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _fields(buf, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire type, field start, value start, value end)`` of each field in [pos, end);
    the value of a varint/fixed field is its encoded bytes. WireError on malformed data."""
    try:
        while pos < end:
            start = pos
            tag, pos = _varint(buf, pos)
            wt = tag & 7
            if wt == 2:
                length, pos = _varint(buf, pos)
                vstart, pos = pos, pos + length
            elif wt == 0:
                vstart = pos
                _, pos = _varint(buf, pos)
            elif wt == 1:
                vstart, pos = pos, pos + 8
            elif wt == 5:
                vstart, pos = pos, pos + 4
            else:  # groups (3, 4) are not used by ONNX; 6, 7 are invalid
                raise WireError(f"wire type {wt}")
            if pos > end or tag >> 3 == 0:
                raise WireError("field past the end of its message")
            yield tag >> 3, wt, start, vstart, pos
    except IndexError:
        raise WireError("truncated") from None


def _raw_field(buf, start: int, end: int) -> tuple[int, int, int] | None:
    """``(field start, data start, data end)`` of the raw_data of the TensorProto in [start, end)
    if it can stay in the file, else None."""
    raw = None
    dtype = None
    for num, wt, fstart, vstart, vend in _fields(buf, start, end):
        if wt not in _TENSOR_WIRE.get(num, ()):
            return None
        if num == 9:
            if raw is not None:
                return None  # twice: protobuf keeps the last; do not guess
            raw = (fstart, vstart, vend)
        elif num == 2:
            dtype, _ = _varint(buf, vstart)
    if raw is None or dtype not in _NATIVE or raw[2] - raw[1] < LAZY_MIN_BYTES:
        return None
    return raw


def _large_initializers(buf, pos: int, end: int, threshold: int) -> list[tuple[int, int, int, int]]:
    """``(initializer index, field start, value start, value end)`` of each initializer field
    (GraphProto field 5) of at least ``threshold`` bytes in the GraphProto bytes [pos, end).

    :func:`_fields` unrolled for speed (a graph may have tens of thousands of fields): one-byte
    tags and lengths below 16 KiB are decoded inline. WireError on malformed data.
    """
    found = []
    index = 0
    try:
        while pos < end:
            start = pos
            tag = buf[pos]
            if tag < 0x80:
                pos += 1
            else:
                tag, pos = _varint(buf, pos)
            wt = tag & 7
            if wt == 2:
                b = buf[pos]
                if b < 0x80:
                    length = b
                    pos += 1
                else:
                    b2 = buf[pos + 1]
                    if b2 < 0x80:
                        length = (b & 0x7F) | (b2 << 7)
                        pos += 2
                    else:
                        length, pos = _varint(buf, pos)
                vstart = pos
                pos += length
                if tag == 0x2A:  # field 5, length-delimited
                    if length >= threshold:
                        found.append((index, start, vstart, pos))
                    index += 1
            elif tag >> 3 == 5:
                raise WireError("initializer that is not a message")
            elif wt == 0:
                _, pos = _varint(buf, pos)
            elif wt == 1:
                pos += 8
            elif wt == 5:
                pos += 4
            else:
                raise WireError(f"wire type {wt}")
            if tag >> 3 == 0:
                raise WireError("field number 0")
        if pos > end:
            raise WireError("field past the end of its message")
    except IndexError:
        raise WireError("truncated") from None
    return found


def split_model(buf, size: int) -> tuple[list, list[tuple[int, int, int]]] | None:
    """Plan a skeleton of the serialized ModelProto ``buf[:size]``.

    Returns ``(pieces, cuts)``: the skeleton is ``b"".join(pieces)`` (slices of ``buf`` and new
    length prefixes) and ``cuts`` lists ``(initializer index, data offset, data length)`` for each
    main-graph initializer whose raw_data was cut out. None when nothing worth cutting was found
    or the bytes are anything but plain (a graph field twice, groups, malformed data): the caller
    then parses the whole file, which also gives the usual error for a corrupt one.
    """
    try:
        graph = None
        for num, wt, fstart, vstart, vend in _fields(buf, 0, size):
            if num == 7:
                if graph is not None or wt != 2:
                    return None  # protobuf would merge the two
                graph = (fstart, vstart, vend)
        if graph is None:
            return None
        gstart, gv, gend = graph
        view = memoryview(buf)
        body: list = []
        cuts: list[tuple[int, int, int]] = []
        last = gv
        removed = 0
        threshold = LAZY_MIN_BYTES
        for index, fstart, vstart, vend in _large_initializers(buf, gv, gend, threshold):
            raw = _raw_field(buf, vstart, vend)
            if raw is not None:
                rstart, dstart, dend = raw
                new_len = (vend - vstart) - (dend - rstart)
                # the field's tag bytes as they were, a new length prefix, the fields around raw_data
                tag_end = _varint(buf, fstart)[1]
                prefix = _varint_bytes(new_len)
                body += [view[last:tag_end], prefix, view[vstart:rstart], view[dend:vend]]
                removed += (vend - fstart) - (tag_end - fstart + len(prefix) + new_len)
                last = vend
                cuts.append((index, dstart, dend - dstart))
        if not cuts or sum(c[2] for c in cuts) < LAZY_MIN_FRACTION * size:
            return None
        body.append(view[last:gend])
        tag_end = _varint(buf, gstart)[1]
        pieces = [view[:tag_end], _varint_bytes((gend - gv) - removed)] + body + [view[gend:size]]
        return pieces, cuts
    except WireError:
        return None


class Embedded:
    """The weights of a model loaded by :func:`split_model`: virtual external tensors read from
    the model file (through the descriptor opened at load), and folded tensors held in memory.

    It takes the spill file's place while folding (``holds``/``read``/``store_array``), and
    :func:`write_embedded` / :meth:`materialize` put the bytes back into a complete model.
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
        _set_external(tensor, SOURCE_LOCATION, offset, length)

    def holds(self, tensor: onnx.TensorProto) -> bool:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or not tensor.external_data:
            return False
        loc = tensor.external_data[0].value
        return loc in (SOURCE_LOCATION, MEMORY_LOCATION)

    def _where(self, tensor: onnx.TensorProto) -> tuple[str, int, int]:
        e = _entries(tensor)
        return e["location"], int(e["offset"]), int(e["length"])

    def raw(self, tensor: onnx.TensorProto) -> bytes | memoryview:
        """The tensor's data bytes (a view of the array for a folded tensor)."""
        loc, offset, length = self._where(tensor)
        if loc == MEMORY_LOCATION:
            return _array_bytes(self.arrays[offset])
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise BadInput(f"{self.path}: the model file became shorter while it was being read")
        return data

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        loc, offset, _ = self._where(tensor)
        if loc == MEMORY_LOCATION:
            return self.arrays[offset]
        return raw_to_array(tensor, self.raw(tensor))

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
        _set_external(tensor, MEMORY_LOCATION, len(self.arrays) - 1, array.nbytes)
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
            _write_all(fd, data)
            return len(data)
        _copy_range(self.fd, fd, offset, length)
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
    return memoryview(a.reshape(-1).view(np.uint8))  # (bfloat16 has no buffer format of its own)


def _unmark(tensor: onnx.TensorProto) -> None:
    del tensor.external_data[:]
    tensor.ClearField("data_location")


class _Layout(Exception):
    """The serialized skeleton is not laid out as expected (the caller writes it plainly)."""


def plan_embedded(model: onnx.ModelProto, embedded: Embedded) -> tuple[list, int]:
    """The pieces of ``model`` serialized with every tensor ``embedded`` holds put back inline.

    Pieces are bytes-like (written as they are) or ``(offset, length)`` of the model file
    (copied from it); the second item is the total size. Tensors held outside the main graph's
    initializers (a folded Constant, a subgraph) are embedded in ``model`` first. Raises _Layout
    if protobuf's output does not look as expected (nothing is lost: the caller materializes).
    """
    inits = model.graph.initializer
    for t in iter_tensors(model, initializers=False):
        if embedded.holds(t):
            embedded.embed(t)
    held: dict[int, tuple[list[tuple[str, str]], tuple[str, int, int]]] = {}
    try:
        for k, t in enumerate(inits):
            if t.data_location == onnx.TensorProto.EXTERNAL and embedded.holds(t):
                held[k] = ([(e.key, e.value) for e in t.external_data], embedded._where(t))
                _unmark(t)
        stub = model.SerializeToString()
    finally:
        for k, (entries, _) in held.items():
            t = inits[k]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in entries:
                e = t.external_data.add()
                e.key, e.value = key, value
    if not held:
        return [stub], len(stub)
    try:
        return _splice(stub, held, embedded)
    except WireError:
        raise _Layout("unreadable") from None


def _splice(stub: bytes, held: dict, embedded: Embedded) -> tuple[list, int]:
    view = memoryview(stub)
    graph = [f for f in _fields(stub, 0, len(stub)) if f[0] == 7]
    if len(graph) != 1:
        raise _Layout("graph")
    _, _, gstart, gv, gend = graph[0]
    body: list = []
    last, grow, index = gv, 0, 0
    for num, _wt, fstart, vstart, vend in _fields(stub, gv, gend):
        if num != 5:
            continue
        if index in held:
            _, (loc, offset, length) = held[index]
            at, prev = vend, 0
            for n, _w, f0, _v0, _v1 in _fields(stub, vstart, vend):
                if n == 9 or n < prev:
                    raise _Layout("tensor fields out of order")
                if n > 9 and at == vend:
                    at = f0
                prev = n
            data = (offset, length) if loc == SOURCE_LOCATION else _array_bytes(embedded.arrays[offset])
            new_len = (vend - vstart) + 1 + len(_varint_bytes(length)) + length
            tag_end = _varint(stub, fstart)[1]
            prefix = _varint_bytes(new_len)
            body += [
                view[last:tag_end],
                prefix,
                view[vstart:at],
                _RAW_TAG + _varint_bytes(length),
                data,
                view[at:vend],
            ]
            grow += (tag_end - fstart + len(prefix) + new_len) - (vend - fstart)
            last = vend
        index += 1
    if index <= max(held):
        raise _Layout("initializer count")
    body.append(view[last:gend])
    tag_end = _varint(stub, gstart)[1]
    pieces = [view[:tag_end], _varint_bytes(gend - gv + grow)] + body + [view[gend:]]
    total = sum(p[1] if isinstance(p, tuple) else len(p) for p in pieces)
    return pieces, total


def write_pieces(fd: int, pieces: list, source_fd: int) -> None:
    """Write :func:`plan_embedded`'s pieces to ``fd``: small ones gathered, file ranges copied
    in the kernel, arrays straight from their memory."""
    pending: list = []
    pending_size = 0
    for p in pieces:
        if isinstance(p, tuple) or len(p) >= 1 << 16:
            if pending:
                _write_all(fd, b"".join(pending))
                pending, pending_size = [], 0
            if isinstance(p, tuple):
                _copy_range(source_fd, fd, p[0], p[1])
            else:
                _write_all(fd, p)
        else:
            pending.append(p)
            pending_size += len(p)
            if pending_size >= 1 << 20:
                _write_all(fd, b"".join(pending))
                pending, pending_size = [], 0
    if pending:
        _write_all(fd, b"".join(pending))


class FileStore(MemoryStore):
    """The pass's tensor store for a model read from ``base_dir``: external data is read one tensor
    at a time (never outside that folder); while ``spill`` is set (a :class:`Spill`, or the
    :class:`Embedded` weights of a lazily loaded file), tensors it holds are read from it and new
    tensors of EXTERNAL_THRESHOLD bytes or more are written to it instead of the protobuf."""

    def __init__(self, base_dir: str, spill: Spill | Embedded | None = None) -> None:
        self.base_dir = base_dir
        self.spill = spill

    @property
    def spills(self) -> bool:
        return self.spill is not None

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if self.spill is not None and self.spill.holds(tensor):
                return self.spill.read(tensor)
            return read_external(tensor, self.base_dir)
        return super().read(tensor)

    def write(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        if self.spill is not None and array.nbytes >= EXTERNAL_THRESHOLD:
            return self.spill.store_array(name, array)
        return super().write(name, array)
