"""Benchmark bnfold against the I/O floor and its peers, whole process, same run.

    build/bench-venv/bin/python benchmarks/run.py [--repeats 3] [--quick] [--big] [--json PATH]

Builds its inputs in a temporary folder (ResNet-50 and MobileNet shapes, chains of 500 and 5000
Conv->BN->ReLU blocks, and with ``--big`` a model above 2 GB with external data), runs every tool
as its own process, alternating tools within each repetition, and reports the median wall time
and the peak RSS of each (VmHWM of the tool process). Prints a table with ratios bnfold/peer and
bnfold/floor, writes it as JSON, and measures onnxruntime latency of original vs folded vs a
model built without BN. Tools that are not installed are reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_models import big_external, chain, mobilenet_like, resnet50_like  # noqa: E402

TOOLS = ["floor", "bnfold", "ort", "onnxscript", "onnxslim", "onnxsim", "onnxoptimizer"]


def run_tool(tool: str, src: Path, dst: Path, timeout: float) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, status) of one whole-process run."""
    rss_file = dst.with_suffix(".rss")
    env = dict(os.environ, BENCH_RSS_FILE=str(rss_file))
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "peers.py"), tool, str(src), str(dst)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = start + timeout
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            return timeout, float("nan"), "timeout"
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
    code = os.waitstatus_to_exitcode(status)
    peak = float(rss_file.read_text()) if rss_file.exists() else float("nan")
    return seconds, peak, "ok" if code == 0 else f"exit {code}: {err[-1] if err else ''}"


def count_bn(path: Path) -> int | None:
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - reported, never raised
        return None
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def latencies(
    paths: dict[str, Path], level: str, shape: list[int], rounds: int = 15, per_round: int = 3
) -> dict[str, float]:
    """Median onnxruntime run time (ms, one thread) of each model, measured interleaved: in each
    round every model runs ``per_round`` times, so a disturbance of the machine hits all alike."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.intra_op_num_threads = 1
    sessions = {
        k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()
    }
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="only the 500-chain and ResNet-50 shape")
    ap.add_argument("--big", action="store_true", help="also a > 2 GB external-data model")
    ap.add_argument("--only-big", action="store_true", help="just the > 2 GB external-data model")
    ap.add_argument(
        "--models", default="", help="comma-separated subset: resnet50,chain500,mobilenet,chain5000"
    )
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--json", default=str(HERE / "results.json"))
    args = ap.parse_args()
    tools = args.tools.split(",")
    # Byte-compile bnfold as an installed wheel would be (the peers' site-packages are): with
    # PYTHONDONTWRITEBYTECODE set, an editable checkout would otherwise be recompiled on every run.
    import bnfold

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(bnfold.__file__).parent)], check=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmpdir = Path(tmp)
        cases = {
            "resnet50": (resnet50_like, [1, 3, 224, 224]),
            "chain500": (lambda **k: chain(500, **k), [1, 3, 16, 16]),
        }
        if not args.quick:
            cases["mobilenet"] = (mobilenet_like, [1, 3, 224, 224])
            cases["chain5000"] = (lambda **k: chain(5000, **k), [1, 3, 16, 16])
        if args.models:
            cases["mobilenet"] = (mobilenet_like, [1, 3, 224, 224])
            cases["chain5000"] = (lambda **k: chain(5000, **k), [1, 3, 16, 16])
            cases = {k: v for k, v in cases.items() if k in args.models.split(",")}
        for name, (builder, shape) in ({} if args.only_big else cases).items():
            src = tmpdir / f"{name}.onnx"
            onnx.save(builder(), str(src))
            nobn = tmpdir / f"{name}_nobn.onnx"
            onnx.save(builder(with_bn=False), str(nobn))
            results[name] = bench(name, src, tmpdir, tools, args)
            folded = tmpdir / f"{name}_bnfold.onnx"
            if folded.exists() and name != "chain5000":
                off = latencies({"original": src, "folded": folded, "no_bn": nobn}, "ORT_DISABLE_ALL", shape)
                default = latencies({"original": src, "folded": folded}, "ORT_ENABLE_ALL", shape)
                results[name]["latency_ms"] = {
                    "original_disable_all": off["original"],
                    "folded_disable_all": off["folded"],
                    "no_bn_disable_all": off["no_bn"],
                    "original_default": default["original"],
                    "folded_default": default["folded"],
                }
            for f in tmpdir.glob(f"{name}*"):
                f.unlink()
        if args.big or args.only_big:
            src = big_external(tmpdir / "big")
            results["big_external"] = bench(
                "big_external", src, tmpdir, ["floor", "bnfold", "copy", "copy+fsync"], args
            )
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


def _remove_outputs(dst: Path) -> None:
    for f in (dst, Path(f"{dst}.data"), dst.with_suffix(".rss")):
        if f.exists():
            f.unlink()


def bench(name: str, src: Path, tmpdir: Path, tools: list[str], args: argparse.Namespace) -> dict:
    data = src.parent / f"{src.name}.data"
    size = (src.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6
    times: dict[str, list[float]] = {t: [] for t in tools}
    rss: dict[str, list[float]] = {t: [] for t in tools}
    status: dict[str, str] = {}
    for rep in range(args.repeats):
        order = tools[rep % len(tools) :] + tools[: rep % len(tools)]  # alternate who goes first
        for tool in order:
            if status.get(tool, "ok") != "ok":
                continue
            dst = tmpdir / f"{name}_{tool}.onnx"
            if tool in ("copy", "copy+fsync"):
                # bnfold makes its output durable (fsync) before renaming it into place; `cp` does
                # not, so both are measured
                t = time.perf_counter()
                subprocess.run(["cp", "-r", str(src.parent), str(tmpdir / "copy")], check=True)
                if tool == "copy+fsync":
                    subprocess.run(["sync", *map(str, (tmpdir / "copy").iterdir())], check=True)
                secs, peak, st = time.perf_counter() - t, float("nan"), "ok"
                subprocess.run(["rm", "-rf", str(tmpdir / "copy")], check=True)
            else:
                secs, peak, st = run_tool(tool, src, dst, args.timeout)
            status[tool] = st
            times[tool].append(secs)
            rss[tool].append(peak)
            if rep < args.repeats - 1 or name == "big_external":
                _remove_outputs(dst)
    row: dict[str, dict] = {}
    for tool in tools:
        if not times[tool]:
            continue
        row[tool] = {
            "seconds": statistics.median(times[tool]),
            "peak_rss_mb": statistics.median(rss[tool]),
            "status": status[tool],
            "bn_left": count_bn(tmpdir / f"{name}_{tool}.onnx")
            if tool not in ("floor", "copy", "copy+fsync")
            else None,
        }
    base = row.get("bnfold", {}).get("seconds")
    print(f"\n{name} ({size:.1f} MB on disk)")
    print(f"{'tool':<14}{'seconds':>10}{'peak MB':>10}{'BN left':>9}{'bnfold/x':>10}  status")
    for tool, r in row.items():
        ratio = base / r["seconds"] if base and r["status"] == "ok" else float("nan")
        r["bnfold_ratio"] = ratio
        bn = "-" if r["bn_left"] is None else str(r["bn_left"])
        print(
            f"{tool:<14}{r['seconds']:>10.3f}{r['peak_rss_mb']:>10.0f}{bn:>9}{ratio:>10.2f}  {r['status'][:60]}"
        )
    return {"size_mb": size, "tools": row}


if __name__ == "__main__":
    main()
