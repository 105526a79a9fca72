"""``dequantized_weight``: Conv with a DequantizeLinear weight."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from onnx_builders import (
    initializer,
)
from pattern_checks import assert_pattern, assert_skipped, dq_model


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
