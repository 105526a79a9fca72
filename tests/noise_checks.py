"""An independent estimate of a model's rounding noise, for tests of bnfold's noise floor: every
float initializer moved by -1, 0 or +1 ulp per element with this module's own bit arithmetic and
generator (not bnfold's), run in onnxruntime with optimizations off."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx_builders import run_ort

UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits(a: np.ndarray) -> np.ndarray:
    """The bit patterns of a float array as int64."""
    return a.view(UINT[a.dtype.itemsize]).astype(np.int64)


def own_nudge(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each nonzero finite element one step away in its bit pattern (magnitude up or down):
    one ulp, computed without np.nextafter."""
    step = rng.integers(-1, 2, size=a.shape)
    step = np.where(np.isfinite(a.astype(np.float64)) & (a.astype(np.float64) != 0), step, 0)
    return (bits(a) + step).astype(UINT[a.dtype.itemsize]).view(a.dtype)


def own_floor(model: onnx.ModelProto, feeds: dict[str, np.ndarray], seeds: int = 3) -> float:
    """The largest change of any output over ``seeds`` copies with every float initializer
    nudged (the model's data in memory)."""
    ref = run_ort(model, feeds)
    worst = 0.0
    for seed in range(seeds):
        rng = np.random.default_rng(100 + seed)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for t in copy.graph.initializer:
            a = numpy_helper.to_array(t)
            if a.dtype.kind == "f":
                t.CopyFrom(numpy_helper.from_array(own_nudge(a, rng), t.name))
        for r, m in zip(ref, run_ort(copy, feeds), strict=True):
            worst = max(worst, float(np.max(np.abs(np.asarray(m, np.float64) - np.asarray(r, np.float64)))))
    return worst
