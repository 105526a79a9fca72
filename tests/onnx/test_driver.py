"""The walk: subgraphs, functions, interface preservation, determinism, idempotence, API inputs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from fold_checks import _shared_weight_model, assert_folds, fold
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import (
    Built,
    assert_ort_equivalent,
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


# ----- the fixed point in one call -------------------------------------------------------------
def _bn_flatten_matmul_bn(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> BN1 -> Flatten -> MatMul -> BN2 -> Y: BN1 can go into the MatMul only once BN2's fold
    has made it a Gemm."""
    from onnx_builders import F32, GraphBuilder
    from pattern_checks import bn, rnd

    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", F32, [2, 3, 2, 2])
    bn(gb, "X", "b1", 3, rng, prefix="bn1")
    gb.node("Flatten", ["b1"], ["f"], name="flatten", axis=1)
    gb.value_info.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, [2, 12]))
    gb.node("MatMul", ["f", gb.const("W", rnd(rng, [12, 5], 0.4))], ["m"], name="matmul")
    bn(gb, "m", "Y", 5, rng, prefix="bn2")
    gb.output("Y", F32, [2, 5])
    return gb.model(17), {"X": rnd(rng, [2, 3, 2, 2])}


def test_a_bn_made_foldable_by_a_later_fold_folds_in_the_same_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the rule that folds a BN into a MatMul after it (bn_before_linear), BN1 waits for
    BN2's fold to make the MatMul a Gemm: the driver asks about it again in the same call."""
    from pattern_checks import assert_pattern

    import bnfold.rules

    rules = tuple(r for r in bnfold.rules.BN_RULES if r.name != "bn_before_linear")
    monkeypatch.setattr(bnfold.rules, "BN_RULES", rules)
    model, feeds = _bn_flatten_matmul_bn()
    folded = assert_pattern(model, feeds, ["matmul", "bn_before"], gone=["BatchNormalization", "MatMul"])
    assert [n.op_type for n in folded.graph.node] == ["Flatten", "Gemm"]


def test_bn_flatten_matmul_bn_folds_in_graph_order() -> None:
    from pattern_checks import assert_pattern

    model, feeds = _bn_flatten_matmul_bn()
    folded = assert_pattern(
        model, feeds, ["bn_before_linear", "bn_after_chain"], gone=["BatchNormalization", "MatMul"]
    )
    assert [n.op_type for n in folded.graph.node] == ["Flatten", "Gemm"]


def test_a_bn_that_stays_after_the_revisit_keeps_its_first_record() -> None:
    model, _ = _bn_flatten_matmul_bn()
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    flatten.input[0] = "X"  # BN1's output is now a graph output, read by nothing else
    bn1 = next(n for n in model.graph.node if n.name == "bn1")
    model.graph.output.append(helper.make_tensor_value_info(bn1.output[0], TensorProto.FLOAT, [2, 3, 2, 2]))
    _, report = fold(model)
    assert [f.pattern for f in report.folded] == ["matmul"]
    assert [(s.bn, s.code) for s in report.skipped] == [("bn1", "no_producer")]
