"""Tolerances and the elementwise comparison of a reference and a candidate array.

An element passes when ``|candidate - reference| <= atol + rtol * |reference|``. Default
tolerances depend on the dtype; the default ``atol`` also scales with the largest magnitude of
the reference output, so deep networks with large activations are judged relative to their size,
and it is never below ``NOISE_FLOORS`` times the output's noise floor (see :mod:`.noise`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..report import OutputCheck, Verification

# dtype name -> (rtol, atol as a fraction of max |reference|)
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
NOISE_FLOORS = 10.0  # the default atol is at least this many noise floors


def default_tolerances(
    dtype: np.dtype, reference: np.ndarray, noise_floor: float | None = None
) -> tuple[float, float]:
    """``(atol, rtol)`` for an output of ``dtype`` with values ``reference``; ``atol`` at least
    ``NOISE_FLOORS * noise_floor`` when a floor is known."""
    rtol, atol_frac = DEFAULT_TOLERANCES.get(dtype.name, (0.0, 0.0))
    if not atol_frac:
        return 0.0, 0.0
    finite = reference[np.isfinite(reference)]
    scale = float(np.max(np.abs(finite))) if finite.size else 0.0
    atol = atol_frac * max(scale, 1e-6)
    if noise_floor is not None and math.isfinite(noise_floor):
        atol = max(atol, NOISE_FLOORS * noise_floor)
    return atol, rtol


def max_change(reference: np.ndarray, changed: np.ndarray) -> float:
    """The largest ``|changed - reference|`` (0 for equal values, NaN against NaN included;
    inf where one is non-finite and the other not, or the shapes differ)."""
    if changed.shape != reference.shape:
        return math.inf
    if reference.size == 0:
        return 0.0
    if reference.dtype.kind not in "iufb" and reference.dtype.name != "bfloat16":
        return 0.0 if np.array_equal(reference, changed) else math.inf
    ref = reference.astype(np.float64)
    new = changed.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(new - ref)
    diff = np.where((np.isnan(ref) & np.isnan(new)) | (ref == new), 0.0, diff)
    return float(np.max(np.where(np.isnan(diff), np.inf, diff)))


def compare(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    atol: float | None = None,
    rtol: float | None = None,
    noise_floor: float | None = None,
) -> OutputCheck:
    """Elementwise ``|cand - ref| <= atol + rtol * |ref|``; NaN matches NaN, Inf matches itself.

    ``atol``/``rtol`` None: the defaults (:func:`default_tolerances`, with ``noise_floor``).
    The check records ``noise_floor`` and ``err_over_noise`` (None when the floor is 0 or unknown).
    """
    check = _compare(name, reference, candidate, atol, rtol, noise_floor)
    check.noise_floor = noise_floor
    if noise_floor is not None and noise_floor > 0 and math.isfinite(noise_floor):
        check.err_over_noise = check.max_abs_err / noise_floor
    return check


def _compare(
    name: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    atol: float | None,
    rtol: float | None,
    noise_floor: float | None,
) -> OutputCheck:
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
    d_atol, d_rtol = default_tolerances(
        dtype, reference.astype(np.float64) if reference.size else reference, noise_floor
    )
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
    return _compare_floats(name, reference, candidate, atol, rtol)


def _compare_floats(
    name: str, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float
) -> OutputCheck:
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
        reference.dtype.name,
        [int(d) for d in reference.shape],
        mismatches == 0,
        max_abs,
        max_rel,
        atol,
        rtol,
        min_atol,
        min_rtol,
        mismatches,
    )


def worst(a: OutputCheck, b: OutputCheck) -> OutputCheck:
    """The check to report of two runs: a failure before a pass, else the larger error."""
    if a.passed != b.passed:
        return a if not a.passed else b
    return a if a.max_abs_err >= b.max_abs_err else b


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


def describe_error(verification: Verification) -> str:
    """How the error compares with the noise, for a final line: ``"max abs err 3.1e-06 = 0.8
    noise floors"`` (the output whose error is the most floors; without floors, the largest
    error and why there is no ratio). Empty when no output was compared."""
    outputs = verification.outputs
    if not outputs:
        return ""
    ratios = [o for o in outputs if o.err_over_noise is not None]
    if ratios:
        o = max(ratios, key=lambda c: c.err_over_noise or 0.0)
        return f"max abs err {_figure(o.max_abs_err)} = {_figure(o.err_over_noise or 0.0)} noise floors"
    o = max(outputs, key=lambda c: c.max_abs_err)
    why = "noise floor 0" if o.noise_floor == 0 else "noise floor not measured"
    return f"max abs err {_figure(o.max_abs_err)} ({why})"


def _figure(x: float) -> str:
    return "0" if x == 0 else "inf" if math.isinf(x) else f"{x:.2g}"
