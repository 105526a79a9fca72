"""Several models in worker processes: output order, a bad model or a crashed worker fails only itself."""

from __future__ import annotations

import os
from pathlib import Path

from cli_helpers import files, last_line, save
from cli_runner import invoke

from bnfold.cli.outcome import FoldJob, ModelOutcome
from bnfold.cli.outputs import default_output
from bnfold.cli.process import process_model
from bnfold.cli.workers import run_parallel, worker_loop
from bnfold.testing import conv_bn_model
from bnfold.verification.options import VerifyOptions


def test_parallel_workers_in_process(tmp_path: Path) -> None:
    a = save(conv_bn_model(seed=0), tmp_path / "a.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(a, tmp_path / "junk.onnx", "--output-dir", out, "-j", "2")
    assert result.exit_code == 2, result.output
    assert files(out) == {"a.folded.onnx"}  # the bad model did not stop the good one
    assert "junk.onnx" in result.stderr and "Traceback" not in result.stderr
    assert last_line(result.stdout).startswith("FAILED 1 of 2 models: 1 folded, 0 kept")
    # output in input order
    assert result.stdout.index("a.onnx") < result.stdout.index("junk.onnx")


def _crash_on_purpose(job: FoldJob) -> ModelOutcome:  # runs in a spawned worker
    if job.input.endswith("crash.onnx"):
        os._exit(7)
    return process_model(job)


def test_a_crashing_worker_fails_only_its_model(tmp_path: Path) -> None:
    import functools

    paths = [
        save(conv_bn_model(seed=i), tmp_path / name)
        for i, name in enumerate(("a.onnx", "crash.onnx", "c.onnx", "d.onnx"))
    ]
    check = VerifyOptions()
    jobs = [FoldJob(str(p), str(default_output(p)), check) for p in paths]
    seen: list[int] = []
    target = functools.partial(worker_loop, process=_crash_on_purpose)
    records = run_parallel(jobs, 2, lambda i, r: seen.append(i), target=target)
    assert sorted(seen) == [0, 1, 2, 3]
    assert records[1].status == "error" and "worker process died (exit code 7)" in records[1].message
    assert [r.status for i, r in enumerate(records) if i != 1] == ["passed"] * 3
    assert all(Path(r.output).exists() for i, r in enumerate(records) if i != 1)
