"""Models and references shared by the storage tests: large single-file models (compared with
onnx.load + fold in memory + onnx.save), external-data models, and onnxruntime runs with
optimizations off."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import bnfold
from bnfold.testing import conv_bn_model

MODELS = sorted((Path(__file__).resolve().parents[1] / "models" / "onnx").glob("*.onnx"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def in_memory(src: Path, out: Path, **opts: object) -> bytes:
    """The reference: onnx.load, fold the ModelProto in memory, onnx.save."""
    result = bnfold.fold(onnx.load(str(src)), verify=False, **opts)
    onnx.save(result.model, str(out))
    return out.read_bytes()


def values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def lazy_candidate(path: Path) -> bool:
    """Whether the lazy path should take the file (thresholds forced low): a main-graph
    initializer with non-empty raw_data, and no external data anywhere."""
    m = onnx.load(str(path), load_external_data=False)
    return any(t.HasField("raw_data") and t.raw_data for t in m.graph.initializer)


def big_model(path: Path) -> onnx.ModelProto:
    """A multi-MB conv/BN chain with tensors carrying fields after raw_data (doc_string 12,
    metadata_props 16), an unused fp16 tensor, and a small one."""
    model = conv_bn_model(blocks=4, channels=192, size=8, seed=3)
    inits = {t.name: t for t in model.graph.initializer}
    inits["w1"].doc_string = "conv 1 weight"
    meta = inits["w2"].metadata_props.add()
    meta.key, meta.value = "origin", "test"
    inits["w3"].doc_string = "last"
    extra = numpy_helper.from_array(np.arange(300_000, dtype=np.float16).reshape(600, 500), "unused_fp16")
    extra.doc_string = "kept as it is"
    model.graph.initializer.append(extra)
    onnx.save(model, str(path))
    return model


def save_external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> Path:
    path = folder / "model.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def has_inline_weights(path: Path) -> bool:
    """True if a tensor of at least 1 KiB is stored inside the model file itself."""
    m = onnx.load(str(path), load_external_data=False)
    return any(
        t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() >= 1024 for t in m.graph.initializer
    )


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def spill_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".bnfold-spill-"))
