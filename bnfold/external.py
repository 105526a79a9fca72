"""External data (models > 2 GB) in bounded memory.

A model is loaded without its external data. The pass reads only the tensors a fold needs
(:func:`read_external`), each one on its own; folded tensors are written to a spill file as soon
as they are made (:class:`Spill`), so they never accumulate in memory. Saving
(:func:`save_external`) streams every untouched tensor from its source file into the output's
data file with ``copy_file_range`` (no user-space buffer) and appends the folded ones from the
spill file. Peak memory tracks the largest folded tensor, not the model.

External data locations must stay inside the model's folder: absolute paths, ``..`` components
and symlinks that resolve elsewhere are refused (:func:`check_locations`).
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadInput
from .io import signals_deferred

ALIGN = 4096  # offsets in written data files are page aligned (mmap-friendly)
EXTERNAL_THRESHOLD = 1024  # tensors at least this large go to the data file when writing external data
PROTO_LIMIT = 2**31 - 2**20  # protobuf's 2 GiB limit, with a margin


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


_PLAIN_OPS = frozenset({"Conv", "ConvTranspose", "BatchNormalization", "Gemm", "MatMul", "Relu", "Clip", "Add",
                        "Mul", "Sub", "Div", "Identity", "Reshape", "Flatten", "Concat", "MaxPool", "AveragePool",
                        "GlobalAveragePool", "Sigmoid", "Softmax", "Transpose", "Squeeze", "Unsqueeze"})


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and Constant/attribute tensors, all graphs."""

    def graph_tensors(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        yield from _node_tensors(g.node)

    def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:  # noqa: ANN001
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

    yield from graph_tensors(model.graph)
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
        raise BadInput(f"external data location '{_short(location)}' is absolute; it must be relative to the model's folder")
    if "\0" in location:
        raise BadInput(f"external data location '{_short(location)}' contains a NUL character")
    parts = Path(location.replace("\\", "/")).parts
    if ".." in parts:
        raise BadInput(f"external data location '{_short(location)}' leaves the model's folder ('..')")
    base = Path(base_dir).resolve()
    try:
        path = (base / location).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a name too long, a symlink loop
        raise BadInput(f"external data location '{_short(location)}' cannot be resolved ({_reason(exc)})") from None
    if path != base and base not in path.parents:
        raise BadInput(f"external data location '{_short(location)}' resolves outside the model's folder (symlink)")
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
                    raise BadInput(f"external data file '{_short(e.get('location', ''))}' of tensor '{t.name}' is missing")
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


def raw_to_array(tensor: onnx.TensorProto, raw: bytes) -> np.ndarray:
    """The value of ``tensor`` whose data bytes are ``raw`` (little-endian, as ONNX stores them).

    Fixed-size numeric types are viewed in place (no copy); other types go through numpy_helper.
    """
    dtype = _NATIVE.get(tensor.data_type)
    if dtype is not None:
        dims = tuple(tensor.dims)
        if len(raw) == math.prod(dims) * dtype.itemsize:
            return np.frombuffer(raw, dtype=dtype).reshape(dims)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = raw
    return numpy_helper.to_array(inline)


def _native_types() -> dict[int, np.dtype]:
    import ml_dtypes

    t = onnx.TensorProto
    types = {t.FLOAT: np.float32, t.FLOAT16: np.float16, t.DOUBLE: np.float64, t.BFLOAT16: ml_dtypes.bfloat16,
             t.INT8: np.int8, t.UINT8: np.uint8, t.INT16: np.int16, t.UINT16: np.uint16, t.INT32: np.int32,
             t.UINT32: np.uint32, t.INT64: np.int64, t.UINT64: np.uint64}
    return {k: np.dtype(v).newbyteorder("<") for k, v in types.items()}


_NATIVE = _native_types()


class Spill:
    """A temporary file that holds folded tensors until the model is saved."""

    def __init__(self, folder: str | None = None) -> None:
        with signals_deferred():  # the file is removed when this object goes away, whatever happens
            fd, name = tempfile.mkstemp(prefix=".bnfold-spill-", suffix=".data", dir=folder)
            self.path = Path(name)
            self._file = os.fdopen(fd, "w+b")
            self._cleanup = weakref.finalize(self, _remove, self._file, self.path)
        self.size = 0

    def store_array(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A tensor named ``name`` whose value ``array`` is written here, never into a proto."""
        tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=list(array.shape))
        data = memoryview(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)).cast("B")
        pad = (-self.size) % ALIGN
        self._file.write(b"\0" * pad)
        offset = self.size + pad
        self._file.write(data)
        self.size = offset + len(data)
        _set_external(tensor, str(self.path), offset, len(data))
        return tensor

    def holds(self, tensor: onnx.TensorProto) -> bool:
        """True if ``tensor``'s data was moved to this spill file."""
        return is_external(tensor) and _entries(tensor).get("location") == str(self.path)

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The value of a tensor stored here."""
        e = _entries(tensor)
        self._file.flush()
        with open(self.path, "rb") as f:
            f.seek(int(e["offset"]))
            raw = f.read(int(e["length"]))
        return raw_to_array(tensor, raw)

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


def _is_open_source(target: Path, sources: dict[str, int], spill: Spill | None) -> bool:
    """True if ``target`` exists and is one of the files (open as ``sources``) data is read from."""
    try:
        st = os.stat(target)
    except OSError:
        return False
    for name, fd in sources.items():
        if spill is not None and name == str(spill.path):
            continue
        if os.path.samestat(st, os.fstat(fd)):
            return True
    return False


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
    folder = path.parent
    data_name = f"{path.name}.data"
    fd, tmp_data = -1, ""
    fd_model, tmp_model = -1, ""
    sources: dict[str, int] = {}
    undo: list[tuple[onnx.TensorProto, list[tuple[str, str]] | None, bytes | None]] = []
    written = replaces_source = False
    try:
        with signals_deferred():  # a Ctrl-C cannot land between creating a temp file and noting its name
            fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=folder)
        with signals_deferred():
            fd_model, tmp_model = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        if spill is not None:
            spill._file.flush()
        pos = 0
        for t in iter_tensors(model):
            if is_external(t):
                e = _entries(t)
                loc = e.get("location", "")
                src = loc if spill is not None and loc == str(spill.path) else str(resolve_location(base_dir, loc))
                if src not in sources:
                    sources[src] = os.open(src, os.O_RDONLY)
                offset, length = _span(t, e, os.fstat(sources[src]).st_size)
                pad = (-pos) % ALIGN
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
        os.close(fd)
        fd = -1
        with os.fdopen(fd_model, "wb") as f:
            fd_model = -1
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        for tmp in (tmp_data, tmp_model):
            os.chmod(tmp, 0o644)
        replaces_source = _is_open_source(folder / data_name, sources, spill)
        with signals_deferred():  # Ctrl-C/SIGTERM cannot split the pair: old pair or new pair
            os.replace(tmp_data, folder / data_name)
            os.replace(tmp_model, path)
            written = True
        if not replaces_source:
            _restore(undo)
        return replaces_source
    except BaseException:
        if not (written and replaces_source):
            _restore(undo)  # the model in memory keeps referring to its old (still valid) data
        for f_ in (fd, fd_model):
            if f_ >= 0:
                os.close(f_)
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
