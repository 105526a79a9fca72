"""Rounding float64 results once into a tensor's dtype (nearest, ties to even), bfloat16 included."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import FoldError

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype: np.dtype) -> bool:
    """True for bfloat16."""
    return bool(dtype == _BFLOAT16)


def round_to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round float64 ``values`` once to ``dtype`` (nearest, ties to even).

    numpy rounds float64 to float32/float16 directly and correctly. bfloat16 is rounded here, with
    integer bit arithmetic, whatever the installed ml_dtypes does (releases before 0.7 rounded
    float64 -> bfloat16 twice, through float32; see :func:`_to_bfloat16`).
    Raises FoldError ``overflow`` when a finite value does not fit the dtype.
    """
    dtype = np.dtype(dtype)
    values = np.asarray(values).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = _to_bfloat16(values, dtype) if is_bfloat16(dtype) else values.astype(dtype)
    if out.size and not np.isfinite(out).all():
        raise FoldError(
            "overflow",
            f"a folded value does not fit in {dtype.name} (largest |value| "
            f"{float(np.max(np.abs(values))):.6g})",
        )
    return out


def _to_bfloat16(exact: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 -> bfloat16 correctly rounded (nearest, ties to even), via float32 rounded to odd.

    float32 has 16 more significand bits than bfloat16 and the same exponent range, so rounding
    float64 to float32 *to odd* (truncate toward zero, then set the last bit if anything was
    lost) and then float32 to bfloat16 to nearest-even equals a single correct rounding. Values
    beyond float32's range truncate to float32's largest finite value, which still rounds to
    infinity in bfloat16, as the exact value would. The float32 -> bfloat16 step is integer
    arithmetic on the bits (add half an ulp minus one plus the kept last bit, then truncate), so
    no library's conversion is involved; ml_dtypes only names the dtype.
    """
    f32 = np.asarray(exact.astype(np.float32))  # nearest-even; may be inf past float32's range
    back = f32.astype(np.float64)
    inexact = back != exact
    # truncate toward zero where float32 rounding went away from zero
    away = inexact & (np.abs(back) > np.abs(exact))
    f32 = np.where(away, np.nextafter(f32, np.float32(0)), f32)
    bits = (f32.view(np.uint32) | inexact.astype(np.uint32)).astype(np.uint64)
    # nearest, ties to even: a carry out of the significand moves to the next binade (or to inf)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    # a NaN keeps its sign and stays a (quiet) NaN instead of carrying into the sign bit
    rounded = np.where(np.isnan(f32), (bits >> 16) | 0x0040, rounded)
    result: np.ndarray = rounded.astype(np.uint16).view(dtype)
    return result
