"""``bn_before_linear``: a BN on a 2-D input before a Gemm or MatMul, or before Flatten -> MatMul,
folds into the layer after it (a MatMul becomes a Gemm); checked in onnxruntime with
optimizations off. Kept: Gemm transA=1, a Flatten of another axis; a MatMul over more axes is no
candidate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_builders import F32, GraphBuilder, count_ops
from pattern_checks import assert_pattern, assert_skipped, bn, rnd


def bn_linear(
    op: str = "Gemm",
    *,
    flatten: bool = False,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float | None = None,
    beta: float | None = None,
    c: bool = True,
    axis: int | None = None,
    rank: int = 2,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> BN(3) [-> Flatten(axis)] -> Gemm | MatMul(W) -> Y."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    xshape = [4, 3] if not flatten else [4, 3, 2, 2]
    if rank == 3:
        xshape = [4, 3, 3]
    gb.input("X", F32, xshape)
    bn(gb, "X", "b", 3, rng)
    x = "b"
    k = 3 if not flatten else (12 if axis in (None, 1) else 4)
    if flatten:
        gb.node("Flatten", ["b"], ["f"], name="flatten", axis=axis)
        x = "f"
    if trans_a:
        k = 4
    w_shape = [5, k] if trans_b else [k, 5]
    ins = [x, gb.const("W", rnd(rng, w_shape, 0.4))]
    if op == "Gemm" and c:
        ins.append(gb.const("C", rnd(rng, [5])))
    if op == "Gemm":
        gb.node(
            "Gemm",
            ins,
            ["Y"],
            name="layer",
            transA=trans_a or None,
            transB=trans_b or None,
            alpha=alpha,
            beta=beta,
        )
    else:
        gb.node("MatMul", ins, ["Y"], name="layer")
    gb.output("Y", F32, [None] * (3 if rank == 3 else 2))
    return gb.model(17), {"X": rnd(rng, xshape)}


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(trans_b=1), dict(alpha=0.5, beta=2.0), dict(c=False), dict(beta=0.0)],
    ids=["plain", "trans_b", "alpha_beta", "no_c", "beta_0"],
)
def test_bn_into_gemm(kw: dict) -> None:
    model, feeds = bn_linear("Gemm", **kw)
    assert_pattern(model, feeds, ["bn_before_linear"], gone=["BatchNormalization"])


@pytest.mark.parametrize("flatten", [False, True])
def test_bn_into_matmul_becomes_gemm(flatten: bool) -> None:
    model, feeds = bn_linear("MatMul", flatten=flatten)
    folded = assert_pattern(model, feeds, ["bn_before_linear"], gone=["BatchNormalization", "MatMul"])
    assert count_ops(folded, "Gemm") == 1


def test_skip_gemm_trans_a() -> None:
    model, _ = bn_linear("Gemm", trans_a=1)
    assert_skipped(model, "channel_axis")


def test_skip_flatten_of_another_axis_before_matmul() -> None:
    model, _ = bn_linear("MatMul", flatten=True, axis=2)
    assert_skipped(model, "channel_axis")


def test_a_matmul_over_three_axes_is_no_candidate() -> None:
    model, _ = bn_linear("MatMul", rank=3)
    assert_skipped(model, "no_producer")
