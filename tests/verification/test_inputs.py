"""bnfold.verification.inputs: input generation and the validation of inputs, shapes and dims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bnfold
from bnfold.errors import BadInput, flag_message
from bnfold.testing import conv_bn_model
from bnfold.verification import (
    check_request,
    verify,
)
from bnfold.verification.inputs import load_inputs, make_inputs, symbolic_dims


def _vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def test_make_inputs_binds_symbolic_dims_from_given_arrays_and_records_assumptions() -> None:
    interface = [
        (v.name, v.type)
        for v in (
            _vi("a", TensorProto.FLOAT, ["B", 3, "T"]),
            _vi("b", TensorProto.FLOAT, ["B", None]),
            _vi("ids", TensorProto.INT64, ["B", 4]),
        )
    ]
    assumed: dict[str, int] = {}
    given = {"a": np.zeros((5, 3, 7), np.float32)}
    feeds = make_inputs(interface, np.random.default_rng(0), {}, {}, given, assumed)
    assert feeds["a"] is given["a"]
    assert feeds["b"].shape == (5, 32)  # B bound by the given array; the unnamed dim assumed
    assert assumed == {"b[1]": 32}
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].min() >= 0 and feeds["ids"].max() < 4
    assert symbolic_dims(interface) == ["B", "T", "b[1]"]
    feeds = make_inputs(
        interface, np.random.default_rng(0), {}, {"B": 2, "T": 9, "b[1]": 3}, {}, assumed := {}
    )
    assert feeds["a"].shape == (2, 3, 9) and feeds["b"].shape == (2, 3) and assumed == {}


def test_make_inputs_is_seeded() -> None:
    interface = [("x", _vi("x", TensorProto.FLOAT, [2, 3]).type)]
    a = make_inputs(interface, np.random.default_rng([0, 0]), {}, {}, {}, {})
    b = make_inputs(interface, np.random.default_rng([0, 0]), {}, {}, {}, {})
    c = make_inputs(interface, np.random.default_rng([1, 0]), {}, {}, {}, {})
    assert np.array_equal(a["x"], b["x"]) and not np.array_equal(a["x"], c["x"])


def test_scalar_boolean_inputs_alternate_between_runs() -> None:
    interface = [
        ("cond", _vi("cond", TensorProto.BOOL, []).type),
        ("mask", _vi("mask", TensorProto.BOOL, [64]).type),
    ]
    runs = [make_inputs(interface, np.random.default_rng([0, r]), {}, {}, {}, {}, None, r) for r in range(3)]
    assert [bool(f["cond"]) for f in runs] == [True, False, True]
    assert runs[0]["mask"].dtype == bool and 0 < runs[0]["mask"].sum() < 64


def test_unknown_rank_and_non_tensor_inputs_need_help() -> None:
    no_shape = onnx.TypeProto()
    no_shape.tensor_type.elem_type = TensorProto.FLOAT
    with pytest.raises(BadInput, match="unknown rank"):
        make_inputs([("x", no_shape)], np.random.default_rng(0), {}, {}, {}, {})
    feeds = make_inputs([("x", no_shape)], np.random.default_rng(0), {"x": [2, 2]}, {}, {}, {})
    assert feeds["x"].shape == (2, 2)
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    with pytest.raises(BadInput, match="not a tensor"):
        make_inputs([("s", seq.type)], np.random.default_rng(0), {}, {}, {}, {})


def test_load_inputs(tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", x=np.ones((1, 2), np.float32))
    assert load_inputs(tmp_path / "in.npz")["x"].shape == (1, 2)
    assert load_inputs(str(tmp_path / "in.npz"))["x"].dtype == np.float32
    assert load_inputs({"x": [[1.0, 2.0]]})["x"].shape == (1, 2)
    assert load_inputs(None) == {}
    (tmp_path / "bad.npz").write_bytes(b"nope")
    for bad in (tmp_path / "bad.npz", tmp_path / "missing.npz"):
        with pytest.raises(BadInput):
            load_inputs(bad)
    np.save(tmp_path / "one.npy", np.zeros(2))
    with pytest.raises(BadInput, match="npz"):
        load_inputs(tmp_path / "one.npy")
    with pytest.raises(BadInput):
        load_inputs(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inputs": {"nope": np.zeros(1, np.float32)}}, "unknown names: nope"),
        ({"inputs": {"x": np.zeros((1, 3, 8, 8), np.float64)}}, "dtype float32, got float64"),
        ({"inputs": {"x": np.zeros((1, 3, 8), np.float32)}}, "rank 3"),
        ({"inputs": {"x": np.zeros((1, 2, 8, 8), np.float32)}}, "at axis 1"),
        ({"inputs": {"x": np.zeros((2, 3, 8, 8), np.float32)}, "dims": {"N": 3}}, r"dims\['N'\]=3"),
        ({"shapes": {"y": [1]}}, "shapes= for unknown input"),
        ({"shapes": {"x": [1, 3, 8]}}, "rank 3"),
        ({"shapes": {"x": [1, 3, 8, 8]}, "inputs": {"x": np.zeros((1, 3, 8, 8), np.float32)}}, "both"),
        ({"dims": {"batch": 1}}, r"unknown dimension\(s\): batch \(dynamic dimensions: N\)"),
        ({"runs": 0}, "runs must be at least 1"),
        ({"atol": -1.0}, "atol must be"),
        ({"rtol": float("nan")}, "rtol must be"),
        ({"provider": "NoSuchExecutionProvider"}, "not available"),
    ],
)
def test_verify_rejects_bad_requests(kwargs: dict, match: str) -> None:
    model = conv_bn_model()
    with pytest.raises(BadInput, match=match):
        verify(model, model, **kwargs)


def test_check_request_validates_without_running() -> None:
    model = conv_bn_model()
    check_request(model, {"x": np.zeros((2, 3, 8, 8), np.float32)}, None, None)
    with pytest.raises(BadInput):
        check_request(model, None, {"q": [1]}, None)


def test_fold_with_nothing_to_fold_still_validates_options() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [_vi("x", TensorProto.FLOAT, [1, 4])],
        [_vi("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold(model)
    assert result.verification is not None and result.verification.runs == 0 and result.passed
    with pytest.raises(BadInput):
        bnfold.fold(model, inputs={"nope": np.zeros(1, np.float32)})


FLAGS = {"shapes": "--shape", "dims": "--dim", "inputs": "--inputs"}


@pytest.mark.parametrize(
    ("kwargs", "parameter", "api", "cli"),
    [
        (
            {"shapes": {"y": [1]}},
            "shapes",
            "shapes= for unknown input(s): y",
            "--shape for unknown input(s): y",
        ),
        ({"shapes": {"x": [1, -3, 8, 8]}}, "shapes", "shapes['x']: dimensions", "--shape x: dimensions"),
        (
            {"shapes": {"x": [1, 3, 8, 8]}, "inputs": {"x": np.zeros((1, 3, 8, 8), np.float32)}},
            "shapes",
            "given both as shapes= and in inputs=",
            "given both as --shape and in --inputs",
        ),
        ({"dims": {"batch": 1}}, "dims", "dims= for unknown dimension(s)", "--dim for unknown dimension(s)"),
        (
            {"inputs": {"x": np.zeros((2, 3, 8, 8), np.float32)}, "dims": {"N": 3}},
            "dims",
            "has size 2, but dims['N']=3",
            "has size 2, but --dim N=3",
        ),
        (
            {"shapes": {"x": [1, 3, 8]}},
            "shapes",
            "input 'x': shapes= has rank 3",
            "input 'x': --shape has rank 3",
        ),
    ],
)
def test_errors_name_parameters_and_the_cli_spells_them_as_flags(
    kwargs: dict, parameter: str, api: str, cli: str
) -> None:
    model = conv_bn_model()
    with pytest.raises(BadInput) as caught:
        verify(model, model, **kwargs)
    assert caught.value.parameter == parameter
    assert api in str(caught.value) and "--" not in str(caught.value)
    assert cli in flag_message(caught.value, FLAGS)
    assert flag_message(BadInput("plain {braces} stay"), FLAGS) == "plain {braces} stay"


def test_names_from_the_model_are_text_not_template() -> None:
    no_shape = onnx.TypeProto()
    no_shape.tensor_type.elem_type = TensorProto.FLOAT
    with pytest.raises(BadInput) as caught:
        make_inputs([("x{0}\n", no_shape)], np.random.default_rng(0), {}, {}, {}, {})
    assert str(caught.value) == "input 'x{0}\\n' has unknown rank; give its shape (shapes['x{0}\\n']=...)"
    assert (
        flag_message(caught.value, FLAGS)
        == "input 'x{0}\\n' has unknown rank; give its shape (--shape x{0}\\n=...)"
    )
