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

import contextlib
import io
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import BadInput
from ..report import OutputCheck, Verification
from ..storage.load import load_model, open_model
from .options import Inputs

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
MAX_INPUT_ELEMENTS = 2**30  # a generated input larger than this is refused (a declared shape gone wrong)


@dataclass
class _Interface:
    inputs: list[tuple[str, onnx.TypeProto]]  # inputs the caller must feed
    outputs: list[tuple[str, int]]  # (name, elem type)
    optional: list[tuple[str, onnx.TypeProto]] = field(default_factory=list)  # inputs with a default


def _interface(model: onnx.ModelProto) -> _Interface:
    inits = {t.name for t in model.graph.initializer}
    inputs = [(v.name, v.type) for v in model.graph.input if v.name not in inits]
    optional = [(v.name, v.type) for v in model.graph.input if v.name in inits]
    outputs = []
    for v in model.graph.output:
        t = v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else 0
        outputs.append((v.name, t))
    return _Interface(inputs, outputs, optional)


def _check_same_interface(a: _Interface, b: _Interface) -> None:
    names_a = [n for n, _ in a.inputs]
    names_b = [n for n, _ in b.inputs]
    if names_a != names_b:
        raise BadInput(f"the models have different inputs: {names_a} vs {names_b}")
    out_a = [n for n, _ in a.outputs]
    out_b = [n for n, _ in b.outputs]
    if out_a != out_b:
        raise BadInput(f"the models have different outputs: {out_a} vs {out_b}")


def _np_dtype(elem_type: int, what: str = "a tensor") -> np.dtype:
    if elem_type == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        raise BadInput(
            f"{what} has element type {elem_type}, which onnx {onnx.__version__} does not know"
        ) from None


def load_inputs(inputs: Inputs) -> dict[str, np.ndarray]:
    """User inputs from a mapping or an ``.npz`` file (BadInput when unreadable)."""
    if inputs is None:
        return {}
    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if not path.is_file():
            raise BadInput(f"{path}: no such inputs file")
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any failure to parse the user's file is bad input
            raise BadInput(f"{path}: cannot read inputs ({_one_line(exc)})") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise BadInput(f"{path}: not an .npz archive of named arrays (write it with numpy.savez)")
        try:
            with data:
                return {k: data[k] for k in data.files}
        except Exception as exc:  # noqa: BLE001 - corrupt members, pickled objects, bad headers
            raise BadInput(f"{path}: cannot read inputs ({_one_line(exc)})") from None
    if not isinstance(inputs, Mapping):
        raise BadInput(
            f"inputs must be a mapping of name to array or an .npz path, not {type(inputs).__name__}"
        )
    out = {}
    for k, v in inputs.items():
        try:
            out[str(k)] = np.asarray(v)
        except Exception as exc:  # noqa: BLE001 - anything numpy rejects is the caller's input
            raise BadInput(f"input '{k}': not an array ({_one_line(exc)})") from None
    return out


def _declared(type_proto: onnx.TypeProto) -> list[onnx.TensorShapeProto.Dimension] | None:
    tt = type_proto.tensor_type
    return list(tt.shape.dim) if tt.HasField("shape") else None


def _dim_key(name: str, axis: int, d: onnx.TensorShapeProto.Dimension) -> str | None:
    """The name a dynamic dimension is set by (``--dim KEY=VALUE``), None for a static one."""
    if d.HasField("dim_value") and d.dim_value > 0:
        return None
    return d.dim_param or f"{name}[{axis}]"


def symbolic_dims(interface: list[tuple[str, onnx.TypeProto]]) -> list[str]:
    """Every key ``--dim`` accepts for these inputs, in order of appearance."""
    keys: list[str] = []
    for name, tp in interface:
        dims = _declared(tp) if tp.HasField("tensor_type") else None
        for axis, d in enumerate(dims or []):
            key = _dim_key(name, axis, d)
            if key is not None and key not in keys:
                keys.append(key)
    return keys


def _check_shape(name: str, shape: list[int], declared, what: str) -> None:
    if declared is None:
        return
    if len(shape) != len(declared):
        raise BadInput(
            f"input '{name}': {what} has rank {len(shape)} ({_fmt_shape(shape)}), "
            f"the model declares rank {len(declared)} ({_fmt_declared(declared)})"
        )
    for axis, (got, d) in enumerate(zip(shape, declared)):
        if d.HasField("dim_value") and d.dim_value > 0 and got != d.dim_value:
            raise BadInput(
                f"input '{name}': {what} {_fmt_shape(shape)} does not match the declared shape "
                f"{_fmt_declared(declared)} at axis {axis}"
            )


def _fmt_shape(shape: list[int] | tuple[int, ...]) -> str:
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


def _fmt_declared(dims: list[onnx.TensorShapeProto.Dimension]) -> str:
    if not dims:
        return "scalar"
    return "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


def validate_request(
    interface: list[tuple[str, onnx.TypeProto]],
    optional: list[tuple[str, onnx.TypeProto]],
    shapes: Mapping[str, list[int] | tuple[int, ...]],
    dims: Mapping[str, int],
    given: Mapping[str, np.ndarray],
) -> None:
    """Reject names that match nothing and values that cannot fit (BadInput, one line)."""
    names = [n for n, _ in interface]
    known = set(names) | {n for n, _ in optional}
    extra = [k for k in given if k not in known]
    if extra:
        raise BadInput(
            f"inputs given for unknown names: {', '.join(sorted(extra))} (model inputs: {', '.join(names) or 'none'})"
        )
    unknown_shapes = [k for k in shapes if k not in set(names)]
    if unknown_shapes:
        raise BadInput(
            f"--shape for unknown input(s): {', '.join(sorted(unknown_shapes))} "
            f"(model inputs: {', '.join(names) or 'none'})"
        )
    for k, v in shapes.items():
        if any(int(d) < 0 for d in v):
            raise BadInput(f"--shape {k}: dimensions must not be negative")
    both = sorted(set(shapes) & set(given))
    if both:
        raise BadInput(f"input(s) {', '.join(both)} given both as --shape and in --inputs")
    keys = symbolic_dims(interface)
    unknown_dims = [k for k in dims if k not in keys]
    if unknown_dims:
        raise BadInput(
            f"--dim for unknown dimension(s): {', '.join(sorted(unknown_dims))} "
            f"(dynamic dimensions: {', '.join(keys) or 'none'})"
        )
    for k, v in dims.items():
        if int(v) < 0:
            raise BadInput(f"--dim {k}: value must not be negative")


def make_inputs(
    interface: list[tuple[str, onnx.TypeProto]],
    rng: np.random.Generator,
    shapes: Mapping[str, list[int] | tuple[int, ...]],
    dims: Mapping[str, int],
    given: Mapping[str, np.ndarray],
    assumed: dict[str, int],
    optional: list[tuple[str, onnx.TypeProto]] | None = None,
    run: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random feeds for every input not in ``given``; record assumed dims in ``assumed``.

    A single-element boolean input (typically an ``If`` condition) is True on even runs and
    False on odd ones, so ``runs=2`` exercises both branches.

    Given arrays are checked against the declared dtype, rank and static dimensions; their sizes
    bind the symbolic dimensions they carry, so generated inputs sharing a dimension name agree.
    """
    types = dict(interface)
    types.update(optional or [])
    bound: dict[str, int] = {k: int(v) for k, v in dims.items()}
    feeds: dict[str, np.ndarray] = {}
    for name, arr in given.items():
        type_proto = types.get(name)
        if type_proto is None:
            raise BadInput(f"inputs given for unknown names: {name}")
        if not type_proto.HasField("tensor_type"):
            feeds[name] = arr
            continue
        dtype = _np_dtype(type_proto.tensor_type.elem_type, f"input '{name}'")
        if arr.dtype != dtype:
            raise BadInput(f"input '{name}' must have dtype {dtype.name}, got {arr.dtype.name}")
        declared = _declared(type_proto)
        _check_shape(name, list(arr.shape), declared, "the given array")
        for axis, d in enumerate(declared or []):
            key = _dim_key(name, axis, d)
            if key is None:
                continue
            if key in bound and bound[key] != arr.shape[axis] and key in dims:
                raise BadInput(
                    f"input '{name}': axis {axis} ({key}) has size {arr.shape[axis]}, but --dim {key}={dims[key]}"
                )
            bound.setdefault(key, int(arr.shape[axis]))
        feeds[name] = arr
    for name, type_proto in interface:
        if name in feeds:
            continue
        if not type_proto.HasField("tensor_type"):
            raise BadInput(f"input '{name}' is not a tensor; pass it with --inputs")
        tt = type_proto.tensor_type
        if tt.elem_type == onnx.TensorProto.UNDEFINED:
            raise BadInput(f"input '{name}' has no element type; pass it with --inputs")
        dtype = _np_dtype(tt.elem_type, f"input '{name}'")
        declared = _declared(type_proto)
        if name in shapes:
            shape = [int(d) for d in shapes[name]]
            _check_shape(name, shape, declared, "--shape")
        elif declared is None:
            raise BadInput(f"input '{name}' has unknown rank; give its shape (--shape {name}=...)")
        else:
            shape = []
            for axis, d in enumerate(declared):
                key = _dim_key(name, axis, d)
                if key is None:
                    shape.append(d.dim_value)
                    continue
                if key in bound:
                    value = bound[key]
                else:
                    value = assumed.get(key, DEFAULT_BATCH if axis == 0 else DEFAULT_DIM)
                    assumed[key] = value
                shape.append(value)
        elements = math.prod(shape)
        if elements > MAX_INPUT_ELEMENTS:
            raise BadInput(
                f"input '{name}' would have shape {_fmt_shape(shape)} ({elements:.3g} elements); give a smaller "
                f"one with --shape {name}=... or --dim"
            )
        if dtype.kind == "b" and elements == 1:
            feeds[name] = np.full(shape, run % 2 == 0, dtype=bool)
        else:
            feeds[name] = _random(rng, dtype, shape, name)
    return feeds


def _random(rng: np.random.Generator, dtype: np.dtype, shape: list[int], name: str) -> np.ndarray:
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
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
            name,
            dtype.name,
            shape,
            False,
            math.inf,
            math.inf,
            atol or 0.0,
            rtol or 0.0,
            math.inf,
            math.inf,
            int(reference.size),
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
    # Non-finite references count as magnitude 0: they pass only by exact match (diff == 0), and
    # 0 * inf never turns a tolerance into nan.
    mag = np.abs(ref)
    mag = np.where(np.isfinite(mag), mag, 0.0)
    ok = (diff == 0) | (diff <= atol + rtol * mag)
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
        name,
        dtype.name,
        shape,
        mismatches == 0,
        max_abs,
        max_rel,
        atol,
        rtol,
        min_atol,
        min_rtol,
        mismatches,
    )


def _worst(a: OutputCheck, b: OutputCheck) -> OutputCheck:
    if a.passed != b.passed:
        return a if not a.passed else b
    return a if a.max_abs_err >= b.max_abs_err else b


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


def _session(model: onnx.ModelProto | Path, provider: str, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # failures come back as exceptions; keep its log off stderr
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    # onnxruntime's Python wrapper print()s an "EP Error ... Falling back" banner to stdout when
    # creating a session fails with a ValueError (e.g. a message it cannot decode): keep stdout ours.
    with contextlib.redirect_stdout(io.StringIO()):
        return ort.InferenceSession(source, sess_options=opts, providers=[provider])


def _run_all(
    model: onnx.ModelProto | Path,
    provider: str,
    feeds: list[dict[str, np.ndarray]],
    names: list[str],
    threads: int | None = None,
) -> list[list[np.ndarray]]:
    session = _session(model, provider, threads)
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
    threads: int | None = None,
) -> Verification:
    """Run ``reference`` and ``candidate`` on the same seeded inputs and compare every output.

    Models may be paths, ``onnx.ModelProto`` or anything :func:`bnfold.storage.load.load_model` accepts.
    ``provider`` is an onnxruntime execution provider (``"cpu"``/``"cuda"`` are accepted as
    short names); ``threads`` caps onnxruntime's intra-op threads (default: onnxruntime's choice).

    Raises BadInput when a model cannot be read, the models do not share an interface, the
    provider is unavailable, or the inputs/shapes/dims given do not fit the model (wrong names,
    dtypes, ranks or static dimensions). Returns status ``"error"`` when onnxruntime cannot run
    the reference (nothing can be said about the candidate) and ``"failed"`` when it runs the
    reference but not the candidate, or the outputs differ.
    """
    start = time.perf_counter()
    if runs < 1:
        raise BadInput("runs must be at least 1")
    for label, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise BadInput(f"{label} must be a finite number >= 0, got {value}")
    ref_model, ref_path = _interface_model(reference)
    cand_model, cand_path = _interface_model(candidate)
    ref_if, cand_if = _interface(ref_model), _interface(cand_model)
    _check_same_interface(ref_if, cand_if)
    given = load_inputs(inputs)
    validate_request(ref_if.inputs, ref_if.optional, shapes or {}, dims or {}, given)
    provider = check_provider(provider)
    assumed: dict[str, int] = {}
    feeds = [
        make_inputs(
            ref_if.inputs,
            np.random.default_rng([seed, run]),
            shapes or {},
            dims or {},
            given,
            assumed,
            ref_if.optional,
            run,
        )
        for run in range(runs)
    ]
    names = [n for n, _ in ref_if.outputs]
    result = Verification(
        passed=False,
        status="error",
        runs=runs,
        seed=seed,
        provider=provider,
        input_shapes={k: [int(d) for d in v.shape] for k, v in feeds[0].items()},
        assumed_dims=assumed,
    )
    # Files go to onnxruntime by path, so it finds their external data beside them.
    ref_source = ref_path if ref_path is not None else ref_model
    cand_source = cand_path if cand_path is not None else cand_model
    del ref_model, cand_model
    try:
        ref_out = _run_all(ref_source, provider, feeds, names, threads)
    except Exception as exc:  # onnxruntime raises its own exception types  # noqa: BLE001 - reported, never raised
        result.message = f"onnxruntime cannot run the reference model: {_one_line(exc)}"
        result.seconds = time.perf_counter() - start
        return result
    try:
        cand_out = _run_all(cand_source, provider, feeds, names, threads)
    except Exception as exc:  # noqa: BLE001 - reported, never raised
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


def _interface_model(source: Any) -> tuple[onnx.ModelProto, Path | None]:
    """The model (for its interface) and its path. A file goes to onnxruntime by path, so its
    weights are not read here: external data stays on disk and large embedded weights in the
    file (validated all the same, like any load)."""
    if isinstance(source, (str, os.PathLike)):
        model, _, path, embedded = open_model(source, stream_external=True, lazy=True)
        if embedded is not None:
            embedded.close()
        return model, path
    model, _, path = load_model(source)
    return model, path


def check_request(
    model: onnx.ModelProto,
    inputs: Inputs = None,
    shapes: Mapping[str, list[int] | tuple[int, ...]] | None = None,
    dims: Mapping[str, int] | None = None,
) -> None:
    """Validate user inputs/shapes/dims against ``model`` without running anything (BadInput)."""
    interface = _interface(model)
    given = load_inputs(inputs)
    validate_request(interface.inputs, interface.optional, shapes or {}, dims or {}, given)
    make_inputs(
        interface.inputs, np.random.default_rng(0), shapes or {}, dims or {}, given, {}, interface.optional
    )


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float (inf, -inf, nan) replaced by None, recursively.

    JSON has no infinities; ``json.dumps(..., allow_nan=False)`` accepts the result.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return value


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message, without onnxruntime's ``[ONNXRuntimeError] : 10 :``."""
    import re

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


MAX_MESSAGE = 400  # characters of a third-party error message kept in bnfold's one-line messages
