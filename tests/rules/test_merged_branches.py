"""``merged_branches`` (opt-in): the parallel branches of one input that an Add tree sums (RepVGG,
MobileOne, RepGhost) become one Conv. Positive cases run in onnxruntime with optimizations off
against the unfolded model (float64 Conv, which the CPU provider lacks, in the ONNX reference
evaluator), and the merged kernel is checked against a float64 computation written here (BN maps
by hand, kernels zero-padded with ``np.pad``, the identity set channel by channel): the stored
values are that exact value rounded once (within half an ulp). Every refusal asserts its code."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import (
    F16,
    F32,
    F64,
    GraphBuilder,
    assert_ort_equivalent,
    check_model,
    count_ops,
    initializer,
)
from pattern_checks import assert_pattern, assert_skipped, bn, fold, rnd


@dataclass
class Branch:
    """One branch conv of a block: kernel, BN after it, bias, and what differs from the default
    (centred pads, stride 1, the block's group and input)."""

    k: tuple[int, int] = (3, 3)
    bn: bool = True
    bias: bool = False
    pads: list[int] | None = None
    strides: int = 1
    group: int | None = None
    dilations: list[int] | None = None
    auto_pad: str | None = None
    input: str = "x"


@dataclass
class Block:
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    branches: list[Branch]
    identity: str | None
    group: int
    after_bn: bool
    convs: list[str] = field(default_factory=list)


def block(
    branches: list[Branch],
    *,
    identity: str | None = "bn",
    c: int = 4,
    cin: int | None = None,
    group: int = 1,
    size: int = 6,
    dtype: Any = F32,
    param_dtype: Any = None,
    after_bn: bool = False,
    seed: int = 0,
) -> Block:
    """X -> Relu -> x; branch convs of x [-> BN]; identity BN(x) or x; summed left to right by Adds
    [-> BN] -> Relu -> Y."""
    rng = np.random.default_rng(seed)
    cin = c if cin is None else cin
    gb = GraphBuilder()
    gb.input("X", dtype, [2, cin, size, size])
    gb.node("Relu", ["X"], ["x"], name="relu_in")
    gb.node("Sigmoid", ["X"], ["z"], name="other_input")
    summands, convs = [], []
    for i, b in enumerate(branches):
        g = b.group or group
        ins = [b.input, gb.const(f"W{i}", rnd(rng, [c, cin // g, *b.k], 0.3, dtype))]
        if b.bias:
            ins.append(gb.const(f"B{i}", rnd(rng, [c], 1.0, dtype)))
        pads = b.pads if b.pads is not None or b.auto_pad else [b.k[0] // 2, b.k[1] // 2] * 2
        gb.node(
            "Conv",
            ins,
            [f"c{i}"],
            name=f"conv{i}",
            pads=pads,
            strides=[b.strides] * 2 if b.strides != 1 else None,
            group=g if g > 1 else None,
            dilations=b.dilations,
            auto_pad=b.auto_pad,
        )
        convs.append(f"conv{i}")
        if b.bn:
            bn(gb, f"c{i}", f"b{i}", c, rng, prefix=f"bn{i}", dtype=param_dtype or dtype)
        summands.append(f"b{i}" if b.bn else f"c{i}")
    if identity == "bn":
        bn(gb, "x", "bid", cin, rng, prefix="bnid", dtype=param_dtype or dtype)
        summands.append("bid")
    elif identity == "plain":
        summands.append("x")
    total = summands[0]
    for j, s in enumerate(summands[1:]):
        gb.node("Add", [total, s], [f"sum{j}"], name=f"add{j}")
        total = f"sum{j}"
    if after_bn:
        bn(gb, total, "after", c, rng, prefix="bn_after", dtype=param_dtype or dtype)
        total = "after"
    gb.node("Relu", [total], ["Y"], name="relu_out")
    gb.output("Y", dtype, [None] * 4)
    feeds = {"X": rnd(rng, [2, cin, size, size], 1.0, dtype)}
    return Block(gb.model(17), feeds, branches, identity, group, after_bn, convs)


def _bn_map(model: onnx.ModelProto, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (
        initializer(model, f"{prefix}_{p}").astype(np.float64) for p in ("scale", "B", "mean", "var")
    )
    s = gamma / np.sqrt(var + 1e-5)
    return s, beta - s * mean


def reference(b: Block) -> tuple[np.ndarray, np.ndarray]:
    """The merged weight and bias in float64, computed here from the original tensors."""
    m = b.model
    kernel = tuple(max(br.k[a] for br in b.branches) for a in (0, 1))
    weights, biases = [], []
    for i, br in enumerate(b.branches):
        w = initializer(m, f"W{i}").astype(np.float64)
        bias = initializer(m, f"B{i}").astype(np.float64) if br.bias else np.zeros(w.shape[0])
        if br.bn:
            s, t = _bn_map(m, f"bn{i}")
            w = w * s[:, None, None, None]
            bias = s * bias + t
        widths = [((kernel[a] - br.k[a]) // 2,) * 2 for a in (0, 1)]
        weights.append(np.pad(w, [(0, 0), (0, 0), *widths]))
        biases.append(bias)
    weight, bias = sum(weights), sum(biases)
    cout, cin_g = weight.shape[:2]
    if b.identity is not None:
        s, t = _bn_map(m, "bnid") if b.identity == "bn" else (np.ones(cout), np.zeros(cout))
        for ch in range(cout):
            weight[ch, ch % cin_g, kernel[0] // 2, kernel[1] // 2] += s[ch]
        bias = bias + t
    if b.after_bn:
        s, t = _bn_map(m, "bn_after")
        weight, bias = weight * s[:, None, None, None], s * bias + t
    return weight, bias


def assert_rounded_once(got: np.ndarray, exact: np.ndarray) -> None:
    """``got`` is ``exact`` rounded to its dtype: within half an ulp of the stored value."""
    assert got.shape == exact.shape
    ulp = np.spacing(np.abs(got)).astype(np.float64)
    assert np.all(np.abs(got.astype(np.float64) - exact) <= 0.5 * ulp * (1 + 1e-9)), (got, exact)


def merged_model(b: Block, patterns: list[str], convs_removed: int, dtype: Any = F32) -> onnx.ModelProto:
    """Fold with merge_branches; ORT equivalence (assert_pattern), one Conv and no Add or BN left,
    the kept Conv's constants against :func:`reference`."""
    folded = assert_pattern(b.model, b.feeds, patterns, dtype=dtype, merge_branches=True)
    _, report = fold(b.model, merge_branches=True)
    assert report.merged_convs == convs_removed and report.to_dict()["merged_convs"] == convs_removed
    assert count_ops(folded, "Conv") == 1 and count_ops(folded, "Add") == 0
    assert count_ops(folded, "BatchNormalization") == 0
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    weight, bias = reference(b)
    got_w, got_b = initializer(folded, conv.input[1]), initializer(folded, conv.input[2])
    assert got_w.dtype == np.dtype(dtype) and got_b.dtype == np.dtype(dtype)
    assert_rounded_once(got_w, weight)
    assert_rounded_once(got_b, bias)
    return folded


REPVGG = [Branch((3, 3)), Branch((1, 1))]


def test_repvgg_block_with_identity_bn() -> None:
    b = block(REPVGG)
    folded = merged_model(b, ["merged_branches"] * 3, 1)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert conv.name == "conv0" and conv.output[0] == "sum1"  # the 3x3 conv takes the root's name


def test_repvgg_block_without_identity_strided() -> None:
    b = block([Branch((3, 3), strides=2), Branch((1, 1), strides=2, pads=[0] * 4)], identity=None, size=7)
    merged_model(b, ["merged_branches"] * 2, 1)


def test_mobileone_three_kxk_branches_scale_branch_and_identity() -> None:
    b = block([Branch((3, 3)), Branch((3, 3)), Branch((3, 3)), Branch((1, 1))])
    merged_model(b, ["merged_branches"] * 5, 3)


@pytest.mark.parametrize("group,c", [(2, 4), (6, 6)], ids=["grouped", "depthwise"])
def test_grouped_and_depthwise_blocks(group: int, c: int) -> None:
    b = block([Branch((3, 3)), Branch((3, 3)), Branch((1, 1))], group=group, c=c)
    merged_model(b, ["merged_branches"] * 4, 2)


def test_float16_block_with_float32_bn_parameters() -> None:
    b = block(REPVGG, dtype=F16, param_dtype=F32)
    merged_model(b, ["merged_branches"] * 3, 1, dtype=F16)


def test_float64_block_in_the_reference_evaluator() -> None:
    from onnx.reference import ReferenceEvaluator

    b = block([Branch((3, 3), bias=True), Branch((1, 1))], dtype=F64)
    folded, report = fold(b.model, merge_branches=True)
    assert [str(p.pattern) for p in report.folded] == ["merged_branches"] * 3 and report.merged_convs == 1
    check_model(folded)
    (want,) = ReferenceEvaluator(b.model).run(None, b.feeds)
    (got,) = ReferenceEvaluator(folded).run(None, b.feeds)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * float(np.abs(want).max()))
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    weight, bias = reference(b)
    assert_rounded_once(initializer(folded, conv.input[1]), weight)
    assert_rounded_once(initializer(folded, conv.input[2]), bias)


def test_branch_convs_with_biases_and_a_plain_identity() -> None:
    b = block([Branch((3, 3), bias=True), Branch((1, 1), bias=True, bn=False)], identity="plain")
    merged_model(b, ["merged_branches"], 1)


def test_a_fused_block_without_any_bn_merges_too() -> None:
    """Already fused branches (convs with biases, no BN): counted in merged_convs only."""
    b = block([Branch((3, 3), bn=False, bias=True), Branch((1, 1), bn=False, bias=True)], identity=None)
    merged_model(b, [], 1)
    folded, report = fold(b.model, merge_branches=True)
    assert report.changed and not report.folded
    unmerged, off = fold(b.model)
    assert not off.changed and unmerged.SerializeToString() == b.model.SerializeToString()


def test_a_bn_after_the_sum_composes_in() -> None:
    b = block(REPVGG, identity="plain", after_bn=True)
    merged_model(b, ["merged_branches"] * 3, 1)


def test_asymmetric_kernels_merge_into_the_square_one() -> None:
    """ACNet: 3x3 + 1x3 + 3x1 branches, each centred."""
    b = block([Branch((3, 3)), Branch((1, 3)), Branch((3, 1))])
    merged_model(b, ["merged_branches"] * 4, 2)


def test_same_upper_padding_resolves_at_stride_one() -> None:
    b = block([Branch((3, 3), auto_pad="SAME_UPPER"), Branch((1, 1), auto_pad="VALID")])
    merged_model(b, ["merged_branches"] * 3, 1)


def test_a_weight_shared_by_two_branches_is_copied() -> None:
    b = block([Branch((3, 3)), Branch((3, 3))], identity=None)
    conv1 = next(n for n in b.model.graph.node if n.name == "conv1")
    conv1.input[1] = "W0"  # both branches read W0 (W1 is unused now)
    b.model.graph.initializer.remove(next(t for t in b.model.graph.initializer if t.name == "W1"))
    b.model.graph.initializer.append(numpy_helper.from_array(initializer(b.model, "W0"), "W1"))
    merged_model(b, ["merged_branches"] * 2, 1)


def test_with_the_flag_off_the_identity_bn_names_it() -> None:
    fused = [Branch((3, 3), bn=False, bias=True), Branch((1, 1), bn=False)]
    report = assert_skipped(block(fused).model, "needs_merge_branches")
    message = report.skipped[0].message
    assert "--merge-branches" in message and "identity branch of Add 'add1'" in message
    b = block(REPVGG)  # the branch BNs fold into their convs; the identity BN says why it stays
    folded, report = fold(b.model)
    assert [str(p.pattern) for p in report.folded] == ["bn_after", "bn_after"]
    assert [(s.bn, s.code) for s in report.skipped] == [("bnid", "needs_merge_branches")]
    assert report.merged_convs == 0


def test_a_bn_outside_a_block_keeps_its_reason() -> None:
    """BN(x) + Conv(z): no block (different inputs), so the flag would not help."""
    b = block([Branch((3, 3), bn=False, input="z")])
    report = assert_skipped(b.model, "unsupported_producer")
    assert "merge" not in report.skipped[0].message


# ----- refusals (flag on): the identity BN of the block says why it did not merge ---------------------
FUSED = dict(bn=False, bias=True)


def test_refuses_mismatched_strides() -> None:
    """3x3 stride 1 and 1x1 stride 2 on 2 x 2: onnxruntime broadcasts the 1 x 1 output."""
    b = block([Branch((3, 3), **FUSED), Branch((1, 1), strides=2, **FUSED)], size=2)
    report = assert_skipped(b.model, "branch_mismatch", merge_branches=True)
    assert "strides [2, 2] and [1, 1]" in report.skipped[0].message


def test_refuses_uncentred_padding() -> None:
    b = block([Branch((3, 3), pads=[2, 2, 0, 0], **FUSED), Branch((1, 1), **FUSED)])
    report = assert_skipped(b.model, "branch_padding", merge_branches=True)
    assert "not centred" in report.skipped[0].message


def test_refuses_same_padding_with_a_stride() -> None:
    """SAME_LOWER with stride 2: its pads depend on the input size."""
    branches = [Branch((3, 3), auto_pad="SAME_LOWER", strides=2, **FUSED), Branch((1, 1), strides=2, **FUSED)]
    report = assert_skipped(block(branches, size=2).model, "branch_padding", merge_branches=True)
    assert "auto_pad SAME_LOWER" in report.skipped[0].message


def test_refuses_branches_of_different_inputs() -> None:
    b = block([Branch((3, 3), **FUSED), Branch((1, 1), input="z", **FUSED)])
    report = assert_skipped(b.model, "branch_mismatch", merge_branches=True)
    assert "reads 'z'" in report.skipped[0].message


def test_refuses_a_branch_output_with_a_second_consumer() -> None:
    b = block([Branch((3, 3), **FUSED), Branch((1, 1), **FUSED)])
    b.model.graph.node.append(helper.make_node("Relu", ["c1"], ["side"], name="side"))
    b.model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    report = assert_skipped(b.model, "multiple_consumers", merge_branches=True)
    assert "'c1'" in report.skipped[0].message


def test_refuses_a_branch_output_that_is_a_graph_output() -> None:
    b = block([Branch((3, 3), **FUSED), Branch((1, 1), **FUSED)])
    b.model.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, [None] * 4))
    assert_skipped(b.model, "graph_output", merge_branches=True)


def test_refuses_an_identity_next_to_a_strided_conv() -> None:
    """3x3 of stride 2 on 2 x 2 gives 1 x 1, broadcast against the 2 x 2 identity."""
    b = block([Branch((3, 3), strides=2, **FUSED)], size=2)
    report = assert_skipped(b.model, "identity_branch", merge_branches=True)
    assert "strides [2, 2]" in report.skipped[0].message


def test_the_branches_under_a_refused_root_still_merge() -> None:
    """(3x3 s2 + 1x1 s2) + identity on 2 x 2: the root cannot take the identity, the Add of the two
    convs under it merges alone; the identity BN stays and says why."""
    b = block([Branch((3, 3), strides=2, **FUSED), Branch((1, 1), strides=2, **FUSED)], size=2)
    folded, report = fold(b.model, merge_branches=True)
    assert report.merged_convs == 1 and not report.folded
    assert [(s.bn, s.code) for s in report.skipped] == [("bnid", "identity_branch")]
    assert count_ops(folded, "Conv") == 1 and count_ops(folded, "Add") == 1
    check_model(folded)
    assert_ort_equivalent(b.model, folded, b.feeds, F32)


def test_refuses_an_identity_of_other_channels() -> None:
    """One input channel, four output channels: the identity broadcasts along the channels."""
    b = block([Branch((3, 3), **FUSED)], cin=1)
    report = assert_skipped(b.model, "identity_branch", merge_branches=True)
    assert "from 1 to 4 channels" in report.skipped[0].message


def test_refuses_an_identity_next_to_a_conv_that_shrinks() -> None:
    """3x3 without pads on 3 x 3 gives 1 x 1, broadcast against the 3 x 3 identity."""
    b = block([Branch((3, 3), pads=[0] * 4, **FUSED), Branch((1, 1), pads=[0] * 4, **FUSED)], size=3)
    assert_skipped(b.model, "branch_padding", merge_branches=True)
    model = block([Branch((3, 3), pads=[0] * 4, **FUSED)], size=3).model
    assert_skipped(model, "identity_branch", merge_branches=True)


def test_refuses_dilation() -> None:
    b = block([Branch((3, 3), pads=[2] * 4, dilations=[2, 2], **FUSED), Branch((1, 1), **FUSED)])
    report = assert_skipped(b.model, "branch_mismatch", merge_branches=True)
    assert "dilated" in report.skipped[0].message


def test_refuses_different_groups() -> None:
    b = block([Branch((3, 3), group=2, **FUSED), Branch((1, 1), **FUSED)])
    report = assert_skipped(b.model, "branch_mismatch", merge_branches=True)
    assert "groups 1 and 2" in report.skipped[0].message


def test_refuses_kernels_without_a_largest_one() -> None:
    b = block([Branch((1, 3), **FUSED), Branch((3, 1), **FUSED)])
    assert_skipped(b.model, "branch_mismatch", merge_branches=True)


def test_refuses_a_weight_that_is_not_constant() -> None:
    b = block([Branch((3, 3), **FUSED), Branch((1, 1), **FUSED)])
    w = next(t for t in b.model.graph.initializer if t.name == "W1")
    b.model.graph.initializer.remove(w)
    b.model.graph.input.append(helper.make_tensor_value_info("W1", TensorProto.FLOAT, list(w.dims)))
    assert_skipped(b.model, "weight_not_constant", merge_branches=True)


def test_refuses_branches_of_different_dtypes() -> None:
    """Not a valid model (Conv wants X and W of one type), so only the pass's answer is checked."""
    b = block([Branch((3, 3), **FUSED), Branch((1, 1), **FUSED)])
    for t in b.model.graph.initializer:
        if t.name in ("W1", "B1"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    folded, report = fold(b.model, merge_branches=True)
    assert [s.code for s in report.skipped] == ["unsupported_dtype"] and not report.merged_convs
    assert "dtypes float64 and float32" in report.skipped[0].message
    assert folded.SerializeToString() == b.model.SerializeToString()


def test_refuses_a_merged_kernel_out_of_float16_range() -> None:
    b = block([Branch((3, 3), **FUSED)], dtype=F16, param_dtype=F32)
    scale = next(t for t in b.model.graph.initializer if t.name == "bnid_scale")
    scale.CopyFrom(numpy_helper.from_array(np.full(4, 1e6, np.float32), "bnid_scale"))
    report = assert_skipped(b.model, "overflow", merge_branches=True)
    assert "float16" in report.skipped[0].message


def test_an_add_of_one_conv_and_its_input_alone_is_left_alone() -> None:
    """Conv(x) + x without any BN: nothing would go but the Add; not a block."""
    b = block([Branch((3, 3), **FUSED)], identity="plain")
    folded, report = fold(b.model, merge_branches=True)
    assert not report.changed and folded.SerializeToString() == b.model.SerializeToString()


def test_the_bundled_repvgg_case() -> None:
    from models.cases import BY_NAME

    case = BY_NAME["case_repvgg_block"]
    model = onnx.load(case.path)
    off = fold(model)[1]
    assert [s.code for s in off.skipped] == ["needs_merge_branches"] and len(off.folded) == 2
    on_model, on = fold(model, merge_branches=True)
    assert [str(p.pattern) for p in on.folded] == ["merged_branches"] * 3 and on.merged_convs == 1
    feeds = {"X": np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)}
    assert_ort_equivalent(model, on_model, feeds, F32)
    assert copy.deepcopy(on_model).SerializeToString() == on_model.SerializeToString()
