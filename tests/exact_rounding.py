"""Exact rounding with rational arithmetic (``fractions``): the reference for every claim that a value
was rounded once, to nearest, ties to even.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)

# (significand bits incl. implicit, min normal exponent, max exponent)
FORMATS = {
    "float16": (11, -14, 15),
    "bfloat16": (8, -126, 127),
    "float32": (24, -126, 127),
}


def exact_round(x: float, fmt: str) -> float:
    """Round the float64 ``x`` to the nearest value of ``fmt`` (ties to even), exactly."""
    p, emin, emax = FORMATS[fmt]
    if x == 0:
        return x
    fx = Fraction(x)
    sign = -1 if fx < 0 else 1
    ax = abs(fx)
    e = math.floor(math.log2(ax))
    # fix possible off-by-one of log2 on float64 inputs
    while Fraction(2) ** e > ax:
        e -= 1
    while Fraction(2) ** (e + 1) <= ax:
        e += 1
    e = max(e, emin)
    q = Fraction(2) ** (e - p + 1)
    m = ax / q
    lo = math.floor(m)
    frac = m - lo
    if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and lo % 2 == 1):
        lo += 1
    r = lo * q
    largest = (2 - Fraction(2) ** (1 - p)) * Fraction(2) ** emax
    if r > largest:
        return sign * math.inf
    return sign * float(r)
