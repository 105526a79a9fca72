"""Loading models from every accepted source and writing them atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from .errors import BadInput

def to_model_proto(obj: Any) -> onnx.ModelProto | None:
    """Convert in-memory models (ModelProto, onnx_ir.Model, torch.onnx.ONNXProgram, bytes)."""
    if isinstance(obj, onnx.ModelProto):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _parse(bytes(obj), "the given bytes")
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
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise BadInput(f"{what} is not an ONNX model (protobuf parse failed: {exc})") from None
    if not model.HasField("graph"):
        raise BadInput(f"{what} is not an ONNX model (no graph)")
    return model


STREAM_THRESHOLD = 512 * 2**20  # external data at least this large stays on disk while folding


def load_model(source: Any, stream_external: bool | None = None) -> tuple[onnx.ModelProto, str, Path | None]:
    """Return ``(model, base_dir, path)`` for a path or an in-memory model.

    External data is loaded into the model when it is smaller than STREAM_THRESHOLD (or
    ``stream_external`` is False); otherwise (or when True) it stays on disk, is read tensor by
    tensor by the pass and streamed when saving.

    The returned model is always a fresh copy the caller may modify. Raises BadInput with a
    one-line message for anything that is not a readable ONNX model.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise BadInput(f"{path}: no such file")
        if path.is_dir():
            raise BadInput(f"{path}: is a directory, not an ONNX file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BadInput(f"{path}: cannot read ({exc.strerror})") from None
        if not data:
            raise BadInput(f"{path}: empty file")
        model = _parse(data, str(path))
        base_dir = str(path.resolve().parent)
        if has_external_data(model):
            from .external import check_locations, external_bytes

            try:
                check_locations(model, base_dir)
            except BadInput as exc:
                raise BadInput(f"{path}: {exc}") from None
            if not stream_external and (stream_external is not None or external_bytes(model) < STREAM_THRESHOLD):
                _load_external(model, base_dir, path)
            # else external data stays on disk: the pass reads only the tensors it folds.
        return model, base_dir, path
    proto = to_model_proto(source)
    if proto is None:
        raise BadInput(
            f"cannot fold a {type(source).__name__}: pass a path, onnx.ModelProto, "
            "onnx_ir.Model or torch.onnx.ONNXProgram"
        )
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy, "", None


def _load_external(model: onnx.ModelProto, base_dir: str, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model

    try:
        load_external_data_for_model(model, base_dir)
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise BadInput(f"{path}: cannot read external data ({exc})") from None


def has_external_data(model: onnx.ModelProto) -> bool:
    """True if any tensor of the model keeps its data in an external file."""
    from .external import is_external, iter_tensors

    return any(is_external(t) for t in iter_tensors(model))


PROTOBUF_LIMIT = 2**31 - 1


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], base_dir: str = "", spill: Any = None
) -> Path:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A model with external data (read from ``base_dir``, or from ``spill`` for folded tensors), or
    one over protobuf's 2 GiB limit, is written as ``path`` plus ``<name>.data`` beside it, with
    the data streamed rather than loaded. An interrupted write leaves the previous file (or none),
    never a partial one. Raises BadInput (nothing written) when the folder is missing or not
    writable.
    """
    path = Path(path)
    if has_external_data(model) or model.ByteSize() > PROTOBUF_LIMIT:
        from .external import save_external

        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise BadInput(f"{path}: folder {folder} does not exist")
        try:
            save_external(model, path, base_dir, spill)
        except OSError as exc:
            raise BadInput(f"{path}: write failed ({exc.strerror or exc})") from None
        return path
    return write_atomic(model.SerializeToString(), path)


def write_atomic(data: bytes | str, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` via a temporary file and a rename.

    The temporary file lives in the target folder (so the rename is atomic) and is removed on any
    failure, including KeyboardInterrupt. An existing file keeps its permission bits.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInput(f"{path}: folder {folder} does not exist")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BadInput(f"{path}: cannot write in {folder} ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise BadInput(f"{path}: write failed ({exc.strerror or exc})") from None
        raise
    return path
