"""bnfold.ir.FoldBatchNormPass on torch.onnx programs (torch.onnx.export(dynamo=True)).

Numerics are checked against the PyTorch module itself, run in onnxruntime with optimizations off.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnfold

torch = pytest.importorskip("torch")
ir = pytest.importorskip("onnx_ir")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it
from bnfold.ir import FoldBatchNormPass  # noqa: E402
from models.definitions import build  # noqa: E402


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    return out


@pytest.fixture(scope="module")
def exported() -> tuple[object, torch.nn.Module, torch.Tensor]:
    module, x = build("resnet_small")
    program = torch.onnx.export(module, (x,), dynamo=True, optimize=False, verbose=False)
    return program, module, x


def test_pass_on_an_exported_program_matches_the_torch_module(exported) -> None:
    program, module, x = exported
    before = program.model_proto.SerializeToString()
    pass_ = FoldBatchNormPass()
    result = pass_(program.model)
    assert result.modified
    assert pass_.last_result is not None and pass_.last_result.verification is not None
    assert pass_.last_result.verification.status == "passed"
    ops = [n.op_type for n in result.model.graph]
    assert "BatchNormalization" not in ops
    assert [n.op_type for n in program.model.graph].count("BatchNormalization") == 6  # input untouched
    assert program.model_proto.SerializeToString() == before

    with torch.no_grad():
        want = module(x).double().numpy()
    got = _run(ir.to_proto(result.model), x.numpy()).astype(np.float64)
    # float32 end to end: the fold rounds each folded weight once; 1e-5 of the output scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_pass_equals_fold_of_the_program(exported) -> None:
    program, _, _ = exported
    via_pass = FoldBatchNormPass(verify=False)(program.model).model
    via_fold = bnfold.fold(program, verify=False).model
    assert (
        ir.to_proto(via_pass).SerializeToString() == ir.to_proto(ir.from_proto(via_fold)).SerializeToString()
    )


def test_pass_on_model_proto_and_back_into_the_program(exported) -> None:
    program, module, x = exported
    result = FoldBatchNormPass()(ir.from_proto(program.model_proto))
    folded_program = torch.onnx.ONNXProgram(result.model, None)
    proto = folded_program.model_proto
    assert "BatchNormalization" not in [n.op_type for n in proto.graph.node]
    with torch.no_grad():
        want = module(x).double().numpy()
    got = _run(proto, x.numpy()).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
