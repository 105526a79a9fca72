"""``bn_after_passthrough``: a BN folded through Identity, inference Dropout and Transpose pairs that
cancel (checked in onnxruntime with optimizations off); kept for a training Dropout, a read mask,
Transposes that move the channel axis, and a second reader on the way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import F32, GraphBuilder, add_bn, bn_stats
from pattern_checks import assert_pattern, assert_skipped, bn, rnd


def through(
    ops: Sequence[tuple[str, dict[str, Any]]],
    *,
    opset: int = 17,
    add: bool = False,
    layer: str = "Conv",
    size: int = 5,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> layer [-> Add(b)] -> ops... -> BN -> Y; each op ``(op type, attributes)``; a Dropout's
    ``ratio`` / ``training_mode`` entries become constant inputs (``"input"``: a graph input)."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    if layer == "Conv":
        xshape, c = [2, 3, size, size], 4
        gb.node("Conv", ["X", gb.const("W", rnd(rng, [c, 3, 3, 3], 0.3))], ["l"], name="conv", pads=[1] * 4)
    else:
        xshape, c = [3, 5], 4
        gb.node("Gemm", ["X", gb.const("W", rnd(rng, [5, c], 0.3)), gb.const("Bg", rnd(rng, [c]))], ["l"])
    gb.input("X", F32, xshape)
    prev = "l"
    if add:
        gb.node("Add", ["l", gb.const("k", rnd(rng, [c] + [1] * (len(xshape) - 2)))], ["a"], name="add")
        prev = "a"
    for i, (op, attrs) in enumerate(ops):
        attrs = dict(attrs)
        inputs = [prev]
        if op == "Dropout":
            if "ratio" in attrs:
                inputs.append(gb.const(f"ratio{i}", np.asarray(attrs.pop("ratio"), np.float32)))
            if "training_mode" in attrs:
                mode = attrs.pop("training_mode")
                inputs += [""] * (2 - len(inputs))
                if mode == "input":
                    inputs.append(gb.input(f"mode{i}", np.bool_, []))
                else:
                    inputs.append(gb.const(f"mode{i}", np.asarray(mode, np.bool_)))
        outputs = [f"p{i}"] + ([f"mask{i}"] if attrs.pop("mask", False) else [])
        gb.node(op, inputs, outputs, name=f"{op.lower()}{i}", **attrs)
        prev = f"p{i}"
    if opset < 7:
        add_bn(gb, prev, "Y", bn_stats(rng, c), dtype=F32, bn_opset=6, prefix="bn")
    else:
        bn(gb, prev, "Y", c, rng)
    gb.output("Y", F32, [None] * len(xshape))
    feeds = {"X": rnd(rng, xshape)}
    feeds.update({v.name: np.asarray(False) for v in gb.inputs if v.name.startswith("mode")})
    return gb.model(opset), feeds


@pytest.mark.parametrize(
    "ops",
    [
        [("Identity", {})],
        [("Identity", {}), ("Identity", {})],
        [("Dropout", {})],
        [("Dropout", {"ratio": 0.3})],
        [("Dropout", {"ratio": 0.3, "training_mode": False})],
        [("Transpose", {"perm": [0, 2, 3, 1]}), ("Transpose", {"perm": [0, 3, 1, 2]})],
        [("Transpose", {}), ("Identity", {}), ("Transpose", {})],
        [("Dropout", {}), ("Transpose", {"perm": [0, 1, 3, 2]}), ("Transpose", {"perm": [0, 1, 3, 2]})],
    ],
    ids=[
        "identity",
        "two_identities",
        "dropout",
        "dropout_ratio",
        "dropout_not_training",
        "nhwc_pair",
        "reverse_pair",
        "dropout_and_pair",
    ],
)
def test_through(ops: list[tuple[str, dict[str, Any]]]) -> None:
    model, feeds = through(ops)
    if any(op == "Transpose" and not a for op, a in ops):
        model = onnx.shape_inference.infer_shapes(model)  # the default perm needs the rank
    assert_pattern(
        model,
        feeds,
        ["bn_after_passthrough"],
        gone=["BatchNormalization", "Identity", "Dropout", "Transpose"],
    )


def test_through_after_a_constant_add_and_into_gemm() -> None:
    model, feeds = through([("Identity", {})], add=True)
    assert_pattern(model, feeds, ["bn_after_passthrough"], gone=["BatchNormalization", "Add", "Identity"])
    model, feeds = through([("Dropout", {}), ("Identity", {})], layer="Gemm")
    assert_pattern(model, feeds, ["bn_after_passthrough"], gone=["BatchNormalization", "Dropout"])


@pytest.mark.parametrize("opset", [7, 10])  # onnxruntime has no Dropout-6
def test_through_dropout_of_older_opsets(opset: int) -> None:
    model, feeds = through([("Dropout", {"is_test": 1} if opset < 7 else {})], opset=opset)
    assert_pattern(model, feeds, ["bn_after_passthrough"], gone=["BatchNormalization", "Dropout"])


def test_through_dropout_with_an_unread_mask() -> None:
    model, feeds = through([("Dropout", {"mask": True})])
    model = onnx.shape_inference.infer_shapes(model)  # declares the mask in value_info
    folded = assert_pattern(model, feeds, ["bn_after_passthrough"], gone=["BatchNormalization", "Dropout"])
    assert "mask0" not in {v.name for v in folded.graph.value_info}


def test_skip_dropout_mask() -> None:
    model, _ = through([("Dropout", {"mask": True})])
    model.graph.output.append(helper.make_tensor_value_info("mask0", TensorProto.BOOL, [None] * 4))
    assert_skipped(model, "dropout_mask")


@pytest.mark.parametrize("mode", [True, "input"])
def test_skip_dropout_training_mode(mode: object) -> None:
    model, _ = through([("Dropout", {"ratio": 0.5, "training_mode": mode})])
    report = assert_skipped(model, "training_mode")
    assert "Dropout" in report.skipped[0].message


def test_skip_dropout_is_test_0_opset_6() -> None:
    model, _ = through([("Dropout", {"is_test": 0})], opset=6)
    assert_skipped(model, "training_mode")


@pytest.mark.parametrize(
    "ops",
    [
        [("Transpose", {"perm": [0, 2, 3, 1]})],
        [("Transpose", {"perm": [0, 2, 3, 1]}), ("Transpose", {"perm": [0, 2, 3, 1]})],
        [("Transpose", {"perm": [0, 2, 3, 1]}), ("Identity", {}), ("Transpose", {"perm": [0, 1, 3, 2]})],
    ],
    ids=["single", "not_cancelling", "through_identity"],
)
def test_skip_transposes_that_move_the_channel_axis(ops: list[tuple[str, dict[str, Any]]]) -> None:
    model, _ = through(ops, size=4)  # 4 channels, 4 x 4: every order is a valid BN input
    report = assert_skipped(model, "channel_axis")
    assert "Transpose" in report.skipped[0].message


def test_skip_unknown_rank_of_a_reversing_transpose() -> None:
    model, _ = through([("Transpose", {}), ("Identity", {}), ("Transpose", {})])  # no shapes declared
    assert_skipped(model, "unknown_rank")


def test_skip_multiple_consumers_on_the_way() -> None:
    model, _ = through([("Identity", {}), ("Identity", {})])
    model.graph.node.append(helper.make_node("Relu", ["p0"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "multiple_consumers")


def test_skip_graph_output_on_the_way() -> None:
    model, _ = through([("Identity", {}), ("Identity", {})])
    model.graph.output.append(helper.make_tensor_value_info("p0", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "graph_output")


def test_skip_identity_of_a_relu_names_the_op() -> None:
    model, _ = through([("Relu", {}), ("Identity", {})])
    report = assert_skipped(model, "unsupported_producer")
    assert "Relu" in report.skipped[0].message
