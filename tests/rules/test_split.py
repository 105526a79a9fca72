"""``split``: layer -> Split along channels -> BN on a part folds into that channel range (checked
in onnxruntime with optimizations off; the Split stays); kept for another split axis, a layer
output read elsewhere, a part that is also a graph output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import F32, GraphBuilder, count_ops
from pattern_checks import assert_pattern, assert_skipped, bn, rnd


def split_bn(
    sizes: Sequence[int] | None = (2, 4),
    *,
    parts: int = 2,
    bn_on: Sequence[int] = (0, 1),
    axis: int = 1,
    opset: int = 17,
    bias: bool = True,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X [2, 3, 5, 5] -> Conv(6) -> Split(axis, sizes) -> a BN on each part in ``bn_on`` -> outputs."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", F32, [2, 3, 5, 5])
    ins = ["X", gb.const("W", rnd(rng, [6, 3, 3, 3], 0.3))] + (
        [gb.const("Bc", rnd(rng, [6]))] if bias else []
    )
    gb.node("Conv", ins, ["c"], name="conv", pads=[1] * 4)
    n = len(sizes) if sizes is not None else parts
    outs = [f"s{i}" for i in range(n)]
    if sizes is not None and opset >= 13:
        gb.node("Split", ["c", gb.const("sizes", np.array(sizes, np.int64))], outs, name="split", axis=axis)
    else:
        gb.node(
            "Split", ["c"], outs, name="split", axis=axis, split=list(sizes) if sizes is not None else None
        )
    for i in range(n):
        width = (sizes[i] if sizes is not None else 6 // parts) if axis == 1 else 6
        if i in bn_on:
            bn(gb, f"s{i}", f"y{i}", width, rng, prefix=f"bn{i}")
            gb.output(f"y{i}", F32, [None] * 4)
        else:
            gb.output(f"s{i}", F32, [None] * 4)
    return gb.model(opset), {"X": rnd(rng, [2, 3, 5, 5])}


@pytest.mark.parametrize("bias", [True, False])
def test_each_part_folds_into_its_channels(bias: bool) -> None:
    model, feeds = split_bn(bias=bias)
    folded = assert_pattern(model, feeds, ["split", "split"], gone=["BatchNormalization"])
    assert count_ops(folded, "Split") == 1


def test_even_split_with_one_part_normalized() -> None:
    model, feeds = split_bn(None, parts=3, bn_on=(1,))
    assert_pattern(model, feeds, ["split"], gone=["BatchNormalization"])


def test_split_attribute_before_opset_13() -> None:
    model, feeds = split_bn((4, 2), opset=11)
    assert_pattern(model, feeds, ["split", "split"], gone=["BatchNormalization"])


def test_skip_split_along_another_axis() -> None:
    model, _ = split_bn((2, 3), axis=2, bn_on=(0,))
    assert_skipped(model, "channel_axis")


def test_skip_layer_output_read_elsewhere() -> None:
    model, _ = split_bn(bn_on=(0,))
    model.graph.node.append(helper.make_node("Relu", ["c"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "multiple_consumers")


def test_skip_part_that_is_a_graph_output() -> None:
    model, _ = split_bn(bn_on=(0,))
    model.graph.output.append(helper.make_tensor_value_info("s0", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "graph_output")
