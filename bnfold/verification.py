"""Numerical verification of two ONNX models with the same interface, in onnxruntime.

Both models run on the chosen execution provider with every graph optimization **off**
(``ORT_DISABLE_ALL``): at any higher level onnxruntime folds Conv+BN itself, and the comparison
would only check our fold against its fold. Works for any pair of models, including folds made
by other tools.

An output element passes when ``|candidate - reference| <= atol + rtol * |reference|``. Default
tolerances depend on the dtype; the default ``atol`` also scales with the largest magnitude of the
reference output, so deep networks with large activations are judged relative to their size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import BadInput
from .io import load_model
from .report import OutputCheck, Verification

# dtype name -> (rtol, atol as a fraction of max |reference|)
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
DEFAULT_BATCH = 1
DEFAULT_DIM = 32
INT_HIGH = 4  # integers are drawn from [0, INT_HIGH)

Inputs = Mapping[str, np.ndarray] | str | Path | None


@dataclass
class _Interface:
    inputs: list[tuple[str, onnx.TypeProto]]  # inputs the caller must feed
    outputs: list[tuple[str, int]]  # (name, elem type)


def _interface(model: onnx.ModelProto) -> _Interface:
    inits = {t.name for t in model.graph.initializer}
    inputs = [(v.name, v.type) for v in model.graph.input if v.name not in inits]
    outputs = []
    for v in model.graph.output:
        t = v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else 0
        outputs.append((v.name, t))
    return _Interface(inputs, outputs)


def _check_same_interface(a: _Interface, b: _Interface) -> None:
    names_a = [n for n, _ in a.inputs]
    names_b = [n for n, _ in b.inputs]
    if names_a != names_b:
        raise BadInput(f"the models have different inputs: {names_a} vs {names_b}")
    out_a = [n for n, _ in a.outputs]
    out_b = [n for n, _ in b.outputs]
    if out_a != out_b:
        raise BadInput(f"the models have different outputs: {out_a} vs {out_b}")


def _np_dtype(elem_type: int) -> np.dtype:
    if elem_type == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def load_inputs(inputs: Inputs) -> dict[str, np.ndarray]:
    """User inputs from a mapping or an ``.npz`` file."""
    if inputs is None:
        return {}
    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise BadInput(f"{path}: cannot read inputs ({exc})") from None
    return {k: np.asarray(v) for k, v in inputs.items()}


def make_inputs(
    interface: list[tuple[str, onnx.TypeProto]],
    rng: np.random.Generator,
    shapes: Mapping[str, list[int] | tuple[int, ...]],
    dims: Mapping[str, int],
    given: Mapping[str, np.ndarray],
    assumed: dict[str, int],
) -> dict[str, np.ndarray]:
    """Seeded random feeds for every input not in ``given``; record assumed dims in ``assumed``."""
    feeds: dict[str, np.ndarray] = {}
    for name, type_proto in interface:
        if not type_proto.HasField("tensor_type"):
            raise BadInput(f"input '{name}' is not a tensor; pass it with --inputs")
        tt = type_proto.tensor_type
        dtype = _np_dtype(tt.elem_type)
        if name in given:
            arr = np.asarray(given[name])
            if arr.dtype != dtype:
                raise BadInput(f"input '{name}' must have dtype {dtype.name}, got {arr.dtype.name}")
            feeds[name] = arr
            continue
        if name in shapes:
            shape = [int(d) for d in shapes[name]]
        elif not tt.HasField("shape"):
            raise BadInput(f"input '{name}' has unknown rank; give its shape (--shape {name}=...)")
        else:
            shape = []
            for axis, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(d.dim_value)
                    continue
                key = d.dim_param or f"{name}[{axis}]"
                if key in dims:
                    value = int(dims[key])
                else:
                    value = assumed.get(key, DEFAULT_BATCH if axis == 0 else DEFAULT_DIM)
                    assumed[key] = value
                shape.append(value)
        feeds[name] = _random(rng, dtype, shape, name)
    extra = set(given) - {n for n, _ in interface}
    if extra:
        raise BadInput(f"inputs given for unknown names: {', '.join(sorted(extra))}")
    return feeds


def _random(rng: np.random.Generator, dtype: np.dtype, shape: list[int], name: str) -> np.ndarray:
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    raise BadInput(f"input '{name}' has dtype {dtype.name}; pass it with --inputs")


def default_tolerances(dtype: np.dtype, reference: np.ndarray) -> tuple[float, float]:
    """``(atol, rtol)`` for an output of ``dtype`` with values ``reference``."""
    rtol, atol_frac = DEFAULT_TOLERANCES.get(dtype.name, (0.0, 0.0))
    if not atol_frac:
        return 0.0, 0.0
    finite = reference[np.isfinite(reference)]
    scale = float(np.max(np.abs(finite))) if finite.size else 0.0
    return atol_frac * max(scale, 1e-6), rtol


def compare(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    atol: float | None = None,
    rtol: float | None = None,
) -> OutputCheck:
    """Elementwise ``|cand - ref| <= atol + rtol * |ref|``; NaN matches NaN, Inf matches itself."""
    shape = [int(d) for d in reference.shape]
    dtype = reference.dtype
    if candidate.shape != reference.shape or candidate.dtype != dtype:
        return OutputCheck(
            name, dtype.name, shape, False, math.inf, math.inf, atol or 0.0, rtol or 0.0,
            math.inf, math.inf, int(reference.size),
            f"shape/dtype differ: {list(candidate.shape)} {candidate.dtype.name} vs {shape} {dtype.name}",
        )
    d_atol, d_rtol = default_tolerances(dtype, reference.astype(np.float64) if reference.size else reference)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if reference.size == 0:
        return OutputCheck(name, dtype.name, shape, True, 0.0, 0.0, atol, rtol, 0.0, 0.0)
    if dtype.kind in "iub" or dtype.kind in "OSU":
        bad = reference != candidate
        n = int(np.count_nonzero(bad))
        err = 0.0
        if n and dtype.kind in "iu":
            err = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))
        elif n:
            err = math.inf
        return OutputCheck(name, dtype.name, shape, n == 0, err, err if n else 0.0, 0.0, 0.0, err, 0.0, n)
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    same_nan = np.isnan(ref) & np.isnan(cand)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(cand - ref)
    diff = np.where(same_nan | (ref == cand), 0.0, diff)  # equal infinities differ by nan otherwise
    diff = np.where(np.isnan(diff), np.inf, diff)
    mag = np.abs(ref)
    ok = diff <= atol + rtol * mag
    mismatches = int(ok.size - np.count_nonzero(ok))
    max_abs = float(np.max(diff))
    nonzero = mag > 0
    rel = diff[nonzero] / mag[nonzero]
    max_rel = float(np.max(rel)) if rel.size else 0.0
    if np.any((diff > 0) & ~nonzero):
        max_rel = math.inf
    min_atol = float(np.max(np.maximum(diff - rtol * mag, 0.0)))
    need = np.maximum(diff - atol, 0.0)
    if np.any((need > 0) & ~nonzero):
        min_rtol = math.inf
    else:
        r = need[nonzero] / mag[nonzero]
        min_rtol = float(np.max(r)) if r.size else 0.0
    return OutputCheck(
        name, dtype.name, shape, mismatches == 0, max_abs, max_rel, atol, rtol, min_atol, min_rtol,
        mismatches,
    )


def _worst(a: OutputCheck, b: OutputCheck) -> OutputCheck:
    if a.passed != b.passed:
        return a if not a.passed else b
    return a if a.max_abs_err >= b.max_abs_err else b


def _session(model: onnx.ModelProto | Path, provider: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, sess_options=opts, providers=[provider])


def _run_all(
    model: onnx.ModelProto | Path, provider: str, feeds: list[dict[str, np.ndarray]], names: list[str]
) -> list[list[np.ndarray]]:
    session = _session(model, provider)
    try:
        return [[np.asarray(o) for o in session.run(names, f)] for f in feeds]
    finally:
        del session


def verify(
    reference: Any,
    candidate: Any,
    *,
    inputs: Inputs = None,
    shapes: Mapping[str, list[int] | tuple[int, ...]] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    runs: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "CPUExecutionProvider",
) -> Verification:
    """Run ``reference`` and ``candidate`` on the same seeded inputs and compare every output.

    Models may be paths, ``onnx.ModelProto`` or anything :func:`bnfold.io.load_model` accepts.
    Raises BadInput when the models do not share an interface or inputs cannot be built; returns
    status ``"error"`` when onnxruntime cannot run the reference and ``"failed"`` when it runs the
    reference but not the candidate, or the outputs differ.
    """
    start = time.perf_counter()
    if runs < 1:
        raise BadInput("runs must be at least 1")
    ref_model, _, ref_path = load_model(reference)
    cand_model, _, cand_path = load_model(candidate)
    ref_if, cand_if = _interface(ref_model), _interface(cand_model)
    _check_same_interface(ref_if, cand_if)
    given = load_inputs(inputs)
    assumed: dict[str, int] = {}
    feeds = [
        make_inputs(ref_if.inputs, np.random.default_rng([seed, run]), shapes or {}, dims or {}, given, assumed)
        for run in range(runs)
    ]
    names = [n for n, _ in ref_if.outputs]
    result = Verification(
        passed=False, status="error", runs=runs, seed=seed, provider=provider,
        input_shapes={k: [int(d) for d in v.shape] for k, v in feeds[0].items()},
        assumed_dims=assumed,
    )
    ref_source = ref_path if ref_path is not None and not _has_external(ref_model) else ref_model
    cand_source = cand_path if cand_path is not None and not _has_external(cand_model) else cand_model
    del ref_model, cand_model
    try:
        ref_out = _run_all(ref_source, provider, feeds, names)
    except Exception as exc:  # onnxruntime raises its own exception types
        result.message = f"onnxruntime cannot run the reference model: {_one_line(exc)}"
        result.seconds = time.perf_counter() - start
        return result
    try:
        cand_out = _run_all(cand_source, provider, feeds, names)
    except Exception as exc:
        result.status = "failed"
        result.message = f"onnxruntime cannot run the candidate model: {_one_line(exc)}"
        result.seconds = time.perf_counter() - start
        return result
    checks: list[OutputCheck] = []
    for i, name in enumerate(names):
        check = None
        for run in range(runs):
            c = compare(name, ref_out[run][i], cand_out[run][i], atol, rtol)
            check = c if check is None else _worst(check, c)
        assert check is not None
        checks.append(check)
    result.outputs = checks
    result.passed = all(c.passed for c in checks)
    result.status = "passed" if result.passed else "failed"
    if not result.passed:
        bad = [c.name for c in checks if not c.passed]
        result.message = f"outputs differ beyond tolerance: {', '.join(bad)}"
    result.seconds = time.perf_counter() - start
    return result


def _has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
