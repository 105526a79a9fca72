"""The ONNX pass end to end on small models built with ``onnx.helper``.

Every positive test checks the fold count, that the BN is gone, ``onnx.checker`` (full check)
and the numerics of original vs folded computed here: onnxruntime with every optimization off,
or (for what onnxruntime's CPU provider cannot run: bfloat16, float64 Conv, BN opset 1/6) a
float64 torch evaluation of the original Conv+BN against the folded layer, within the bound
that rounding the folded tensors once allows. bnfold's own verification is never used here.

Every negative test checks the reason code, that the BN and its layer are untouched and that
no exception escapes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import (
    BF16,
    F16,
    F32,
    F64,
    Built,
    GraphBuilder,
    add_bn,
    assert_f64_equivalent,
    assert_ort_equivalent,
    bn_stats,
    check_model,
    conv_bn,
    count_ops,
    function_model,
    gemm_bn,
    if_model,
    initializer,
    loop_model,
    node_named,
    run_ort,
    scan_model,
)

import bnfold
from bnfold.onnx.driver import fold_model


def fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bnfold.FoldReport]:
    out = copy.deepcopy(model)
    report = fold_model(out)
    return out, report


def ort_runnable(b: Built) -> bool:
    opset = {o.domain: o.version for o in b.model.opset_import}.get("", 1)
    if b.dtype == BF16 or opset < 7:
        return False
    if b.dtype == F64:
        return all(n.op_type not in ("Conv", "ConvTranspose") for n in b.model.graph.node)
    return True


def assert_folds(b: Built, n: int = 1, *, f64: bool | None = None) -> onnx.ModelProto:
    """Fold ``b``; check count, BN gone, checker and numerics. Returns the folded model."""
    check_model(b.model)
    folded, report = fold(b.model)
    assert len(report.folded) == n, report.skipped
    assert not report.skipped, report.skipped
    assert count_ops(folded, "BatchNormalization") == count_ops(b.model, "BatchNormalization") - n
    check_model(folded)
    if ort_runnable(b):
        assert_ort_equivalent(b.model, folded, b.feeds, b.dtype)
    if f64 or (f64 is None and not ort_runnable(b)) or b.dtype == F16:
        assert_f64_equivalent(b.model, folded, b.feeds, b.dtype)
    # tensor dtypes never change
    before = {t.name: t.data_type for t in b.model.graph.initializer}
    for t in folded.graph.initializer:
        if t.name in before:
            assert t.data_type == before[t.name], t.name
    return folded


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


# ==============================================================================================
# Conv / ConvTranspose / Gemm geometry
# ==============================================================================================
CONV_CASES = {
    "1d": dict(rank=1, size=7),
    "1d_no_bias": dict(rank=1, bias=False, size=6),
    "2d": dict(),
    "2d_no_bias": dict(bias=False),
    "3d": dict(rank=3, size=4, kernel=2),
    "3d_no_bias_grouped": dict(rank=3, size=4, kernel=[1, 2, 3], cin=4, cout=4, group=2, bias=False),
    "grouped": dict(cin=6, cout=9, group=3),
    "depthwise": dict(cin=5, cout=5, group=5),
    "depthwise_multiplier": dict(cin=3, cout=6, group=3),
    "dilated": dict(dilations=[2, 1], size=7),
    "strided": dict(strides=[2, 3], size=8),
    "pads_asymmetric": dict(pads=[0, 1, 2, 1]),
    "same_upper": dict(auto_pad="SAME_UPPER", strides=[2, 2], size=6),
    "same_lower": dict(auto_pad="SAME_LOWER", size=6, kernel=2),
    "valid": dict(auto_pad="VALID"),
    "everything_3d": dict(
        rank=3,
        cin=4,
        cout=8,
        group=2,
        strides=[1, 2, 1],
        dilations=[1, 1, 2],
        pads=[1, 0, 1, 0, 1, 1],
        size=5,
        kernel=2,
    ),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv(case: str) -> None:
    assert_folds(conv_bn(**CONV_CASES[case]))


CONV_T_CASES = {
    "1d": dict(rank=1, size=4),
    "2d": dict(),
    "2d_no_bias": dict(bias=False),
    "3d": dict(rank=3, size=3, kernel=2, strides=[2, 1, 2]),
    "grouped": dict(cin=4, cout=6, group=2),
    "grouped_no_bias_strided": dict(cin=6, cout=4, group=2, strides=[2, 2], bias=False),
    "depthwise": dict(cin=4, cout=4, group=4, strides=[2, 2]),
    "group3_3d": dict(rank=3, cin=3, cout=6, group=3, size=3, kernel=2),
    "output_padding": dict(strides=[2, 2], output_padding=[1, 0]),
    "pads": dict(pads=[1, 0, 0, 1], strides=[2, 2]),
    "dilated": dict(dilations=[2, 2]),
    "same_upper": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "valid": dict(auto_pad="VALID", strides=[2, 1]),
    "output_shape": dict(strides=[2, 2], output_shape=[10, 11]),
}


@pytest.mark.parametrize("case", CONV_T_CASES)
def test_conv_transpose(case: str) -> None:
    assert_folds(conv_bn(op="ConvTranspose", **CONV_T_CASES[case]))


def test_conv_transpose_grouped_in_float64_reference() -> None:
    """Grouped ConvTranspose checked against torch in float64 too (independent of ORT)."""
    assert_folds(conv_bn(op="ConvTranspose", cin=6, cout=9, group=3, strides=[2, 2]), f64=True)


GEMM_CASES = {
    "plain": dict(),
    "transB": dict(trans_b=1),
    "transA": dict(trans_a=1),
    "transA_transB": dict(trans_a=1, trans_b=1),
    "alpha": dict(alpha=0.5),
    "beta": dict(beta=2.5),
    "alpha_beta_negative": dict(alpha=-1.5, beta=-0.25),
    "beta_zero": dict(beta=0.0),
    "no_C": dict(c_shape=None),
    "no_C_alpha_transB": dict(c_shape=None, alpha=3.0, trans_b=1),
    "C_1xN": dict(c_shape=(1, 4)),
    "C_scalar": dict(c_shape=()),
    "C_1": dict(c_shape=(1,)),
    "C_MxN": dict(c_shape=(3, 4), beta=0.5),
    "C_Mx1": dict(c_shape=(3, 1)),
    "C_1x1": dict(c_shape=(1, 1)),
}


@pytest.mark.parametrize("case", GEMM_CASES)
def test_gemm(case: str) -> None:
    folded = assert_folds(gemm_bn(**GEMM_CASES[case]), f64=True)
    gemm = node_named(folded.graph, "gemm")
    beta = [a.f for a in gemm.attribute if a.name == "beta"]
    assert beta in ([], [1.0])


@pytest.mark.parametrize("opset", [6, 7, 9, 11, 13])
def test_gemm_old_opsets(opset: int) -> None:
    b = gemm_bn(bn_opset=min(opset, 9) if opset >= 7 else 6, opset=opset, trans_b=1, beta=0.5)
    folded = assert_folds(b, f64=True)
    if opset < 7:
        gemm = node_named(folded.graph, "gemm")
        assert helper.get_attribute_value(next(a for a in gemm.attribute if a.name == "broadcast")) == 1


# ==============================================================================================
# BN opsets, epsilon, dtypes
# ==============================================================================================
@pytest.mark.parametrize("bn_opset", [1, 6, 7, 9, 14, 15])
@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_bn_opsets(bn_opset: int, op: str) -> None:
    b = conv_bn(op=op, bn_opset=bn_opset, epsilon=1e-3, seed=bn_opset)
    folded = assert_folds(b)
    if bn_opset < 7:
        assert folded.ir_version == 3


@pytest.mark.parametrize("bn_opset", [1, 6, 7, 9, 14, 15])
def test_bn_opsets_gemm(bn_opset: int) -> None:
    assert_folds(gemm_bn(bn_opset=bn_opset, opset=bn_opset, c_shape=(4,)), f64=True)


@pytest.mark.parametrize("bn_opset", [6, 7, 9, 14, 15])
def test_missing_epsilon_defaults_to_1e_5(bn_opset: int) -> None:
    """Variances near zero make the epsilon visible: a wrong default fails numerically."""
    b = conv_bn(bn_opset=bn_opset, seed=3)
    for t in b.model.graph.initializer:
        if t.name == "bn_var":
            t.CopyFrom(numpy_helper.from_array(np.full(6, 1e-5, np.float32), "bn_var"))
    assert not any(a.name == "epsilon" for a in node_named(b.model.graph, "bn").attribute)
    assert_folds(b, f64=True)


@pytest.mark.parametrize("eps", [0.0, 1e-7, 1e-3, 0.5])
def test_epsilon_values(eps: float) -> None:
    assert_folds(conv_bn(epsilon=eps, seed=4), f64=True)


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_dtypes_conv(dtype: np.dtype, op: str) -> None:
    b = conv_bn(op=op, dtype=dtype, cin=4, cout=6, group=2)
    folded = assert_folds(b)
    assert initializer(folded, "W").dtype == dtype
    assert initializer(folded, "Bc").dtype == dtype


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
def test_dtypes_conv_no_bias(dtype: np.dtype) -> None:
    folded = assert_folds(conv_bn(dtype=dtype, bias=False))
    conv = node_named(folded.graph, "conv")
    assert initializer(folded, conv.input[2]).dtype == dtype


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
def test_dtypes_gemm(dtype: np.dtype) -> None:
    assert_folds(gemm_bn(dtype=dtype, trans_b=1), f64=True)


@pytest.mark.parametrize(
    ("x", "p", "m"),
    [
        (F16, F32, F32),
        (F32, F16, F16),
        (F16, F16, F32),
        (F32, F64, F64),
        (F16, F32, F64),
        (BF16, F32, F32),
        (F64, F32, F16),
        (BF16, F64, F16),
    ],
)
def test_bn15_mixed_param_dtypes(x: np.dtype, p: np.dtype, m: np.dtype) -> None:
    b = conv_bn(dtype=x, param_dtype=p, mean_dtype=m, bn_opset=15, opset=22 if x == BF16 else 17)
    ort_ok = ort_runnable(b)
    if ort_ok:
        try:
            run_ort(b.model, b.feeds)
        except Exception:
            ort_ok = False
    folded, report = fold(b.model)
    assert len(report.folded) == 1
    check_model(folded)
    assert initializer(folded, "W").dtype == x
    if ort_ok:
        assert_ort_equivalent(b.model, folded, b.feeds, x)
    assert_f64_equivalent(b.model, folded, b.feeds, x)


def test_float16_rounded_once_from_float64() -> None:
    """The folded float16 weight is the float64 product rounded once, not computed in float16."""
    b = conv_bn(dtype=F16, param_dtype=F32, seed=11)
    folded, _ = fold(b.model)
    w = initializer(b.model, "W").astype(np.float64)
    g, beta, m, v = (
        initializer(b.model, f"bn_{k}").astype(np.float64) for k in ("scale", "B", "mean", "var")
    )
    s = g / np.sqrt(v + np.float64(np.float32(1e-5)))
    np.testing.assert_array_equal(initializer(folded, "W"), (w * s[:, None, None, None]).astype(np.float16))
    bias = initializer(b.model, "Bc").astype(np.float64)
    np.testing.assert_array_equal(initializer(folded, "Bc"), (bias * s + beta - s * m).astype(np.float16))


# ==============================================================================================
# where the constants come from
# ==============================================================================================
@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_constant_node_weights_and_params(op: str) -> None:
    b = conv_bn(op=op, weight_form="constant_node", param_form="constant_node")
    folded = assert_folds(b)
    # the BN's Constant nodes are gone, the weight/bias Constant nodes hold the folded values
    consts = [n.output[0] for n in folded.graph.node if n.op_type == "Constant"]
    assert sorted(consts) == ["Bc", "W"]
    assert not folded.graph.initializer


def test_constant_node_gemm() -> None:
    assert_folds(
        gemm_bn(weight_form="constant_node", param_form="constant_node", trans_b=1, c_shape=(1, 4)), f64=True
    )


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


# ==============================================================================================
# IR < 4
# ==============================================================================================
@pytest.mark.parametrize("bias", [True, False])
def test_ir3_initializers_listed_as_inputs(bias: bool) -> None:
    b = conv_bn(bn_opset=7, opset=7, ir_version=3, bias=bias)
    assert {v.name for v in b.model.graph.input} >= {"W", "bn_scale"}
    folded = assert_folds(b)
    assert folded.ir_version == 3
    inputs = [v.name for v in folded.graph.input]
    inits = [t.name for t in folded.graph.initializer]
    assert set(inits) <= set(inputs)  # valid IR 3: every initializer is listed as an input
    assert not any(n.startswith("bn_") for n in inputs)  # the BN's parameters left with it
    assert inputs[0] == "X"


def test_ir3_shared_weight_new_initializer_listed_as_input() -> None:
    b = _shared_weight_model(ir_version=3, opset=7, second_bn=False)
    folded = assert_folds(b)
    inputs = {v.name for v in folded.graph.input}
    inits = {t.name for t in folded.graph.initializer}
    assert inits <= inputs
    assert "W" in inits and len(inits - {"W", "Bc"}) == 2  # W and Bc kept for the other conv


def test_ir3_if_subgraph_copy_on_write_keeps_valid_ir3() -> None:
    """IR 3: a fold inside an If branch that needs a new constant must not add inputs to the
    branch (branches take no inputs)."""
    b = if_model(shared_weight=True)
    b.model.ir_version = 3
    b.model.opset_import[0].version = 7
    for t in b.model.graph.initializer:
        b.model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    folded = assert_folds(b)
    if_node = folded.graph.node[0]
    for a in if_node.attribute:
        assert not a.g.input, a.name


# ==============================================================================================
# sharing
# ==============================================================================================
def _shared_weight_model(*, ir_version: int | None = None, opset: int = 17, second_bn: bool = True) -> Built:
    """Two convs on one weight and bias; conv1 -> BN1; conv2 -> BN2 (different stats) or nothing."""
    rng = np.random.default_rng(7)
    gb = GraphBuilder()
    gb.input("X", F32, [1, 3, 5, 5])
    gb.const("W", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32))
    gb.const("Bc", rng.normal(0, 1, 4).astype(np.float32))
    gb.node("Conv", ["X", "W", "Bc"], ["c1"], name="conv1", kernel_shape=[3, 3])
    gb.node("Conv", ["X", "W", "Bc"], ["c2"], name="conv2", kernel_shape=[3, 3])
    add_bn(gb, "c1", "Y1", bn_stats(rng, 4), dtype=F32, bn_opset=min(opset, 15), prefix="bn1")
    if second_bn:
        add_bn(gb, "c2", "Y2", bn_stats(rng, 4), dtype=F32, bn_opset=min(opset, 15), prefix="bn2")
    else:
        gb.node("Identity", ["c2"], ["Y2"], name="id2")
    gb.output("Y1", F32, [1, 4, 3, 3])
    gb.output("Y2", F32, [1, 4, 3, 3])
    feeds = {"X": rng.normal(0, 1, (1, 3, 5, 5)).astype(np.float32)}
    return Built(gb.model(opset, ir_version), feeds, F32)


def test_shared_weight_copy_on_write_other_conv_unchanged() -> None:
    b = _shared_weight_model(second_bn=False)
    folded = assert_folds(b)
    conv1, conv2 = node_named(folded.graph, "conv1"), node_named(folded.graph, "conv2")
    assert list(conv2.input) == ["X", "W", "Bc"]
    np.testing.assert_array_equal(initializer(folded, "W"), initializer(b.model, "W"))
    np.testing.assert_array_equal(initializer(folded, "Bc"), initializer(b.model, "Bc"))
    assert conv1.input[1] not in ("W",) and conv1.input[2] != "Bc"


def test_shared_weight_two_bns() -> None:
    b = _shared_weight_model(second_bn=True)
    folded = assert_folds(b, 2)
    conv1, conv2 = node_named(folded.graph, "conv1"), node_named(folded.graph, "conv2")
    assert conv1.input[1] != conv2.input[1]
    assert len(folded.graph.initializer) == 4  # two folded weights, two folded biases


def test_shared_bn_params() -> None:
    rng = np.random.default_rng(8)
    gb = GraphBuilder()
    gb.input("X", F32, [1, 3, 5, 5])
    st = bn_stats(rng, 4)
    params = [gb.const(f"p_{k}", st[k].astype(np.float32)) for k in ("scale", "B", "mean", "var")]
    for i in (1, 2):
        w = gb.const(f"W{i}", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32))
        gb.node("Conv", ["X", w], [f"c{i}"], name=f"conv{i}", kernel_shape=[3, 3])
        gb.node("BatchNormalization", [f"c{i}", *params], [f"Y{i}"], name=f"bn{i}")
        gb.output(f"Y{i}", F32, [1, 4, 3, 3])
    b = Built(gb.model(17), {"X": rng.normal(0, 1, (1, 3, 5, 5)).astype(np.float32)}, F32)
    folded = assert_folds(b, 2)
    assert not any(t.name.startswith("p_") for t in folded.graph.initializer)


def test_bn_param_also_used_elsewhere_is_kept() -> None:
    b = conv_bn(relu=True)
    g = b.model.graph
    g.node.append(helper.make_node("Identity", ["bn_mean"], ["mean_out"], name="mean_id"))
    g.output.append(helper.make_tensor_value_info("mean_out", TensorProto.FLOAT, [6]))
    folded = assert_folds(b)
    assert "bn_mean" in {t.name for t in folded.graph.initializer}
    assert {t.name for t in folded.graph.initializer} == {"W", "Bc", "bn_mean"}


def test_conv_bn_bn_chain() -> None:
    b = conv_bn(seed=12)
    g = b.model.graph
    node_named(g, "bn").output[0] = "mid"
    rng = np.random.default_rng(13)
    gb = GraphBuilder()
    add_bn(gb, "mid", "Y", bn_stats(rng, 6), dtype=F32, bn_opset=15, prefix="bn2", epsilon=1e-2)
    g.node.extend(gb.nodes)
    g.initializer.extend(gb.initializers)
    folded = assert_folds(b, 2, f64=True)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.node[0].output[0] == "Y"


# ==============================================================================================
# subgraphs and functions
# ==============================================================================================
@pytest.mark.parametrize("shared", [False, True])
def test_if_branch_outer_scope_weights(shared: bool) -> None:
    b = if_model(shared_weight=shared)
    folded = assert_folds(b)
    for cond in (True, False):
        feeds = {**b.feeds, "cond": np.array(cond)}
        assert_ort_equivalent(b.model, folded, feeds)
    if shared:  # the else branch still uses the original outer weight
        els = next(a.g for a in folded.graph.node[0].attribute if a.name == "else_branch")
        assert els.node[0].input[1] == "t_W"
        np.testing.assert_array_equal(initializer(folded, "t_W"), initializer(b.model, "t_W"))
    # BN params (outer initializers) are gone
    assert not any(t.name in ("t_scale", "t_B", "t_mean", "t_var") for t in folded.graph.initializer)


def test_loop_body_outer_scope_weights() -> None:
    folded = assert_folds(loop_model())
    assert not any(t.name in ("l_scale", "l_var") for t in folded.graph.initializer)


def test_scan_body_outer_scope_weights() -> None:
    assert_folds(scan_model())


def test_nested_if_inside_loop() -> None:
    """A BN two levels deep (If inside a Loop body) on weights of the main graph."""
    b = loop_model()
    g = b.model.graph
    loop = g.node[0]
    body = loop.attribute[0].g
    # move the Conv+BN of the body into an If(then) inside the body
    conv_bn_nodes = [n for n in body.node if n.op_type in ("Conv", "BatchNormalization")]
    rest = [n for n in body.node if n.op_type not in ("Conv", "BatchNormalization")]
    then = helper.make_graph(
        conv_bn_nodes, "then", [], [helper.make_tensor_value_info("body_y", TensorProto.FLOAT, [1, 4, 5, 5])]
    )
    els = helper.make_graph(
        [helper.make_node("Identity", ["v_in"], ["e_y"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_y", TensorProto.FLOAT, [1, 4, 5, 5])],
    )
    del body.node[:]
    body.node.append(
        helper.make_node("If", ["c_in"], ["body_y"], name="inner_if", then_branch=then, else_branch=els)
    )
    body.node.extend(rest)
    assert_folds(b)


@pytest.mark.parametrize("calls", [1, 2])
def test_model_local_function(calls: int) -> None:
    b = function_model(calls=calls)
    folded = assert_folds(b)
    f = folded.functions[0]
    assert [n.op_type for n in f.node].count("Constant") == 2  # folded weight and bias
    assert "BatchNormalization" not in [n.op_type for n in f.node]


def test_function_shared_constant_weight_copy_on_write() -> None:
    b = function_model()
    f = b.model.functions[0]
    # a second Conv in the function on the same Constant weight, without BN
    f.node.append(
        helper.make_node("Conv", ["x", "fw"], ["y2"], name="f_conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    )
    f.output.append("y2")
    call = b.model.graph.node[0]
    call.output.append("Y2")
    b.model.graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [1, 4, 5, 5]))
    folded = assert_folds(b)
    conv2 = next(n for n in folded.functions[0].node if n.name == "f_conv2")
    assert conv2.input[1] == "fw"


# ==============================================================================================
# interface preservation, determinism, idempotence
# ==============================================================================================
def _decorated() -> Built:
    b = conv_bn(relu=True, seed=21)
    m = b.model
    g = m.graph
    m.doc_string = "model doc"
    g.doc_string = "graph doc"
    m.domain = "test.domain"
    m.model_version = 7
    helper.set_model_props(m, {"author": "tests", "k": "v"})
    node_named(g, "conv").doc_string = "conv doc"
    # second input and output, in an order that is not alphabetical
    g.input.insert(0, helper.make_tensor_value_info("Z_extra", TensorProto.FLOAT, [2]))
    g.node.append(helper.make_node("Identity", ["Z_extra"], ["A_out"], name="id_extra"))
    g.output.append(helper.make_tensor_value_info("A_out", TensorProto.FLOAT, [2]))
    g.value_info.extend(
        [
            helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [2, 6, 3, 3]),
            helper.make_tensor_value_info("bn_out", TensorProto.FLOAT, [2, 6, 3, 3]),
        ]
    )
    g.initializer.append(numpy_helper.from_array(np.arange(3, dtype=np.float32), "unrelated_unused"))
    g.node.insert(
        0,
        helper.make_node(
            "Constant",
            [],
            ["dangling"],
            name="dangling_const",
            value=numpy_helper.from_array(np.ones(2, np.float32), "d"),
        ),
    )
    for t in g.initializer:
        if t.name == "W":
            t.doc_string = "weight doc"
    b.feeds["Z_extra"] = np.ones(2, np.float32)
    return b


def test_interface_preserved() -> None:
    b = _decorated()
    folded = assert_folds(b)
    m0, m1 = b.model, folded
    assert [v.name for v in m1.graph.input] == [v.name for v in m0.graph.input]
    assert [v.SerializeToString() for v in m1.graph.output] == [
        v.SerializeToString() for v in m0.graph.output
    ]
    assert [o.SerializeToString() for o in m1.opset_import] == [
        o.SerializeToString() for o in m0.opset_import
    ]
    for field in ("ir_version", "producer_name", "producer_version", "doc_string", "domain", "model_version"):
        assert getattr(m1, field) == getattr(m0, field), field
    assert list(m1.metadata_props) == list(m0.metadata_props)
    assert m1.graph.doc_string == "graph doc" and m1.graph.name == m0.graph.name
    assert node_named(m1.graph, "conv").doc_string == "conv doc"
    assert next(t for t in m1.graph.initializer if t.name == "W").doc_string == "weight doc"
    vi = [v.name for v in m1.graph.value_info]
    assert vi == ["bn_out"]  # conv_out's value_info is gone with the name
    names = {t.name for t in m1.graph.initializer}
    assert names == {"W", "Bc", "unrelated_unused"}  # unrelated unused initializer kept
    assert "dangling_const" in [n.name for n in m1.graph.node]  # unrelated unused Constant kept


def test_deterministic_and_idempotent() -> None:
    for b in (
        _decorated(),
        _shared_weight_model(),
        if_model(shared_weight=True),
        function_model(),
        gemm_bn(c_shape=None),
    ):
        first, _ = fold(b.model)
        second, _ = fold(b.model)
        assert first.SerializeToString() == second.SerializeToString()
        again, report = fold(first)
        assert not report.folded and not report.skipped
        assert again.SerializeToString() == first.SerializeToString()


def test_api_inputs_modelproto_path_onnx_ir(tmp_path: Path) -> None:
    import onnx_ir

    b = conv_bn(seed=5)
    before = b.model.SerializeToString()
    r1 = bnfold.fold(b.model, verify=False)
    assert b.model.SerializeToString() == before  # the caller's model is not modified
    assert len(r1.report.folded) == 1
    path = tmp_path / "m.onnx"
    onnx.save(b.model, path)
    r2 = bnfold.fold(str(path), verify=False)
    assert r2.model.SerializeToString() == r1.model.SerializeToString()
    ir_model = onnx_ir.serde.deserialize_model(b.model)
    r3 = bnfold.fold(ir_model, verify=False)
    assert len(r3.report.folded) == 1
    check_model(r3.model)
    assert_ort_equivalent(b.model, r3.model, b.feeds)


@pytest.fixture(scope="module")
def torch_program():
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 4, 3, bias=False)
            self.b1 = torch.nn.BatchNorm2d(4)
            self.c2 = torch.nn.Conv2d(4, 4, 3, groups=2, bias=False)
            self.b2 = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))

    torch.manual_seed(0)
    m = M()
    for bn in (m.b1, m.b2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.normal_(1, 0.5)
        bn.bias.data.normal_()
    m.eval()
    x = torch.randn(1, 3, 9, 9)
    program = torch.onnx.export(m, (x,), dynamo=True, optimize=False, verbose=False)
    return program, x.numpy(), m(x).detach().numpy()


def test_api_input_torch_onnx_program(torch_program) -> None:
    program, x, expected = torch_program
    original = copy.deepcopy(program.model_proto)
    result = bnfold.fold(program, verify=False)
    assert len(result.report.folded) == 2, result.report.skipped
    assert count_ops(result.model, "BatchNormalization") == 0
    # torch's Shape->Expand->CastLike zero-bias helpers went away with the fold
    assert {n.op_type for n in result.model.graph.node} <= {"Conv", "Relu"}
    check_model(result.model)
    assert_ort_equivalent(original, result.model, {program.model_proto.graph.input[0].name: x})
    (got,) = run_ort(result.model, {result.model.graph.input[0].name: x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ==============================================================================================
# every skip reason code
# ==============================================================================================
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


def _append_second_bn(nodes, initializers_or_consts, y: str, c: int, rng, *, as_constants: bool) -> None:
    """Rename the BN output ``y`` to ``y_mid`` and add a second BN ``y_mid -> y``."""
    bn = next(n for n in nodes if n.op_type == "BatchNormalization" and n.output[0] == y)
    bn.output[0] = f"{y}_mid"
    gb = GraphBuilder(const_form="constant_node" if as_constants else "initializer")
    add_bn(gb, f"{y}_mid", y, bn_stats(rng, c), dtype=F32, bn_opset=15, prefix=f"{y}_bn2")
    nodes.extend(gb.nodes)
    initializers_or_consts.extend(gb.initializers)


def test_function_shared_weight_bn_chain() -> None:
    """Copy-on-write inside a function adds a Constant node; a second BN in a chain must see it as
    a constant (and update it in place)."""
    b = function_model()
    f = b.model.functions[0]
    f.node.append(
        helper.make_node("Conv", ["x", "fw"], ["y2"], name="f_conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    )
    f.output.append("y2")
    b.model.graph.node[0].output.append("Y2")
    b.model.graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [1, 4, 5, 5]))
    _append_second_bn(f.node, [], "y", 4, np.random.default_rng(3), as_constants=True)
    folded = assert_folds(b, 2)
    consts = [n.output[0] for n in folded.functions[0].node if n.op_type == "Constant"]
    assert sorted(consts) == ["fb", "fw", "fw_folded"], consts


def test_ir3_if_shared_weight_bn_chain() -> None:
    b = if_model(shared_weight=True)
    b.model.ir_version = 3
    b.model.opset_import[0].version = 7
    then = next(a.g for a in b.model.graph.node[0].attribute if a.name == "then_branch")
    _append_second_bn(then.node, [], "then_y", 4, np.random.default_rng(4), as_constants=True)
    for t in b.model.graph.initializer:
        b.model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    folded = assert_folds(b, 2)
    then = next(a.g for a in folded.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Constant", "Conv"]


# ----- malformed models are refused with a code, never an exception -------------------------
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


def test_if_branch_local_weights_value_info_and_unrelated_kept() -> None:
    """Weights as branch initializers, BN params as branch Constant nodes; the branch's
    value_info of the removed conv output goes, the branch's unrelated initializer stays."""
    b = if_model()
    g = b.model.graph
    then = next(a.g for a in g.node[0].attribute if a.name == "then_branch")
    # move the conv weight into the branch, BN params into branch Constant nodes
    for name in ("t_W", "t_Bc"):
        t = next(t for t in g.initializer if t.name == name)
        then.initializer.append(copy.deepcopy(t))
        g.initializer.remove(t)
    consts = []
    for name in ("t_scale", "t_B", "t_mean", "t_var"):
        t = next(t for t in g.initializer if t.name == name)
        consts.append(helper.make_node("Constant", [], [name], name=f"{name}_c", value=copy.deepcopy(t)))
        g.initializer.remove(t)
    for i, n in enumerate(consts):
        then.node.insert(i, n)
    then.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "branch_unused"))
    then.value_info.extend([helper.make_tensor_value_info("then_conv_out", TensorProto.FLOAT, [1, 4, 5, 5])])
    folded = assert_folds(b)
    then = next(a.g for a in folded.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Conv"]
    assert not then.value_info
    assert sorted(t.name for t in then.initializer) == ["branch_unused", "t_Bc", "t_W"]
    assert_ort_equivalent(b.model, folded, {**b.feeds, "cond": np.array(True)})


def test_function_value_info_removed() -> None:
    b = function_model()
    f = b.model.functions[0]
    if not hasattr(f, "value_info"):
        pytest.skip("FunctionProto.value_info needs onnx >= 1.16")
    f.value_info.extend(
        [
            helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [1, 4, 5, 5]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5]),
        ]
    )
    folded = assert_folds(b)
    assert [v.name for v in folded.functions[0].value_info] == ["y"]


def test_every_reason_code_has_a_negative_test() -> None:
    import re

    from bnfold.report import ONNX_REASONS

    codes = {str(r) for r in ONNX_REASONS}
    assert len(codes) == 26
    source = Path(__file__).read_text() + (Path(__file__).parent / "test_patterns.py").read_text()
    tested = set(re.findall(r'assert_skipped\([^\n]*"([a-z_]+)"', source))
    tested |= {"malformed"} if "MALFORMED" in source else set()
    assert codes <= tested, sorted(codes - tested)


def test_training_info_references_keep_tensors() -> None:
    """Tensors a TrainingInfoProto reads or updates are neither overwritten nor removed."""
    b = conv_bn(seed=2)
    info = b.model.training_info.add()
    algo = helper.make_graph(
        [helper.make_node("Mul", ["W", "bn_scale_f"], ["W_new"])],
        "algo",
        [],
        [helper.make_tensor_value_info("W_new", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.float32(0.5), "bn_scale_f")],
    )
    info.algorithm.CopyFrom(algo)
    info.update_binding.add(key="W", value="W_new")
    info.update_binding.add(key="bn_mean", value="W_new")
    folded, report = fold(b.model)
    assert len(report.folded) == 1
    np.testing.assert_array_equal(initializer(folded, "W"), initializer(b.model, "W"))
    np.testing.assert_array_equal(initializer(folded, "bn_mean"), initializer(b.model, "bn_mean"))
    assert_ort_equivalent(b.model, folded, b.feeds)


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
    shared = _affine_false_dynamo_bn(declare_shape=True)  # the Shape output also used elsewhere
    shared.graph.node.append(helper.make_node("Identity", ["ch"], ["ch_out"]))
    shared.graph.output.append(helper.make_tensor_value_info("ch_out", TensorProto.INT64, [1]))
    for m in (model, shared):
        before = m.SerializeToString()
        report = fold_model(m)
        assert report.folded == [] and [s.code for s in report.skipped] == ["multiple_consumers"]
        assert m.SerializeToString() == before
