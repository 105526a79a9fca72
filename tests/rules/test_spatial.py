"""``bn_after_spatial``: a BN folded into the layer before Resize, pools and ReduceMean, which stay
(checked in onnxruntime with optimizations off); kept for a negative scale before a MaxPool,
counted padding, a channel axis that is resized or reduced, a crop with an extrapolation value, a
Pad, and a second reader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import F32, GraphBuilder, add_bn, count_ops
from pattern_checks import assert_pattern, assert_skipped, rnd


def spatial(
    ops: Sequence[tuple[str, dict[str, Any], dict[str, np.ndarray]]],
    *,
    opset: int = 17,
    channels_out: int = 4,
    out_rank: int = 4,
    positive: bool = False,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X [2, 3, 6, 6] -> Conv(4) -> ops -> BN -> Y; each op ``(type, attributes, constant inputs
    by position name)``: inputs are ``[prev, *constants]`` (``""`` values skip an input)."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", F32, [2, 3, 6, 6])
    gb.node(
        "Conv",
        ["X", gb.const("W", rnd(rng, [4, 3, 3, 3], 0.3)), gb.const("Bc", rnd(rng, [4]))],
        ["c"],
        name="conv",
        pads=[1] * 4,
    )
    prev = "c"
    for i, (op, attrs, consts) in enumerate(ops):
        inputs = [prev]
        for key, value in consts.items():
            inputs.append("" if value is None else gb.const(f"{key}{i}", value))
        gb.node(op, inputs, [f"o{i}"], name=f"{op.lower()}{i}", **attrs)
        prev = f"o{i}"
    c = channels_out
    gamma = rng.uniform(0.5, 1.5, c) if positive else rng.normal(1.0, 0.5, c)
    gamma[0] = -abs(gamma[0]) if not positive else gamma[0]
    stats = {
        "scale": gamma,
        "B": rng.normal(0, 1, c),
        "mean": rng.normal(0, 1, c),
        "var": rng.uniform(0.5, 2, c),
    }
    add_bn(gb, prev, "Y", stats, dtype=F32, bn_opset=15, prefix="bn")
    gb.output("Y", F32, [None] * out_rank)
    return gb.model(opset), {"X": rnd(rng, [2, 3, 6, 6])}


F = np.float32
I64 = np.int64
RESIZE = [
    ("Resize", {"mode": "nearest"}, {"roi": None, "scales": np.array([1, 1, 2, 2], F)}),
    ("Resize", {"mode": "linear"}, {"roi": None, "scales": None, "sizes": np.array([2, 4, 9, 12], I64)}),
    (
        "Resize",
        {"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
        {"roi": None, "scales": np.array([1, 1, 1.5, 0.5], F)},
    ),
    (
        "Resize",
        {"mode": "linear", "antialias": 1, "axes": [2, 3]},
        {"roi": None, "scales": np.array([0.5, 0.5], F)},
    ),
]
POOLS = [
    ("GlobalAveragePool", {}, {}),
    ("ReduceMean", {"axes": [2, 3]}, {}),
    ("ReduceMean", {"axes": [0, -1]}, {}),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, {}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1] * 4}, {}),
    ("AveragePool", {"kernel_shape": [3, 3], "count_include_pad": 1}, {}),
]


@pytest.mark.parametrize("op", RESIZE + POOLS, ids=lambda o: f"{o[0]}-{sorted(o[1])}-{sorted(o[2])}")
def test_through(op: tuple[str, dict[str, Any], dict[str, np.ndarray]]) -> None:
    opset = 18 if "axes" in op[1] and op[0] == "Resize" else 17
    model, feeds = spatial([op], opset=opset)
    if op[0] == "ReduceMean":
        model = onnx.shape_inference.infer_shapes(model)
    folded = assert_pattern(model, feeds, ["bn_after_spatial"], gone=["BatchNormalization"])
    assert count_ops(folded, op[0]) == 1  # the op stays


def test_reduce_mean_without_keepdims_and_opset_18_axes() -> None:
    model, feeds = spatial(
        [("ReduceMean", {"keepdims": 0}, {"axes": np.array([2, 3], I64)})], opset=18, out_rank=2
    )
    assert_pattern(model, feeds, ["bn_after_spatial"], gone=["BatchNormalization"])


def test_upsample_opset_9() -> None:
    model, feeds = spatial(
        [("Upsample", {"mode": "nearest"}, {"scales": np.array([1, 1, 2, 2], F)})], opset=9
    )
    assert_pattern(model, feeds, ["bn_after_spatial"], gone=["BatchNormalization"])


@pytest.mark.parametrize("op", ["MaxPool", "GlobalMaxPool"])
def test_max_with_positive_scales_and_ops_along(op: str) -> None:
    attrs = {"kernel_shape": [3, 3], "pads": [1] * 4, "strides": [2, 2]} if op == "MaxPool" else {}
    model, feeds = spatial([(op, attrs, {}), ("Identity", {}, {}), ("Dropout", {}, {})], positive=True)
    folded = assert_pattern(model, feeds, ["bn_after_spatial"], gone=["BatchNormalization"])
    assert [n.op_type for n in folded.graph.node] == ["Conv", op, "Identity", "Dropout"]


def test_skip_negative_scale_before_max_pool() -> None:
    model, _ = spatial([("MaxPool", {"kernel_shape": [2, 2]}, {})])
    assert_skipped(model, "negative_scale")


def test_skip_average_pool_counting_padded_zeros() -> None:
    model, _ = spatial(
        [("AveragePool", {"kernel_shape": [3, 3], "pads": [1] * 4, "count_include_pad": 1}, {})]
    )
    assert_skipped(model, "padding")


def test_skip_resize_of_the_channels() -> None:
    model, _ = spatial(
        [("Resize", {"mode": "nearest"}, {"roi": None, "scales": np.array([1, 2, 1, 1], F)})], channels_out=8
    )
    assert_skipped(model, "channel_axis")


def test_skip_reduce_mean_over_the_channels() -> None:
    model, _ = spatial([("ReduceMean", {"axes": [1]}, {})], channels_out=1)
    assert_skipped(model, "channel_axis")


def test_skip_resize_crop_with_extrapolation() -> None:
    op = (
        "Resize",
        {
            "mode": "linear",
            "coordinate_transformation_mode": "tf_crop_and_resize",
            "extrapolation_value": 5.0,
        },
        {"roi": np.array([0, 0, -0.5, -0.5, 1, 1, 1.5, 1.5], F), "scales": np.array([1, 1, 2, 2], F)},
    )
    report = assert_skipped(spatial([op])[0], "unsupported_producer")
    assert "tf_crop_and_resize" in report.skipped[0].message


def test_skip_through_pad() -> None:
    model, _ = spatial(
        [
            ("Pad", {}, {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], I64)}),
            ("MaxPool", {"kernel_shape": [2, 2]}, {}),
        ],
        positive=True,
    )
    report = assert_skipped(model, "unsupported_producer")
    assert "Pad" in report.skipped[0].message


def test_skip_a_second_reader_of_the_layer() -> None:
    model, _ = spatial([("GlobalAveragePool", {}, {})])
    model.graph.node.append(helper.make_node("Relu", ["c"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "multiple_consumers")


def test_skip_a_value_on_the_way_that_is_a_graph_output() -> None:
    model, _ = spatial([("MaxPool", {"kernel_shape": [2, 2]}, {}), ("Identity", {}, {})], positive=True)
    model.graph.output.append(helper.make_tensor_value_info("o0", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "graph_output")
