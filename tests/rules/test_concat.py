"""``concat``: Concat of layers along channels -> BN, split by channel ranges into each layer (the
BN's own epsilon kept: brevitas's split used the default), checked in onnxruntime with
optimizations off; the whole BN kept when any input is not a foldable, single-reader layer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import F32, GraphBuilder, add_bn, initializer
from pattern_checks import assert_pattern, assert_skipped, rnd

from bnfold.onnx.driver import fold_model


def concat_bn(
    branches: Sequence[tuple[int, int]] = ((3, 4), (1, 2)),
    *,
    bias: bool = False,
    epsilon: float = 1e-3,
    axis: int = 1,
    split: bool = False,
    bns_after: int = 0,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> Conv(k_i, c_i) for each ``(kernel, channels)`` -> Concat(axis) -> BN(eps) [-> BN...] -> Y.
    ``split``: each conv reads its own part of a Split of X (MixNet's MixConv)."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    cin = 2 * len(branches) if split else 3
    gb.input("X", F32, [2, cin, 6, 6])
    parts = ["X"] * len(branches)
    if split:
        parts = [f"x{i}" for i in range(len(branches))]
        gb.node(
            "Split",
            ["X", gb.const("sizes", np.full(len(branches), 2, np.int64))],
            parts,
            name="split",
            axis=1,
        )
    outs = []
    for i, ((k, c), x) in enumerate(zip(branches, parts)):
        ins = [x, gb.const(f"W{i}", rnd(rng, [c, 2 if split else cin, k, k], 0.3))]
        if bias:
            ins.append(gb.const(f"B{i}", rnd(rng, [c])))
        gb.node("Conv", ins, [f"c{i}"], name=f"conv{i}", pads=[k // 2] * 4)
        outs.append(f"c{i}")
    gb.node("Concat", outs, ["cat"], name="concat", axis=axis)
    total = sum(c for _, c in branches)
    prev = "cat"
    for j in range(1 + bns_after):
        out = "Y" if j == bns_after else f"b{j}"
        stats = {
            "scale": rng.normal(1.0, 0.5, total),
            "B": rng.normal(0.0, 1.0, total),
            "mean": rng.normal(0.0, 1.0, total),
            "var": rng.uniform(1e-4, 1e-3, total),  # small: the epsilon matters
        }
        add_bn(gb, prev, out, stats, dtype=F32, bn_opset=15, prefix=f"bn{j}", epsilon=epsilon)
        prev = out
    gb.output("Y", F32, [None] * 4)
    return gb.model(17), {"X": rnd(rng, [2, cin, 6, 6])}


@pytest.mark.parametrize("bias", [False, True])
def test_csp_two_convs(bias: bool) -> None:
    model, feeds = concat_bn(((1, 4), (1, 4)), bias=bias)
    assert_pattern(model, feeds, ["concat"], gone=["BatchNormalization"])


def test_mixconv_split_kernels() -> None:
    model, feeds = concat_bn(((3, 2), (5, 3), (7, 1)), split=True)
    folded = assert_pattern(model, feeds, ["concat"], gone=["BatchNormalization"])
    assert [n.op_type for n in folded.graph.node] == ["Split", "Conv", "Conv", "Conv", "Concat"]


def test_negative_axis_with_known_rank_and_a_bn_after() -> None:
    model, feeds = concat_bn(axis=-3, bns_after=1)
    model = onnx.shape_inference.infer_shapes(model)
    assert_pattern(model, feeds, ["concat", "bn_after_chain"], gone=["BatchNormalization"])


def test_each_part_is_the_bn_epsilon_rounded_once() -> None:
    """Every folded weight is within half an ulp of the float64 value with the model's eps."""
    model, _ = concat_bn(((3, 4), (1, 2)), bias=True, epsilon=1e-3)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    fold_model(folded)
    g, beta, mean, var = (
        initializer(model, f"bn0_{k}").astype(np.float64) for k in ("scale", "B", "mean", "var")
    )
    s = g / np.sqrt(var + float(np.float32(1e-3)))  # the attribute is a float32
    t = beta - s * mean
    start = 0
    for i, c in enumerate((4, 2)):
        conv = next(n for n in folded.graph.node if n.name == f"conv{i}")
        w = initializer(model, f"W{i}").astype(np.float64) * s[start : start + c].reshape(-1, 1, 1, 1)
        b = initializer(model, f"B{i}").astype(np.float64) * s[start : start + c] + t[start : start + c]
        for exact, name in ((w, conv.input[1]), (b, conv.input[2])):
            got = initializer(folded, name).astype(np.float64)
            ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
            assert np.all(np.abs(got - exact) <= 0.5 * ulp * (1 + 1e-6)), name
        start += c


def test_gemm_and_matmul_inputs() -> None:
    rng = np.random.default_rng(1)
    gb = GraphBuilder()
    gb.input("X", F32, [3, 5])
    gb.node(
        "Gemm", ["X", gb.const("W0", rnd(rng, [5, 2])), gb.const("B0", rnd(rng, [2]))], ["g"], name="gemm"
    )
    gb.node("MatMul", ["X", gb.const("W1", rnd(rng, [5, 3]))], ["m"], name="matmul")
    gb.node("Concat", ["g", "m"], ["cat"], name="concat", axis=1)
    add_bn(
        gb,
        "cat",
        "Y",
        {
            "scale": rng.normal(1, 0.5, 5),
            "B": rng.normal(0, 1, 5),
            "mean": rng.normal(0, 1, 5),
            "var": rng.uniform(0.5, 2, 5),
        },
        dtype=F32,
        bn_opset=15,
        prefix="bn",
    )
    gb.output("Y", F32, [3, 5])
    folded = assert_pattern(
        gb.model(17), {"X": rnd(rng, [3, 5])}, ["concat"], gone=["BatchNormalization", "MatMul"]
    )
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Gemm", "Concat"]


def test_a_shape_of_the_concat_output_reads_the_name_that_stays() -> None:
    model, feeds = concat_bn()
    model.graph.node.append(helper.make_node("Shape", ["cat"], ["shape"], name="shape"))
    model.graph.output.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [4]))
    folded = assert_pattern(model, feeds, ["concat"], gone=["BatchNormalization"])
    assert next(n for n in folded.graph.node if n.op_type == "Shape").input[0] == "Y"


def test_skip_an_input_that_is_not_a_layer_keeps_everything() -> None:
    model, _ = concat_bn()
    conv = next(n for n in model.graph.node if n.name == "conv1")
    conv.output[0] = "pre"
    model.graph.node.insert(
        list(model.graph.node).index(conv) + 1, helper.make_node("Relu", ["pre"], ["c1"], name="relu")
    )
    report = assert_skipped(model, "unsupported_producer")
    assert "Concat 'concat' input 1" in report.skipped[0].message and "Relu" in report.skipped[0].message


def test_skip_an_input_with_another_consumer() -> None:
    model, _ = concat_bn()
    model.graph.node.append(helper.make_node("Relu", ["c0"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "multiple_consumers")


def test_skip_the_concat_output_with_another_consumer() -> None:
    model, _ = concat_bn()
    model.graph.output.append(helper.make_tensor_value_info("cat", TensorProto.FLOAT, [None] * 4))
    assert_skipped(model, "graph_output")


def test_skip_concat_not_along_channels() -> None:
    rng = np.random.default_rng(0)
    gb = GraphBuilder()
    gb.input("X", F32, [2, 3, 4, 4])
    for i in range(2):
        gb.node("Conv", ["X", gb.const(f"W{i}", rnd(rng, [4, 3, 1, 1]))], [f"c{i}"], name=f"conv{i}")
    gb.node("Concat", ["c0", "c1"], ["cat"], name="concat", axis=2)
    add_bn(
        gb,
        "cat",
        "Y",
        {"scale": np.ones(4), "B": np.zeros(4), "mean": np.zeros(4), "var": np.ones(4)},
        dtype=F32,
        bn_opset=15,
        prefix="bn",
    )
    gb.output("Y", F32, [None] * 4)
    assert_skipped(gb.model(17), "channel_axis")


def test_skip_a_weight_that_is_not_constant() -> None:
    model, _ = concat_bn()
    w = next(t for t in model.graph.initializer if t.name == "W1")
    model.graph.initializer.remove(w)
    model.graph.input.append(helper.make_tensor_value_info("W1", TensorProto.FLOAT, list(w.dims)))
    assert_skipped(model, "weight_not_constant")


def test_skip_negative_axis_of_unknown_rank() -> None:
    model, _ = concat_bn(axis=-3)
    assert_skipped(model, "unknown_rank")
