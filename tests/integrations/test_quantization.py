"""examples/quantize_folded.py: fold with bnfold, then onnxruntime's static INT8 quantization.

The bounds come from measuring the example's defaults (per-channel INT8 QDQ, 16 calibration
inputs, 64 held-out evaluation inputs) on the example's conv net built with seeds 0 to 5:

=============================  ==================  ======  ================================
quantized folded, vs float     measured, seeds 0-5  bound   miscalibrated control (0.25x)
=============================  ==================  ======  ================================
mean abs err / output spread   4.5 % to 5.5 %      8 %     45 % to 73 %
max abs err / max |output|     13 % to 38 %        50 %    63 % to 109 %
argmax agreement               89 % to 100 %       85 %    23 % to 52 %
=============================  ==================  ======  ================================

Each bound is about 1.5 times the worst value measured (the max error, which one clipped
intermediate activation on one held-out input sets, gets less margin in ratio because its
spread is already wide), and a quantization whose calibration inputs were scaled by 0.25 (every
activation range too narrow, so activations clip) is far outside all three: the bounds tell a
correct quantization from a broken one. The numbers are computed from onnxruntime runs with
optimizations off (the float reference, and the QDQ model as written) and with them on (the QDQ
model fused into INT8 kernels).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import onnx
import pytest

pytest.importorskip("onnxruntime.quantization")

ROOT = Path(__file__).resolve().parents[2]

# bounds for the quantized folded model against the float model (see the table above)
REL_MEAN_BOUND = 0.08
REL_MAX_BOUND = 0.50
ARGMAX_BOUND = 0.85


def _example():
    spec = importlib.util.spec_from_file_location("quantize_folded", ROOT / "examples" / "quantize_folded.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


qf = _example()


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("quantize")
    return qf.compare(qf.build_convnet(seed=0), workdir, samples=16, evaluate=64, seed=0), workdir


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def test_folded_models_have_no_batchnorm(comparison) -> None:
    result, workdir = comparison
    assert result.float_batchnorms == 4 and result.folded == 4
    assert _ops(workdir / "float.onnx").count("BatchNormalization") == 4
    assert "BatchNormalization" not in _ops(workdir / "folded.onnx")
    folded, unfolded = result.quantized
    assert folded.label == "quantized folded" and folded.batchnorms == 0
    assert "BatchNormalization" not in _ops(workdir / "quantized_folded.onnx")
    # quantizing the unfolded model leaves each BN as a float op between DequantizeLinear and
    # QuantizeLinear (47 nodes against 30 with onnxruntime 1.32)
    assert unfolded.batchnorms == 4 and unfolded.nodes > folded.nodes
    ops = _ops(workdir / "quantized_folded.onnx")
    assert ops.count("Conv") == 4 and ops.count("QuantizeLinear") >= 5  # really quantized


def test_quantized_folded_model_stays_close_to_the_float_model(comparison) -> None:
    result, _ = comparison
    assert result.classes >= 8  # the float argmax varies with the input: agreement means something
    folded = result.quantized[0]
    for errors in (folded.qdq, folded.int8):
        assert errors.rel_mean < REL_MEAN_BOUND, errors
        assert errors.rel_max < REL_MAX_BOUND, errors
        assert errors.argmax_agreement >= ARGMAX_BOUND, errors


def test_folding_first_quantizes_no_worse_than_leaving_batchnorm(comparison) -> None:
    # measured on seeds 0-5: folded 4.5-5.5 %, unfolded 6.6-7.9 % mean error of the output spread
    result, _ = comparison
    folded, unfolded = result.quantized
    assert folded.qdq.rel_mean <= unfolded.qdq.rel_mean
    assert folded.qdq.argmax_agreement >= unfolded.qdq.argmax_agreement


def test_bounds_reject_a_miscalibrated_quantization(comparison) -> None:
    _, workdir = comparison
    calibration = [0.25 * x for x in qf.sample_inputs((1, 3, 32, 32), 16, seed=0)]
    qf.quantize(workdir / "folded.onnx", workdir / "miscalibrated.onnx", "image", calibration, True)
    inputs = qf.sample_inputs((1, 3, 32, 32), 64, seed=1)
    want = qf._outputs(qf._session(workdir / "float.onnx"), "image", inputs)
    errors = qf.Errors.of(qf._outputs(qf._session(workdir / "miscalibrated.onnx"), "image", inputs), want)
    assert errors.rel_mean > 3 * REL_MEAN_BOUND
    assert errors.rel_max > REL_MAX_BOUND
    assert errors.argmax_agreement < ARGMAX_BOUND


def test_example_runs_as_a_script() -> None:
    import os
    import subprocess

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quantize_folded.py"),
            str(ROOT / "models" / "onnx" / "mlp_bn.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("float model: 7 nodes, 2 BatchNormalization; bnfold folded 2 (verified")
    assert any(line.lstrip().startswith("quantized folded") for line in lines)
    assert any(line.lstrip().startswith("quantized unfolded") for line in lines)
