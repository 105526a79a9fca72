"""Constants the pass evaluates: exporter helper subgraphs for weights, biases and BN parameters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fold_checks import assert_folds
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import (
    F16,
    F32,
    Built,
    conv_bn,
    initializer,
    node_named,
)

from bnfold.onnx.driver import fold_model


def _torch_style_zero_bias(b: Built, target_from: str = "X") -> None:
    """Replace nothing: add torch's Shape(W)->Expand->CastLike(0, X)->Expand zero bias to the conv."""
    g = b.model.graph
    conv = node_named(g, "conv")
    nodes = [
        helper.make_node("Shape", ["W"], ["val_0"], name="n_shape", start=0, end=1),
        helper.make_node("Constant", [], ["val_1"], name="n_c1", value_ints=[1]),
        helper.make_node("Expand", ["val_0", "val_1"], ["val_2"], name="n_expand0"),
        helper.make_node(
            "Constant",
            [],
            ["val_3"],
            name="n_c3",
            value=numpy_helper.from_array(np.array(0.0, np.float32), "v"),
        ),
        helper.make_node("CastLike", ["val_3", target_from], ["val_4"], name="n_castlike"),
        helper.make_node("Expand", ["val_4", "val_2"], ["val_5"], name="n_expand1"),
    ]
    conv.input.append("val_5")
    idx = list(g.node).index(conv)
    for i, n in enumerate(nodes):
        g.node.insert(idx + i, n)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_torch_style_computed_zero_bias(dtype: np.dtype) -> None:
    b = conv_bn(bias=False, dtype=dtype, opset=18)
    _torch_style_zero_bias(b)
    folded = assert_folds(b)
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["Conv"], ops  # the zero-bias helper subgraph is gone with the BN
    conv = folded.graph.node[0]
    assert conv.input[1] == "W"  # weight updated in place once the Shape user is gone
    assert initializer(folded, conv.input[2]).dtype == dtype


def test_torch_style_zero_bias_castlike_target_is_intermediate() -> None:
    """CastLike's target type comes from an intermediate value (not a graph input)."""
    b = conv_bn(bias=False, opset=18)
    g = b.model.graph
    g.node.insert(0, helper.make_node("Relu", ["X"], ["Xr"], name="relu_in"))
    node_named(g, "conv").input[0] = "Xr"
    _torch_style_zero_bias(b, target_from="Xr")
    folded = assert_folds(b)
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Conv"]


def test_computed_weight_cast_identity() -> None:
    """A weight computed from constants (Cast of a float64 initializer, via Identity) is folded
    into a new initializer; the helper nodes and the source initializer are removed."""
    b = conv_bn(opset=17)
    g = b.model.graph
    w = initializer(b.model, "W")
    for t in g.initializer:
        if t.name == "W":
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float64), "W64"))
    g.node.insert(0, helper.make_node("Cast", ["W64"], ["Wc"], name="cast", to=TensorProto.FLOAT))
    g.node.insert(1, helper.make_node("Identity", ["Wc"], ["W"], name="ident"))
    folded = assert_folds(b)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert "W64" not in {t.name for t in folded.graph.initializer}


def _affine_false_dynamo_bn(declare_shape: bool) -> onnx.ModelProto:
    """torch's dynamo export (optimize=False) of Conv1d + BatchNorm1d(affine=False): the BN's scale
    and bias are Expand(CastLike(1|0, conv_out), Shape(conv_out)[1:2])."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((6, 3, 3)).astype(np.float32), "w")
    mean = numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "mean")
    var = numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype(np.float32), "var")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Constant", [], ["one"], value_floats=[1.0]),
        helper.make_node("CastLike", ["one", "c"], ["one_t"]),
        helper.make_node("Shape", ["c"], ["ch"], start=1, end=2),
        helper.make_node("Expand", ["one_t", "ch"], ["gamma"]),
        helper.make_node("Constant", [], ["zero"], value_floats=[0.0]),
        helper.make_node("CastLike", ["zero", "c"], ["zero_t"]),
        helper.make_node("Shape", ["c"], ["ch2"], start=1, end=2),
        helper.make_node("Expand", ["zero_t", "ch2"], ["beta"]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    value_info = [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 6, 6])] if declare_shape else []
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 6])],
        [w, mean, var],
        value_info=value_info,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bn_params_from_the_conv_outputs_declared_shape_fold() -> None:
    """With the conv output's shape declared, Shape/CastLike give constant parameters, and the
    helper nodes die with them (they are not other consumers of the conv output)."""
    import onnxruntime as ort

    model = _affine_false_dynamo_bn(declare_shape=True)
    original = model.SerializeToString()
    report = fold_model(model)
    assert [p.kind for p in report.folded] == ["Conv"] and report.skipped == []
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    want = ort.InferenceSession(original, opts).run(None, feed)[0]
    got = ort.InferenceSession(model.SerializeToString(), opts).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_type_only_value_never_feeds_a_shape_computation() -> None:
    """Without a declared shape the same parameters are not constants: the conv output's type is
    known, its shape is not. Evaluating Shape on the type-only placeholder once produced a
    parameter of shape [1]."""
    model = _affine_false_dynamo_bn(declare_shape=False)
    before = model.SerializeToString()
    report = fold_model(model)
    assert report.folded == []
    assert [s.code for s in report.skipped] == ["param_not_constant"]
    assert model.SerializeToString() == before


def test_bn_params_from_the_conv_output_with_a_real_second_consumer_stay() -> None:
    """The Shape/CastLike helpers do not count as consumers, but a real second consumer does."""
    model = _affine_false_dynamo_bn(declare_shape=True)
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"]))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 6, 6]))
    before = model.SerializeToString()
    report = fold_model(model)
    assert report.folded == [] and [s.code for s in report.skipped] == ["multiple_consumers"]
    assert model.SerializeToString() == before


def test_bn_params_from_the_conv_output_with_the_shape_also_used_fold() -> None:
    """The Shape of the conv output also feeds a graph output: it reads only the shape, so the BN
    folds and that Shape reads the name that stays (the conv's new output)."""
    import onnxruntime as ort

    model = _affine_false_dynamo_bn(declare_shape=True)
    model.graph.node.append(helper.make_node("Identity", ["ch"], ["ch_out"]))
    model.graph.output.append(helper.make_tensor_value_info("ch_out", TensorProto.INT64, [1]))
    original = model.SerializeToString()
    report = fold_model(model)
    assert [p.kind for p in report.folded] == ["Conv"] and report.skipped == []
    assert [n.op_type for n in model.graph.node] == ["Conv", "Shape", "Identity"]
    assert model.graph.node[1].input[0] == model.graph.node[0].output[0] == "y"
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    want = ort.InferenceSession(original, opts).run(None, feed)
    got = ort.InferenceSession(model.SerializeToString(), opts).run(None, feed)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * float(np.abs(want[0]).max()))
    np.testing.assert_array_equal(got[1], want[1])
