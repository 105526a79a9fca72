"""``dequantized_weight``: Conv with a DequantizeLinear weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx_builders import (
    F32,
    GraphBuilder,
    add_bn,
    bn_stats,
    initializer,
)
from pattern_checks import assert_pattern, assert_skipped, rnd


def dq_model(
    *,
    per_channel: bool = True,
    dtype: Any = np.int8,
    axis: int | None = 0,
    opset: int = 13,
    zero_point: bool = True,
    bias: bool = True,
    scale_shape: Sequence[int] | None = None,
    shared: bool = False,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cout, cin = 4, 3
    gb = GraphBuilder()
    gb.input("X", F32, [1, cin, 5, 5])
    info = np.iinfo(dtype)
    gb.const("Wq", rng.integers(max(info.min, -100), min(info.max, 100), (cout, cin, 3, 3)).astype(dtype))
    if scale_shape is not None:
        scale = rng.uniform(0.002, 0.01, scale_shape).astype(np.float32)
    else:
        scale = rng.uniform(0.002, 0.01, cout if per_channel else ()).astype(np.float32)
    ins = ["Wq", gb.const("Ws", scale)]
    if zero_point:
        zp = rng.integers(-3, 4, scale.shape) if dtype == np.int8 else rng.integers(120, 130, scale.shape)
        ins.append(gb.const("Wz", np.asarray(zp).astype(dtype)))
    gb.node("DequantizeLinear", ins, ["W"], name="dq", axis=axis)
    conv_ins = ["X", "W"] + ([gb.const("Bc", rnd(rng, [cout]))] if bias else [])
    gb.node("Conv", conv_ins, ["c"], name="conv", pads=[1, 1, 1, 1])
    add_bn(gb, "c", "Y", bn_stats(rng, cout), dtype=F32, bn_opset=9 if opset < 14 else 15, prefix="bn")
    if shared:
        gb.node("Conv", ["X", "W"], ["Y2"], name="conv2", pads=[1, 1, 1, 1])
        gb.output("Y2", F32, [None] * 4)
    gb.output("Y", F32, [None] * 4)
    return gb.model(opset), {"X": rnd(rng, [1, cin, 5, 5])}


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(bias=False),
        dict(zero_point=False),
        dict(dtype=np.uint8),
        dict(per_channel=False, axis=None),
        dict(per_channel=False, dtype=np.uint8, axis=1),
        dict(opset=17, per_channel=False, zero_point=False, bias=False),
    ],
)
def test_dequantized_weight(kw: dict) -> None:
    model, feeds = dq_model(**kw)
    folded = assert_pattern(model, feeds, ["dequantized_weight"], gone=["BatchNormalization"])
    np.testing.assert_array_equal(initializer(folded, "Wq"), initializer(model, "Wq"))  # integers untouched
    dq = [n for n in folded.graph.node if n.op_type == "DequantizeLinear"][0]
    assert initializer(folded, dq.input[1]).shape == (4,)
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]


def test_skip_dequantized_per_tensor_opset10() -> None:
    model, _ = dq_model(per_channel=False, axis=None, opset=10)
    assert_skipped(model, "dequantize_axis")


def test_skip_dequantized_scale_on_input_channel_axis() -> None:
    model, _ = dq_model(scale_shape=(3,), axis=1)  # per input channel: not per output channel
    assert_skipped(model, "dequantize_axis")


def test_skip_dequantized_weight_shared() -> None:
    model, _ = dq_model(shared=True)
    assert_skipped(model, "multiple_consumers")


def test_skip_dequantized_int32() -> None:
    model, _ = dq_model(zero_point=False)
    for t in model.graph.initializer:
        if t.name == "Wq":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int32), "Wq"))
    assert_skipped(model, "unsupported_dtype")
