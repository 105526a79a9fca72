"""Atomic writes (a temporary file in the target folder, then a rename) and signal deferral."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import BadInput


def write_atomic(
    data: bytes | str | Callable[[int], None], path: str | os.PathLike[str], durable: bool = True
) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` via a temporary file and a rename.

    ``data`` may also be a function that writes to the file descriptor it is given. The
    temporary file lives in the target folder (so the rename is atomic), is fsync'ed before the
    rename (unless ``durable`` is False) and is removed on any failure, including
    KeyboardInterrupt. An existing file keeps its permission bits.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInput(f"{path}: folder {folder} does not exist")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory")
    tmp = ""
    try:
        with signals_deferred():  # a Ctrl-C cannot land between creating the file and noting its name
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BadInput(f"{path}: cannot write in {folder} ({exc.strerror or exc})") from None
    except BaseException:
        if tmp:
            os.unlink(tmp)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f.fileno())
            else:
                f.write(data)
            f.flush()
            if durable:
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


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (delivered to Python handlers) until the block ends, then act on them.

    Python runs signal handlers in the main thread between bytecodes, so the handlers are
    swapped for recorders (main thread only: elsewhere no handler can interrupt the block).
    SIGKILL cannot be held (see :func:`bnfold.storage.save.save_external`).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: dict[int, Callable[[int, FrameType | None], Any] | int] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None:
            continue
        try:
            signal.signal(sig, lambda signum, frame: pending.append(signum))
        except (ValueError, OSError):  # pragma: no cover
            continue
        saved[sig] = handler
    try:
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)
        for signum in pending:
            previous = saved[signum]
            if callable(previous):
                previous(signum, None)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
