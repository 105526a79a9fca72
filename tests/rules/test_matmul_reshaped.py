"""``matmul_reshaped``: LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(x)`` (MatMul on a 3-D
input -> Flatten / Reshape to [M, C] -> BN -> Reshape): the scale into the weight, the BN becomes
an Add of its shift; checked in onnxruntime with optimizations off. Kept when the reshape mixes
tokens into the BN's channels, the rank is unknown, or the MatMul output has another reader."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import F32, GraphBuilder, count_ops
from pattern_checks import assert_pattern, assert_skipped, bn, rnd


def levit(
    flat: str = "reshape",
    *,
    shape: list[int] | None = None,
    axis: int = 2,
    rank: int = 3,
    channels: int = 4,
    declare: bool = True,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X [2, 5, 6] (or [10, 6] for ``rank=2``) -> MatMul(W [6, 4]) -> Flatten(axis) | Reshape(shape)
    -> BN(channels) -> Y."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    xshape = [2, 5, 6] if rank == 3 else [10, 6]
    gb.input("X", F32, xshape)
    x = "X"
    if not declare:  # reshaped to a shape of unknown length: the rank is unknown
        gb.input("S", np.int64, [None])
        gb.node("Reshape", ["X", "S"], ["xr"], name="reshape_in")
        x = "xr"
    gb.node("MatMul", [x, gb.const("W", rnd(rng, [6, 4], 0.4))], ["m"], name="linear")
    if flat == "reshape":
        gb.node(
            "Reshape", ["m", gb.const("to2d", np.array(shape or [-1, 4], np.int64))], ["f"], name="flatten"
        )
    else:
        gb.node("Flatten", ["m"], ["f"], name="flatten", axis=axis)
    bn(gb, "f", "Y", channels, rng)
    gb.output("Y", F32, [None, channels])
    return gb.model(17), {"X": rnd(rng, xshape)}


@pytest.mark.parametrize(
    "kw",
    [
        dict(flat="reshape"),
        dict(flat="reshape", shape=[10, 4]),
        dict(flat="flatten", axis=2),
        dict(flat="flatten", axis=-1),
        dict(flat="flatten", axis=1, rank=2),
    ],
    ids=["reshape_minus_one", "reshape_fixed", "flatten_2", "flatten_minus_1", "flatten_2d"],
)
def test_levit_linear_norm(kw: dict) -> None:
    model, feeds = levit(**kw)
    folded = assert_pattern(model, feeds, ["matmul_reshaped"], gone=["BatchNormalization"])
    assert count_ops(folded, "MatMul") == 1 and count_ops(folded, "Add") == 1


def test_the_add_keeps_the_bn_name_and_output() -> None:
    model, feeds = levit()
    folded = assert_pattern(model, feeds, ["matmul_reshaped"], gone=["BatchNormalization"])
    add = next(n for n in folded.graph.node if n.op_type == "Add")
    assert add.name == "bn" and list(add.output) == ["Y"] and add.input[0] == "f"


@pytest.mark.parametrize(
    "kw",
    [
        dict(flat="flatten", axis=1, channels=20),
        dict(flat="reshape", shape=[-1, 20], channels=20),
        dict(flat="reshape", shape=[20, 2], channels=2),
    ],
    ids=["flatten_tokens_into_features", "reshape_tokens_into_features", "reshape_splits_features"],
)
def test_skip_channel_axis(kw: dict) -> None:
    model, _ = levit(**kw)
    assert_skipped(model, "channel_axis")


def test_skip_unknown_rank() -> None:
    model, _ = levit(flat="flatten", declare=False)
    assert_skipped(model, "unknown_rank")


def test_skip_matmul_output_with_another_reader() -> None:
    model, _ = levit()
    model.graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 5, 4]))
    assert_skipped(model, "graph_output")
    model, _ = levit()
    model.graph.node.append(helper.make_node("Relu", ["m"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [2, 5, 4]))
    assert_skipped(model, "multiple_consumers")


def levit_dynamic(
    last: list[int] | None = None, *, parts: int = 2, channels: int = 4, seed: int = 0
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The dynamo exporter's ``flatten(0, 1)`` with a dynamic batch: X [B, 5, 6] -> MatMul(W [6, 4])
    -> Reshape(Concat(Reshape(Mul(Squeeze(Shape(X, 0, 1)), 5), [-1]), last)) -> BN -> Y, no shape
    declared on the way; ``last`` None: the last part computed (``Shape(m, 2, 3)``); ``parts=3``:
    a Concat of three parts (a rank-3 result)."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", F32, ["B", 5, 6])
    gb.node("MatMul", ["X", gb.const("W", rnd(rng, [6, 4], 0.4))], ["m"], name="linear")
    gb.node("Shape", ["X"], ["s"], start=0, end=1)
    gb.node("Squeeze", ["s", gb.const("sq", np.array([0], np.int64))], ["b"])
    gb.node("Mul", ["b", gb.const("tokens", np.array(5, np.int64))], ["bt"])
    gb.node("Reshape", ["bt", gb.const("flat", np.array([-1], np.int64))], ["bt1"])
    if last is None:
        gb.node("Shape", ["m"], ["tail"], start=2, end=3)
    else:
        gb.const("tail", np.array(last, np.int64))
    extra = [gb.const("mid", np.array([1], np.int64))] if parts == 3 else []
    gb.node("Concat", ["bt1", *extra, "tail"], ["shape"], axis=0)
    gb.node("Reshape", ["m", "shape"], ["f"], name="flatten")
    bn(gb, "f", "Y", channels, rng)
    gb.output("Y", F32, [None] * parts)
    return gb.model(17), {"X": rnd(rng, [2, 5, 6])}


def test_levit_dynamo_reshape_with_a_computed_shape() -> None:
    model, feeds = levit_dynamic([4])
    folded = assert_pattern(model, feeds, ["matmul_reshaped"], gone=["BatchNormalization"])
    assert count_ops(folded, "MatMul") == 1 and count_ops(folded, "Add") == 1


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        (dict(last=[2], channels=2), "channel_axis"),  # [B * 10, 2]: the features split in two
        (dict(last=[4], parts=3, channels=1), "channel_axis"),  # [B * 5, 1, 4]: not [M, C]
        (dict(last=None), "channel_axis"),  # the last part computed: nothing proves it is C
    ],
    ids=["last_not_the_features", "three_parts", "computed_last_part"],
)
def test_skip_computed_shapes_not_proven(kw: dict, code: str) -> None:
    model, _ = levit_dynamic(**kw)
    report = assert_skipped(model, code)
    assert "computed shape" in report.skipped[0].message
