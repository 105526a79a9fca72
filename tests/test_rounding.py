"""Rounding float64 once into float16, bfloat16 and float32, checked against exact rational
arithmetic (nearest, ties to even), overflow refused."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from exact_rounding import BF16, FORMATS, exact_round

from bnfold.errors import FoldError
from bnfold.rounding import round_to_dtype

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BF16, "float32": np.dtype(np.float32)}


def _ties_and_neighbours(fmt: str, rng: np.random.Generator, n: int = 300) -> np.ndarray:
    """Values exactly halfway between two neighbours of ``fmt``, and one float64 ulp either side
    (the cases a double rounding through a wider format gets wrong), across normal and subnormal
    ranges, both signs."""
    p, emin, emax = FORMATS[fmt]
    out = []
    for _ in range(n):
        e = int(rng.integers(emin - p + 2, emax))  # includes subnormal scales
        e_eff = max(e, emin)
        q = 2.0 ** (e_eff - p + 1)
        m = int(rng.integers(2 ** (p - 1), 2**p)) if e >= emin else int(rng.integers(0, 2 ** (p - 1)))
        tie = (m + 0.5) * q
        if not np.isfinite(tie):
            continue
        for v in (tie, np.nextafter(tie, np.inf), np.nextafter(tie, -np.inf)):
            out += [v, -v]
    # the overflow threshold: largest + half an ulp (a tie that rounds to infinity) and below it
    largest = float((2 - Fraction(2) ** (1 - p)) * Fraction(2) ** emax)
    half_ulp = 2.0 ** (emax - p)
    thr = largest + half_ulp
    out += [largest, np.nextafter(thr, 0)]
    return np.array(out, dtype=np.float64)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "float32"])
def test_round_to_dtype_is_correctly_rounded_on_ties(fmt: str) -> None:
    rng = np.random.default_rng(1)
    values = _ties_and_neighbours(fmt, rng)
    got = round_to_dtype(values, DTYPES[fmt])
    assert got.dtype == DTYPES[fmt]
    expected = np.array([exact_round(float(v), fmt) for v in values])
    mismatch = got.astype(np.float64) != expected
    assert not mismatch.any(), list(zip(values[mismatch][:5], got[mismatch][:5], expected[mismatch][:5]))
    # signed zeros keep their sign
    assert np.array_equal(np.signbit(got.astype(np.float64)), np.signbit(expected))


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "float32"])
def test_round_to_dtype_random_values(fmt: str) -> None:
    rng = np.random.default_rng(2)
    p, emin, emax = FORMATS[fmt]
    # random float64 bit patterns with exponents inside the format's range
    values = rng.normal(0, 1, 2000) * 2.0 ** rng.integers(emin - p, emax - 1, 2000)
    got = round_to_dtype(values, DTYPES[fmt]).astype(np.float64)
    expected = np.array([exact_round(float(v), fmt) for v in values])
    assert np.array_equal(got, expected)


def _double_rounding_cases(n: int = 200) -> np.ndarray:
    """float64 values just above or below a bfloat16 tie by less than half a float32 ulp: rounding
    through float32 first lands exactly on the tie, and ties-to-even then picks the wrong side."""
    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        e = int(rng.integers(-120, 120))
        m = int(rng.integers(2**7, 2**8))
        tie = Fraction(2 * m + 1, 2**8) * Fraction(2) ** e  # halfway between two bfloat16 values
        # less than half a float32 ulp, away from the even neighbour that a tie would round to
        nudge = Fraction(2) ** (e - 30) * (1 if m % 2 == 0 else -1)
        v = float(tie + nudge)
        out += [v, -v]
    return np.array(out)


def test_bfloat16_double_rounding_cases_are_rounded_once() -> None:
    # independent of ml_dtypes: the expected values come from exact rational rounding, and the
    # test first shows that each value is one that a rounding through float32 gets wrong
    x = _double_rounding_cases()
    once = np.array([exact_round(float(v), "bfloat16") for v in x])
    twice = np.array([exact_round(exact_round(float(v), "float32"), "bfloat16") for v in x])
    assert (once != twice).all()
    got = round_to_dtype(x, BF16)
    assert got.dtype == BF16
    assert np.array_equal(got.astype(np.float64), once)
    # 1 + 2**-8 + 2**-30, the case written out: correctly rounded it is 1 + 2**-7 (not 1.0)
    y = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30)])
    assert list(round_to_dtype(y, BF16).astype(np.float64)) == [1 + 2**-7, -(1 + 2**-7)]


def test_bfloat16_rounding_keeps_nan_inf_and_signed_zero() -> None:
    from bnfold.rounding import _to_bfloat16  # round_to_dtype itself refuses non-finite results

    special = np.array([np.inf, -np.inf, 0.0, -0.0])
    got = _to_bfloat16(special, BF16).astype(np.float64)
    assert np.array_equal(got, special) and np.array_equal(np.signbit(got), np.signbit(special))
    # every NaN bit pattern of float32 (sign, quiet/signalling, largest payload) stays a NaN
    patterns = np.array(
        [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0xFFFFFFFF, 0x7FFFFFFF], dtype=np.uint32
    )
    nans = patterns.view(np.float32).astype(np.float64)
    out = _to_bfloat16(nans, BF16).view(np.uint16)
    assert ((out & 0x7F80) == 0x7F80).all() and (
        (out & 0x007F) != 0
    ).all()  # exponent all ones, fraction non-zero
    assert list(out >> 15) == [0, 1, 0, 1, 1, 0]  # the sign is kept


@pytest.mark.parametrize(
    ("fmt", "too_big"),
    [("float16", 65520.0), ("bfloat16", 3.4e38), ("bfloat16", 1e39), ("float32", 3.5e38)],
)
def test_overflow_raises_overflow(fmt: str, too_big: float) -> None:
    for v in (too_big, -too_big):
        with pytest.raises(FoldError) as e:
            round_to_dtype(np.array([1.0, v]), DTYPES[fmt])
        assert e.value.code == "overflow"


@pytest.mark.parametrize(
    ("fmt", "fits"), [("float16", 65519.99), ("bfloat16", 3.3961e38), ("float32", 3.4028235e38)]
)
def test_largest_values_below_threshold_round_to_max(fmt: str, fits: float) -> None:
    got = round_to_dtype(np.array([fits, -fits]), DTYPES[fmt])
    assert np.all(np.isfinite(got))
    assert got.astype(np.float64)[0] == exact_round(fits, fmt)
