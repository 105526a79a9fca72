"""``bn_after_chain``: Conv -> BN -> BN, Conv -> Add -> BN, several BNs rounded once."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from pattern_checks import assert_pattern, assert_skipped, conv_chain

from bnfold.onnx.driver import fold_model


def test_conv_bn_bn() -> None:
    model, feeds = conv_chain(ops=[("bn", None), ("bn", None)])
    assert_pattern(model, feeds, ["bn_after", "bn_after_chain"], gone=["BatchNormalization"])


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (), (1,), (1, 1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_add_bn(shape: tuple[int, ...], bias: bool) -> None:
    model, feeds = conv_chain(ops=[("add", shape), ("bn", None)], bias=bias)
    assert_pattern(model, feeds, ["bn_after_chain"], gone=["BatchNormalization", "Add"])


@pytest.mark.parametrize("rank,shape", [(1, (4, 1)), (1, (1, 4, 1)), (3, (4, 1, 1, 1)), (3, (1, 4, 1, 1, 1))])
def test_conv_1d_3d_add_bn_and_decomposed(rank: int, shape: tuple[int, ...]) -> None:
    model, feeds = conv_chain(ops=[("add", shape), ("bn", None)], rank=rank, size=4)
    assert_pattern(model, feeds, ["bn_after_chain"], gone=["BatchNormalization", "Add"])
    model, feeds = conv_chain(ops=[("mul", shape), ("add", shape)], rank=rank, size=4)
    assert_pattern(model, feeds, ["decomposed_affine"], gone=["Mul", "Add"])


def test_skip_conv1d_add_with_2d_conv_shape_broadcast() -> None:
    # [4, 1, 1] on a 1-D conv output [2, 4, L] lines the 4 up with the batch axis
    model, _ = conv_chain(ops=[("add", (1, 1, 1)), ("bn", None)], rank=1)
    for t in model.graph.initializer:
        if t.name == "k0":
            t.CopyFrom(numpy_helper.from_array(np.ones((2, 1, 1), np.float32), "k0"))
    assert_skipped(model, "broadcast")


def test_conv_transpose_grouped_add_bn() -> None:
    model, feeds = conv_chain(
        ops=[("add", (6, 1, 1)), ("bn", None)], op="ConvTranspose", cin=4, cout=6, group=2
    )
    assert_pattern(model, feeds, ["bn_after_chain"], gone=["BatchNormalization", "Add"])


@pytest.mark.parametrize("shape", [(4,), (1, 4, 5, 5), (2, 4, 1, 1)])
def test_skip_conv_add_bn_not_per_channel_broadcast(shape: tuple[int, ...]) -> None:
    # [4] aligns with the width axis; [1,4,5,5] is per pixel; [2,4,1,1] is per sample
    model, _ = conv_chain(ops=[("add", shape), ("bn", None)], size=4 if shape == (4,) else 5)
    assert_skipped(model, "broadcast")


def test_skip_bn_after_residual_add_keeps_unsupported_producer() -> None:
    # pre-activation ResNet: Conv -> Add(residual) -> BN, the Add's output also used elsewhere
    model, _ = conv_chain(ops=[("add", (4, 1, 1)), ("bn", None)], cin=4)
    add = [n for n in model.graph.node if n.op_type == "Add"][0]
    add.input[1] = "X"
    model.graph.node.append(helper.make_node("Relu", [add.output[0]], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "unsupported_producer")


def test_skip_conv_add_bn_conv_output_shared() -> None:
    model, _ = conv_chain(ops=[("add", (4, 1, 1)), ("bn", None)])
    model.graph.node.append(helper.make_node("Relu", ["c0"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "multiple_consumers")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("count", [2, 3])
def test_conv_then_several_bns_is_rounded_once(seed: int, count: int) -> None:
    """Conv -> BN -> BN (-> BN): the BNs fold in one step, so every folded weight and bias is
    within half an ulp of the float64 value computed here (one rounding); folding them one after
    the other would round the weights once per BN."""
    model, feeds = conv_chain(ops=[("bn", None)] * count, cout=16, seed=seed)
    assert_pattern(model, feeds, ["bn_after"] + ["bn_after_chain"] * (count - 1), gone=["BatchNormalization"])
    folded = copy.deepcopy(model)
    fold_model(folded)
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    w, b = values["W"], values["Bc"]
    for i in range(count):
        g, beta, mean, var = (values[f"bn{i}_{k}"] for k in ("scale", "B", "mean", "var"))
        node = next(n for n in model.graph.node if n.name == f"bn{i}")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        s = g / np.sqrt(var + eps)
        w = w * s.reshape(-1, 1, 1, 1)
        b = b * s + (beta - s * mean)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    got = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in folded.graph.initializer}
    for exact, name in ((w, conv.input[1]), (b, conv.input[2])):
        ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
        assert np.all(np.abs(got[name] - exact) <= 0.5 * ulp * (1 + 1e-6)), name
