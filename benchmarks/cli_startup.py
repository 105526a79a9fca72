"""What the command line costs per process: median wall time of ``bnfold --help``,
``bnfold --version`` and a one-model fold of a tiny model, each in its own process, against a
bare ``python -c "import argparse"``.

    python benchmarks/cli_startup.py [--repeats 21] [--old PATH]

``--old PATH`` also times the checkout at PATH (e.g. the argparse CLI of commit 1b22cce:
``git worktree add /tmp/cli-old 1b22cce``), run the same way with PATH first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _seconds(command: list[str], env: dict[str, str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, capture_output=True, check=False)
    return time.perf_counter() - start


def _tiny_model(folder: Path) -> Path:
    import onnx

    sys.path.insert(0, str(REPO))
    from bnfold.testing import conv_bn_model

    path = folder / "tiny.onnx"
    onnx.save(conv_bn_model(blocks=1), str(path))
    return path


def cases(folder: Path, model: Path) -> dict[str, list[str]]:
    bnfold = [sys.executable, "-m", "bnfold"]
    out = str(folder / "out.onnx")
    return {
        "python -c 'import argparse'": [sys.executable, "-c", "import argparse"],
        "bnfold --help": [*bnfold, "--help"],
        "bnfold --version": [*bnfold, "--version"],
        "bnfold fold --help": [*bnfold, "fold", "--help"],
        "bnfold tiny.onnx --no-verify": [*bnfold, str(model), "-q", "--no-verify", "-o", out],
        "bnfold tiny.onnx (verified)": [*bnfold, str(model), "-q", "-o", out],
    }


def measure(checkouts: list[Path], repeats: int, folder: Path, model: Path) -> list[dict[str, float]]:
    """Median seconds per case and checkout; checkouts alternate within each repetition so that
    a busy machine slows them alike."""
    envs = []
    for checkout in checkouts:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        env.pop("GITHUB_STEP_SUMMARY", None)
        envs.append(env)
    times: list[dict[str, list[float]]] = [{name: [] for name in cases(folder, model)} for _ in checkouts]
    for repetition in range(repeats + 1):  # the first warms the file cache
        for name, command in cases(folder, model).items():
            for env, column in zip(envs, times):
                seconds = _seconds(command, env, str(folder))
                if repetition:
                    column[name].append(seconds)
    return [{name: statistics.median(t) for name, t in column.items()} for column in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--old", type=Path, help="another checkout to time the same way")
    args = parser.parse_args()
    checkouts = [REPO] + ([args.old.resolve()] if args.old is not None else [])
    with tempfile.TemporaryDirectory(prefix="bnfold-startup-") as tmp:
        folder = Path(tmp)
        model = _tiny_model(folder)
        columns = measure(checkouts, args.repeats, folder, model)
    labels = ["this checkout"] + ([str(args.old)] if args.old is not None else [])
    print(f"median of {args.repeats} processes each (checkouts alternating)\n")
    baseline = columns[0]["python -c 'import argparse'"]
    two = len(columns) == 2
    print("| command | " + " | ".join(labels) + (" | difference |" if two else " |"))
    print("|---" * (len(columns) + 1 + two) + "|")
    for name in columns[0]:
        cells = [f"{c[name] * 1000:.0f} ms" for c in columns]
        if name != "python -c 'import argparse'":
            cells = [f"{c[name] * 1000:.0f} ms (+{(c[name] - baseline) * 1000:.0f})" for c in columns]
        if two:
            cells.append(f"{(columns[0][name] - columns[1][name]) * 1000:+.0f} ms")
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
