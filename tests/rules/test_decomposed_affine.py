"""``decomposed_affine``: layer -> Mul(m) [-> Add(a)], a BN an exporter decomposed."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_builders import (
    F32,
    GraphBuilder,
    check_model,
    count_ops,
)
from pattern_checks import assert_pattern, assert_skipped, conv_chain, fold, rnd


@pytest.mark.parametrize(
    "mshape,ashape", [((4, 1, 1), (4, 1, 1)), ((1, 4, 1, 1), (1, 4, 1, 1)), ((), (4, 1, 1)), ((4, 1, 1), ())]
)
def test_decomposed_mul_add(mshape: tuple[int, ...], ashape: tuple[int, ...]) -> None:
    model, feeds = conv_chain(ops=[("mul", mshape), ("add", ashape)])
    assert_pattern(model, feeds, ["decomposed_affine"], gone=["Mul", "Add"])


def test_decomposed_mul_add_then_bn() -> None:
    model, feeds = conv_chain(ops=[("mul", (4, 1, 1)), ("add", (4, 1, 1)), ("bn", None)], bias=False)
    assert_pattern(
        model, feeds, ["decomposed_affine", "bn_after_chain"], gone=["Mul", "Add", "BatchNormalization"]
    )


def test_decomposed_mul_only_and_bad_add_kept() -> None:
    model, feeds = conv_chain(ops=[("mul", (4, 1, 1)), ("add", (1, 4, 5, 5))])
    folded = assert_pattern(model, feeds, ["decomposed_affine"], gone=["Mul"])
    assert count_ops(folded, "Add") == 1


def test_decomposed_gemm_mul_add() -> None:
    rng = np.random.default_rng(3)
    gb = GraphBuilder()
    gb.input("X", F32, [3, 5])
    gb.const("W", rnd(rng, (4, 5), 0.4))
    gb.const("C", rnd(rng, (4,)))
    gb.node("Gemm", ["X", "W", "C"], ["g"], name="gemm", transB=1, alpha=0.5, beta=2.0)
    gb.const("m", rnd(rng, (1, 4)))
    gb.node("Mul", ["m", "g"], ["gm"], name="mul")  # constant first: Mul commutes
    gb.const("a", rnd(rng, (4,)))
    gb.node("Add", ["gm", "a"], ["Y"], name="add")
    gb.output("Y", F32, [3, 4])
    assert_pattern(gb.model(17), {"X": rnd(rng, (3, 5))}, ["decomposed_affine"], gone=["Mul", "Add"])


def test_skip_decomposed_mul_not_per_channel() -> None:
    model, _ = conv_chain(ops=[("mul", (1, 4, 5, 5)), ("add", (4, 1, 1))])
    assert_skipped(model, "broadcast", op="Mul")


def test_decomposed_mul_shared_conv_output_untouched() -> None:
    model, _ = conv_chain(ops=[("mul", (4, 1, 1)), ("add", (4, 1, 1))])
    model.graph.node.append(helper.make_node("Relu", ["c0"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    check_model(model)
    folded, report = fold(model)
    assert not report.folded and not report.skipped and not report.skipped_affine  # not a decomposed BN
    assert folded.SerializeToString() == model.SerializeToString()


def test_mul_of_activations_ignored() -> None:
    model, _ = conv_chain(ops=[("mul", (4, 1, 1))])
    model.graph.node[-1].input[1] = "c0"  # x * x: not a constant scale
    folded, report = fold(model)
    assert not report.folded and not report.skipped and not report.skipped_affine
