"""The pre-commit hooks bnfold-check and bnfold-fold, run as their entry commands on temp files.

Each hook is run exactly as its console script runs it (the function named in pyproject's
[project.scripts], in a fresh interpreter); folded files are checked in onnxruntime (optimizations
off) against the original model. Through ``pre-commit try-repo`` too when pre-commit is installed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models" / "onnx"


def _scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _hooks() -> list[dict[str, str]]:
    """The hooks of .pre-commit-hooks.yaml (a flat list of mappings with scalar values)."""
    hooks: list[dict[str, str]] = []
    for line in (ROOT / ".pre-commit-hooks.yaml").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"(- |  )(\w+): (.*)", line)
        assert match, f"unexpected line in .pre-commit-hooks.yaml: {line!r}"
        if match.group(1) == "- ":
            hooks.append({})
        hooks[-1][match.group(2)] = match.group(3)
    return hooks


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run_entry(entry: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the console script ``entry`` the way its installed wrapper does."""
    module, function = _scripts()[entry].split(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def _run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    for name in ("resnet_small.onnx", "case_bn_after_relu.onnx", "case_bf16.onnx"):
        shutil.copy(MODELS / name, tmp_path / name)
    (tmp_path / "notes.onnx").write_text("not a model\n")
    return tmp_path


def test_hook_manifest_names_the_console_scripts() -> None:
    hooks = {h["id"]: h for h in _hooks()}
    assert set(hooks) == {"bnfold-check", "bnfold-fold"}
    scripts = _scripts()
    for hook_id, hook in hooks.items():
        assert hook["entry"] == hook_id and hook_id in scripts
        assert hook["language"] == "python"
        pattern = re.compile(hook["files"])
        assert pattern.search("models/a.onnx") and not pattern.search("a.onnx.data")


def test_check_fails_on_a_foldable_model_and_prints_the_fold_command(work: Path) -> None:
    before = (work / "resnet_small.onnx").read_bytes()
    proc = _run_entry("bnfold-check", "resnet_small.onnx", "case_bn_after_relu.onnx", cwd=work)
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stdout.splitlines()  # the clean model prints nothing
    assert line.startswith("resnet_small.onnx: 6 BatchNormalizations can be folded; fold with: ")
    assert (work / "resnet_small.onnx").read_bytes() == before  # a check writes nothing
    assert sorted(p.name for p in work.iterdir()) == [
        "case_bf16.onnx",
        "case_bn_after_relu.onnx",
        "notes.onnx",
        "resnet_small.onnx",
    ]

    # the printed command folds it, after which the check passes
    command = shlex.split(line.split("fold with: ", 1)[1])
    assert command[0] == "bnfold"
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", *command[1:]], cwd=work, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    again = _run_entry("bnfold-check", "resnet_small.onnx", cwd=work)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


def test_check_passes_when_nothing_folds(work: Path) -> None:
    proc = _run_entry("bnfold-check", "case_bn_after_relu.onnx", cwd=work)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert _run_entry("bnfold-check", cwd=work).returncode == 0  # no files staged


def test_check_bad_input_is_one_line_and_exit_2(work: Path) -> None:
    proc = _run_entry("bnfold-check", "notes.onnx", "missing.onnx", "resnet_small.onnx", cwd=work)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "bnfold-check: error: notes.onnx is not an ONNX model (it looks like a text file); pass an .onnx file",
        "bnfold-check: error: missing.onnx: no such file",
    ]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("resnet_small.onnx: 6 BatchNormalizations can be folded")


def test_check_bn_to_affine_counts_rewrites(work: Path) -> None:
    proc = _run_entry("bnfold-check", "case_bn_after_relu.onnx", "--bn-to-affine", cwd=work)
    assert proc.returncode == 1
    assert proc.stdout.strip().endswith("--in-place --bn-to-affine")


def test_fold_folds_in_place_verified(work: Path) -> None:
    path = work / "resnet_small.onnx"
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = _run_ort(path, x).astype(np.float64)
    # (--dim names a dimension every given model must have, as with bnfold: one model here)
    proc = _run_entry("bnfold-fold", "resnet_small.onnx", "--dim", "batch=2", cwd=work)
    assert proc.returncode == 1, proc.stderr  # a hook that changed files fails
    assert re.fullmatch(
        r"resnet_small\.onnx: folded 6 BatchNormalizations in place \(verified, max abs err [0-9.e+-]+\)\n",
        proc.stdout,
    )
    assert "BatchNormalization" not in _ops(path)
    got = _run_ort(path, x).astype(np.float64)
    # float32 model; each folded weight is rounded once: well inside 1e-5 of the output scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]

    folded, clean = path.read_bytes(), (work / "case_bn_after_relu.onnx").read_bytes()
    again = _run_entry("bnfold-fold", "resnet_small.onnx", "case_bn_after_relu.onnx", cwd=work)
    assert (again.returncode, again.stdout) == (0, "")  # nothing (more) to fold: files untouched
    assert path.read_bytes() == folded
    assert (work / "case_bn_after_relu.onnx").read_bytes() == clean


def test_fold_never_writes_a_fold_that_fails_verification(work: Path) -> None:
    path = work / "resnet_small.onnx"
    before = path.read_bytes()
    # zero tolerances: the once-rounded folded weights change the outputs by about 6e-8
    proc = _run_entry("bnfold-fold", "resnet_small.onnx", "--atol", "0", "--rtol", "0", cwd=work)
    assert proc.returncode == 1
    assert "resnet_small.onnx: not written: the fold of 6 BatchNormalizations was not verified" in proc.stderr
    assert "differ beyond tolerance" in proc.stderr
    assert path.read_bytes() == before


def test_fold_does_not_write_an_unverifiable_fold(work: Path) -> None:
    path = work / "case_bf16.onnx"  # onnxruntime has no bfloat16 Conv kernel
    before = path.read_bytes()
    proc = _run_entry("bnfold-fold", "case_bf16.onnx", cwd=work)
    assert proc.returncode == 1
    assert "not written" in proc.stderr and "--no-verify" in proc.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dim", "batch"], "bnfold-fold: error: --dim wants NAME=VALUE, got 'batch'"),
        (["--shape", "x=1xax3"], "bnfold-fold: error: --shape 'x=1xax3': the shape is positive integers"),
        (["--atol", "big"], "bnfold-fold: error: argument --atol: invalid float value: 'big'"),
        (["--no-such-flag"], "bnfold-fold: error: unrecognized arguments: --no-such-flag"),
    ],
)
def test_fold_usage_errors_are_one_line_exit_2(work: Path, args: list[str], message: str) -> None:
    before = (work / "resnet_small.onnx").read_bytes()
    proc = _run_entry("bnfold-fold", "resnet_small.onnx", *args, cwd=work)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(message)
    assert (work / "resnet_small.onnx").read_bytes() == before


@pytest.mark.skipif(shutil.which("pre-commit") is None, reason="pre-commit is not installed")
def test_through_pre_commit_try_repo(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(MODELS / "resnet_small.onnx", repo / "model.onnx")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "model.onnx"], cwd=repo, check=True)
    proc = subprocess.run(
        ["pre-commit", "try-repo", str(ROOT), "bnfold-check", "--files", "model.onnx"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "model.onnx: 6 BatchNormalizations can be folded" in proc.stdout
