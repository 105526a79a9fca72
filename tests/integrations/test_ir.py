"""bnfold.ir.FoldBatchNormPass against bnfold.fold on every model in models/onnx.

The pass serializes, folds and deserializes, so its output is bnfold.fold's output after one
onnx_ir round trip. That round trip changes bytes in two ways only (checked below for every model):
it writes a ``value_info`` entry for each initializer that has none (the folded weights and biases
bnfold creates, and, in the legacy exports, every initializer), and it writes the default opset
domain ``""`` explicitly. Neither changes what the graph computes; the folded models are also run
in onnxruntime (optimizations off) and must give bit-identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold

ir = pytest.importorskip("onnx_ir")
ort = pytest.importorskip("onnxruntime")
from bnfold.ir import FoldBatchNormPass  # noqa: E402

MODELS = sorted((Path(__file__).resolve().parents[2] / "models" / "onnx").glob("*.onnx"))


def _round_trip(model: onnx.ModelProto) -> bytes:
    return ir.to_proto(ir.from_proto(model)).SerializeToString()


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _normalized(model: onnx.ModelProto) -> bytes:
    """``model`` without the two things the IR round trip adds: initializers' value_info entries
    and an explicit default opset domain."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for graph in _graphs(copy.graph):
        initializers = {t.name for t in graph.initializer}
        kept = [v for v in graph.value_info if v.name not in initializers]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    for opset in copy.opset_import:
        if not opset.domain:  # (proto2: an explicit "" is serialized, an absent one is not)
            opset.ClearField("domain")
    return copy.SerializeToString()


def _run(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_pass_is_fold_then_ir_round_trip(path: Path) -> None:
    proto = onnx.load(path)
    expected = bnfold.fold(proto, verify=False)
    result = FoldBatchNormPass(verify=False)(ir.from_proto(proto))
    assert result.modified == bool(expected.report.folded)
    got = ir.to_proto(result.model).SerializeToString()
    assert got == _round_trip(expected.model)
    # what the round trip changed is only initializers' value_info and the opset domain spelling
    assert _normalized(ir.to_proto(result.model)) == _normalized(expected.model)


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_pass_output_runs_like_fold_output(path: Path) -> None:
    proto = onnx.load(path)
    expected = bnfold.fold(proto, verify=False).model.SerializeToString()
    got = ir.to_proto(FoldBatchNormPass(verify=False)(ir.from_proto(proto)).model).SerializeToString()
    feeds = _feeds(proto)
    try:
        want = _run(expected, feeds)
    except Exception as exc:  # bf16, opset-6 BN, float64 Conv: onnxruntime has no kernel
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
        pytest.skip(f"onnxruntime cannot run {path.name}: {str(exc).splitlines()[0][:120]}")
    for a, b in zip(want, _run(got, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_input_model_is_not_modified() -> None:
    proto = onnx.load(MODELS[0].parent / "resnet_small.onnx")
    model = ir.from_proto(proto)
    before = ir.to_proto(model).SerializeToString()
    result = FoldBatchNormPass(verify=False)(model)
    assert result.modified and result.model is not model
    assert ir.to_proto(model).SerializeToString() == before
    assert [n.op_type for n in model.graph].count("BatchNormalization") == 6
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph]


def test_nothing_to_fold_returns_an_equal_clone() -> None:
    proto = onnx.load(MODELS[0].parent / "case_bn_after_relu.onnx")
    model = ir.from_proto(proto)
    pass_ = FoldBatchNormPass()
    result = pass_(model)
    assert not result.modified and result.model is not model
    assert ir.to_proto(result.model).SerializeToString() == ir.to_proto(model).SerializeToString()
    assert pass_.last_result is not None and pass_.last_result.report.skipped


def test_verified_by_default_and_report_kept() -> None:
    pass_ = FoldBatchNormPass(runs=2, seed=3)
    result = pass_(ir.load(MODELS[0].parent / "mobilenet_small.onnx"))
    assert result.modified
    assert pass_.last_result is not None
    verification = pass_.last_result.verification
    assert verification is not None and verification.status == "passed" and verification.runs == 2
    assert len(pass_.last_result.report.folded) == 10


def test_failed_verification_raises_and_returns_nothing() -> None:
    # atol=rtol=0: float32 rounding of the folded weights makes some output differ (it does on
    # this model: max abs err about 1e-6), so verification fails and the pass must refuse
    pass_ = FoldBatchNormPass(atol=0.0, rtol=0.0)
    with pytest.raises(bnfold.VerificationFailed, match="failed verification"):
        pass_(ir.load(MODELS[0].parent / "resnet_small.onnx"))
    assert pass_.last_result is not None and not pass_.last_result.passed


def test_bn_to_affine_option_is_forwarded() -> None:
    model = ir.load(MODELS[0].parent / "case_bn_after_relu.onnx")
    result = FoldBatchNormPass(bn_to_affine=True, verify=False)(model)
    expected = bnfold.fold(ir.to_proto(model), bn_to_affine=True, verify=False)
    assert result.modified and expected.report.folded[0].pattern == "bn_to_affine"
    assert [n.op_type for n in result.model.graph].count("BatchNormalization") == 0
    assert ir.to_proto(result.model).SerializeToString() == _round_trip(expected.model)


def test_merge_branches_option_is_forwarded() -> None:
    model = ir.load(MODELS[0].parent / "case_repvgg_block.onnx")
    result = FoldBatchNormPass(merge_branches=True)(model)  # verified: the pass raises otherwise
    expected = bnfold.fold(ir.to_proto(model), merge_branches=True, verify=False)
    assert result.modified and expected.report.merged_convs == 1
    assert [n.op_type for n in result.model.graph] == ["Relu", "Conv", "Relu"]
    assert ir.to_proto(result.model).SerializeToString() == _round_trip(expected.model)


def test_unknown_and_file_options_are_refused() -> None:
    with pytest.raises(TypeError, match="unknown option.*verfy"):
        FoldBatchNormPass(verfy=False)
    with pytest.raises(TypeError, match="unknown option.*output"):
        FoldBatchNormPass(output="x.onnx")


def test_bad_options_raise_bad_input() -> None:
    with pytest.raises(bnfold.BadInput):
        FoldBatchNormPass(shapes={"no_such_input": [1, 3]})(ir.load(MODELS[0].parent / "resnet_small.onnx"))


def test_in_a_pass_manager_with_onnx_ir_passes() -> None:
    from onnx_ir.passes import PassManager, PassResult
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    model = ir.load(MODELS[0].parent / "unet_decoder.onnx")
    manager = PassManager([FoldBatchNormPass(), RemoveUnusedNodesPass()], steps=3, early_stop=True)
    result = manager(model)
    assert isinstance(result, PassResult) and result.modified
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph]
    # the second step folds nothing: folding a folded model changes nothing
    again = FoldBatchNormPass()(result.model)
    assert not again.modified


def test_pass_manager_wraps_verification_failure() -> None:
    from onnx_ir.passes import PassError, PassManager

    manager = PassManager([FoldBatchNormPass(atol=0.0, rtol=0.0)])
    with pytest.raises(PassError) as info:
        manager(ir.load(MODELS[0].parent / "resnet_small.onnx"))
    chain = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    assert any(isinstance(e, bnfold.VerificationFailed) for e in chain)


def test_external_data_model_loaded_by_onnx_ir(tmp_path: Path) -> None:
    source = MODELS[0].parent / "resnet_small.onnx"
    path = tmp_path / "ext.onnx"
    # (onnx.save turns the proto it is given into an external-data one: give it a copy)
    onnx.save(onnx.load(source), path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    proto = onnx.load(source)
    model = ir.load(path)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    pass_ = FoldBatchNormPass()  # verified: the weights were read from the data file
    result = pass_(model)
    assert result.modified and pass_.last_result is not None
    assert len(pass_.last_result.report.folded) == 6
    folded = ir.to_proto(result.model)
    assert folded.SerializeToString() == _round_trip(bnfold.fold(proto, verify=False).model)
    # the input still refers to its data file
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
