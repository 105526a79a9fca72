"""External data: where a tensor's bytes are, reading them one tensor at a time, and copying them.

External data locations must stay inside the model's folder: absolute paths, ``..`` components
and symlinks that resolve elsewhere are refused (:func:`check_locations`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from ..errors import BadInput
from ..onnx.ops import NO_TENSOR_ATTRIBUTE_OPS, ONNX_DOMAINS
from ..onnx.tensor_store import _NATIVE, raw_to_array

ALIGN = 4096  # offsets in written data files are page aligned (mmap-friendly)


def entries(tensor: onnx.TensorProto) -> dict[str, str]:
    """The tensor's external data entries (location, offset, length, ...) as a dict."""
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: onnx.TensorProto) -> bool:
    """True if the tensor's data is outside the protobuf (in a file, or virtual: see embedded)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def iter_tensors(model: onnx.ModelProto, initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and Constant/attribute tensors, all graphs
    (without the main graph's initializers if ``initializers`` is False)."""

    def graph_tensors(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        yield from _node_tensors(g.node)

    def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
        for n in nodes:
            if n.op_type in NO_TENSOR_ATTRIBUTE_OPS and n.domain in ONNX_DOMAINS:
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
            length = entries(t).get("length")
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
        e = entries(t)
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
        offset, length = span(t, e, sizes[path])
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


def span(t: onnx.TensorProto, e: dict[str, str], file_size: int) -> tuple[int, int]:
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
    e = entries(tensor)
    path = resolve_location(base_dir, e.get("location", ""))
    try:
        size = path.stat().st_size
        offset, length = span(tensor, e, size)
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(length)
    except OSError as exc:
        raise BadInput(f"cannot read external data of tensor '{tensor.name}': {exc.strerror}") from None
    if len(raw) != length:
        raise BadInput(f"external data of tensor '{tensor.name}' is truncated")
    return raw_to_array(tensor, raw)


def set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[: 1 << 30])
        view = view[n:]


def copy_range(src: int, dst: int, offset: int, length: int) -> None:
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
            write_all(dst, chunk)
            n = len(chunk)
        done += n


def data_files(model: onnx.ModelProto, base_dir: str) -> list[Path]:
    """The distinct files (resolved) that hold the model's external data."""
    files: dict[Path, None] = {}
    for t in iter_tensors(model):
        if is_external(t):
            files.setdefault(resolve_location(base_dir, entries(t).get("location", "")))
    return list(files)


def has_external_data(model: onnx.ModelProto) -> bool:
    """True if any tensor of the model keeps its data in an external file."""
    return any(is_external(t) for t in iter_tensors(model))
