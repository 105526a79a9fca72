"""``bn_after``: Conv / ConvTranspose / Gemm -> BN end to end, over geometries, opsets, epsilons and dtypes
(checks in tests/fold_checks.py)."""

from __future__ import annotations

import numpy as np
import pytest
from fold_checks import assert_folds, fold, ort_runnable
from onnx import helper, numpy_helper
from onnx_builders import (
    BF16,
    F16,
    F32,
    F64,
    assert_f64_equivalent,
    assert_ort_equivalent,
    check_model,
    conv_bn,
    gemm_bn,
    initializer,
    node_named,
    run_ort,
)

CONV_CASES = {
    "1d": dict(rank=1, size=7),
    "1d_no_bias": dict(rank=1, bias=False, size=6),
    "2d": dict(),
    "2d_no_bias": dict(bias=False),
    "3d": dict(rank=3, size=4, kernel=2),
    "3d_no_bias_grouped": dict(rank=3, size=4, kernel=[1, 2, 3], cin=4, cout=4, group=2, bias=False),
    "grouped": dict(cin=6, cout=9, group=3),
    "depthwise": dict(cin=5, cout=5, group=5),
    "depthwise_multiplier": dict(cin=3, cout=6, group=3),
    "dilated": dict(dilations=[2, 1], size=7),
    "strided": dict(strides=[2, 3], size=8),
    "pads_asymmetric": dict(pads=[0, 1, 2, 1]),
    "same_upper": dict(auto_pad="SAME_UPPER", strides=[2, 2], size=6),
    "same_lower": dict(auto_pad="SAME_LOWER", size=6, kernel=2),
    "valid": dict(auto_pad="VALID"),
    "everything_3d": dict(
        rank=3,
        cin=4,
        cout=8,
        group=2,
        strides=[1, 2, 1],
        dilations=[1, 1, 2],
        pads=[1, 0, 1, 0, 1, 1],
        size=5,
        kernel=2,
    ),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv(case: str) -> None:
    assert_folds(conv_bn(**CONV_CASES[case]))


CONV_T_CASES = {
    "1d": dict(rank=1, size=4),
    "2d": dict(),
    "2d_no_bias": dict(bias=False),
    "3d": dict(rank=3, size=3, kernel=2, strides=[2, 1, 2]),
    "grouped": dict(cin=4, cout=6, group=2),
    "grouped_no_bias_strided": dict(cin=6, cout=4, group=2, strides=[2, 2], bias=False),
    "depthwise": dict(cin=4, cout=4, group=4, strides=[2, 2]),
    "group3_3d": dict(rank=3, cin=3, cout=6, group=3, size=3, kernel=2),
    "output_padding": dict(strides=[2, 2], output_padding=[1, 0]),
    "pads": dict(pads=[1, 0, 0, 1], strides=[2, 2]),
    "dilated": dict(dilations=[2, 2]),
    "same_upper": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "valid": dict(auto_pad="VALID", strides=[2, 1]),
    "output_shape": dict(strides=[2, 2], output_shape=[10, 11]),
}


@pytest.mark.parametrize("case", CONV_T_CASES)
def test_conv_transpose(case: str) -> None:
    assert_folds(conv_bn(op="ConvTranspose", **CONV_T_CASES[case]))


def test_conv_transpose_grouped_in_float64_reference() -> None:
    """Grouped ConvTranspose checked against torch in float64 too (independent of ORT)."""
    assert_folds(conv_bn(op="ConvTranspose", cin=6, cout=9, group=3, strides=[2, 2]), f64=True)


GEMM_CASES = {
    "plain": dict(),
    "transB": dict(trans_b=1),
    "transA": dict(trans_a=1),
    "transA_transB": dict(trans_a=1, trans_b=1),
    "alpha": dict(alpha=0.5),
    "beta": dict(beta=2.5),
    "alpha_beta_negative": dict(alpha=-1.5, beta=-0.25),
    "beta_zero": dict(beta=0.0),
    "no_C": dict(c_shape=None),
    "no_C_alpha_transB": dict(c_shape=None, alpha=3.0, trans_b=1),
    "C_1xN": dict(c_shape=(1, 4)),
    "C_scalar": dict(c_shape=()),
    "C_1": dict(c_shape=(1,)),
    "C_MxN": dict(c_shape=(3, 4), beta=0.5),
    "C_Mx1": dict(c_shape=(3, 1)),
    "C_1x1": dict(c_shape=(1, 1)),
}


@pytest.mark.parametrize("case", GEMM_CASES)
def test_gemm(case: str) -> None:
    folded = assert_folds(gemm_bn(**GEMM_CASES[case]), f64=True)
    gemm = node_named(folded.graph, "gemm")
    beta = [a.f for a in gemm.attribute if a.name == "beta"]
    assert beta in ([], [1.0])


@pytest.mark.parametrize("opset", [6, 7, 9, 11, 13])
def test_gemm_old_opsets(opset: int) -> None:
    b = gemm_bn(bn_opset=min(opset, 9) if opset >= 7 else 6, opset=opset, trans_b=1, beta=0.5)
    folded = assert_folds(b, f64=True)
    if opset < 7:
        gemm = node_named(folded.graph, "gemm")
        assert helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "broadcast")) == 1


@pytest.mark.parametrize("bn_opset", [1, 6, 7, 9, 14, 15])
@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_bn_opsets(bn_opset: int, op: str) -> None:
    b = conv_bn(op=op, bn_opset=bn_opset, epsilon=1e-3, seed=bn_opset)
    folded = assert_folds(b)
    if bn_opset < 7:
        assert folded.ir_version == 3


@pytest.mark.parametrize("bn_opset", [1, 6, 7, 9, 14, 15])
def test_bn_opsets_gemm(bn_opset: int) -> None:
    assert_folds(gemm_bn(bn_opset=bn_opset, opset=bn_opset, c_shape=(4,)), f64=True)


@pytest.mark.parametrize("bn_opset", [6, 7, 9, 14, 15])
def test_missing_epsilon_defaults_to_1e_5(bn_opset: int) -> None:
    """Variances near zero make the epsilon visible: a wrong default fails numerically."""
    b = conv_bn(bn_opset=bn_opset, seed=3)
    for t in b.model.graph.initializer:
        if t.name == "bn_var":
            t.CopyFrom(numpy_helper.from_array(np.full(6, 1e-5, np.float32), "bn_var"))
    assert not any(a.name == "epsilon" for a in node_named(b.model.graph, "bn").attribute)
    assert_folds(b, f64=True)


@pytest.mark.parametrize("eps", [0.0, 1e-7, 1e-3, 0.5])
def test_epsilon_values(eps: float) -> None:
    assert_folds(conv_bn(epsilon=eps, seed=4), f64=True)


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_dtypes_conv(dtype: np.dtype, op: str) -> None:
    b = conv_bn(op=op, dtype=dtype, cin=4, cout=6, group=2)
    folded = assert_folds(b)
    assert initializer(folded, "W").dtype == dtype
    assert initializer(folded, "Bc").dtype == dtype


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
def test_dtypes_conv_no_bias(dtype: np.dtype) -> None:
    folded = assert_folds(conv_bn(dtype=dtype, bias=False))
    conv = node_named(folded.graph, "conv")
    assert initializer(folded, conv.input[2]).dtype == dtype


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
def test_dtypes_gemm(dtype: np.dtype) -> None:
    assert_folds(gemm_bn(dtype=dtype, trans_b=1), f64=True)


@pytest.mark.parametrize(
    ("x", "p", "m"),
    [
        (F16, F32, F32),
        (F32, F16, F16),
        (F16, F16, F32),
        (F32, F64, F64),
        (F16, F32, F64),
        (BF16, F32, F32),
        (F64, F32, F16),
        (BF16, F64, F16),
    ],
)
def test_bn15_mixed_param_dtypes(x: np.dtype, p: np.dtype, m: np.dtype) -> None:
    b = conv_bn(dtype=x, param_dtype=p, mean_dtype=m, bn_opset=15, opset=22 if x == BF16 else 17)
    ort_ok = ort_runnable(b)
    if ort_ok:
        try:
            run_ort(b.model, b.feeds)
        except Exception:
            ort_ok = False
    folded, report = fold(b.model)
    assert len(report.folded) == 1
    check_model(folded)
    assert initializer(folded, "W").dtype == x
    if ort_ok:
        assert_ort_equivalent(b.model, folded, b.feeds, x)
    assert_f64_equivalent(b.model, folded, b.feeds, x)


def test_float16_rounded_once_from_float64() -> None:
    """The folded float16 weight is the float64 product rounded once, not computed in float16."""
    b = conv_bn(dtype=F16, param_dtype=F32, seed=11)
    folded, _ = fold(b.model)
    w = initializer(b.model, "W").astype(np.float64)
    g, beta, m, v = (
        initializer(b.model, f"bn_{k}").astype(np.float64) for k in ("scale", "B", "mean", "var")
    )
    s = g / np.sqrt(v + np.float64(np.float32(1e-5)))
    np.testing.assert_array_equal(initializer(folded, "W"), (w * s[:, None, None, None]).astype(np.float16))
    bias = initializer(b.model, "Bc").astype(np.float64)
    np.testing.assert_array_equal(initializer(folded, "Bc"), (bias * s + beta - s * m).astype(np.float16))


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_constant_node_weights_and_params(op: str) -> None:
    b = conv_bn(op=op, weight_form="constant_node", param_form="constant_node")
    folded = assert_folds(b)
    # the BN's Constant nodes are gone, the weight/bias Constant nodes hold the folded values
    consts = [n.output[0] for n in folded.graph.node if n.op_type == "Constant"]
    assert sorted(consts) == ["Bc", "W"]
    assert not folded.graph.initializer


def test_constant_node_gemm() -> None:
    assert_folds(
        gemm_bn(weight_form="constant_node", param_form="constant_node", trans_b=1, c_shape=(1, 4)), f64=True
    )
