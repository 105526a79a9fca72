"""One tool run as a whole process: ``python benchmarks/peers.py TOOL IN OUT``.

Tools: floor (onnx.load + onnx.save), bnfold (the ``bnfold`` CLI, ``--no-verify``), ort (onnxruntime
basic level saving its optimized model), onnxscript (its BatchNorm fusion rules), onnxslim,
onnxsim, onnxoptimizer (``fuse_bn_into_conv``); ``bnfold-baseline`` is the bnfold CLI of another
checkout (``$BENCH_BASELINE``, e.g. the commit before a refactor), to measure a change in the same
run. Peers are imported only here, in the benchmark environment; nothing in bnfold depends on them.
"""

from __future__ import annotations

import os
import sys


def _report_peak() -> None:
    """Write this process's peak RSS (VmHWM: this program only, not the launcher) to $BENCH_RSS_FILE."""
    target = os.environ.get("BENCH_RSS_FILE")
    if not target:
        return
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                with open(target, "w") as out:
                    out.write(str(int(line.split()[1]) / 1024))


def main(tool: str, src: str, dst: str) -> None:
    if tool == "bnfold-baseline":
        sys.path.insert(0, os.environ["BENCH_BASELINE"])
        for name in [m for m in sys.modules if m == "bnfold" or m.startswith("bnfold.")]:
            del sys.modules[name]
        tool = "bnfold"
    if tool == "bnfold":
        import atexit

        from bnfold.cli import entry  # what the `bnfold` console script runs

        sys.argv = ["bnfold", src, "-o", dst, "--no-verify", "--quiet"]
        atexit.register(_report_peak)  # entry() ends the process after the exit handlers
        entry()
    import onnx

    if tool == "floor":
        model = onnx.load(src)
        big = any(
            t.data_location == onnx.TensorProto.EXTERNAL
            for t in onnx.load(src, load_external_data=False).graph.initializer
        )
        if big:
            onnx.save(model, dst, save_as_external_data=True, location=os.path.basename(dst) + ".data")
        else:
            onnx.save(model, dst)
    elif tool == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = dst
        ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    elif tool == "onnxscript":
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import (
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        )

        rules = [
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        ]
        onnx.save(rewriter.rewrite(onnx.load(src), pattern_rewrite_rules=rules), dst)
    elif tool == "onnxslim":
        import onnxslim

        onnx.save(onnxslim.slim(onnx.load(src)), dst)
    elif tool == "onnxsim":
        import onnxsim

        model, _ = onnxsim.simplify(onnx.load(src))
        onnx.save(model, dst)
    elif tool == "onnxoptimizer":
        import onnxoptimizer

        onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)
    else:
        raise SystemExit(f"unknown tool {tool}")


if __name__ == "__main__":
    try:
        main(*sys.argv[1:4])
    finally:
        _report_peak()
