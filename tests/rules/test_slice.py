"""``slice``: layer -> Slices along the channels -> BN on a part folds into that channel range
(checked in onnxruntime with optimizations off, and the folded tensors against float64 values
computed here; the Slices stay); kept for overlapping ranges, another axis, a step, computed
bounds, another reader of the layer output or of the part."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import F16, F32, F64, GraphBuilder, add_bn, bn_stats, count_ops, initializer, run_ort
from pattern_checks import assert_pattern, assert_rounded_once, assert_skipped, bn_affine64, rnd

END = 2**63 - 1  # what torch's exporter writes for "to the end"


def sliced(
    parts: Sequence[tuple[int, int]] = ((0, 3), (3, 8)),
    *,
    bn_on: Sequence[int] = (0, 1),
    opset: int = 17,
    layer: str = "Conv",
    axes: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    dtype: Any = F32,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> Conv(8) [N, 8, 4, 4] (or Gemm(8) [3, 8]) -> Slice(part) per part -> BN on each part
    in ``bn_on`` -> outputs. Slice-10+ takes inputs, Slice-1 (``opset`` < 10) attributes."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    if layer == "Conv":
        xshape, rank = [2, 3, 4, 4], 4
        ins = [
            "X",
            gb.const("W", rnd(rng, [8, 3, 3, 3], 0.3, dtype)),
            gb.const("Bc", rnd(rng, [8], 1.0, dtype)),
        ]
        gb.node("Conv", ins, ["c"], name="conv", pads=[1] * 4)
    else:
        xshape, rank = [3, 5], 2
        ins = ["X", gb.const("W", rnd(rng, [5, 8], 0.4, dtype)), gb.const("Bc", rnd(rng, [8], 1.0, dtype))]
        gb.node("Gemm", ins, ["c"], name="conv")
    gb.input("X", dtype, xshape)
    for i, (start, end) in enumerate(parts):
        ax = list(axes) if axes is not None else [1]
        if opset >= 10:
            bounds = [gb.const(f"{k}{i}", np.array(v, np.int64)) for k, v in (("st", [start]), ("en", [end]))]
            extra = [gb.const(f"ax{i}", np.array(ax, np.int64))]
            if steps is not None:
                extra.append(gb.const(f"sp{i}", np.array(steps, np.int64)))
            gb.node("Slice", ["c", *bounds, *extra], [f"s{i}"], name=f"slice{i}")
        else:
            gb.node("Slice", ["c"], [f"s{i}"], name=f"slice{i}", starts=[start], ends=[end], axes=ax)
        width = len(range(*slice(start, end).indices(8))) if ax == [1] else 8
        if i in bn_on:
            add_bn(
                gb,
                f"s{i}",
                f"y{i}",
                bn_stats(rng, width),
                dtype=dtype,
                bn_opset=min(opset, 15),
                prefix=f"bn{i}",
            )
            gb.output(f"y{i}", dtype, [None] * rank)
        else:
            gb.output(f"s{i}", dtype, [None] * rank)
    return gb.model(opset), {"X": rnd(rng, xshape, 1.0, dtype)}


def _check_ranges(
    model: onnx.ModelProto, folded: onnx.ModelProto, ranges: dict[int, tuple[int, int]]
) -> None:
    """Rows and bias entries of each range are the float64 fold rounded once; the rest unchanged."""
    layer = next(n for n in folded.graph.node if n.name == "conv")
    w, b = initializer(model, "W").astype(np.float64), initializer(model, "Bc").astype(np.float64)
    axis = 0 if layer.op_type == "Conv" else 1
    scale, shift = np.ones(8), np.zeros(8)
    for i, (start, end) in ranges.items():
        s, t = bn_affine64(model, f"bn{i}")
        scale[start:end], shift[start:end] = s, t
    shape = [1] * w.ndim
    shape[axis] = 8
    assert_rounded_once(initializer(folded, layer.input[1]), w * scale.reshape(shape), "weight")
    assert_rounded_once(initializer(folded, layer.input[2]), b * scale + shift, "bias")


@pytest.mark.parametrize("opset", [9, 11, 17])
def test_each_part_folds_into_its_channels(opset: int) -> None:
    model, feeds = sliced(opset=opset)
    folded = assert_pattern(model, feeds, ["slice", "slice"], gone=["BatchNormalization"])
    assert count_ops(folded, "Slice") == 2
    _check_ranges(model, folded, {0: (0, 3), 1: (3, 8)})


def test_negative_and_clamped_bounds_resolve_against_the_channels() -> None:
    model, feeds = sliced(((-5, END), (-100, -5)))  # [3, 8) and [0, 3)
    folded = assert_pattern(model, feeds, ["slice", "slice"], gone=["BatchNormalization"])
    _check_ranges(model, folded, {0: (3, 8), 1: (0, 3)})


def test_one_part_normalized_others_overlapping_each_other() -> None:
    # [2, 4) for the BN; [0, 2) and [4, 8) and [5, 7) read channels the BN leaves alone
    model, feeds = sliced(((0, 2), (2, 4), (4, 8), (5, 7)), bn_on=(1,))
    folded = assert_pattern(model, feeds, ["slice"], gone=["BatchNormalization"])
    _check_ranges(model, folded, {1: (2, 4)})


def test_the_folded_output_against_float64_by_hand() -> None:
    model, feeds = sliced(layer="Gemm")
    folded = assert_pattern(model, feeds, ["slice", "slice"], gone=["BatchNormalization"])
    x = feeds["X"].astype(np.float64)
    z = x @ initializer(model, "W").astype(np.float64) + initializer(model, "Bc").astype(np.float64)
    got = run_ort(folded, feeds)
    for i, (start, end) in enumerate(((0, 3), (3, 8))):
        s, t = bn_affine64(model, f"bn{i}")
        want = z[:, start:end] * s + t
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("dtype,layer", [(F16, "Conv"), (F64, "Gemm")])
def test_float16_and_float64(dtype: Any, layer: str) -> None:
    model, feeds = sliced(dtype=dtype, layer=layer)
    folded = assert_pattern(model, feeds, ["slice", "slice"], gone=["BatchNormalization"], dtype=dtype)
    _check_ranges(model, folded, {0: (0, 3), 1: (3, 8)})


def test_a_shape_reader_and_a_second_bn_on_the_part() -> None:
    model, feeds = sliced(bn_on=(0,))
    model.graph.node.append(helper.make_node("Shape", ["c"], ["shape"], name="shape"))
    model.graph.output.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [4]))
    model.graph.node.append(
        helper.make_node(
            "BatchNormalization", ["y0", "bn0_scale", "bn0_B", "bn0_mean", "bn0_var"], ["z0"], name="again"
        )
    )
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z0", TensorProto.FLOAT, [None] * 4))
    assert_pattern(model, feeds, ["slice", "bn_after_chain"], gone=["BatchNormalization"])


def test_skip_overlapping_ranges() -> None:
    model, _ = sliced(((0, 4), (3, 8)), bn_on=(0,))
    assert_skipped(model, "overlapping_slices")


def test_skip_overlap_through_clamping() -> None:
    model, _ = sliced(((-3, END), (4, 7)), bn_on=(0,))  # [5, 8) and [4, 7)
    assert_skipped(model, "overlapping_slices")


@pytest.mark.parametrize("opset", [9, 17])
def test_skip_slice_along_another_axis(opset: int) -> None:
    model, _ = sliced(((0, 2), (2, 4)), axes=[2], bn_on=(0,), opset=opset)
    assert_skipped(model, "channel_axis")


def test_skip_step_along_the_channels() -> None:
    model, _ = sliced(((0, 8),), steps=[2], bn_on=())
    rng = np.random.default_rng(1)
    model.graph.output.pop()
    gb = GraphBuilder()
    add_bn(gb, "s0", "y0", bn_stats(rng, 4), dtype=F32, bn_opset=15, prefix="bn0")
    model.graph.node.extend(gb.nodes)
    model.graph.initializer.extend(gb.initializers)
    model.graph.output.append(helper.make_tensor_value_info("y0", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "slice_step")


def test_skip_computed_start() -> None:
    model, _ = sliced(bn_on=(0,))
    model.graph.input.append(helper.make_tensor_value_info("start", TensorProto.INT64, [1]))
    node = next(n for n in model.graph.node if n.name == "slice0")
    node.input[1] = "start"
    assert_skipped(model, "computed_slice")


def test_skip_layer_output_read_by_another_op() -> None:
    model, _ = sliced(bn_on=(0,))
    model.graph.node.append(helper.make_node("Relu", ["c"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "multiple_consumers")


def test_skip_layer_output_that_is_a_graph_output() -> None:
    model, _ = sliced(bn_on=(0,))
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "graph_output")


def test_skip_part_with_a_second_consumer() -> None:
    model, _ = sliced(bn_on=(0,))
    model.graph.node.append(helper.make_node("Relu", ["s0"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "multiple_consumers")


def test_skip_part_that_is_a_graph_output() -> None:
    model, _ = sliced(bn_on=(0,))
    model.graph.output.append(helper.make_tensor_value_info("s0", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "graph_output")


def test_a_slice_of_a_non_layer_keeps_the_first_refusal() -> None:
    model, _ = sliced(bn_on=(0,))
    relu = helper.make_node("Relu", ["X"], ["r"], name="relu")
    model.graph.node.insert(0, relu)
    next(n for n in model.graph.node if n.name == "slice0").input[0] = "r"
    report = assert_skipped(model, "unsupported_producer")
    assert "Slice" in report.skipped[0].message
