"""Fold, then quantize: onnxruntime's static INT8 quantization of a bnfold-folded model.

    python examples/quantize_folded.py                 # a small conv net built here
    python examples/quantize_folded.py MODEL.onnx      # any model with one float image-like input

Steps: fold the float model with bnfold (verified in onnxruntime); quantize the folded model and,
for comparison, the unfolded one with ``onnxruntime.quantization.quantize_static`` (QDQ format,
INT8 weights and activations, MinMax calibration over ``--samples`` seeded inputs); run the float
model and both quantized ones on ``--evaluate`` held-out seeded inputs and print each quantized
model's error against the float outputs (max abs error, that error relative to the largest float
output, and how often the argmax agrees). The quantized models are run twice: with onnxruntime's
optimizations off (QDQ as written: each DequantizeLinear then the float op) and with all
optimizations on (QDQ fused into INT8 kernels, as deployed). See docs/quantization.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import bnfold

# (in channels, out channels, stride) of each Conv -> BatchNormalization -> Relu block
_BLOCKS = ((3, 8, 1), (8, 16, 2), (16, 16, 1), (16, 32, 2))
_INPUT_SHAPE = (1, 3, 32, 32)
_CLASSES = 10
_FEATURES = 32 * 8 * 8  # the last block's output (32 channels, 32x32 after two stride-2 convs), flattened


def _session(model: onnx.ModelProto | str | Path, optimized: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _convnet(weights: dict[str, np.ndarray], blocks: int, output: str = "logits") -> onnx.ModelProto:
    """The first ``blocks`` blocks (each Conv, then BN when its statistics are in ``weights``, then
    Relu), and what ``output`` asks for: ``"conv"`` (the last Conv's output), ``"features"`` (then
    Flatten) or ``"logits"`` (then the Gemm classifier)."""
    nodes, x = [], "image"
    for i in range(blocks):
        conv_inputs = [x, f"conv{i}.w"] + ([f"conv{i}.b"] if f"conv{i}.b" in weights else [])
        stride = _BLOCKS[i][2]
        nodes.append(
            helper.make_node(
                "Conv",
                conv_inputs,
                [f"conv{i}"],
                f"conv{i}",
                kernel_shape=[3, 3],
                pads=[1] * 4,
                strides=[stride] * 2,
            )
        )
        x = f"conv{i}"
        if f"bn{i}.mean" in weights:
            params = [f"bn{i}.{p}" for p in ("scale", "bias", "mean", "var")]
            nodes.append(
                helper.make_node("BatchNormalization", [x, *params], [f"bn{i}"], f"bn{i}", epsilon=1e-5)
            )
            nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], f"relu{i}"))
            x = f"relu{i}"
    shape = None
    if output != "conv":
        nodes.append(helper.make_node("Flatten", [x], ["features"], "flatten"))
        x, shape = "features", [_INPUT_SHAPE[0], _FEATURES]
    if output == "logits":
        nodes.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], "fc", transB=1))
        x, shape = "logits", [_INPUT_SHAPE[0], _CLASSES]
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(_INPUT_SHAPE))],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(v, k) for k, v in weights.items() if k in used],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run_all(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = _session(model)
    return np.concatenate([session.run(None, {"image": x[None]})[0] for x in images])


def build_convnet(seed: int = 0) -> onnx.ModelProto:
    """A small image classifier: four Conv -> BatchNormalization -> Relu blocks (two strided, the
    first Conv with a bias), Flatten and a Gemm to 10 logits.

    Weights are He-initialized from ``seed``. As training would leave them, each BN's running mean
    and variance are *measured* (the conv output's per-channel statistics over 64 seeded inputs)
    and its scale is log-uniform in [0.25, 2] (the channel-to-channel spread trained BNs have). The
    classifier reads every position (no global pooling, which on random weights and inputs would
    average the input's influence away) and its bias centres the logits, so the logits and their
    argmax vary from input to input, as a trained network's do.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for i, (cin, cout, _) in enumerate(_BLOCKS):
        weights[f"conv{i}.w"] = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(
            np.float32
        )
        if i == 0:
            weights["conv0.b"] = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    images = np.concatenate(sample_inputs(_INPUT_SHAPE, 64, seed + 1))
    for i, (_, cout, _) in enumerate(_BLOCKS):
        conv = _run_all(_convnet(weights, i + 1, output="conv"), images)
        weights[f"bn{i}.mean"] = conv.mean(axis=(0, 2, 3)).astype(np.float32)
        weights[f"bn{i}.var"] = conv.var(axis=(0, 2, 3)).astype(np.float32)
        weights[f"bn{i}.scale"] = np.exp(rng.uniform(np.log(0.25), np.log(2.0), cout)).astype(np.float32)
        weights[f"bn{i}.bias"] = (rng.standard_normal(cout) * 0.2).astype(np.float32)
    features = _run_all(_convnet(weights, len(_BLOCKS), output="features"), images).astype(np.float64)
    fc = rng.standard_normal((_CLASSES, _FEATURES)) / np.sqrt(_FEATURES)
    weights["fc.w"] = fc.astype(np.float32)
    weights["fc.b"] = (-fc @ features.mean(axis=0)).astype(np.float32)  # centred logits
    model = _convnet(weights, len(_BLOCKS))
    onnx.checker.check_model(model, full_check=True)
    return model


def sample_inputs(onnx_input_shape: Sequence[int], count: int, seed: int) -> list[np.ndarray]:
    """``count`` seeded float32 arrays of the given shape, image-like when it is one (N, C, H, W):
    smooth random patterns (noise on a grid of about 4x4 cells, upsampled) plus fine noise, so
    inputs differ in their coarse content as images do; else standard normal."""
    rng = np.random.default_rng(seed)
    shape = tuple(onnx_input_shape)
    samples = []
    for _ in range(count):
        x = rng.standard_normal(shape)
        if len(shape) == 4 and shape[2] >= 4 and shape[3] >= 4:
            cells = rng.standard_normal((*shape[:2], 4, 4))
            rows = np.arange(shape[2]) * 4 // shape[2]
            cols = np.arange(shape[3]) * 4 // shape[3]
            x = cells[:, :, rows][:, :, :, cols] + 0.25 * x
        samples.append(x.astype(np.float32))
    return samples


def _input_shape(model: onnx.ModelProto) -> tuple[str, tuple[int, ...]]:
    """The name and shape (symbolic dimensions as 1) of the model's single graph input."""
    initializers = {t.name for t in model.graph.initializer}
    (value,) = [v for v in model.graph.input if v.name not in initializers]
    dims = value.type.tensor_type.shape.dim
    return value.name, tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)


class _Samples(CalibrationDataReader):  # type: ignore[misc]
    """The calibration set, one feed dict at a time (what quantize_static reads)."""

    def __init__(self, name: str, samples: list[np.ndarray]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter([{name: x} for x in samples])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@dataclass
class Errors:
    """A quantized model's outputs against the float model's, over the evaluation inputs."""

    max_abs_err: float
    mean_abs_err: float
    rel_max: float  # max_abs_err / max |float output|
    rel_mean: float  # mean_abs_err / the float outputs' spread (std over inputs, averaged over outputs)
    argmax_agreement: float  # fraction of inputs whose argmax is the float model's

    @classmethod
    def of(cls, got: np.ndarray, want: np.ndarray) -> Errors:
        err = np.abs(got - want)
        spread = float(want.std(axis=0).mean())
        agree = float((got.argmax(axis=1) == want.argmax(axis=1)).mean())
        return cls(
            float(err.max()),
            float(err.mean()),
            float(err.max() / np.abs(want).max()),
            float(err.mean() / spread),
            agree,
        )


@dataclass
class Quantized:
    """One quantized model: its size and its errors, run as written and with INT8 kernels."""

    label: str
    nodes: int
    batchnorms: int
    qdq: Errors  # onnxruntime optimizations off: each DequantizeLinear, then the float op
    int8: Errors  # optimizations on: QDQ fused into INT8 kernels, as deployed


@dataclass
class Comparison:
    float_nodes: int
    float_batchnorms: int
    folded: int  # BatchNormalizations bnfold folded
    fold_max_abs_err: float  # bnfold's own verification of the float fold
    classes: int  # distinct argmax of the float model over the evaluation inputs
    quantized: list[Quantized]


def _outputs(session: ort.InferenceSession, name: str, inputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([session.run(None, {name: x})[0].reshape(1, -1) for x in inputs]).astype(np.float64)


def _measure(label: str, path: Path, name: str, inputs: list[np.ndarray], want: np.ndarray) -> Quantized:
    ops = [n.op_type for n in onnx.load(path).graph.node]
    qdq, int8 = (
        Errors.of(_outputs(_session(path, optimized), name, inputs), want) for optimized in (False, True)
    )
    return Quantized(label, len(ops), ops.count("BatchNormalization"), qdq, int8)


def quantize(source: Path, target: Path, name: str, calibration: list[np.ndarray], per_channel: bool) -> None:
    """``quantize_static``: QDQ, INT8 weights and activations, MinMax over ``calibration``."""
    quantize_static(
        str(source),
        str(target),
        _Samples(name, calibration),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
    )


def compare(
    model: onnx.ModelProto | str | Path,
    workdir: str | Path,
    *,
    samples: int = 16,
    evaluate: int = 64,
    seed: int = 0,
    per_channel: bool = True,
) -> Comparison:
    """Fold ``model``, quantize the folded and the unfolded model, measure both against the float one.

    Calibration uses ``samples`` inputs drawn with ``seed``; evaluation ``evaluate`` other inputs
    (``seed + 1``). Files are written to ``workdir``: ``float.onnx``, ``folded.onnx`` and
    ``quantized_folded.onnx`` / ``quantized_unfolded.onnx``.
    """
    workdir = Path(workdir)
    original = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
    float_path = workdir / "float.onnx"
    onnx.save(original, float_path)
    result = bnfold.fold(float_path)  # verified in onnxruntime; raises on unusable models
    folded_path = result.save(workdir / "folded.onnx")
    name, shape = _input_shape(original)
    calibration = sample_inputs(shape, samples, seed)
    inputs = sample_inputs(shape, evaluate, seed + 1)
    want = _outputs(_session(float_path), name, inputs)
    quantized = []
    for label, source in (("quantized folded", folded_path), ("quantized unfolded", float_path)):
        target = workdir / f"{label.replace(' ', '_')}.onnx"
        quantize(source, target, name, calibration, per_channel)
        quantized.append(_measure(label, target, name, inputs, want))
    ops = [n.op_type for n in original.graph.node]
    verification = result.verification
    return Comparison(
        float_nodes=len(ops),
        float_batchnorms=ops.count("BatchNormalization"),
        folded=len(result.report.folded),
        fold_max_abs_err=verification.max_abs_err if verification else float("nan"),
        classes=len(set(want.argmax(axis=1).tolist())),
        quantized=quantized,
    )


def _print(comparison: Comparison, per_channel: bool, evaluate: int) -> None:
    print(
        f"float model: {comparison.float_nodes} nodes, {comparison.float_batchnorms} BatchNormalization; "
        f"bnfold folded {comparison.folded} (verified, max abs err {comparison.fold_max_abs_err:.2g})"
    )
    print(
        f"INT8 QDQ, {'per-channel' if per_channel else 'per-tensor'} weights; against the float model on "
        f"{evaluate} held-out inputs ({comparison.classes} distinct float argmax):"
    )
    header = f"{'max abs err':>12}{'(rel)':>8}{'mean abs err':>13}{'(rel)':>8}{'argmax':>8}"
    print(
        f"  {'model':<20}{'nodes':>6}{'BNs':>5}  {'run as QDQ, optimizations off':^49}  {'INT8 kernels':^49}".rstrip()
    )
    print(f"  {'':<31}  {header}  {header}")
    for q in comparison.quantized:
        cells = [
            f"{e.max_abs_err:>12.3g}{e.rel_max:>8.1%}{e.mean_abs_err:>13.3g}{e.rel_mean:>8.1%}{e.argmax_agreement:>8.1%}"
            for e in (q.qdq, q.int8)
        ]
        print(f"  {q.label:<20}{q.nodes:>6}{q.batchnorms:>5}  {cells[0]}  {cells[1]}")
    print("  (rel: max abs err / max |float output|; mean abs err / the float outputs' spread over inputs)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="an ONNX model (default: a small conv net built here)")
    parser.add_argument("--samples", type=int, default=16, help="calibration inputs [16]")
    parser.add_argument("--evaluate", type=int, default=64, help="evaluation inputs [64]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--per-tensor", action="store_true", help="per-tensor weight scales (default per-channel)"
    )
    args = parser.parse_args(argv)
    model = args.model or build_convnet(args.seed)
    with tempfile.TemporaryDirectory(prefix="bnfold-quantize-") as workdir:
        comparison = compare(
            model,
            workdir,
            samples=args.samples,
            evaluate=args.evaluate,
            seed=args.seed,
            per_channel=not args.per_tensor,
        )
    _print(comparison, not args.per_tensor, args.evaluate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
