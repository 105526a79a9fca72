"""Keeping stdout for ``--json -``, numpy's warnings off stderr, and SIGTERM as Ctrl-C."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any


@contextmanager
def quiet_warnings() -> Iterator[None]:
    """numpy's RuntimeWarnings (overflow, invalid value) on hostile weights would add lines to
    stderr; what they mean is in the report (codes non_finite, overflow), so they are not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@contextmanager
def stdout_to_stderr(active: bool) -> Iterator[None]:
    """While processing with ``--json -``, send anything printed to stdout (by us, onnx or
    onnxruntime, at the file-descriptor level too) to stderr, so stdout carries only the JSON."""
    if not active:
        yield
        return
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        fd = -1
    if fd != 1 or sys.__stdout__ is None or sys.stdout is not sys.__stdout__:
        with redirect_stdout(sys.stderr):
            yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def sigterm_as_interrupt() -> None:
    """Make SIGTERM (a cancelled CI job, ``kill``) unwind like Ctrl-C, so temporary files are
    removed and workers stopped, instead of killing the process on the spot."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def _handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _handler)
    except (ValueError, OSError):  # pragma: no cover - not the main thread / not supported
        pass
