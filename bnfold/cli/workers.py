"""Several models in worker processes: spawned, each reused for several models; a worker that
dies fails only the model it was processing."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from .outcome import FoldJob, ModelOutcome
from .process import process_model


def worker_loop(conn: Any, process: Any = None) -> None:  # pragma: no cover - runs in a child process
    """A worker process: receive a FoldJob, send back its outcome, until it receives None."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us

    def _terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds, so a half-written temp file is removed

    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.stdout.flush()
        os.dup2(2, 1)  # stdout may carry --json -: keep anything a library prints off it
    except OSError:
        pass
    process = process or process_model
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        conn.send(process(job))


class _Pool:
    """The bookkeeping of :func:`run_parallel`: pending jobs, live workers, finished outcomes."""

    def __init__(
        self, jobs: list[FoldJob], on_done: Callable[[int, ModelOutcome], None], target: Any
    ) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.jobs = jobs
        self.on_done = on_done
        self.target = target or worker_loop
        self.pending = list(range(len(jobs)))
        self.outcomes: list[ModelOutcome | None] = [None] * len(jobs)
        self.active: dict[Any, tuple[Any, int]] = {}  # connection -> (process, job index)

    def finish(self, idx: int, outcome: ModelOutcome) -> None:
        self.outcomes[idx] = outcome
        self.on_done(idx, outcome)

    def crashed(self, idx: int, proc: Any) -> ModelOutcome:
        proc.join(5)
        outcome = ModelOutcome.empty(self.jobs[idx])
        outcome.message = f"internal error: the worker process died (exit code {proc.exitcode})"
        return outcome

    def start(self) -> tuple[Any, Any]:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=self.target, args=(child,), daemon=True, name="bnfold-worker")
        proc.start()
        child.close()
        return parent, proc

    def assign(self, conn: Any, proc: Any) -> None:
        """Give the worker the next job, or tell it to exit when none is left."""
        while self.pending:
            idx = self.pending.pop(0)
            try:
                conn.send(self.jobs[idx])
            except (OSError, EOFError):
                conn.close()
                self.finish(idx, self.crashed(idx, proc))
                conn, proc = self.start()
                continue
            self.active[conn] = (proc, idx)
            return
        try:
            conn.send(None)  # no more work: let it exit
        except (OSError, EOFError):
            pass
        conn.close()
        proc.join(5)

    def receive(self, conn: Any) -> None:
        proc, idx = self.active.pop(conn)
        try:
            outcome = conn.recv()
        except (EOFError, OSError):
            conn.close()
            self.finish(idx, self.crashed(idx, proc))
            if self.pending:
                self.assign(*self.start())
            return
        self.finish(idx, outcome)
        self.assign(conn, proc)

    def stop(self) -> None:
        for proc, _idx in self.active.values():
            proc.terminate()
        for proc, _idx in self.active.values():
            proc.join(5)


def run_parallel(
    jobs: list[FoldJob],
    workers: int,
    on_done: Callable[[int, ModelOutcome], None],
    on_tick: Callable[[], None] | None = None,
    target: Any = None,
) -> list[ModelOutcome]:
    """Process ``jobs`` in at most ``workers`` worker processes and return their outcomes in job
    order. ``on_done(index, outcome)`` is called as each finishes; ``target(connection)`` is the
    worker function (a test hook; default :func:`worker_loop`)."""
    from multiprocessing.connection import wait

    pool = _Pool(jobs, on_done, target)
    try:
        for _ in range(min(workers, len(jobs))):
            pool.assign(*pool.start())
        while pool.active:
            for conn in wait(list(pool.active), timeout=0.25):
                pool.receive(conn)
            if on_tick is not None:
                on_tick()
    except BaseException:
        pool.stop()
        raise
    return [o for o in pool.outcomes if o is not None]
