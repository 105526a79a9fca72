"""Running the ``bnfold`` command line from tests: in this process (:func:`invoke`, through
``cli.run``) or as ``python -m bnfold`` (:func:`run_module`)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bnfold import cli

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    output: str  # stdout and stderr interleaved, as a terminal shows them


class _Capture(io.StringIO):
    """One stream (stdout or stderr) that also copies what it receives into ``both``."""

    def __init__(self, both: io.StringIO) -> None:
        super().__init__()
        self.both = both

    def write(self, text: str) -> int:
        self.both.write(text)
        return super().write(text)


def invoke(*args: Any, env: dict[str, str] | None = None) -> Result:
    """``bnfold ARGS`` in this process (``cli.run``), with ``env`` added to the environment.
    ``run`` turns every error into an exit code; anything it lets escape fails the test."""
    both = io.StringIO()
    out, err = _Capture(both), _Capture(both)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.run([str(a) for a in args])
    assert isinstance(code, int)
    return Result(code, out.getvalue(), err.getvalue(), both.getvalue())


def run_module(
    *args: Any, timeout: float = 120, env_extra: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """``python -m bnfold ARGS`` in a child process, this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kw,
    )
