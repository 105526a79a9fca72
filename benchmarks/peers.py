"""One tool run as a whole process: ``python benchmarks/peers.py TOOL IN OUT``.

Tools: floor (onnx.load + onnx.save), bnfold (the ``bnfold`` CLI, ``--no-verify``), ort (onnxruntime
basic level saving its optimized model), onnxscript (its BatchNorm fusion rules), onnxslim,
onnxsim, onnxoptimizer (``fuse_bn_into_conv``). Peers are imported only here, in the benchmark
environment; nothing in bnfold depends on them.
"""

from __future__ import annotations

import sys


def main(tool: str, src: str, dst: str) -> None:
    if tool == "bnfold":
        from bnfold.cli import main as cli

        sys.argv = ["bnfold", src, "-o", dst, "--no-verify", "--quiet"]
        cli()
        return
    import onnx

    if tool == "floor":
        onnx.save(onnx.load(src), dst)
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

        rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule,
                 fuse_batchnorm_into_gemm_rule]
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
    main(*sys.argv[1:4])
