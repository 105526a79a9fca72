"""bnfold.verification.runner: provider names and onnxruntime's messages kept to one line."""

from __future__ import annotations

from bnfold.testing import conv_bn_model
from bnfold.verification import (
    normalize_provider,
    verify,
)
from bnfold.verification.runner import one_line


def test_provider_names_and_one_line_messages() -> None:
    assert normalize_provider("cpu") == "CPUExecutionProvider"
    assert normalize_provider("CUDA") == "CUDAExecutionProvider"
    assert normalize_provider("MyExecutionProvider") == "MyExecutionProvider"
    exc = RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : bad\nmore")
    assert one_line(exc) == "INVALID_GRAPH : bad"
    assert one_line(RuntimeError("")) == "RuntimeError"


def test_onnxruntime_banner_and_source_paths_stay_out_of_messages(monkeypatch, capsys) -> None:
    """onnxruntime's Python wrapper prints an 'EP Error' banner to stdout when a session fails
    with a ValueError; its messages carry C++ source paths and signatures. Neither reaches the user."""
    import onnxruntime as ort

    class Failing:
        def __init__(self, *args, **kwargs) -> None:
            print("*************** EP Error ***************")
            raise RuntimeError(
                "[ONNXRuntimeError] : 1 : FAIL : Load model from /x/m.onnx failed:/onnxruntime_src/onnxruntime/"
                "core/providers/common.h:81 onnxruntime::AutoPadType onnxruntime::StringToAutoPadType(const "
                "std::string&) false was false. Unknown AutoPadType String"
            )

    model = conv_bn_model()
    monkeypatch.setattr(ort, "InferenceSession", Failing)
    v = verify(model, model)
    assert v.status == "error"
    assert v.message == "onnxruntime cannot run the reference model: FAIL : Unknown AutoPadType String"
    assert capsys.readouterr().out == ""
