"""Processes killed (SIGKILL, SIGINT, SIGTERM) while writing leave the old file or the new one, never a torn one;
several processes folding one model at once all produce the same valid output.

See tests/hardening_helpers.py for the shared checks."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_runner import invoke
from hardening_helpers import REPO, external_model

import bnfold
from bnfold.testing import conv_bn_model

# ------------------------------------------------------------------------------------------------
# killed while writing

_WRITER = r"""
import os, sys, signal
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bnfold.storage.atomic import write_atomic
target = Path(sys.argv[2])
a = bytes([1]) * int(sys.argv[3])
b = bytes([2]) * int(sys.argv[3])
print("ready", flush=True)
i = 0
try:
    while True:
        write_atomic(a if i % 2 else b, target)
        i += 1
except KeyboardInterrupt:
    sys.exit(130)
"""


def _default_sigint() -> None:
    """Run in the child before exec: Ctrl-C as a terminal delivers it. A shell starts background
    jobs with SIGINT ignored, and a Python started so never raises KeyboardInterrupt (the test would
    then wait for a child that cannot be interrupted), so the test must not depend on how it was run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_loop(
    tmp_path: Path,
    sig: int,
    rounds: int,
    check: Callable[[], None],
    start: Callable[[], Any],
    delays: tuple[float, float],
) -> None:
    rng = np.random.default_rng(sig)
    for _ in range(rounds):
        proc = start()
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(*delays)))
        proc.send_signal(sig)
        proc.wait(30)
        proc.stdout.close()
        check()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_while_writing_leaves_old_or_new_file(tmp_path: Path, sig: int) -> None:
    target = tmp_path / "out.onnx"
    size = 8 * 2**20
    target.write_bytes(bytes([2]) * size)
    wanted = {hashlib.sha256(bytes([v]) * size).hexdigest() for v in (1, 2)}

    def start() -> Any:
        return subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(REPO), str(target), str(size)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )

    def check() -> None:
        assert hashlib.sha256(target.read_bytes()).hexdigest() in wanted
        temps = [p for p in tmp_path.iterdir() if p != target]
        if sig == signal.SIGINT:
            assert temps == []  # Ctrl-C unwinds and removes the temporary file
        for p in temps:  # SIGKILL cannot be cleaned up after: a hidden .out.onnx.*.tmp may stay
            assert p.name.startswith(".out.onnx.") and p.name.endswith(".tmp"), p
            p.unlink()

    _kill_loop(tmp_path, sig, 6, check, start, (0.05, 0.4))


_PAIR_WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import bnfold
folds = [bnfold.fold(p, stream_external=True, verify=False) for p in sys.argv[2:4]]
print("ready", flush=True)
i = 0
try:
    while True:
        folds[i % 2].save(sys.argv[4])
        i += 1
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_external_data_save_keeps_model_and_data_paired(tmp_path: Path, sig: int) -> None:
    """A model with external data is two files renamed one after the other; Ctrl-C or SIGTERM at any
    moment leaves both old or both new (the signal waits until the pair is in place)."""
    sources = []
    for i in range(2):
        folder = tmp_path / f"src{i}"
        folder.mkdir()
        path = folder / "m.onnx"
        onnx.save(
            conv_bn_model(blocks=2, channels=192, in_channels=192, size=4, seed=i),
            str(path),
            save_as_external_data=True,
            location="m.data",
            size_threshold=0,
        )
        sources.append(path)
    pairs = set()
    for i, path in enumerate(sources):
        ref = tmp_path / f"ref{i}"
        ref.mkdir()
        bnfold.fold(path, stream_external=True, verify=False).save(ref / "out.onnx")
        pairs.add(((ref / "out.onnx").read_bytes(), (ref / "out.onnx.data").read_bytes()))
    assert len(pairs) == 2
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    script = (
        _PAIR_WRITER
        if sig == signal.SIGINT
        else _PAIR_WRITER.replace(
            "import bnfold\n",
            "import bnfold, signal\nfrom bnfold.cli.streams import sigterm_as_interrupt\nsigterm_as_interrupt()\n",
        )
    )

    def start() -> Any:
        return subprocess.Popen(
            [sys.executable, "-c", script, str(REPO), *map(str, sources), str(out)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )

    def check() -> None:
        names = sorted(p.name for p in out_dir.iterdir())
        assert names in ([], ["out.onnx", "out.onnx.data"]), names  # no temporary file either
        if names:
            assert (out.read_bytes(), (out_dir / "out.onnx.data").read_bytes()) in pairs

    _kill_loop(tmp_path, sig, 6, check, start, (0.05, 0.3))


def _big_model(path: Path) -> None:
    onnx.save(conv_bn_model(blocks=3, channels=448, in_channels=448, size=4, seed=3), str(path))  # ~22 MB


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_cli_killed_at_random_moments(tmp_path: Path, sig: int) -> None:
    """``bnfold`` on a ~22 MB model killed at random moments: the output is the previous one or
    the complete new one, never a truncated file; the input is never touched."""
    src = tmp_path / "big.onnx"
    _big_model(src)
    out = tmp_path / "big.folded.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "1"}
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bnfold", src, "--no-verify", "-q"], check=True, env=env, capture_output=True
    )
    elapsed = time.perf_counter() - t
    new = hashlib.sha256(out.read_bytes()).hexdigest()
    old = b"previous output"
    src_hash = hashlib.sha256(src.read_bytes()).hexdigest()
    seen: set[str] = set()

    def start() -> Any:
        out.write_bytes(old)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "print('ready', flush=True)\nimport runpy, sys\nsys.argv[0] = 'bnfold'\n"
                "runpy.run_module('bnfold', run_name='__main__')",
                src,
                "--no-verify",
                "-q",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_default_sigint,
        )
        procs.append(proc)
        return proc

    procs: list[Any] = []

    def check() -> None:
        proc = procs[-1]
        err = proc.stderr.read()
        proc.stderr.close()
        data = out.read_bytes()
        state = "old" if data == old else "new" if hashlib.sha256(data).hexdigest() == new else "CORRUPT"
        assert state != "CORRUPT", len(data)
        seen.add(state)
        assert hashlib.sha256(src.read_bytes()).hexdigest() == src_hash
        temps = [p for p in tmp_path.iterdir() if p not in (src, out)]
        if sig == signal.SIGINT:
            if proc.returncode == 130:
                assert err.strip().splitlines()[-1] == "bnfold: interrupted", err
            assert temps == [], temps
        for p in temps:
            assert p.name.startswith(".big.folded.onnx.") and p.name.endswith(".tmp"), p
            p.unlink()

    # Aim at the second half of a run, where the output is written.
    _kill_loop(tmp_path, sig, 8, check, start, (elapsed * 0.4, elapsed * 1.1))
    print(
        f"{signal.Signals(sig).name}: outputs seen {sorted(seen)}, exit codes {[p.returncode for p in procs]}, "
        f"a clean run takes {elapsed:.2f} s"
    )
    assert seen  # at least one state observed (typically both)


# ------------------------------------------------------------------------------------------------
# several processes at once


def test_concurrent_runs_on_the_same_model(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=3, channels=64, seed=5), str(src))
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    ext_src = ext_dir / "m.onnx"
    onnx.save(
        conv_bn_model(blocks=3, channels=64, seed=5),
        str(ext_src),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "1"}
    env.pop("GITHUB_STEP_SUMMARY", None)
    commands = [
        [src, "-q"],
        [src, "-q"],
        [src, "-q", "-o", tmp_path / "own1.onnx"],
        [src, "-q", "-o", tmp_path / "own2.onnx"],
        [ext_src, "-q"],
        [ext_src, "-q"],
        [ext_src, "-q", "-o", ext_dir / "own.onnx"],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bnfold", *map(str, c)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for c in commands
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.startswith("PASSED 3 folded"), out
    outputs = [tmp_path / "m.folded.onnx", tmp_path / "own1.onnx", tmp_path / "own2.onnx"]
    assert len({p.read_bytes() for p in outputs}) == 1
    for p in outputs:
        bnfold.testing.assert_models_close(src, p)
    # external data in, external data out: the data files are identical, and so are the models
    # once their data is loaded (each names its own data file)
    ext_outputs = [ext_dir / "m.folded.onnx", ext_dir / "own.onnx"]
    assert len({Path(f"{p}.data").read_bytes() for p in ext_outputs}) == 1
    assert len({onnx.load(str(p)).SerializeToString() for p in ext_outputs}) == 1
    for p in ext_outputs:
        bnfold.testing.assert_models_close(ext_src, p)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in ext_dir.iterdir() if p.name.startswith(".")) == []


def test_concurrent_in_place_runs(tmp_path: Path) -> None:
    """Three ``--in-place`` runs on one file at once: each reads the original or a complete fold
    (renames are atomic), so the file ends as the fold, whichever finishes last."""
    model = conv_bn_model(blocks=3, channels=64, seed=6)
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    reference = tmp_path / "ref"
    reference.mkdir()
    onnx.save(model, str(reference / "m.onnx"))
    assert invoke(reference / "m.onnx", "-q").exit_code == 0
    want = (reference / "m.folded.onnx").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "1"}
    env.pop("GITHUB_STEP_SUMMARY", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bnfold", str(src), "--in-place", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.startswith("PASSED "), out
    assert src.read_bytes() == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "ref"]


def test_concurrent_streamed_saves_of_external_data(tmp_path: Path) -> None:
    """Several processes saving the same fold (model + .data pair) over one path at once."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = external_model(src_dir)
    out = tmp_path / "out.onnx"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bnfold\n"
        "r = bnfold.fold(sys.argv[2], stream_external=True, verify=False)\n"
        "for _ in range(5): r.save(sys.argv[3])\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(REPO), str(src), str(out)], stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data", "src"]
    bnfold.testing.assert_models_close(src, out)
