"""bnfold.testing: the pytest helpers and their failure messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
from bnfold.testing import assert_fold_preserves, assert_models_close, conv_bn_model


def _corrupted(model: onnx.ModelProto, delta: float = 0.5) -> onnx.ModelProto:
    folded = bnfold.fold(model, verify=False).model
    w = next(t for t in folded.graph.initializer if len(t.dims) == 4)
    a = numpy_helper.to_array(w).copy()
    a.flat[0] += delta
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    return folded


@pytest.mark.parametrize(
    "kwargs", [{}, {"blocks": 3, "channels": 8}, {"dtype": "float16"}, {"matmul_bn": True}, {"batch": 2}]
)
def test_conv_bn_model_is_valid(kwargs: dict) -> None:
    model = conv_bn_model(**kwargs)
    onnx.checker.check_model(model, full_check=True)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert n_bn == kwargs.get("blocks", 1) + int(kwargs.get("matmul_bn", False))


def test_assert_fold_preserves_returns_the_result(tmp_path: Path) -> None:
    model = conv_bn_model(blocks=3)
    result = assert_fold_preserves(model, expect_folded=3, strict=True, runs=2, dims={"N": 2})
    assert len(result.report.folded) == 3 and result.verification.status == "passed"
    path = result.save(tmp_path / "m.onnx")
    assert_models_close(model, path)
    onnx.save(model, str(tmp_path / "in.onnx"))
    assert_fold_preserves(str(tmp_path / "in.onnx"), expect_folded=3)


def test_assert_fold_preserves_failure_messages() -> None:
    with pytest.raises(
        AssertionError, match=r"expected 2 BatchNormalization\(s\) folded, got 1 folded, 0 kept"
    ):
        assert_fold_preserves(conv_bn_model(), expect_folded=2)
    with pytest.raises(AssertionError, match=r"bn_mm after MatMul mm: channel_axis"):
        assert_fold_preserves(conv_bn_model(matmul_bn=True), strict=True)
    assert_fold_preserves(conv_bn_model(matmul_bn=True))  # not strict: kept BNs are fine
    with pytest.raises(AssertionError) as info:
        assert_fold_preserves(conv_bn_model(), atol=0.0, rtol=0.0)
    text = str(info.value)
    assert "changed the model's outputs" in text and "FAILED  y (float32, 1x4x8x8): max abs err" in text
    assert "would pass with atol >= " in text


def test_unverifiable_fold_fails_unless_allowed() -> None:
    bf = conv_bn_model(dtype="bfloat16")
    with pytest.raises(AssertionError, match="(?s)could not be verified: .*cannot run the reference"):
        assert_fold_preserves(bf)
    result = assert_fold_preserves(bf, allow_unverifiable=True, expect_folded=1)
    assert result.verification.status == "error"


def test_assert_models_close_shows_error_figures() -> None:
    model = conv_bn_model(blocks=2)
    v = assert_models_close(model, bnfold.fold(model, verify=False).model)
    assert v.passed
    with pytest.raises(AssertionError) as info:
        assert_models_close(model, _corrupted(model), seed=1)
    text = str(info.value)
    assert text.startswith("models differ: onnxruntime CPUExecutionProvider (optimizations off), seed 1")
    assert "FAILED  y" in text and "max abs err" in text and "max rel err" in text
    assert "element(s) outside atol" in text
    with pytest.raises(AssertionError, match="could not be compared"):
        bf = conv_bn_model(dtype="bfloat16")
        assert_models_close(bf, bf)
    with pytest.raises(bnfold.BadInput):
        assert_models_close(model, model, inputs={"nope": np.zeros(1, np.float32)})
