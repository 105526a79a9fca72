"""``sum_of_layers``: Add(layer, layer) -> BN, the scale into both weights and the shift into one
bias (checked in onnxruntime with optimizations off); an identity summand or a shared layer output
keeps the BN."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import F32, GraphBuilder, count_ops
from pattern_checks import assert_pattern, assert_skipped, bn, rnd


def sum_bn(
    *,
    bias: tuple[bool, bool] = (True, False),
    kernels: tuple[int, int] = (3, 1),
    gemm: bool = False,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> Conv(k0) + Conv(k1) (or two Gemms) -> Add -> BN -> Y."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    xshape = [3, 5] if gemm else [2, 3, 5, 5]
    gb.input("X", F32, xshape)
    c = 4
    for i in range(2):
        if gemm:
            ins = ["X", gb.const(f"W{i}", rnd(rng, [5, c], 0.3))]
        else:
            k = kernels[i]
            ins = ["X", gb.const(f"W{i}", rnd(rng, [c, 3, k, k], 0.3))]
        if bias[i]:
            ins.append(gb.const(f"B{i}", rnd(rng, [c])))
        if gemm:
            gb.node("Gemm", ins, [f"l{i}"], name=f"layer{i}")
        else:
            gb.node("Conv", ins, [f"l{i}"], name=f"layer{i}", pads=[kernels[i] // 2] * 4)
    gb.node("Add", ["l0", "l1"], ["sum"], name="add")
    bn(gb, "sum", "Y", c, rng)
    gb.output("Y", F32, [None] * len(xshape))
    return gb.model(17), {"X": rnd(rng, xshape)}


@pytest.mark.parametrize("bias", [(True, False), (False, True), (True, True), (False, False)])
def test_repvgg_style_sum(bias: tuple[bool, bool]) -> None:
    model, feeds = sum_bn(bias=bias)
    folded = assert_pattern(model, feeds, ["sum_of_layers"], gone=["BatchNormalization"])
    assert count_ops(folded, "Conv") == 2 and count_ops(folded, "Add") == 1


def test_sum_of_gemms() -> None:
    model, feeds = sum_bn(gemm=True)
    assert_pattern(model, feeds, ["sum_of_layers"], gone=["BatchNormalization"])


def test_skip_identity_summand() -> None:
    model, _ = sum_bn(kernels=(3, 1))
    add = next(n for n in model.graph.node if n.op_type == "Add")
    add.input[1] = "X"  # a residual: X has 3 channels, so make the layer output 3 as well
    model = _three_channels(model)
    report = assert_skipped(model, "identity_summand")
    assert "graph input" in report.skipped[0].message


def test_skip_summand_from_an_activation_names_it() -> None:
    model, _ = sum_bn()
    layer1 = next(n for n in model.graph.node if n.name == "layer1")
    layer1.output[0] = "pre"
    model.graph.node.insert(2, helper.make_node("Relu", ["pre"], ["l1"], name="relu"))
    report = assert_skipped(model, "identity_summand")
    assert "Relu 'relu'" in report.skipped[0].message


def test_skip_a_layer_output_with_another_consumer() -> None:
    model, _ = sum_bn()
    model.graph.node.append(helper.make_node("Relu", ["l1"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "multiple_consumers")


def test_skip_a_layer_weight_that_is_not_constant() -> None:
    model, _ = sum_bn()
    w = next(t for t in model.graph.initializer if t.name == "W1")
    model.graph.initializer.remove(w)
    model.graph.input.append(helper.make_tensor_value_info("W1", TensorProto.FLOAT, list(w.dims)))
    report = assert_skipped(model, "weight_not_constant")
    assert "input 1" in report.skipped[0].message


def test_an_add_with_other_readers_stays_unsupported_producer() -> None:
    model, _ = sum_bn()
    model.graph.output.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "unsupported_producer")


def _three_channels(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make every 4-channel tensor of ``sum_bn`` 3-channel (conv weights and BN parameters)."""
    for t in model.graph.initializer:
        a = onnx.numpy_helper.to_array(t)
        if a.shape and a.shape[0] == 4:
            t.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(a[:3]), t.name))
    return model
