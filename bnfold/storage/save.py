"""Saving models atomically: one file, a file written in pieces (a lazily loaded model), or a model
file with its weights streamed into ``<name>.data`` beside it (external data).

Saving external data (:func:`save_external`) streams every untouched tensor from its source file
into the output's data file with ``copy_file_range`` (no user-space buffer) and appends the folded
ones from the spill file. Peak memory tracks the largest folded tensor, not the model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import EncodeError  # type: ignore[import-untyped]

from ..errors import BadInput
from .atomic import signals_deferred, write_atomic
from .embedded import Embedded, LayoutError, plan_embedded, write_pieces
from .external_data import (
    ALIGN,
    copy_range,
    entries,
    has_external_data,
    is_external,
    iter_tensors,
    resolve_location,
    set_external,
    span,
    write_all,
)
from .policy import DEFAULT_POLICY, StoragePolicy
from .spill import Spill

# a tensor changed by a save: its external entries before (None: it had raw_data) and its raw_data
_Undo = tuple[onnx.TensorProto, list[tuple[str, str]] | None, bytes | None]


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    base_dir: str = "",
    spill: Spill | Embedded | None = None,
    *,
    policy: StoragePolicy = DEFAULT_POLICY,
) -> Path:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A model with external data (read from ``base_dir``, or from ``spill`` for folded tensors), or
    one over protobuf's 2 GiB limit, is written as ``path`` plus ``<name>.data`` beside it, with
    the data streamed rather than loaded. An interrupted write leaves the previous file (or none),
    never a partial one. Raises BadInput (nothing written) when the folder is missing or not
    writable. ``model`` is left as it was, unless the write replaced a data file it reads from
    (saving in place): then its tensors refer to the new ``<name>.data`` beside ``path``.
    """
    return save_model_located(model, path, base_dir, spill, policy=policy)[0]


def save_model_located(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    base_dir: str = "",
    spill: Spill | Embedded | None = None,
    durable: bool = True,
    external: bool | None = None,
    *,
    policy: StoragePolicy = DEFAULT_POLICY,
) -> tuple[Path, bool]:
    """:func:`save_model`, also saying whether ``model`` now reads its data from beside ``path``.

    ``spill`` may be an :class:`~bnfold.storage.embedded.Embedded` (a model from
    :func:`bnfold.storage.load.open_model` with ``lazy``): the file is then written in pieces,
    never serialized whole in memory, with the bytes a complete model would have.
    ``durable=False`` skips fsync (scratch copies). ``external``: True writes ``<name>.data`` even
    for a model whose data is all in memory (its input kept its weights in external data); False
    says the caller knows no tensor refers to external data (a model read from a file without
    any); None (default) checks.
    """
    path = Path(path)
    if isinstance(spill, Embedded) and not external:
        written = _save_embedded(model, path, spill, durable, policy.single_file_limit)
        if written is not None:
            return written, False
        # over protobuf's limit: the data goes to <name>.data below, read through ``spill``
    data = None
    if external is False or (external is None and not has_external_data(model)):
        try:
            data = model.SerializeToString()  # one pass; ByteSize() first would cost another
        except (ValueError, EncodeError):
            data = None  # over protobuf's 2 GiB limit: write external data instead
        if data is not None and len(data) > policy.single_file_limit:
            data = None
    if data is None:
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise BadInput(f"{path}: folder {folder} does not exist")
        try:
            moved = save_external(model, path, base_dir, spill, policy)
        except OSError as exc:
            raise BadInput(f"{path}: write failed ({exc.strerror or exc})") from None
        return path, moved
    return write_atomic(data, path, durable=durable), False


def _save_embedded(
    model: onnx.ModelProto, path: Path, embedded: Embedded, durable: bool, limit: int
) -> Path | None:
    """Write a lazily loaded model as one file, in pieces; None if it is over ``limit`` bytes."""
    try:
        pieces, total = plan_embedded(model, embedded)
    except LayoutError:  # protobuf laid the skeleton out unexpectedly: serialize a complete copy
        full = onnx.ModelProto()
        full.CopyFrom(model)
        embedded.materialize(full)
        data = full.SerializeToString()
        del full
        return write_atomic(data, path, durable=durable)
    if total > limit:
        return None
    return write_atomic(lambda fd: write_pieces(fd, pieces, embedded.fd), path, durable=durable)


def same_file(a: Path, b: Path) -> bool:
    """True if both paths name one existing file (symlinks and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def save_external(
    model: onnx.ModelProto,
    path: Path,
    base_dir: str,
    spill: Spill | Embedded | None,
    policy: StoragePolicy = DEFAULT_POLICY,
) -> bool:
    """Write ``model`` at ``path`` with its tensors in ``<name>.data`` beside it, atomically.

    Tensors already external are read from ``base_dir`` (or the spill file) and streamed;
    inline tensors of at least ``policy.external_threshold`` bytes move to the data file too. The
    data file is renamed into place before the model file, so a reader never sees a model without
    its data.

    ``model`` keeps referring to where its data was (its sources stay valid, whatever later
    happens to the written files), unless the new data file replaced one of those sources
    (saving in place): then it refers to the new data file, and True is returned.
    """
    save = _ExternalSave(path, spill, policy)
    try:
        pos = save.open()
        save.append_tensors(model, base_dir, pos)
        return save.commit(model)
    except BaseException:
        save.abandon()
        raise
    finally:
        save.close_sources()


class _ExternalSave:
    """One :func:`save_external` under way: its temporary files, the source files it reads, and
    the tensors it re-pointed. Whatever step fails (or is interrupted), :meth:`abandon` leaves
    the folder and the model as they were."""

    def __init__(self, path: Path, spill: Spill | Embedded | None, policy: StoragePolicy) -> None:
        self.path = path
        self.folder = path.parent
        self.data_name = f"{path.name}.data"
        self.spill = spill
        self.threshold = policy.external_threshold
        self.fd, self.tmp_data = -1, ""
        self.fd_model, self.tmp_model = -1, ""
        self.sources: dict[str, int] = {}
        self.undo: list[_Undo] = []
        self.written = self.replaces_source = False
        # A spill file in this folder becomes the data file: folded tensors stay where they are,
        # the others are appended after them.
        self.adopted = spill if isinstance(spill, Spill) and spill.can_adopt(self.folder) else None

    def open(self) -> int:
        """Create the temporary files (or take over the spill file); the data file's end."""
        if self.adopted is not None:
            self.fd = self.adopted.fileno()
            pos = self.adopted.size
            os.lseek(self.fd, pos, os.SEEK_SET)  # (a failed earlier save may have moved it)
        else:
            with signals_deferred():  # a Ctrl-C cannot land between creating a temp file and noting its name
                self.fd, self.tmp_data = tempfile.mkstemp(
                    prefix=f".{self.data_name}.", suffix=".tmp", dir=self.folder
                )
            pos = 0
        with signals_deferred():
            self.fd_model, self.tmp_model = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".tmp", dir=self.folder
            )
        return pos

    def append_tensors(self, model: onnx.ModelProto, base_dir: str, pos: int) -> None:
        """Write every external (and every large inline) tensor's data to the data file from
        ``pos`` on, and point the tensor there (noted in ``undo``)."""
        fd, spill, adopted, data_name, undo = self.fd, self.spill, self.adopted, self.data_name, self.undo
        sources = self.sources
        for t in iter_tensors(model):
            if is_external(t):
                pad = (-pos) % ALIGN
                if adopted is not None and adopted.holds(t):  # already in the data file
                    e = entries(t)
                    undo.append((t, [(x.key, x.value) for x in t.external_data], None))
                    set_external(t, data_name, int(e["offset"]), int(e["length"]))
                    continue
                if spill is not None and spill.holds(t):  # a folded tensor (or an Embedded one)
                    if pad:
                        write_all(fd, b"\0" * pad)
                    pos += pad
                    length = spill.write_to(t, fd)
                    undo.append((t, [(x.key, x.value) for x in t.external_data], None))
                    set_external(t, data_name, pos, length)
                    pos += length
                    continue
                e = entries(t)
                src = str(resolve_location(base_dir, e.get("location", "")))
                if src not in sources:
                    sources[src] = os.open(src, os.O_RDONLY)
                offset, length = span(t, e, os.fstat(sources[src]).st_size)
                if pad:
                    write_all(fd, b"\0" * pad)
                pos += pad
                copy_range(sources[src], fd, offset, length)
                undo.append((t, [(x.key, x.value) for x in t.external_data], None))
                set_external(t, data_name, pos, length)
                pos += length
            elif t.HasField("raw_data") and len(t.raw_data) >= self.threshold:
                raw = t.raw_data
                pad = (-pos) % ALIGN
                write_all(fd, b"\0" * pad)
                write_all(fd, raw)
                pos += pad
                undo.append((t, None, raw))
                t.ClearField("raw_data")
                set_external(t, data_name, pos, len(raw))
                pos += len(raw)

    def commit(self, model: onnx.ModelProto) -> bool:
        """Make the data durable, write the model file, and rename both into place; True if the
        new data file replaced one the model read from (the model then keeps the new entries)."""
        os.fsync(self.fd)
        closing, self.fd = self.fd, -1  # forget it first: a Ctrl-C here must not close it twice below
        if self.adopted is None:
            os.close(closing)
        with os.fdopen(self.fd_model, "wb") as f:
            self.fd_model = -1
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        for tmp in (self.adopted.path if self.adopted is not None else self.tmp_data, self.tmp_model):
            os.chmod(tmp, 0o644)
        target = self.folder / self.data_name
        self.replaces_source = _is_open_source(target, self.sources)
        with signals_deferred():  # Ctrl-C/SIGTERM cannot split the pair: old pair or new pair
            if self.adopted is not None:
                self.adopted.adopt(target)
            else:
                os.replace(self.tmp_data, target)
            os.replace(self.tmp_model, self.path)
            self.written = True
        if not self.replaces_source:
            _restore(self.undo)
        return self.replaces_source

    def abandon(self) -> None:
        """Undo a save that failed: restore the model's entries, cut the spill file back, close
        and remove the temporary files."""
        if not (self.written and self.replaces_source):
            _restore(self.undo)  # the model in memory keeps referring to its old (still valid) data
        if self.adopted is not None:
            self.fd = -1  # the spill's own file stays open
            if not self.adopted.adopted:  # drop what was appended to it
                try:
                    os.ftruncate(self.adopted.fileno(), self.adopted.size)
                except OSError:
                    pass
        for f_ in (self.fd, self.fd_model):
            if f_ >= 0:
                try:
                    os.close(f_)
                except OSError:  # already closed (interrupted right after a close): the cleanup goes on
                    pass
        for tmp in (self.tmp_data, self.tmp_model):
            try:
                if tmp:
                    os.unlink(tmp)
            except FileNotFoundError:
                pass

    def close_sources(self) -> None:
        for src_fd in self.sources.values():
            os.close(src_fd)


def _is_open_source(target: Path, sources: dict[str, int]) -> bool:
    """True if ``target`` exists and is one of the files (open as ``sources``) data is read from."""
    try:
        st = os.stat(target)
    except OSError:
        return False
    return any(os.path.samestat(st, os.fstat(fd)) for fd in sources.values())


def _restore(undo: list[_Undo]) -> None:
    for t, saved, raw in reversed(undo):
        del t.external_data[:]
        if raw is not None:
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw
        else:
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in saved or []:
                e = t.external_data.add()
                e.key, e.value = k, v
