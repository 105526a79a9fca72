"""Pure numpy math for folding an inference-mode BatchNormalization into the layer before it.

BatchNormalization in inference mode is, per channel ``c``::

    y_c = s_c * x_c + t_c,   s_c = gamma_c / sqrt(var_c + eps),   t_c = beta_c - s_c * mean_c

A layer ``x = W * a + b`` whose output channel ``c`` depends only on the weight slice for ``c``
absorbs it exactly::

    W'_c = s_c * W_c,        b'_c = s_c * b_c + t_c

All arithmetic runs in float64 and every result is rounded once into the dtype of the tensor it
replaces (round to nearest, ties to even), so a folded model never changes a tensor's dtype.
Nothing here knows about ONNX or torch: inputs and outputs are numpy arrays.

Other exact affine folds built on the same map:

* a per-channel constant ``a`` added between the layer and the BN (``Conv -> Add -> BN``) or a
  decomposed BN (``Conv -> Mul(m) -> Add(a)``) compose into one affine map first
  (:func:`compose_add`, :func:`affine_of`), so the layer is still rounded once;
* a BN *before* a layer with no padding (:func:`fold_conv_input`, :func:`fold_gemm_input`)::

      W'[o, i, k] = W[o, i, k] * s[g*Cin_g + i],   b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[g*Cin_g + i]

  (``g`` the group of output channel ``o``); for a Gemm after ``Flatten(axis=1)`` each channel
  covers ``HW`` consecutive features: ``B'[k, n] = s[k // HW] * B[k, n]``,
  ``C' = beta * C + alpha * sum_k t[k // HW] * B[k, n]``;
* a dequantized weight ``W = (q - zp) * scale`` with a per-output-channel scale:
  ``scale' = s * scale`` (:func:`fold_dequantized_scale`), the integers ``q`` untouched;
* a standalone BN as ``y = s * x + t`` with ``s``, ``t`` rounded once (:func:`affine_constants`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import FoldError
from .rounding import is_bfloat16, round_to_dtype

__all__ = [
    "BNAffine",
    "bn_affine",
    "fold_conv",
    "fold_conv_transpose",
    "fold_conv_many",
    "fold_gemm",
    "scale_output_channels",
    "channel_vector",
    "compose_add",
    "fold_constant",
    "compose_affine",
    "affine_of",
    "fold_conv_input",
    "fold_gemm_input",
    "fold_dequantized_scale",
    "affine_constants",
    "fold_bias",
]


@dataclass(frozen=True)
class BNAffine:
    """The per-channel affine map ``y = scale * x + shift`` of an inference BN, in float64."""

    scale: np.ndarray
    shift: np.ndarray


def _as_f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def bn_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> BNAffine:
    """The BN's affine map in float64.

    Raises FoldError with code ``param_shape`` unless all four parameters are 1-D of one length,
    ``non_finite`` if any is NaN/Inf, ``invalid_variance`` unless ``var + eps`` is finite and > 0.
    """
    params = [np.asarray(p) for p in (gamma, beta, mean, var)]
    shapes = {p.shape for p in params}
    if len(shapes) != 1 or params[0].ndim != 1:
        raise FoldError(
            "param_shape",
            "BN parameters must be 1-D of one length, got shapes "
            + ", ".join(str(list(p.shape)) for p in params),
        )
    stacked = np.array(params, dtype=np.float64)  # [4, C]: one conversion, one finiteness check
    g, b, m, v = stacked
    if not np.isfinite(stacked).all():
        label = next(n for n, p in zip(("scale", "bias", "mean", "var"), stacked) if not np.isfinite(p).all())
        raise FoldError("non_finite", f"BN {label} contains NaN or Inf")
    denom = v + float(epsilon)
    if not (np.isfinite(epsilon) and (denom > 0).all()):
        bad = int(np.sum(~(denom > 0)))
        raise FoldError("invalid_variance", f"var + epsilon is not positive for {bad} channel(s)")
    scale = g / np.sqrt(denom)
    return BNAffine(scale=scale, shift=b - scale * m)


def scale_output_channels(weight: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """``weight * scale`` broadcast along ``axis``, in float64 (not rounded)."""
    shape = [1] * weight.ndim
    shape[axis] = scale.shape[0]
    scaled: np.ndarray = _as_f64(weight) * scale.reshape(shape)
    return scaled


def _folded_bias(bias: np.ndarray | None, affine: BNAffine) -> np.ndarray:
    if bias is None:
        return affine.shift.copy()
    folded: np.ndarray = _as_f64(bias) * affine.scale + affine.shift
    return folded


def fold_bias(bias: np.ndarray | None, affine: BNAffine, dtype: np.dtype) -> np.ndarray:
    """``s * b + t`` (just ``t`` without a bias) rounded once to ``dtype``."""
    _check_finite("bias", bias)
    if bias is not None:
        _check_bias(bias, affine.scale.shape[0])
    return round_to_dtype(_folded_bias(bias, affine), dtype)


def _check_finite(label: str, arr: np.ndarray | None) -> None:
    if arr is None or not arr.size:
        return
    native = arr.dtype.kind == "f" or is_bfloat16(arr.dtype)
    if not np.isfinite(arr if native else _as_f64(arr)).all():
        raise FoldError("non_finite", f"{label} contains NaN or Inf")


def scale_and_round(weight: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """``weight * scale`` along ``axis``, computed in float64 and rounded once to weight's dtype.

    For float16/32/64 the product is formed in float64 and cast in one pass (numpy's ufunc
    buffering), without a full float64 copy of the weight; bfloat16 takes the exact two-step path
    of :func:`round_to_dtype`. Raises FoldError ``overflow`` like round_to_dtype.
    """
    if is_bfloat16(weight.dtype) or weight.dtype.kind != "f":
        return round_to_dtype(scale_output_channels(weight, scale, axis), weight.dtype)
    shape = [1] * weight.ndim
    shape[axis] = scale.shape[0]
    out = np.empty(weight.shape, dtype=weight.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(weight, scale.reshape(shape), out=out, dtype=np.float64, casting="same_kind")
    if out.size and not np.isfinite(out).all():
        raise FoldError("overflow", f"a folded value does not fit in {weight.dtype.name}")
    return out


def fold_conv(
    weight: np.ndarray, bias: np.ndarray | None, affine: BNAffine, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Fold into Conv: weight ``[Cout, Cin/group, *k]``, output channel axis 0.

    Returns ``(weight', bias')`` rounded to the dtypes of ``weight`` and ``bias`` (``weight``'s
    when there was no bias).
    """
    if weight.ndim < 3:
        raise FoldError("weight_shape", f"Conv weight must have rank >= 3, got {weight.ndim}")
    cout = weight.shape[0]
    if group < 1 or cout % group:
        raise FoldError("invalid_group", f"Conv output channels {cout} not divisible by group {group}")
    _check_channels(cout, affine)
    _check_bias(bias, cout)
    _check_finite("weight", weight)
    _check_finite("bias", bias)
    w = scale_and_round(weight, affine.scale, 0)
    b = round_to_dtype(_folded_bias(bias, affine), (bias if bias is not None else weight).dtype)
    return w, b


def fold_conv_many(
    weights: list[np.ndarray],
    biases: list[np.ndarray | None],
    params: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    epsilons: list[float],
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """``fold_conv(weights[k], biases[k], bn_affine(*params[k], epsilons[k]))`` for many pairs in
    a few whole-array operations, with bit-identical results.

    The caller guarantees the shapes: ``weights[k]`` float16/32/64 of rank >= 3 with ``C_k >= 1``
    output channels (axis 0), its bias None or ``[C_k]`` of the weight's dtype, the four BN
    parameters ``[C_k]`` floats. Entry ``k`` is None where :func:`bn_affine` or :func:`fold_conv`
    would raise FoldError (non-finite values, a non-positive variance, an overflow): the caller
    folds those one by one to get the reason.
    """
    n = len(weights)
    if n == 0:
        return []
    counts = np.fromiter((w.shape[0] for w in weights), dtype=np.int64, count=n)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    gamma, beta, mean, var = (np.concatenate([p[i] for p in params]).astype(np.float64) for i in range(4))
    eps = np.array(epsilons, dtype=np.float64)
    with np.errstate(all="ignore"):
        denom = var + np.repeat(eps, counts)
        scale = gamma / np.sqrt(denom)  # as bn_affine, element by element
        shift = beta - scale * mean
        valid = np.isfinite(gamma) & np.isfinite(beta) & np.isfinite(mean) & np.isfinite(var) & (denom > 0)
    ok = (np.add.reduceat(~valid, starts) == 0) & np.isfinite(eps)

    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n
    # pairs with one weight dtype and one row length (elements per output channel) are stacked
    # as rows [sum of C_k, row length] and scaled by broadcasting one factor per row
    groups: dict[tuple[np.dtype, int], list[int]] = {}
    for k in range(n):
        if ok[k]:
            w = weights[k]
            groups.setdefault((w.dtype, w.size // w.shape[0]), []).append(k)
    for (dtype, row), group in groups.items():
        chans = counts[group]
        c_starts = np.zeros(len(group), dtype=np.int64)
        np.cumsum(chans[:-1], out=c_starts[1:])
        rows = np.concatenate([weights[k].reshape(-1, row) for k in group])
        channel_scale = np.concatenate([scale[starts[k] : starts[k] + counts[k]] for k in group])
        folded = np.empty(rows.shape, dtype=dtype)
        with np.errstate(all="ignore"):  # as scale_and_round: float64 product, one rounding
            np.multiply(rows, channel_scale[:, None], out=folded, dtype=np.float64, casting="same_kind")
        # a non-finite product means a non-finite weight or an overflow: both refused by fold_conv
        w_ok = np.add.reduceat(~np.isfinite(folded).all(axis=1), c_starts) == 0
        channel_shift = np.concatenate([shift[starts[k] : starts[k] + counts[k]] for k in group])
        has_bias = np.repeat(
            np.fromiter((biases[k] is not None for k in group), dtype=bool, count=len(group)), chans
        )
        bias64 = np.concatenate(
            [
                biases[k].astype(np.float64) if biases[k] is not None else np.zeros(counts[k])  # type: ignore[union-attr]
                for k in group
            ]
        )
        with np.errstate(all="ignore"):  # as _folded_bias: s * b + t, or t itself without a bias
            new_bias = np.where(has_bias, bias64 * channel_scale + channel_shift, channel_shift)
            rounded = new_bias.astype(dtype)
        b_ok = np.add.reduceat(~(np.isfinite(rounded) & np.isfinite(bias64)), c_starts) == 0
        c0 = 0
        for j, k in enumerate(group):
            c1 = c0 + int(chans[j])
            if w_ok[j] and b_ok[j]:
                out[k] = (folded[c0:c1].reshape(weights[k].shape), rounded[c0:c1])
            c0 = c1
    return out


def fold_conv_transpose(
    weight: np.ndarray, bias: np.ndarray | None, affine: BNAffine, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Fold into ConvTranspose: weight ``[Cin, Cout/group, *k]``.

    Output channel ``g * Cout/group + j`` is produced by ``weight[g*Cin/group:(g+1)*Cin/group, j]``,
    so the weight is viewed as ``[group, Cin/group, Cout/group, *k]`` and scaled along axis 2.
    """
    if weight.ndim < 3:
        raise FoldError("weight_shape", f"ConvTranspose weight must have rank >= 3, got {weight.ndim}")
    cin, cout_g = weight.shape[0], weight.shape[1]
    if group < 1 or cin % group:
        raise FoldError("invalid_group", f"ConvTranspose input channels {cin} not divisible by group {group}")
    cout = cout_g * group
    _check_channels(cout, affine)
    _check_bias(bias, cout)
    _check_finite("weight", weight)
    _check_finite("bias", bias)
    grouped = weight.reshape((group, cin // group, cout_g) + weight.shape[2:])
    scale = affine.scale.reshape(group, cout_g)
    shape = (group, 1, cout_g) + (1,) * (weight.ndim - 2)
    w64 = _as_f64(grouped) * scale.reshape(shape)
    w = round_to_dtype(w64.reshape(weight.shape), weight.dtype)
    b = round_to_dtype(_folded_bias(bias, affine), (bias if bias is not None else weight).dtype)
    return w, b


def fold_gemm(
    b_matrix: np.ndarray,
    c: np.ndarray | None,
    affine: BNAffine,
    trans_b: bool,
    beta: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold into ``Y = alpha * A' @ B' + beta * C`` (output channel = column ``n`` of ``B'``).

    Returns ``(B', C')`` for a Gemm with the same ``alpha`` and ``beta = 1``:
    ``C' = beta * s * C + t`` (broadcast against ``[N]``; just ``t`` when there is no C).
    """
    if b_matrix.ndim != 2:
        raise FoldError("weight_shape", f"Gemm B must be 2-D, got rank {b_matrix.ndim}")
    n = b_matrix.shape[0] if trans_b else b_matrix.shape[1]
    _check_channels(n, affine)
    _check_finite("weight", b_matrix)
    _check_finite("bias", c)
    if c is not None and (c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n))):
        raise FoldError("bias_shape", f"Gemm C of shape {list(c.shape)} does not broadcast to [M, {n}]")
    w = scale_and_round(b_matrix, affine.scale, 0 if trans_b else 1)
    if c is None:
        c64 = affine.shift.copy()
        c_dtype = b_matrix.dtype
    else:
        c64 = float(beta) * _as_f64(c) * affine.scale + affine.shift
        c_dtype = c.dtype
    return w, round_to_dtype(c64, c_dtype)


def _check_channels(channels: int, affine: BNAffine) -> None:
    if affine.scale.shape[0] != channels:
        raise FoldError(
            "channel_mismatch",
            f"BN has {affine.scale.shape[0]} channels but the layer produces {channels}",
        )


def _check_bias(bias: np.ndarray | None, channels: int) -> None:
    if bias is not None and bias.shape != (channels,):
        raise FoldError("bias_shape", f"bias has shape {list(bias.shape)}, expected [{channels}]")


# ----------------------------------------------------------------------------------------------
# per-channel constants, composition, folds before a layer, dequantized weights
# ----------------------------------------------------------------------------------------------
def channel_vector(value: np.ndarray, channels: int, out_rank: int, axis: int = 1) -> np.ndarray:
    """The ``[channels]`` float64 vector of a constant that broadcasts exactly along ``axis`` of a
    rank-``out_rank`` tensor with ``channels`` channels there.

    Accepted: a scalar, or a tensor of rank <= ``out_rank`` that, right-aligned, is 1 on every axis
    but ``axis`` (where it is ``channels`` or 1): ``[C, 1, 1]`` or ``[1, C, 1, 1]`` for a 2-D conv
    output, ``[C]`` / ``[1, C]`` for ``[M, C]``. Anything else (a bigger rank, a spatial or batch
    extent) changes the output shape or is not per-channel: FoldError ``broadcast``.
    """
    v = np.asarray(value)
    shape = list(v.shape)
    if len(shape) > out_rank:
        raise FoldError(
            "broadcast", f"constant of shape {shape} has a higher rank than the output ({out_rank})"
        )
    padded = [1] * (out_rank - len(shape)) + shape
    for ax, d in enumerate(padded):
        if d != 1 and (ax != axis or d != channels):
            raise FoldError(
                "broadcast",
                f"constant of shape {shape} does not broadcast along the channel axis only "
                f"(expected 1s and {channels} at axis {axis} of a rank-{out_rank} output)",
            )
    _check_finite("constant", v)
    return (
        np.broadcast_to(_as_f64(v).reshape(-1), (channels,)).copy()
        if v.size == 1
        else _as_f64(v).reshape(channels)
    )


def fold_constant(value: np.ndarray, affine: BNAffine, axis: int, out_rank: int) -> np.ndarray:
    """``s * a + t`` for a constant ``a`` added to a rank-``out_rank`` output whose channels are on
    ``axis`` (``s``, ``t`` broadcast there), rounded once to ``a``'s dtype: an Add after a layer
    that keeps the BN's shift (``MatMul -> Add([M, N]) -> BN``). The result has the shape of ``a``
    broadcast against ``[C, 1, ..., 1]`` (from ``axis``); FoldError ``broadcast`` when ``a`` has a
    higher rank than the output or an extent other than 1 or ``C`` on ``axis``."""
    v = np.asarray(value)
    channels = affine.scale.shape[0]
    if v.ndim > out_rank:
        raise FoldError(
            "broadcast", f"constant of shape {list(v.shape)} has a higher rank than the output ({out_rank})"
        )
    padded = [1] * (out_rank - v.ndim) + list(v.shape)
    if padded[axis] not in (1, channels):
        raise FoldError(
            "broadcast",
            f"constant of shape {list(v.shape)} has {padded[axis]} entries on the channel axis, not {channels}",
        )
    _check_finite("constant", v)
    shape = (channels,) + (1,) * (out_rank - 1 - axis)
    folded: np.ndarray = _as_f64(v) * affine.scale.reshape(shape) + affine.shift.reshape(shape)
    return round_to_dtype(folded, v.dtype)


def compose_add(add: np.ndarray, affine: BNAffine) -> BNAffine:
    """``BN(z + a)`` as one affine map of ``z``: ``s * z + (s * a + t)`` (``a`` per channel)."""
    return BNAffine(scale=affine.scale, shift=affine.scale * _as_f64(add) + affine.shift)


def compose_affine(first: BNAffine, then: BNAffine) -> BNAffine:
    """``then(first(z))`` as one affine map: ``s2 * s1 * z + (s2 * t1 + t2)`` (float64)."""
    return BNAffine(scale=then.scale * first.scale, shift=then.scale * first.shift + then.shift)


def affine_of(mul: np.ndarray | None, add: np.ndarray | None, channels: int) -> BNAffine:
    """``z * m + a`` as a :class:`BNAffine` (per-channel float64 vectors; missing parts neutral)."""
    m = np.ones(channels) if mul is None else _as_f64(mul)
    a = np.zeros(channels) if add is None else _as_f64(add)
    return BNAffine(scale=m, shift=a)


def fold_conv_input(
    weight: np.ndarray, bias: np.ndarray | None, affine: BNAffine, group: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a BN on the *input* of an unpadded Conv (weight ``[Cout, Cin/group, *k]``).

    ``W'[o, i, k] = W[o, i, k] * s[c]``, ``b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[c]`` with
    ``c = g * Cin/group + i`` the input channel read by output channel ``o`` of group ``g``.
    Exact only when no output reads padding (the padded zeros would not get the shift ``t``);
    the caller checks that.
    """
    if weight.ndim < 3:
        raise FoldError("weight_shape", f"Conv weight must have rank >= 3, got {weight.ndim}")
    cout, cin_g = weight.shape[0], weight.shape[1]
    if group < 1 or cout % group:
        raise FoldError("invalid_group", f"Conv output channels {cout} not divisible by group {group}")
    _check_channels(cin_g * group, affine)
    _check_bias(bias, cout)
    _check_finite("weight", weight)
    _check_finite("bias", bias)
    cout_g = cout // group
    # per output channel o: the scale/shift of the input channels of its group, [Cout, Cin/group]
    grp = np.arange(cout) // cout_g
    cols = grp[:, None] * cin_g + np.arange(cin_g)[None, :]
    s = affine.scale[cols]
    t = affine.shift[cols]
    w64 = _as_f64(weight)
    extra = (1,) * (weight.ndim - 2)
    new_w = w64 * s.reshape(s.shape + extra)
    shift = np.sum(w64 * t.reshape(t.shape + extra), axis=tuple(range(1, weight.ndim)))
    b64 = shift if bias is None else _as_f64(bias) + shift
    w = round_to_dtype(new_w, weight.dtype)
    b = round_to_dtype(b64, (bias if bias is not None else weight).dtype)
    return w, b


def fold_gemm_input(
    b_matrix: np.ndarray,
    c: np.ndarray | None,
    affine: BNAffine,
    trans_b: bool,
    alpha: float,
    beta: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a BN on ``[N, C, *spatial]`` followed by ``Flatten(axis=1)`` into the Gemm after it
    (``transA = 0``). Returns ``(B', C')`` for the same ``alpha`` and ``beta = 1``.

    Feature ``k`` of the flattened input is channel ``k // HW`` with ``HW = K / C``.
    """
    if b_matrix.ndim != 2:
        raise FoldError("weight_shape", f"Gemm B must be 2-D, got rank {b_matrix.ndim}")
    k_dim = b_matrix.shape[1] if trans_b else b_matrix.shape[0]
    n = b_matrix.shape[0] if trans_b else b_matrix.shape[1]
    channels = affine.scale.shape[0]
    if channels == 0 or k_dim % channels:
        raise FoldError(
            "channel_mismatch",
            f"Gemm has {k_dim} input features, not a multiple of the BN's {channels} channels",
        )
    _check_finite("weight", b_matrix)
    _check_finite("bias", c)
    if c is not None and (c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n))):
        raise FoldError("bias_shape", f"Gemm C of shape {list(c.shape)} does not broadcast to [M, {n}]")
    hw = k_dim // channels
    s = np.repeat(affine.scale, hw)
    t = np.repeat(affine.shift, hw)
    b64 = _as_f64(b_matrix)
    bkn = b64.T if trans_b else b64
    new_b = scale_output_channels(b_matrix, s, 1 if trans_b else 0)
    shift = float(alpha) * (t @ bkn)  # [N]
    if c is None:
        c64 = shift
        c_dtype = b_matrix.dtype
    else:
        c64 = float(beta) * _as_f64(c) + shift
        c_dtype = c.dtype
    return round_to_dtype(new_b, b_matrix.dtype), round_to_dtype(c64, c_dtype)


def fold_dequantized_scale(scale: np.ndarray, affine: BNAffine) -> np.ndarray:
    """``scale' = scale * s`` for a weight ``(q - zp) * scale`` whose scale is per output channel
    (``[C]``) or per tensor (a scalar, returned as ``[C]``); rounded once to the scale's dtype.
    A negative ``s`` is fine: the integers are untouched, the sign moves into the scale."""
    channels = affine.scale.shape[0]
    sc = np.asarray(scale)
    if sc.ndim == 0:
        sc64 = np.full(channels, float(_as_f64(sc)))
    elif sc.shape == (channels,):
        sc64 = _as_f64(sc)
    else:
        raise FoldError("channel_mismatch", f"scale of shape {list(sc.shape)} for {channels} BN channels")
    _check_finite("scale", sc)
    return round_to_dtype(sc64 * affine.scale, sc.dtype)


def affine_constants(affine: BNAffine, rank: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` shaped ``[C, 1, ..., 1]`` for an input of ``rank`` (channel axis 1), rounded once
    to ``dtype``: the BN as ``Mul`` + ``Add``."""
    if rank < 2:
        raise FoldError("unknown_rank", f"BN input must have rank >= 2, got {rank}")
    shape = (affine.scale.shape[0],) + (1,) * (rank - 2)
    return (
        round_to_dtype(affine.scale.reshape(shape), dtype),
        round_to_dtype(affine.shift.reshape(shape), dtype),
    )
