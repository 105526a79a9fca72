"""Rewriting the graph: copy-on-write of shared tensors, IR < 4 initializers, value_info of removed values."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from fold_checks import _shared_weight_model, assert_folds
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import (
    F32,
    Built,
    GraphBuilder,
    add_bn,
    assert_ort_equivalent,
    bn_stats,
    conv_bn,
    function_model,
    if_model,
    initializer,
    node_named,
)


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
