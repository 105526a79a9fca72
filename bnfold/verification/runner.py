"""onnxruntime sessions: the only module that imports onnxruntime, and only when a model runs.

Every session runs with graph optimizations **off** (``ORT_DISABLE_ALL``): at any higher level
onnxruntime folds Conv+BN itself, and a comparison would only check one fold against its fold.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import BadInput

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
}
MAX_MESSAGE = 400  # characters of a third-party error message kept in bnfold's one-line messages

Feeds = dict[str, np.ndarray]
ModelSource = onnx.ModelProto | Path | bytes


def normalize_provider(name: str) -> str:
    """``"cpu"`` -> ``"CPUExecutionProvider"``; full provider names pass through."""
    return PROVIDER_ALIASES.get(name.strip().lower(), name.strip())


def check_provider(provider: str) -> str:
    """The full name of ``provider``; BadInput when this onnxruntime build does not offer it.

    onnxruntime itself only warns and falls back to CPU for an unavailable provider, which would
    silently verify on the wrong device.
    """
    import onnxruntime as ort

    full = normalize_provider(provider)
    available = ort.get_available_providers()
    if full not in available:
        raise BadInput(
            f"execution provider '{provider}' is not available in this onnxruntime "
            f"(available: {', '.join(available)})"
        )
    return full


def _session(
    model: ModelSource,
    provider: str,
    threads: int | None = None,
    overrides: Mapping[str, np.ndarray] | None = None,
) -> tuple[Any, list[Any]]:
    """The session, and the onnxruntime values of ``overrides`` (they must outlive it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # failures come back as exceptions; keep its log off stderr
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    values = []
    for name, array in (overrides or {}).items():
        values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
        opts.add_initializer(name, values[-1])
    if isinstance(model, Path):
        source: str | bytes = str(model)
    elif isinstance(model, bytes):
        source = model
    else:
        source = model.SerializeToString()
    # onnxruntime's Python wrapper print()s an "EP Error ... Falling back" banner to stdout when
    # creating a session fails with a ValueError (e.g. a message it cannot decode): keep stdout ours.
    with contextlib.redirect_stdout(io.StringIO()):
        return ort.InferenceSession(source, sess_options=opts, providers=[provider]), values


def run_all(
    model: ModelSource,
    provider: str,
    feeds: Sequence[Feeds],
    names: list[str],
    threads: int | None = None,
    overrides: Mapping[str, np.ndarray] | None = None,
) -> list[list[np.ndarray]]:
    """The outputs ``names`` of ``model`` for each feed (a file goes by path, so onnxruntime
    finds its external data beside it), with the main-graph initializers ``overrides`` replaced
    by the arrays given. Raises whatever onnxruntime raises."""
    session, values = _session(model, provider, threads, overrides)
    try:
        return [[np.asarray(o) for o in session.run(names, f)] for f in feeds]
    finally:
        del session, values


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, without onnxruntime's ``[ONNXRuntimeError] : 10 :``."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*", "", text[0])
    # onnxruntime's "Load model from <path> failed:" and "<source file>:<line> <C++ signature>" add
    # nothing for a user; keep the sentence after them.
    line = re.sub(r"Load model from .*? failed:\s*", "", line)
    line = re.sub(r"\S*onnxruntime\S*\.(?:cc|h|cpp):\d+ .*?\)\s+", "", line)
    line = re.sub(r"^(.*?: )?\S+ was false\.\s*", r"\1", line)
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3].rstrip() + "..."
