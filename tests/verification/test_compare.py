"""bnfold.verification.compare: comparison semantics, tolerances and JSON-safe figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bnfold.verification import (
    compare,
    default_tolerances,
    jsonable,
)


def test_compare_passes_within_tolerance_and_reports_needed_tolerances() -> None:
    ref = np.array([1.0, -2.0, 0.0, 4.0], np.float32)
    cand = ref + np.array([1e-6, -2e-6, 0.0, 0.5], np.float32)
    c = compare("y", ref, cand, atol=0.1, rtol=0.0)
    assert not c.passed and c.mismatches == 1
    assert c.max_abs_err == pytest.approx(0.5)
    assert c.min_atol == pytest.approx(0.5)  # the smallest atol that passes with rtol 0
    assert c.min_rtol == pytest.approx((0.5 - 0.1) / 4.0)  # the smallest rtol that passes with atol 0.1
    assert compare("y", ref, cand, atol=c.min_atol, rtol=0.0).passed
    assert compare("y", ref, cand, atol=0.1, rtol=c.min_rtol * 1.0001).passed


def test_compare_nan_inf_and_zero_reference() -> None:
    ref = np.array([np.nan, np.inf, -np.inf, 0.0], np.float32)
    assert compare("y", ref, ref.copy(), atol=0.0, rtol=0.0).passed
    c = compare("y", ref, np.array([1.0, np.inf, -np.inf, 0.0], np.float32), atol=0.0, rtol=0.0)
    assert not c.passed and c.max_abs_err == math.inf
    c = compare("y", np.zeros(3, np.float32), np.array([0, 0, 1e-3], np.float32), atol=0.0, rtol=1.0)
    assert not c.passed and c.max_rel_err == math.inf and c.min_rtol == math.inf
    assert c.min_atol == pytest.approx(1e-3)


def test_compare_shape_dtype_and_integer_outputs() -> None:
    c = compare("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert not c.passed and "shape/dtype differ" in c.message
    c = compare("i", np.array([1, 2, 3]), np.array([1, 2, 5]))
    assert not c.passed and c.mismatches == 1 and c.max_abs_err == 2
    assert compare("b", np.array([True, False]), np.array([True, False])).passed


def test_default_tolerances_scale_with_output_magnitude() -> None:
    small = default_tolerances(np.dtype("float32"), np.array([0.5, -1.0]))
    large = default_tolerances(np.dtype("float32"), np.array([500.0, -1000.0]))
    assert large[0] == pytest.approx(1000 * small[0])
    assert small[1] == large[1] == 1e-4
    assert default_tolerances(np.dtype("float16"), np.array([1.0]))[1] == 1e-2
    assert default_tolerances(np.dtype("float32"), np.array([np.inf, 2.0]))[0] == pytest.approx(2e-4)


def test_jsonable_replaces_non_finite_numbers() -> None:
    data = {"a": math.inf, "b": [1.0, -math.inf, math.nan], "c": np.float32(2.5), "d": {"e": np.int64(3)}}
    out = jsonable(data)
    assert out == {"a": None, "b": [1.0, None, None], "c": 2.5, "d": {"e": 3}}
    json.dumps(out, allow_nan=False)
