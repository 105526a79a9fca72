"""The checks shared by the rules: one negative test per reason code, malformed models refused with a
code and never an exception."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fold_checks import _shared_weight_model, fold
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import (
    BF16,
    F16,
    F32,
    Built,
    GraphBuilder,
    add_bn,
    assert_ort_equivalent,
    bn_stats,
    check_model,
    conv_bn,
    function_model,
    gemm_bn,
    initializer,
    node_named,
)

import bnfold


def assert_skipped(model: onnx.ModelProto, code: str, *, check: bool = False) -> bnfold.FoldReport:
    """Nothing folded, one skip with ``code``, the model byte-identical."""
    if check:
        check_model(model)
    original = model.SerializeToString()
    folded, report = fold(model)
    assert not report.folded
    assert [s.code for s in report.skipped] == [code], report.skipped
    assert report.skipped[0].message
    assert folded.SerializeToString() == original
    return report


def test_skip_training_mode_bn14() -> None:
    b = conv_bn(bn_opset=14)
    node_named(b.model.graph, "bn").attribute.append(helper.make_attribute("training_mode", 1))
    assert_skipped(b.model, "training_mode")


@pytest.mark.parametrize("bn_opset", [1, 6])
def test_skip_training_mode_is_test_0(bn_opset: int) -> None:
    b = conv_bn(bn_opset=bn_opset)
    bn = node_named(b.model.graph, "bn")
    for a in bn.attribute:
        if a.name == "is_test":
            a.i = 0
    assert_skipped(b.model, "training_mode", check=True)


def test_skip_training_mode_is_test_missing_bn6() -> None:
    b = conv_bn(bn_opset=6)
    bn = node_named(b.model.graph, "bn")
    kept = [a for a in bn.attribute if a.name != "is_test"]
    del bn.attribute[:]
    bn.attribute.extend(kept)
    assert_skipped(b.model, "training_mode")


@pytest.mark.parametrize("bn_opset", [7, 9])
def test_skip_training_outputs(bn_opset: int) -> None:
    b = conv_bn(bn_opset=bn_opset)
    bn = node_named(b.model.graph, "bn")
    bn.output.extend(["rm", "rv", "sm", "sv"])
    assert_skipped(b.model, "training_mode")


def test_skip_spatial_mode() -> None:
    b = conv_bn(bn_opset=7, opset=7)
    node_named(b.model.graph, "bn").attribute.append(helper.make_attribute("spatial", 0))
    assert_skipped(b.model, "spatial_mode")


def test_skip_attribute_ref_epsilon() -> None:
    assert_skipped(function_model(eps_ref=True).model, "attribute_ref", check=True)


def test_skip_attribute_ref_group() -> None:
    b = function_model()
    f = b.model.functions[0]
    conv = next(n for n in f.node if n.op_type == "Conv")
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = "group", "g", onnx.AttributeProto.INT
    conv.attribute.append(a)
    f.attribute_proto.append(helper.make_attribute("g", 1))
    assert_skipped(b.model, "attribute_ref", check=True)


def test_skip_malformed() -> None:
    b = conv_bn()
    bn = node_named(b.model.graph, "bn")
    del bn.input[4]
    assert_skipped(b.model, "malformed")


def test_skip_malformed_conv_without_weight() -> None:
    b = conv_bn(bias=False)
    conv = node_named(b.model.graph, "conv")
    del conv.input[1]
    assert_skipped(b.model, "malformed")


def test_skip_no_producer() -> None:
    gb = GraphBuilder()
    gb.input("X", F32, [1, 4, 3, 3])
    add_bn(gb, "X", "Y", bn_stats(np.random.default_rng(0), 4), dtype=F32, bn_opset=15, prefix="bn")
    gb.output("Y", F32, [1, 4, 3, 3])
    assert_skipped(gb.model(17), "no_producer", check=True)


def test_skip_producer_outside_scope() -> None:
    rng = np.random.default_rng(0)
    gb = GraphBuilder()
    gb.input("X", F32, [1, 3, 5, 5])
    gb.input("cond", np.bool_, [])
    gb.node(
        "Conv",
        ["X", gb.const("W", rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32))],
        ["c"],
        name="conv",
        kernel_shape=[3, 3],
    )
    then = GraphBuilder()
    add_bn(then, "c", "ty", bn_stats(rng, 4), dtype=F32, bn_opset=15, prefix="bn")
    then.output("ty", F32, [1, 4, 3, 3])
    # BN params are initializers of the branch itself
    other = GraphBuilder()
    other.node("Identity", ["c"], ["ey"], name="eid")
    other.output("ey", F32, [1, 4, 3, 3])
    gb.node("If", ["cond"], ["Y"], name="if", then_branch=then.graph("then"), else_branch=other.graph("else"))
    gb.output("Y", F32, [1, 4, 3, 3])
    assert_skipped(gb.model(17), "producer_outside_scope", check=True)


@pytest.mark.parametrize("producer", ["Relu", "Add_of_activations", "custom"])
def test_skip_unsupported_producer(producer: str) -> None:
    b = conv_bn()
    conv = node_named(b.model.graph, "conv")
    if producer == "Relu":
        conv.output[0] = "pre"
        b.model.graph.node.insert(1, helper.make_node("Relu", ["pre"], ["conv_out"], name="relu"))
    elif producer == "custom":
        conv.domain = "com.example"
        b.model.opset_import.append(helper.make_opsetid("com.example", 1))
    else:  # an Add whose other operand is not a constant (a residual): not a foldable chain
        conv.output[0] = "pre"
        b.model.graph.node.insert(1, helper.make_node("Add", ["pre", "pre"], ["conv_out"], name="add"))
        assert_skipped(b.model, "unsupported_producer", check=True)
        return
    assert_skipped(b.model, "unsupported_producer")


def test_skip_graph_output() -> None:
    b = conv_bn()
    b.model.graph.output.append(helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, None))
    assert_skipped(b.model, "graph_output")


def test_skip_multiple_consumers() -> None:
    b = conv_bn()
    b.model.graph.node.append(helper.make_node("Relu", ["conv_out"], ["r"], name="side"))
    b.model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 6, 3, 3]))
    assert_skipped(b.model, "multiple_consumers", check=True)


def test_skip_multiple_consumers_via_subgraph() -> None:
    b = conv_bn()
    g = b.model.graph
    g.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    then = helper.make_graph(
        [helper.make_node("Identity", ["conv_out"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 6, 3, 3])],
    )
    els = helper.make_graph(
        [helper.make_node("Identity", ["Y"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 6, 3, 3])],
    )
    g.node.append(helper.make_node("If", ["cond"], ["Z"], name="if", then_branch=then, else_branch=els))
    g.output.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [2, 6, 3, 3]))
    assert_skipped(b.model, "multiple_consumers", check=True)


@pytest.mark.parametrize("form", ["input", "initializer_input"])
def test_skip_param_not_constant(form: str) -> None:
    b = conv_bn(param_form=form)
    report = assert_skipped(b.model, "param_not_constant", check=True)
    assert "graph input" in report.skipped[0].message


def test_skip_param_not_constant_computed_from_input() -> None:
    b = conv_bn()
    g = b.model.graph
    g.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [6]))
    g.node.insert(0, helper.make_node("Mul", ["bn_scale", "s"], ["scale2"], name="mul"))
    node_named(g, "bn").input[1] = "scale2"
    assert_skipped(b.model, "param_not_constant", check=True)


@pytest.mark.parametrize("form", ["input", "initializer_input"])
def test_skip_weight_not_constant(form: str) -> None:
    assert_skipped(conv_bn(weight_form=form, bias=False).model, "weight_not_constant", check=True)


def test_skip_weight_not_constant_random() -> None:
    b = conv_bn(bias=False, opset=17)
    g = b.model.graph
    for t in list(g.initializer):
        if t.name == "W":
            g.initializer.remove(t)
    g.node.insert(0, helper.make_node("RandomNormal", [], ["W"], name="rand", shape=[6, 4, 3, 3]))
    assert_skipped(b.model, "weight_not_constant", check=True)


def test_skip_bias_not_constant() -> None:
    b = conv_bn()
    g = b.model.graph
    for t in list(g.initializer):
        if t.name == "Bc":
            g.initializer.remove(t)
    g.input.append(helper.make_tensor_value_info("Bc", TensorProto.FLOAT, [6]))
    assert_skipped(b.model, "bias_not_constant", check=True)


def test_skip_bias_not_constant_gemm_initializer_input() -> None:
    b = gemm_bn(weight_form="initializer")
    g = b.model.graph
    g.input.append(helper.make_tensor_value_info("C", TensorProto.FLOAT, [4]))
    assert_skipped(b.model, "bias_not_constant", check=True)


def _replace_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def test_skip_unsupported_dtype_params() -> None:
    b = conv_bn()
    _replace_init(b.model, "bn_var", np.ones(6, np.int64))
    assert_skipped(b.model, "unsupported_dtype")


def test_skip_unsupported_dtype_bias_differs() -> None:
    b = conv_bn()
    _replace_init(b.model, "Bc", np.ones(6, np.float64))
    assert_skipped(b.model, "unsupported_dtype")


def test_skip_param_shape() -> None:
    b = conv_bn()
    _replace_init(b.model, "bn_mean", np.zeros((6, 1), np.float32))
    assert_skipped(b.model, "param_shape")


@pytest.mark.parametrize(
    ("name", "value"), [("bn_var", np.nan), ("bn_mean", np.inf), ("W", np.nan), ("Bc", -np.inf)]
)
def test_skip_non_finite(name: str, value: float) -> None:
    b = conv_bn()
    arr = initializer(b.model, name).copy()
    arr.reshape(-1)[1] = value
    _replace_init(b.model, name, arr)
    assert_skipped(b.model, "non_finite", check=True)


def test_skip_invalid_variance() -> None:
    b = conv_bn()
    _replace_init(b.model, "bn_var", np.array([1, 1, -2, 1, 1, 1], np.float32))
    assert_skipped(b.model, "invalid_variance", check=True)


def test_skip_invalid_variance_zero_var_zero_eps() -> None:
    b = conv_bn(epsilon=0.0)
    _replace_init(b.model, "bn_var", np.array([1, 1, 0, 1, 1, 1], np.float32))
    assert_skipped(b.model, "invalid_variance", check=True)


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose", "Gemm"])
def test_skip_channel_mismatch(op: str) -> None:
    b = gemm_bn() if op == "Gemm" else conv_bn(op=op)
    for k in ("scale", "B", "mean", "var"):
        arr = initializer(b.model, f"bn_{k}")
        _replace_init(b.model, f"bn_{k}", np.concatenate([arr, arr[:1]]))
    assert_skipped(b.model, "channel_mismatch")


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_skip_invalid_group(op: str) -> None:
    b = conv_bn(op=op, cin=4, cout=6)
    node_named(b.model.graph, "conv").attribute.append(helper.make_attribute("group", 5))
    assert_skipped(b.model, "invalid_group")


def test_skip_weight_shape() -> None:
    b = gemm_bn()
    _replace_init(b.model, "W", np.ones((5, 4, 1), np.float32))
    assert_skipped(b.model, "weight_shape")


def test_skip_weight_shape_conv() -> None:
    b = conv_bn(bias=False)
    _replace_init(b.model, "W", np.ones((6, 4), np.float32))
    assert_skipped(b.model, "weight_shape")


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_skip_bias_shape(op: str) -> None:
    if op == "Conv":
        b = conv_bn()
        _replace_init(b.model, "Bc", np.ones(7, np.float32))
    else:
        b = gemm_bn()
        _replace_init(b.model, "C", np.ones(5, np.float32))
    assert_skipped(b.model, "bias_shape")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_skip_overflow(dtype: np.dtype) -> None:
    b = conv_bn(dtype=dtype, param_dtype=F32)
    var = np.full(6, 1.0, np.float32)
    var[2] = 1e-30
    _replace_init(b.model, "bn_var", var)
    b.model.graph.node[-1].attribute.append(helper.make_attribute("epsilon", 0.0))
    if dtype == BF16:
        scale = initializer(b.model, "bn_scale").copy()
        scale[2] = 1e30
        _replace_init(b.model, "bn_scale", scale)
    assert_skipped(b.model, "overflow", check=True)


def test_skip_leaves_other_bns_folding() -> None:
    """One refused BN does not stop another from folding; the refused one is untouched."""
    b = _shared_weight_model(second_bn=True)
    _replace_init(b.model, "bn2_var", -np.ones(4, np.float32))
    bn2 = node_named(b.model.graph, "bn2")
    bn2_bytes = bn2.SerializeToString()
    folded, report = fold(b.model)
    assert [s.code for s in report.skipped] == ["invalid_variance"] and len(report.folded) == 1
    assert node_named(folded.graph, "bn2").SerializeToString() == bn2_bytes
    conv2 = node_named(folded.graph, "conv2")
    assert list(conv2.input) == ["X", "W", "Bc"] and conv2.output[0] == "c2"
    np.testing.assert_array_equal(initializer(folded, "W"), initializer(b.model, "W"))
    np.testing.assert_array_equal(initializer(folded, "bn2_var"), -np.ones(4, np.float32))
    check_model(folded)


def test_skip_report_fields() -> None:
    b = conv_bn(bn_opset=14)
    node_named(b.model.graph, "bn").attribute.append(helper.make_attribute("training_mode", 1))
    report = assert_skipped(b.model, "training_mode")
    s = report.skipped[0]
    assert (s.bn, s.graph, s.producer, s.producer_op) == ("bn", "main", "conv", "Conv")
    assert report.to_dict()["skipped"][0]["code"] == "training_mode"


def _set_attr(node_name: str, name: str, value) -> callable:
    def mutate(m: onnx.ModelProto) -> None:
        node_named(m.graph, node_name).attribute.append(helper.make_attribute(name, value))

    return mutate


def _corrupt_tensor(name: str, how: str) -> callable:
    def mutate(m: onnx.ModelProto) -> None:
        tensors = [t for t in m.graph.initializer if t.name == name]
        tensors += [n.attribute[0].t for n in m.graph.node if n.op_type == "Constant" and n.output[0] == name]
        (t,) = tensors
        if how == "short":
            t.raw_data = t.raw_data[:-4]
        elif how == "odd":
            t.raw_data = b"123"
        elif how == "undefined":
            t.data_type = 0
        elif how == "external":
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            e = t.external_data.add()
            e.key, e.value = "location", "missing.bin"

    return mutate


def _two_outputs(m: onnx.ModelProto) -> None:
    node_named(m.graph, "conv").output.append("extra")


MALFORMED = {
    "epsilon_string": (lambda: conv_bn(), _set_attr("bn", "epsilon", "abc")),
    "epsilon_list": (lambda: conv_bn(), _set_attr("bn", "epsilon", [1.0, 2.0])),
    "epsilon_int": (lambda: conv_bn(), _set_attr("bn", "epsilon", 0)),
    "training_mode_string": (lambda: conv_bn(bn_opset=14), _set_attr("bn", "training_mode", "x")),
    "is_test_float": (
        lambda: conv_bn(bn_opset=6),
        lambda m: [
            a.CopyFrom(helper.make_attribute("is_test", 1.0))
            for a in node_named(m.graph, "bn").attribute
            if a.name == "is_test"
        ],
    ),
    "group_list": (lambda: conv_bn(), _set_attr("conv", "group", [1, 2])),
    "group_float": (lambda: conv_bn(), _set_attr("conv", "group", 1.5)),
    "transB_string": (lambda: gemm_bn(), _set_attr("gemm", "transB", "x")),
    "beta_string": (lambda: gemm_bn(), _set_attr("gemm", "beta", "x")),
    "weight_truncated": (lambda: conv_bn(), _corrupt_tensor("W", "short")),
    "var_truncated": (lambda: conv_bn(), _corrupt_tensor("bn_var", "short")),
    "var_undefined_type": (lambda: conv_bn(), _corrupt_tensor("bn_var", "undefined")),
    "constant_weight_bad_buffer": (lambda: conv_bn(weight_form="constant_node"), _corrupt_tensor("W", "odd")),
    "weight_external_missing": (lambda: conv_bn(), _corrupt_tensor("W", "external")),
    "conv_two_outputs": (lambda: conv_bn(bias=False), _two_outputs),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_skip_malformed_never_raises(case: str) -> None:
    build, mutate = MALFORMED[case]
    b = build()
    mutate(b.model)
    assert_skipped(b.model, "malformed")


# ----- metadata-only readers (Shape, Size, CastLike's type input) are not consumers -------------
def _with_readers(readers: list[tuple[str, list[str]]]) -> Built:
    """Conv -> BN (``conv_bn``) plus nodes reading the conv output, each a graph output."""
    b = conv_bn()
    g = b.model.graph
    for i, (op, inputs) in enumerate(readers):
        g.node.append(helper.make_node(op, inputs, [f"m{i}"], name=f"meta{i}"))
        g.output.append(helper.make_tensor_value_info(f"m{i}", TensorProto.UNDEFINED, None))
    b.model = onnx.shape_inference.infer_shapes(b.model)
    return b


@pytest.mark.parametrize(
    "readers",
    [
        [("Shape", ["conv_out"])],
        [("Size", ["conv_out"]), ("Shape", ["conv_out"])],
        [("CastLike", ["X", "conv_out"])],
    ],
    ids=["shape", "size_and_shape", "castlike_type"],
)
def test_metadata_readers_do_not_block_the_fold(readers: list[tuple[str, list[str]]]) -> None:
    b = _with_readers(readers)
    model = b.model
    check_model(model)
    folded, report = fold(model)
    assert [f.pattern for f in report.folded] == ["bn_after"], report.skipped
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    readers_after = [n for n in folded.graph.node if n.name.startswith("meta")]
    conv = node_named(folded.graph, "conv")
    assert all(conv.output[0] in n.input for n in readers_after)  # they read the name that stays
    check_model(folded)
    assert_ort_equivalent(model, folded, b.feeds, F32)
    again, rep2 = fold(folded)
    assert not rep2.folded and again.SerializeToString() == folded.SerializeToString()


def test_skip_multiple_consumers_castlike_reads_the_values() -> None:
    # CastLike's first input is data: a real consumer
    assert_skipped(_with_readers([("CastLike", ["conv_out", "X"])]).model, "multiple_consumers")


def test_skip_multiple_consumers_shape_and_a_real_consumer() -> None:
    assert_skipped(
        _with_readers([("Shape", ["conv_out"]), ("Relu", ["conv_out"])]).model, "multiple_consumers"
    )
