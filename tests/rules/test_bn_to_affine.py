"""``bn_to_affine`` (opt-in): an unfoldable BN rewritten as Mul + Add."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import (
    F16,
    F32,
    GraphBuilder,
    add_bn,
    bn_stats,
    check_model,
    count_ops,
    initializer,
)
from pattern_checks import assert_pattern, assert_skipped, bn, conv_chain, fold, rnd

import bnfold


def lone_bn(
    shape: Sequence[Any] | None,
    *,
    dtype: Any = F32,
    param_dtype: Any = None,
    feed: Sequence[int] = (2, 3, 4, 4),
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", dtype, list(feed))
    x = "X"
    feeds = {"X": rnd(rng, feed, 1.0, dtype)}
    if shape is None:  # reshaped to a shape only known at run time: rank unknown
        gb.input("S", np.int64, [len(feed)])
        gb.node("Reshape", ["X", "S"], ["x2"])
        x = "x2"
        feeds["S"] = np.array(feed, np.int64)
    gb.node("Relu", [x], ["r"])
    bn(gb, "r", "Y", feed[1], rng, dtype=dtype, param_dtype=param_dtype)
    gb.output("Y", dtype, [None] * len(feed))
    return gb.model(17), feeds


@pytest.mark.parametrize("feed", [(2, 3, 4, 4), (2, 3), (2, 3, 5), (1, 3, 2, 2, 2)])
def test_bn_to_affine(feed: tuple[int, ...]) -> None:
    model, feeds = lone_bn(feed, feed=feed)
    folded = assert_pattern(model, feeds, ["bn_to_affine"], gone=["BatchNormalization"], bn_to_affine=True)
    assert count_ops(folded, "Mul") == 1 and count_ops(folded, "Add") == 1
    mul = [n for n in folded.graph.node if n.op_type == "Mul"][0]
    assert initializer(folded, mul.input[1]).shape == (3,) + (1,) * (len(feed) - 2)


def test_bn_to_affine_float16_with_float32_params() -> None:
    model, feeds = lone_bn((2, 3, 4, 4), dtype=F16, param_dtype=F32)
    folded = assert_pattern(model, feeds, ["bn_to_affine"], dtype=F16, bn_to_affine=True)
    assert all(t.data_type == TensorProto.FLOAT16 for t in folded.graph.initializer)


def test_bn_to_affine_off_by_default() -> None:
    model, _ = lone_bn((2, 3, 4, 4))
    assert_skipped(model, "unsupported_producer")


def test_bn_to_affine_unknown_rank_kept() -> None:
    model, _ = lone_bn(None)
    report = assert_skipped(model, "unsupported_producer", bn_to_affine=True)
    assert "Mul+Add" in report.skipped[0].message


def test_bn_to_affine_training_mode_kept() -> None:
    model, _ = lone_bn((2, 3, 4, 4))
    bnode = [n for n in model.graph.node if n.op_type == "BatchNormalization"][0]
    bnode.attribute.append(helper.make_attribute("training_mode", 1))
    bnode.output.extend(["rm", "rv"])
    assert_skipped(model, "training_mode", bn_to_affine=True)


def test_bn_to_affine_leaves_foldable_bns_to_folding() -> None:
    model, feeds = conv_chain(ops=[("bn", None)])
    assert_pattern(model, feeds, ["bn_after"], gone=["BatchNormalization", "Mul"], bn_to_affine=True)


def test_patterns_inside_if_branch_and_function_bn_to_affine() -> None:
    """bn_to_affine inside a subgraph: the inserted Mul and its constants stay inside the branch."""
    rng = np.random.default_rng(7)
    outer = GraphBuilder()
    outer.input("X", F32, [1, 3, 4, 4])
    outer.input("cond", np.bool_, [])
    then = GraphBuilder()
    then.node("Relu", ["X"], ["r"])
    bn(then, "r", "ty", 3, rng)
    then.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 3, 4, 4]))
    then.output("ty", F32, [1, 3, 4, 4])
    other = GraphBuilder()
    other.node("Identity", ["X"], ["ey"])
    other.output("ey", F32, [1, 3, 4, 4])
    outer.node(
        "If", ["cond"], ["Y"], name="if", then_branch=then.graph("then"), else_branch=other.graph("else")
    )
    outer.output("Y", F32, [1, 3, 4, 4])
    feeds = {"X": rnd(rng, (1, 3, 4, 4)), "cond": np.array(True)}
    assert_pattern(outer.model(17), feeds, ["bn_to_affine"], gone=["BatchNormalization"], bn_to_affine=True)


def test_bn_to_affine_legacy_opset6_explicit_broadcast() -> None:
    """Opset < 7 has no numpy broadcasting: the constants are [C] with broadcast=1, axis=1.
    (onnxruntime cannot run opset 6, and onnx's version converter rejects this legal form, so
    only the structure and the checker are verified here.)"""
    rng = np.random.default_rng(0)
    gb = GraphBuilder()
    gb.input("X", F32, [2, 3, 4, 4])
    gb.node("Relu", ["X"], ["r"])
    add_bn(gb, "r", "Y", bn_stats(rng, 3), dtype=F32, bn_opset=6, prefix="bn")
    gb.output("Y", F32, [2, 3, 4, 4])
    model = gb.model(6)
    check_model(model)
    folded, report = fold(model, bn_to_affine=True)
    assert [f.pattern for f in report.folded] == ["bn_to_affine"]
    check_model(folded)
    for n in folded.graph.node:
        if n.op_type in ("Mul", "Add"):
            attrs = {a.name: a.i for a in n.attribute}
            assert attrs == {"broadcast": 1, "axis": 1}
            assert initializer(folded, n.input[1]).shape == (3,)
    # the IR 3 rule: every initializer is also a graph input
    assert {t.name for t in folded.graph.initializer} <= {v.name for v in folded.graph.input}


def test_api_bn_to_affine_flag() -> None:
    """bnfold.fold passes bn_to_affine through, and its own verification accepts the rewrite."""
    import onnxruntime as ort

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 4, 4])
    rng = np.random.default_rng(0)
    params = [
        onnx.numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in (
            ("g", rng.normal(1, 0.5, 3)),
            ("b", rng.normal(0, 1, 3)),
            ("m", rng.normal(0, 1, 3)),
            ("v", rng.uniform(0.5, 2, 3)),
        )
    ]
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Relu", ["x"], ["r"]),
            onnx.helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["y"]),
        ],
        "g",
        [x],
        [y],
        params,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    plain = bnfold.fold(model, verify=False)
    assert [s.code for s in plain.report.skipped] == ["unsupported_producer"]
    result = bnfold.fold(model, bn_to_affine=True)
    assert [p.pattern for p in result.report.folded] == ["bn_to_affine"]
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Mul", "Add"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), opts).run(None, feed)[0]
    got = ort.InferenceSession(result.model.SerializeToString(), opts).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def bn_bn_flatten_matmul_bn(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> Dropout -> BN a -> BN b -> Flatten -> MatMul -> BN c: BN a folds only once b and c did
    (into the Gemm the MatMul becomes), so the pass reaches it on its revisit."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", F32, [2, 3, 2, 2])
    gb.node("Dropout", ["X"], ["d"], name="dropout")
    bn(gb, "d", "a", 3, rng, prefix="bn_a")
    bn(gb, "a", "b", 3, rng, prefix="bn_b")
    gb.node("Flatten", ["b"], ["flat"], name="flatten", axis=1)
    gb.node("MatMul", ["flat", gb.const("w", rnd(rng, [12, 5], 0.3))], ["mm"], name="matmul")
    bn(gb, "mm", "Y", 5, rng, prefix="bn_c")
    gb.output("Y", F32, [2, 5])
    return gb.model(17), {"X": rnd(rng, [2, 3, 2, 2])}


def test_bn_to_affine_leaves_a_bn_that_folds_on_the_revisit_to_folding() -> None:
    """The rewrite waits for the folds' fixed point: BN a is folded (bn_before), not rewritten as
    Mul + Add, with the flag on exactly as with it off."""
    model, feeds = bn_bn_flatten_matmul_bn()
    without = assert_pattern(model, feeds, ["bn_before_linear", "bn_after_chain", "bn_before"])
    folded = assert_pattern(
        model, feeds, ["bn_before_linear", "bn_after_chain", "bn_before"], gone=["Mul"], bn_to_affine=True
    )
    assert folded.SerializeToString() == without.SerializeToString()


def test_bn_to_affine_refusal_replaces_the_first_record() -> None:
    """A BN neither folded nor rewritten is reported once, with the refusal naming the rewrite."""
    model, _ = lone_bn(None)
    report = assert_skipped(model, "unsupported_producer", bn_to_affine=True)
    assert "not rewritten as Mul+Add" in report.skipped[0].message
