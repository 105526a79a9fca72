"""Loading models from every accepted source: paths, protos, onnx_ir models, ONNXPrograms, bytes.

A large model file can be opened lazily (:func:`open_model`): its big weights stay in the file,
read through an :class:`bnfold.storage.embedded.Embedded`.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from onnx.external_data_helper import load_external_data_for_model

from ..errors import BadInput
from .embedded import Embedded
from .external_data import (
    check_locations,
    data_files,
    external_bytes,
    has_external_data,
    is_external,
    iter_tensors,
)
from .policy import DEFAULT_POLICY, PROTOBUF_LIMIT, StoragePolicy
from .structure import check_structure
from .wire import split_model


def to_model_proto(obj: Any) -> onnx.ModelProto | None:
    """Convert in-memory models (ModelProto, onnx_ir.Model, torch.onnx.ONNXProgram, bytes)."""
    if isinstance(obj, onnx.ModelProto):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _parse(bytes(obj), "the given data")
    model_proto = getattr(obj, "model_proto", None)  # torch.onnx.ONNXProgram
    if isinstance(model_proto, onnx.ModelProto):
        return model_proto
    module = type(obj).__module__ or ""
    if module.startswith("onnx_ir") or module.startswith("onnxscript.ir"):
        import onnx_ir

        return onnx_ir.serde.serialize_model(obj)
    return None


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        kind = _sniff(data)
        detail = (
            f"it looks like {kind}"
            if kind
            else "the protobuf data is corrupt: truncated, or another kind of file"
        )
        raise BadInput(f"{what} is not an ONNX model ({detail}); pass an .onnx file") from None
    if not model.HasField("graph"):
        kind = _sniff(data)
        raise BadInput(f"{what} is not an ONNX model (no graph{'; it looks like ' + kind if kind else ''})")
    return model


_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth checkpoint or an .npz?)"),
    (b"\x89HDF", "an HDF5 file (a Keras model?)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x80\x02", "a Python pickle (a PyTorch checkpoint?)"),
    (b"\x80\x04", "a Python pickle (a PyTorch checkpoint?)"),
    (b"\x1f\x8b", "a gzip file (decompress it first)"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an executable"),
)


def _sniff(data: bytes) -> str:
    """What a file that is not an ONNX model seems to be, from its first bytes ('' if unknown)."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if len(data) >= 8 and data[4:8] == b"TFL3":
        return "a TensorFlow Lite model"
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        stripped = text.lstrip()
        if stripped.startswith(("{", "[")):
            return "a JSON/text file"
        if stripped.startswith("<"):
            return "an XML/HTML file"
        return "a text file"
    return ""


def load_model(
    source: Any,
    stream_external: bool | None = None,
    external_files: list[Path] | None = None,
    *,
    policy: StoragePolicy = DEFAULT_POLICY,
) -> tuple[onnx.ModelProto, str, Path | None]:
    """Return ``(model, base_dir, path)`` for a path or an in-memory model.

    External data is loaded into the model when it is smaller than ``policy.stream_threshold``
    (or ``stream_external`` is False); otherwise (or when True) it stays on disk, is read tensor
    by tensor by the pass and streamed when saving.

    The returned model is always a complete fresh copy the caller may modify. Raises BadInput
    with a one-line message for anything that is not a readable ONNX model. ``external_files``, if
    given, receives the external data files the model on disk refers to (a save must not
    overwrite them).
    """
    model, base_dir, path, _ = open_model(source, stream_external, external_files, policy=policy)
    return model, base_dir, path


def open_model(
    source: Any,
    stream_external: bool | None = None,
    external_files: list[Path] | None = None,
    lazy: bool = False,
    *,
    policy: StoragePolicy = DEFAULT_POLICY,
) -> tuple[onnx.ModelProto, str, Path | None, Embedded | None]:
    """:func:`load_model`, plus (with ``lazy``) large embedded weights left in the file.

    With ``lazy``, a model file of at least ``policy.embedded_threshold`` bytes whose big
    initializers are plain ``raw_data`` is parsed without them (see :mod:`bnfold.storage.embedded`):
    the fourth item is then an :class:`~bnfold.storage.embedded.Embedded` through which those tensors are
    read, folded tensors stored, and the model saved or completed; otherwise it is None and the
    model is complete, as from :func:`load_model`.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise BadInput(f"{path}: no such file")
        if path.is_dir():
            raise BadInput(f"{path}: is a directory, not an ONNX file")
        if not path.is_file():
            raise BadInput(
                f"{path}: not a regular file (a device, pipe or socket); save the model to a file first"
            )
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise BadInput(f"{path}: cannot read ({exc.strerror})") from None
        if size > PROTOBUF_LIMIT:
            raise BadInput(
                f"{path}: {size} bytes is over protobuf's 2 GiB limit, so it is not an ONNX model file "
                "(larger models keep their weights in external data files)"
            )
        if lazy and size >= policy.embedded_threshold:
            opened = _open_lazy(path, size, policy)
            if opened is not None:
                return opened[0], str(path.resolve().parent), path, opened[1]
        model = _read_model(path)
        base_dir = str(path.resolve().parent)
        if has_external_data(model):
            try:
                check_locations(model, base_dir)
            except BadInput as exc:
                raise BadInput(f"{path}: {exc}") from None
            if external_files is not None:
                external_files.extend(data_files(model, base_dir))
            if not stream_external and (
                stream_external is not None or external_bytes(model) < policy.stream_threshold
            ):
                _load_external(model, base_dir, path)
            # else external data stays on disk: the pass reads only the tensors it folds.
        return model, base_dir, path, None
    proto = to_model_proto(source)
    if proto is None:
        raise BadInput(
            f"cannot fold a {type(source).__name__}: pass a path, onnx.ModelProto, "
            "onnx_ir.Model or torch.onnx.ONNXProgram"
        )
    check_structure(proto)
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy, "", None, None


def _read_model(path: Path) -> onnx.ModelProto:
    """Read and parse a whole model file, and check its structure (BadInput, one line)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise BadInput(f"{path}: empty file")
    model = _parse(data, str(path))
    del data
    try:
        check_structure(model)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None
    return model


def _open_lazy(path: Path, size: int, policy: StoragePolicy) -> tuple[onnx.ModelProto, Embedded] | None:
    """Parse the model at ``path`` without its large initializers (they stay in the file).

    None (the caller reads the whole file, which also reports any error in the usual words)
    when the file cannot be mapped, has nothing worth leaving out, is not plain protobuf, or has
    real external data.
    """
    if not hasattr(os, "pread"):  # (not on Windows) the weights are read with pread
        return None

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            size = min(size, len(mm))
            plan = split_model(mm, size, policy)
            if plan is None:
                return None
            pieces, cuts = plan
            skeleton = b"".join(pieces)
            del plan, pieces  # views of the map: released before it closes
            embedded = Embedded(path)
            if os.fstat(embedded.fd).st_ino != os.fstat(f.fileno()).st_ino:
                return None  # replaced meanwhile
    except (OSError, ValueError, BufferError):
        return None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(skeleton)
    except (DecodeError, RuntimeError, ValueError):
        return None
    del skeleton
    inits = model.graph.initializer
    if not model.HasField("graph") or len(inits) <= cuts[-1][0]:
        return None
    for index, offset, length in cuts:
        t = inits[index]
        if t.HasField("raw_data") or t.external_data or t.HasField("data_location"):
            return None  # not what split_model saw
        embedded.mark(t, offset, length)
    try:
        check_structure(model)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None
    if any(is_external(t) and not embedded.holds(t) for t in iter_tensors(model)):
        return None  # also real external data: the usual path checks and streams it
    return model, embedded


def _load_external(model: onnx.ModelProto, base_dir: str, path: Path) -> None:
    try:
        load_external_data_for_model(model, base_dir)
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise BadInput(f"{path}: cannot read external data ({exc})") from None
