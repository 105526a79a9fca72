"""``python -m bnfold`` in real processes: exit codes, pure JSON stdout, start-up imports, the quick exit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import onnx
from cli_helpers import FINAL_PASSED, REPO, check_schema, corrupt, files, last_line, ort_fold, save
from cli_runner import run_module

from bnfold.testing import assert_models_close, conv_bn_model


def test_subprocess_parallel_json_stdout(tmp_path: Path) -> None:
    a = save(conv_bn_model(seed=0), tmp_path / "a.onnx")
    b = save(conv_bn_model(seed=1, blocks=2), tmp_path / "b.onnx")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_module(a, b, "--output-dir", out, "-j", "2", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # nothing but JSON on stdout
    check_schema(doc)
    assert [m["folded"] for m in doc["models"]] == [1, 2]
    assert files(out) == {"a.folded.onnx", "b.folded.onnx"}
    assert last_line(proc.stderr).startswith("PASSED 2 models: 3 folded, 0 kept, max abs err ")
    assert_models_close(b, out / "b.folded.onnx")


def test_subprocess_exit_codes(tmp_path: Path) -> None:
    a = save(conv_bn_model(seed=0), tmp_path / "a.onnx")
    proc = run_module(tmp_path / "missing.onnx")
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("bnfold: error: ") and "Traceback" not in proc.stderr
    proc = run_module(a, "--atol", "0", "--rtol", "0", "-q")
    assert proc.returncode == 1 and proc.stdout.startswith("FAILED ")
    proc = run_module(a, "--json", "-")  # one model: processed in the main process
    assert proc.returncode == 0
    check_schema(json.loads(proc.stdout))
    assert FINAL_PASSED.match(last_line(proc.stderr))
    theirs = ort_fold(a, tmp_path / "a.ort.onnx")
    proc = run_module("verify", a, theirs, "-q")
    assert proc.returncode == 0, proc.stderr
    proc = run_module("verify", a, corrupt(a, tmp_path / "bad.onnx"), "-q")
    assert proc.returncode == 1


_PROBE = """
import sys, time
t = time.perf_counter()
from bnfold.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("CODE", code, "SECONDS", time.perf_counter() - t, file=sys.stderr)
print("MODULES", *sorted(m for m in ("onnxruntime", "torch", "onnx", "numpy", "typer", "click", "pydantic", "rich") if m in sys.modules), file=sys.stderr)
"""


def _probe(*args: Any) -> tuple[int, set[str], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )
    code = int(re.search(r"CODE (\S+)", proc.stderr).group(1))
    modules = set(re.search(r"MODULES(.*)", proc.stderr).group(1).split())
    return code, modules, proc.stdout


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code, modules, out = _probe("--help")
    assert code == 0 and "verify" in out
    # typer is the parser now (its vendored click; pydantic only once a command runs): nothing
    # else, no onnxruntime, torch, onnx, numpy, rich for --help
    assert modules == {"typer"}, modules
    code, modules, _ = _probe("fold", "--help")
    assert code == 0 and modules == {"typer"}, modules
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    best = float("inf")
    for _ in range(3):  # whole process, interpreter start included
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bnfold", "--help"], capture_output=True, env=env, check=True)
        best = min(best, time.perf_counter() - t)
    assert best < 0.5, best


def test_no_verify_never_imports_onnxruntime(folder: Path) -> None:
    code, modules, out = _probe(folder / "a.onnx", "--no-verify", "-q")
    assert code == 0 and out.startswith("PASSED")
    assert "onnxruntime" not in modules and "torch" not in modules
    code, modules, _ = _probe(folder / "a.onnx", "-q")
    assert code == 0 and "onnxruntime" in modules and "torch" not in modules


def test_the_quick_exit_keeps_codes_output_and_cleanup(tmp_path: Path) -> None:
    """``python -m bnfold`` ends without interpreter teardown: the exit code, everything written
    to stdout/stderr (a pipe here, so buffered) and the removal of temporary files survive."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    folder = tmp_path / "ext"
    folder.mkdir()
    src = folder / "m.onnx"
    onnx.save(
        conv_bn_model(blocks=2, channels=8),
        str(src),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    ok = run_module(src, "-o", tmp_path / "out.onnx", "--json", "-", env_extra={"TMPDIR": str(scratch)})
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["models"][0]["exit_code"] == 0  # the whole JSON document arrived
    assert FINAL_PASSED.match(last_line(ok.stderr))
    # the spill file of the external-data model is gone (onnxruntime leaves a '.ses' file of its own)
    assert [p.name for p in scratch.iterdir() if "bnfold" in p.name] == []
    assert (tmp_path / "out.onnx.data").exists()
    bad = run_module(tmp_path / "missing.onnx")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    help_ = run_module("--help")
    assert help_.returncode == 0 and "fold" in help_.stdout
