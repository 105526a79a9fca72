"""``bn_before``: BN -> unpadded Conv, BN -> Flatten -> Gemm."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import (
    GraphBuilder,
    initializer,
)
from pattern_checks import assert_pattern, assert_skipped, bn, bn_conv_model, bn_flatten_gemm

BN_CONV_CASES = {
    "dense": dict(),
    "no_bias": dict(bias=False),
    "grouped": dict(cin=4, cout=6, group=2),
    "depthwise": dict(cin=4, cout=4, group=4),
    "depthwise_multiplier": dict(cin=3, cout=6, group=3),
    "strided_valid": dict(strides=[2, 2], auto_pad="VALID", size=7),
    "zero_pads": dict(pads=[0, 0, 0, 0]),
    "after_relu": dict(relu_before=True),
    "1x1": dict(kernel=1),
}


@pytest.mark.parametrize("case", BN_CONV_CASES)
def test_bn_before_conv(case: str) -> None:
    model, feeds = bn_conv_model(**BN_CONV_CASES[case])
    assert_pattern(model, feeds, ["bn_before"], gone=["BatchNormalization"])


@pytest.mark.parametrize(
    "kw", [dict(pads=[1, 1, 1, 1]), dict(pads=[0, 0, 1, 0]), dict(auto_pad="SAME_UPPER")]
)
def test_skip_bn_before_padded_conv(kw: dict) -> None:
    model, _ = bn_conv_model(**kw)
    assert_skipped(model, "padding")


def test_skip_bn_before_conv_two_consumers() -> None:
    model, _ = bn_conv_model()
    model.graph.node.append(helper.make_node("Relu", ["b"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "no_producer")


def test_bn_before_conv_then_bn_after() -> None:
    model, feeds = bn_conv_model()
    rng = np.random.default_rng(5)
    conv = [n for n in model.graph.node if n.op_type == "Conv"][0]
    conv.output[0] = "z"
    gb = GraphBuilder()
    bn(gb, "z", "Y", 6, rng, prefix="bn2")
    model.graph.node.extend(gb.nodes)
    model.graph.initializer.extend(gb.initializers)
    assert_pattern(model, feeds, ["bn_before", "bn_after_chain"], gone=["BatchNormalization"])


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(trans_b=1),
        dict(c_shape=None),
        dict(alpha=0.5, beta=1.5),
        dict(c_shape=(2, 5), beta=-1.0),
        dict(hw=()),
        dict(hw=(3,), trans_b=1),
        dict(beta=0.0),
    ],
)
def test_bn_before_flatten_gemm(kw: dict) -> None:
    model, feeds = bn_flatten_gemm(**kw)
    assert_pattern(model, feeds, ["bn_before"], gone=["BatchNormalization"])


def test_skip_bn_before_flatten_axis_2() -> None:
    model, _ = bn_flatten_gemm(axis=2, hw=(2, 2), c=3)  # [2, 3, 2, 2] -> [6, 4]: mixes batch and channel
    model.graph.node[-1].input[1] = "B2"
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 5), np.float32), "B2"))
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "B"][0])
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "C"][0])
    model.graph.node[-1].input[2] = "C2"
    model.graph.initializer.append(numpy_helper.from_array(np.ones((5,), np.float32), "C2"))
    assert_skipped(model, "channel_axis")


def test_skip_bn_before_gemm_trans_a() -> None:
    model, _ = bn_flatten_gemm(hw=(), c=3, trans_a=1, c_shape=None)  # [2, 3] -> A' = [3, 2]
    model.graph.node[-1].input[1] = "B2"
    model.graph.initializer.append(numpy_helper.from_array(np.ones((2, 5), np.float32), "B2"))
    model.graph.initializer.remove([t for t in model.graph.initializer if t.name == "B"][0])
    assert_skipped(model, "channel_axis")


def test_bn_before_conv_shared_weight_copy_on_write() -> None:
    model, feeds = bn_conv_model(bias=False)
    # a second Conv on the same weight, without a BN before it: its weight must not change
    model.graph.node.append(helper.make_node("Conv", ["X", "W"], ["Y2"], name="conv2"))
    model.graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [None] * 4))
    folded = assert_pattern(model, feeds, ["bn_before"], gone=["BatchNormalization"])
    np.testing.assert_array_equal(initializer(folded, "W"), initializer(model, "W"))
    conv = [n for n in folded.graph.node if n.name == "conv"][0]
    assert conv.input[1] != "W" and conv.input[0] == "X"
