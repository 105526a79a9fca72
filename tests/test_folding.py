"""The folding math in isolation, against independent references: torch.nn.functional in float64
(conv / conv_transpose / linear followed by batch_norm), explicit numpy loops, and exact rational
arithmetic (tests/exact_rounding.py) for the single rounding into float16 / bfloat16 / float32."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from exact_rounding import BF16, exact_round

from bnfold.errors import FoldError
from bnfold.folding import (
    BNAffine,
    affine_constants,
    bn_affine,
    channel_vector,
    compose_add,
    fold_conv,
    fold_conv_input,
    fold_conv_transpose,
    fold_dequantized_scale,
    fold_gemm,
    fold_gemm_input,
    scale_output_channels,
)


def _stats(rng: np.random.Generator, c: int) -> tuple[np.ndarray, ...]:
    return (rng.normal(1, 0.5, c), rng.normal(0, 1, c), rng.normal(0, 1, c), rng.uniform(0.5, 2, c))


def test_bn_affine_matches_torch_batch_norm() -> None:
    rng = np.random.default_rng(0)
    g, b, m, v = _stats(rng, 7)
    eps = 1e-3
    aff = bn_affine(g, b, m, v, eps)
    assert aff.scale.dtype == np.float64 and aff.shift.dtype == np.float64
    x = torch.from_numpy(rng.normal(0, 1, (3, 7, 4)))
    ref = F.batch_norm(
        x,
        torch.from_numpy(m),
        torch.from_numpy(v),
        torch.from_numpy(g),
        torch.from_numpy(b),
        training=False,
        eps=eps,
    )
    got = x * torch.from_numpy(aff.scale)[:, None] + torch.from_numpy(aff.shift)[:, None]
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-13, atol=1e-13)


def test_bn_affine_mixed_dtypes_computed_in_float64() -> None:
    rng = np.random.default_rng(0)
    g, b, m, v = _stats(rng, 5)
    aff = bn_affine(
        g.astype(np.float16), b.astype(np.float16), m.astype(np.float32), v.astype(np.float32), 1e-5
    )
    exp_scale = g.astype(np.float16).astype(np.float64) / np.sqrt(
        v.astype(np.float32).astype(np.float64) + 1e-5
    )
    np.testing.assert_array_equal(aff.scale, exp_scale)


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ((np.ones(3), np.ones(3), np.ones(3), np.ones(4)), "param_shape"),
        ((np.ones((3, 1)), np.ones((3, 1)), np.ones((3, 1)), np.ones((3, 1))), "param_shape"),
        ((np.ones(()),) * 4, "param_shape"),
        ((np.array([1, np.nan]), np.ones(2), np.ones(2), np.ones(2)), "non_finite"),
        ((np.ones(2), np.array([np.inf, 0]), np.ones(2), np.ones(2)), "non_finite"),
        ((np.ones(2), np.ones(2), np.ones(2), np.array([1.0, -1.0])), "invalid_variance"),
        ((np.ones(2), np.ones(2), np.ones(2), np.array([1.0, -1e-5])), "invalid_variance"),
    ],
)
def test_bn_affine_refusals(params: tuple[np.ndarray, ...], code: str) -> None:
    with pytest.raises(FoldError) as e:
        bn_affine(*params, epsilon=1e-5)
    assert e.value.code == code


def test_bn_affine_nan_epsilon_refused() -> None:
    with pytest.raises(FoldError) as e:
        bn_affine(np.ones(2), np.ones(2), np.ones(2), np.ones(2), float("nan"))
    assert e.value.code == "invalid_variance"


def _bn_ref(y: torch.Tensor, g, b, m, v, eps) -> torch.Tensor:
    t = torch.from_numpy
    return F.batch_norm(y, t(m), t(v), t(g), t(b), training=False, eps=eps)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "group"), [(4, 6, 1), (4, 6, 2), (6, 6, 6), (3, 9, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_conv_matches_torch(rank: int, cin: int, cout: int, group: int, bias: bool) -> None:
    rng = np.random.default_rng(rank * 100 + cout + group)
    k = [3, 2, 2][:rank]
    w = rng.normal(0, 1, (cout, cin // group, *k))
    b = rng.normal(0, 1, cout) if bias else None
    g, beta, m, v = _stats(rng, cout)
    eps = 1e-5
    w2, b2 = fold_conv(w, b, bn_affine(g, beta, m, v, eps), group)
    assert w2.shape == w.shape and w2.dtype == w.dtype and b2.shape == (cout,) and b2.dtype == np.float64
    x = torch.from_numpy(rng.normal(0, 1, (2, cin, *([5] * rank))))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    ref = _bn_ref(
        conv(x, torch.from_numpy(w), None if b is None else torch.from_numpy(b), stride=1, groups=group),
        g,
        beta,
        m,
        v,
        eps,
    )
    got = conv(x, torch.from_numpy(w2), torch.from_numpy(b2), groups=group)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-11, atol=1e-11)


def test_fold_conv_explicit_loop() -> None:
    """A 1-D grouped conv written as loops over (out channel, in channel of its group, tap)."""
    rng = np.random.default_rng(5)
    cin, cout, group, k, length = 4, 6, 2, 3, 7
    w = rng.normal(0, 1, (cout, cin // group, k))
    b = rng.normal(0, 1, cout)
    g, beta, m, v = _stats(rng, cout)
    w2, b2 = fold_conv(w, b, bn_affine(g, beta, m, v, 1e-3), group)
    x = rng.normal(0, 1, (cin, length))

    def conv(w_: np.ndarray, b_: np.ndarray) -> np.ndarray:
        out = np.zeros((cout, length - k + 1))
        per_g = cout // group
        for o in range(cout):
            grp = o // per_g
            for ci in range(cin // group):
                for t in range(k):
                    out[o] += w_[o, ci, t] * x[grp * (cin // group) + ci, t : t + length - k + 1]
            out[o] += b_[o]
        return out

    y = conv(w, b)
    ref = (y - m[:, None]) / np.sqrt(v[:, None] + 1e-3) * g[:, None] + beta[:, None]
    np.testing.assert_allclose(conv(w2, b2), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "group"), [(4, 6, 1), (4, 6, 2), (6, 6, 6), (6, 4, 2), (3, 6, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_conv_transpose_matches_torch(rank: int, cin: int, cout: int, group: int, bias: bool) -> None:
    rng = np.random.default_rng(rank * 10 + cin + cout * 7 + group)
    k = [3, 2, 2][:rank]
    w = rng.normal(0, 1, (cin, cout // group, *k))
    b = rng.normal(0, 1, cout) if bias else None
    g, beta, m, v = _stats(rng, cout)
    w2, b2 = fold_conv_transpose(w, b, bn_affine(g, beta, m, v, 1e-5), group)
    assert w2.shape == w.shape
    x = torch.from_numpy(rng.normal(0, 1, (2, cin, *([4] * rank))))
    ct = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    ref = _bn_ref(
        ct(x, torch.from_numpy(w), None if b is None else torch.from_numpy(b), stride=2, groups=group),
        g,
        beta,
        m,
        v,
        1e-5,
    )
    got = ct(x, torch.from_numpy(w2), torch.from_numpy(b2), stride=2, groups=group)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-11, atol=1e-11)


def test_fold_conv_transpose_grouped_is_not_axis_1_of_the_whole_weight() -> None:
    """Guards the classic bug: scaling axis 1 of [Cin, Cout/g, k] with the first Cout/g scales."""
    w = np.ones((4, 1, 1))  # group 4, Cout 4, depthwise
    aff = BNAffine(scale=np.array([1.0, 2.0, 3.0, 4.0]), shift=np.zeros(4))
    w2, _ = fold_conv_transpose(w, None, aff, group=4)
    assert list(w2.reshape(-1)) == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("beta", [1.0, 0.5, -2.0, 0.0])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (), (3, 5), (3, 1), (1,), (1, 1)])
def test_fold_gemm_matches_linear(trans_b: bool, beta: float, c_shape: tuple[int, ...] | None) -> None:
    rng = np.random.default_rng(len(c_shape or ()) + int(trans_b))
    m_, k, n = 3, 4, 5
    bmat = rng.normal(0, 1, (n, k) if trans_b else (k, n))
    c = None if c_shape is None else rng.normal(0, 1, c_shape)
    g, bb, mean, var = _stats(rng, n)
    alpha = 0.75
    new_b, new_c = fold_gemm(bmat, c, bn_affine(g, bb, mean, var, 1e-5), trans_b, beta)
    assert new_b.shape == bmat.shape
    a = rng.normal(0, 1, (m_, k))
    w = bmat.T if trans_b else bmat
    y = alpha * F.linear(torch.from_numpy(a), torch.from_numpy(w.T)).numpy()
    if c is not None:
        y = y + beta * c
    ref = _bn_ref(torch.from_numpy(y), g, bb, mean, var, 1e-5).numpy()
    w2 = new_b.T if trans_b else new_b
    got = alpha * a @ w2 + new_c  # folded Gemm has beta = 1
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_fold_rounds_once_from_float64(dtype) -> None:
    """Every folded value equals the exact float64 product rounded once to the dtype."""
    rng = np.random.default_rng(9)
    dtype = np.dtype(dtype)
    fmt = dtype.name
    w = rng.normal(0, 1, (8, 3, 3, 3)).astype(dtype)
    b = rng.normal(0, 1, 8).astype(dtype)
    g, beta, m, v = (p.astype(np.float32) for p in _stats(rng, 8))
    aff = bn_affine(g, beta, m, v, 1e-5)
    w2, b2 = fold_conv(w, b, aff, 1)
    assert w2.dtype == dtype and b2.dtype == dtype
    exact_w = w.astype(np.float64) * aff.scale[:, None, None, None]
    exact_b = b.astype(np.float64) * aff.scale + aff.shift
    ref_w = np.array([exact_round(float(x), fmt) for x in exact_w.reshape(-1)]).reshape(w.shape)
    ref_b = np.array([exact_round(float(x), fmt) for x in exact_b])
    np.testing.assert_array_equal(w2.astype(np.float64), ref_w)
    np.testing.assert_array_equal(b2.astype(np.float64), ref_b)


def test_fold_keeps_dtypes_and_bias_takes_weight_dtype() -> None:
    aff = BNAffine(np.ones(2), np.ones(2))
    w2, b2 = fold_conv(np.ones((2, 1, 1), np.float16), None, aff)
    assert w2.dtype == np.float16 and b2.dtype == np.float16
    w2, b2 = fold_gemm(np.ones((3, 2), BF16), None, aff, False, 1.0)
    assert w2.dtype == BF16 and b2.dtype == BF16


def test_fold_overflow_in_float16() -> None:
    aff = BNAffine(np.array([1e5, 1.0]), np.zeros(2))
    with pytest.raises(FoldError) as e:
        fold_conv(np.ones((2, 1, 1), np.float16), None, aff)
    assert e.value.code == "overflow"
    aff = BNAffine(np.ones(2), np.array([7e4, 0.0]))  # the bias overflows
    with pytest.raises(FoldError) as e:
        fold_conv(np.ones((2, 1, 1), np.float16), np.zeros(2, np.float16), aff)
    assert e.value.code == "overflow"


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda a: fold_conv(np.ones((3, 1, 1)), None, a), "channel_mismatch"),
        (lambda a: fold_conv(np.ones((2, 1)), None, a), "weight_shape"),
        (lambda a: fold_conv(np.ones((2, 1, 1)), None, a, group=3), "invalid_group"),
        (lambda a: fold_conv(np.ones((2, 1, 1)), None, a, group=0), "invalid_group"),
        (lambda a: fold_conv(np.ones((2, 1, 1)), np.ones(3), a), "bias_shape"),
        (lambda a: fold_conv(np.ones((2, 1, 1)), np.ones((1, 2)), a), "bias_shape"),
        (lambda a: fold_conv(np.full((2, 1, 1), np.nan), None, a), "non_finite"),
        (lambda a: fold_conv_transpose(np.ones((2, 3, 1)), None, a), "channel_mismatch"),
        (lambda a: fold_conv_transpose(np.ones((3, 1, 1)), None, a, group=2), "invalid_group"),
        (lambda a: fold_conv_transpose(np.ones((2, 1)), None, a), "weight_shape"),
        (lambda a: fold_gemm(np.ones((4, 3)), None, a, False, 1.0), "channel_mismatch"),
        (lambda a: fold_gemm(np.ones((4, 2, 1)), None, a, False, 1.0), "weight_shape"),
        (lambda a: fold_gemm(np.ones((4, 2)), np.ones(3), a, False, 1.0), "bias_shape"),
        (lambda a: fold_gemm(np.ones((4, 2)), np.ones((1, 1, 2)), a, False, 1.0), "bias_shape"),
        (lambda a: fold_gemm(np.ones((4, 2)), np.array([np.inf, 1]), a, False, 1.0), "non_finite"),
    ],
)
def test_fold_refusals(call, code: str) -> None:
    aff = BNAffine(np.ones(2), np.zeros(2))
    with pytest.raises(FoldError) as e:
        call(aff)
    assert e.value.code == code


def test_scale_output_channels_axis() -> None:
    w = np.ones((2, 3))
    np.testing.assert_array_equal(
        scale_output_channels(w, np.array([1.0, 2.0, 3.0]), 1), [[1, 2, 3], [1, 2, 3]]
    )


def _affine(rng: np.random.Generator, c: int) -> BNAffine:
    return BNAffine(scale=rng.normal(1, 0.5, c), shift=rng.normal(0, 1, c))


@pytest.mark.parametrize(
    "shape,ok",
    [
        ((), True),
        ((1,), True),
        ((4, 1, 1), True),
        ((1, 4, 1, 1), True),
        ((1, 1, 1), True),
        ((4,), False),
        ((1, 4, 2, 2), False),
        ((2, 4, 1, 1), False),
        ((1, 1, 4, 1, 1), False),
        ((4, 1), False),
    ],
)
def test_channel_vector(shape: tuple[int, ...], ok: bool) -> None:
    v = np.arange(1, 1 + int(np.prod(shape)), dtype=np.float32).reshape(shape)
    if not ok:
        with pytest.raises(FoldError) as e:
            channel_vector(v, 4, 4, 1)
        assert e.value.code == "broadcast"
        return
    out = channel_vector(v, 4, 4, 1)
    # the same numbers as numpy broadcasting over a [2, 4, 3, 3] tensor, per channel
    ref = np.broadcast_to(v.astype(np.float64), (2, 4, 3, 3))[0, :, 0, 0]
    np.testing.assert_array_equal(out, ref)


def test_compose_add_is_bn_of_sum() -> None:
    rng = np.random.default_rng(0)
    aff = _affine(rng, 3)
    a = rng.normal(0, 1, 3)
    z = rng.normal(0, 1, (5, 3))
    got = compose_add(a, aff)
    np.testing.assert_allclose(
        z * got.scale + got.shift, (z + a) * aff.scale + aff.shift, rtol=1e-13, atol=1e-13
    )


@pytest.mark.parametrize("cin,cout,group,kernel", [(4, 6, 1, 3), (4, 6, 2, 3), (4, 4, 4, 1), (3, 6, 3, 2)])
def test_fold_conv_input_matches_torch(cin: int, cout: int, group: int, kernel: int) -> None:
    rng = np.random.default_rng(cin * 100 + group)
    w = rng.normal(0, 0.5, (cout, cin // group, kernel, kernel))
    b = rng.normal(0, 1, cout)
    aff = _affine(rng, cin)
    x = torch.from_numpy(rng.normal(0, 1, (2, cin, 5, 5)))
    xbn = x * torch.from_numpy(aff.scale).reshape(1, -1, 1, 1) + torch.from_numpy(aff.shift).reshape(
        1, -1, 1, 1
    )
    ref = F.conv2d(xbn, torch.from_numpy(w), torch.from_numpy(b), groups=group)
    nw, nb = fold_conv_input(w, b, aff, group)
    got = F.conv2d(x, torch.from_numpy(nw), torch.from_numpy(nb), groups=group)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(FoldError) as e:
        fold_conv_input(w, b, _affine(rng, cin + 1), group)
    assert e.value.code == "channel_mismatch"


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("c_shape", [None, (3,), (2, 3), ()])
def test_fold_gemm_input_matches_flattened_bn(trans_b: bool, c_shape: tuple[int, ...] | None) -> None:
    rng = np.random.default_rng(1)
    ch, hw, n = 4, 6, 3
    b = rng.normal(0, 1, (n, ch * hw) if trans_b else (ch * hw, n))
    c = None if c_shape is None else rng.normal(0, 1, c_shape)
    aff = _affine(rng, ch)
    alpha, beta = 0.7, -1.3
    x = rng.normal(0, 1, (2, ch, 2, 3))
    xbn = x * aff.scale.reshape(1, -1, 1, 1) + aff.shift.reshape(1, -1, 1, 1)
    bkn = b.T if trans_b else b
    ref = alpha * xbn.reshape(2, -1) @ bkn + (0 if c is None else beta * c)
    nb, nc = fold_gemm_input(b, c, aff, trans_b, alpha, beta)
    got = alpha * x.reshape(2, -1) @ (nb.T if trans_b else nb) + nc
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(FoldError) as e:
        fold_gemm_input(b, c, _affine(rng, 5), trans_b, alpha, beta)
    assert e.value.code == "channel_mismatch"


def test_fold_dequantized_scale_rounds_once() -> None:
    rng = np.random.default_rng(2)
    aff = _affine(rng, 5)
    per_channel = rng.uniform(0.001, 0.01, 5).astype(np.float32)
    got = fold_dequantized_scale(per_channel, aff)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (per_channel.astype(np.float64) * aff.scale).astype(np.float32))
    scalar = np.float32(0.004)
    got = fold_dequantized_scale(np.asarray(scalar), aff)
    np.testing.assert_array_equal(got, (np.float64(scalar) * aff.scale).astype(np.float32))
    with pytest.raises(FoldError):
        fold_dequantized_scale(np.ones(3, np.float32), aff)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_affine_constants_shapes(rank: int) -> None:
    aff = _affine(np.random.default_rng(3), 3)
    s, t = affine_constants(aff, rank, np.dtype(np.float16))
    assert s.shape == t.shape == (3,) + (1,) * (rank - 2) and s.dtype == np.float16
    with pytest.raises(FoldError):
        affine_constants(aff, 1, np.dtype(np.float32))
