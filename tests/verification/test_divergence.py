"""Localization (bnfold.verification.localize): the first diverging tensor of candidates broken
at a known layer, folded by bnfold and by onnxruntime's own optimizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
import bnfold.api
from bnfold.errors import VerificationFailed
from bnfold.testing import conv_bn_model
from bnfold.verification import VerifyOptions, describe_divergence, localize, verify


def _scale(model: onnx.ModelProto, name: str, factor: float) -> None:
    t = next(t for t in model.graph.initializer if t.name == name)
    a = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array((a.astype(np.float64) * factor).astype(a.dtype), name))


def _producer(model: onnx.ModelProto, node_name: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.name == node_name)


def test_a_fold_broken_by_hand_at_one_layer_is_found_there() -> None:
    model = conv_bn_model(blocks=4)
    folded = bnfold.fold(model, verify=False).model
    assert localize(model, folded) is None  # a correct fold diverges nowhere
    _scale(folded, "w2", 1.05)
    found = localize(model, folded)
    assert found is not None
    assert found.tensor == _producer(folded, "conv2") == _producer(model, "bn2")  # the BN's output
    assert (found.ref_node, found.cand_node) == ("bn2", "conv2")
    assert found.max_abs_err > 0 and found.max_rel_err > 0
    # shared: each block's BN and Relu outputs; only in the reference: the four Conv outputs
    assert (found.compared, found.skipped) == (8, 4)
    assert describe_divergence(found).startswith(
        f"first divergence: tensor '{found.tensor}' (reference node bn2, candidate node conv2), max abs err "
    )
    assert describe_divergence(found).endswith("; 8 shared tensors compared, 4 skipped")
    assert describe_divergence(None) == "no intermediate tensor diverges"


def test_a_fold_by_onnxruntime_broken_at_one_initializer_is_found_there(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = conv_bn_model(blocks=3)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fused = onnx.load(str(tmp_path / "ort.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in fused.graph.node)  # onnxruntime folded them
    assert localize(model, fused) is None
    weight = next(n.input[1] for n in fused.graph.node if n.name == "conv1")
    _scale(fused, weight, 1.01)
    found = localize(model, fused, VerifyOptions(seed=3))
    assert found is not None
    assert (found.tensor, found.ref_node, found.cand_node) == (
        "relu1",
        "relu1",
        "conv1",
    )  # Conv+BN+Relu fused
    assert found.skipped == 6  # the Conv and BN outputs of the reference


def test_verify_localizes_on_request_and_reports_it_in_json() -> None:
    model = conv_bn_model(blocks=3)
    folded = bnfold.fold(model, verify=False).model
    v = verify(model, folded, localize=True)
    assert v.status == "passed" and v.first_divergence is None and v.to_dict()["first_divergence"] is None
    _scale(folded, "w1", 1.05)
    v = verify(model, folded, localize=True)
    assert v.status == "failed" and v.first_divergence is not None
    data = json.loads(json.dumps(bnfold.verification.jsonable(v.to_dict()), allow_nan=False))
    assert data["first_divergence"]["tensor"] == _producer(folded, "conv1")
    assert {"tensor", "ref_node", "cand_node", "max_abs_err", "max_rel_err"} <= set(data["first_divergence"])
    assert verify(model, folded).first_divergence is None  # not asked


def test_a_fold_that_fails_its_own_verification_says_where(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = bnfold.api.fold_model

    def broken_fold(model: onnx.ModelProto, *args: object, **kwargs: object) -> object:
        report = real(model, *args, **kwargs)  # type: ignore[arg-type]
        _scale(model, "w1", 1.05)  # a fold rule gone wrong on the second layer
        return report

    monkeypatch.setattr(bnfold.api, "fold_model", broken_fold)
    model = conv_bn_model(blocks=3)
    result = bnfold.fold(model)
    v = result.verification
    assert v is not None and v.status == "failed"
    assert v.first_divergence is not None and v.first_divergence.cand_node == "conv1"
    assert result.to_dict()["verification"]["first_divergence"]["ref_node"] == "bn1"
    with pytest.raises(VerificationFailed) as caught:
        result.save(tmp_path / "m.onnx")
    assert caught.value.first_divergence == v.first_divergence
