"""Property test: random Conv / ConvTranspose / Gemm -> BatchNormalization graphs fold, stay valid
and compute the same thing.

Numerics are checked here, never through bnfold's own verification: onnxruntime with every
optimization off on original and folded model (where the CPU provider has kernels: float32,
float16, float64 Gemm), and always a float64 torch evaluation of the folded layer against the
original layer + BN, within the bound that one rounding of the folded tensors allows.
"""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from onnx_builders import (
    F16,
    F32,
    F64,
    assert_f64_equivalent,
    assert_ort_equivalent,
    check_model,
    conv_bn,
    count_ops,
    gemm_bn,
)

from bnfold.onnx.driver import fold_model

EPSILONS = [None, 1e-5, 1e-3, 0.1, 0.0]


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    op = draw(st.sampled_from(["Conv", "ConvTranspose"]))
    rank = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        group, cin_pg, cout_pg = 1, draw(st.integers(1, 4)), draw(st.integers(1, 4))
    elif kind == "grouped":
        group, cin_pg, cout_pg = draw(st.integers(2, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    else:
        group, cin_pg, cout_pg = draw(st.integers(2, 4)), 1, draw(st.sampled_from([1, 1, 2]))
    max_k = 3 if rank < 3 else 2
    kernel = [draw(st.integers(1, max_k)) for _ in range(rank)]
    strides = [draw(st.integers(1, 2)) for _ in range(rank)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # onnxruntime has no dilated SAME_* convolution
    dilations = [1 if auto_pad.startswith("SAME") else draw(st.integers(1, 2)) for _ in range(rank)]
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    max_size = 6 if rank < 3 else 4
    size = [draw(st.integers(max(2, e if op == "Conv" else 1), max(max_size, e))) for e in eff]
    pads = None
    output_padding = None
    if auto_pad == "NOTSET":
        pads = [draw(st.integers(0, max(0, e - 1))) for e in eff] + [
            draw(st.integers(0, max(0, e - 1))) for e in eff
        ]
    if op == "ConvTranspose" and auto_pad in ("NOTSET", "VALID") and draw(st.booleans()):
        # below the stride: onnxruntime releases differ beyond it (1.24 computes uninitialised
        # values for output_padding >= stride with dilation, 1.32 refuses the model)
        output_padding = [draw(st.integers(0, s - 1)) for s in strides]
    # the output must not be empty
    for i in range(rank):
        p = (pads[i] + pads[i + rank]) if pads else 0
        if op == "Conv":
            out = (size[i] + p - eff[i]) // strides[i] + 1
        else:
            out = strides[i] * (size[i] - 1) + (output_padding[i] if output_padding else 0) + eff[i] - p
        assume(out >= 1)
    return dict(
        op=op,
        rank=rank,
        group=group,
        cin=group * cin_pg,
        cout=group * cout_pg,
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        pads=pads,
        size=size,
        output_padding=output_padding,
        auto_pad=None if auto_pad == "NOTSET" else auto_pad,
        bias=draw(st.booleans()),
        batch=1,
    )


@st.composite
def gemm_cases(draw: st.DrawFn) -> dict:
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    c_shape = draw(st.sampled_from([None, "n", "1n", "scalar", "mn", "m1", "1"]))
    shapes = {"n": (n,), "1n": (1, n), "scalar": (), "mn": (m, n), "m1": (m, 1), "1": (1,), None: None}
    return dict(
        m=m,
        k=k,
        n=n,
        trans_a=draw(st.integers(0, 1)),
        trans_b=draw(st.integers(0, 1)),
        alpha=draw(st.sampled_from([None, 1.0, 0.5, -2.0])),
        beta=draw(st.sampled_from([None, 1.0, 0.0, 1.5])),
        c_shape=shapes[c_shape],
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, dict]:
    family = draw(st.sampled_from(["conv", "conv", "conv", "gemm"]))
    kw = draw(conv_cases()) if family == "conv" else draw(gemm_cases())
    dtype = draw(st.sampled_from([F32, F32, F16, F64]))
    bn_opset = draw(st.sampled_from([7, 9, 14, 15]))
    kw.update(
        dtype=dtype,
        bn_opset=bn_opset,
        epsilon=draw(st.sampled_from(EPSILONS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if bn_opset == 15 and dtype == F16 and draw(st.booleans()):
        kw["param_dtype"] = F32  # BN-15: scale/bias/mean/var in float32 with a float16 X
    if family == "gemm":
        # Gemm's C is optional from opset 11 on (BN-9 is the BN in force at opset 11..13)
        kw["opset"] = max(bn_opset, 11) if kw["c_shape"] is None else None
        kw.pop("param_dtype", None)
        if kw["opset"] is None and bn_opset < 11:
            kw["opset"] = bn_opset
    return family, kw


def _ort_runs(family: str, dtype: np.dtype) -> bool:
    return dtype in (F32, F16) or (dtype == F64 and family == "gemm")


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(cases())
def test_random_layer_bn_folds_exactly(case: tuple[str, dict]) -> None:
    family, kw = case
    event(f"{kw.get('op', 'Gemm')} {np.dtype(kw['dtype']).name} BN-{kw['bn_opset']}")
    b = conv_bn(**kw) if family == "conv" else gemm_bn(**kw)
    check_model(b.model)
    original = b.model.SerializeToString()
    folded = copy.deepcopy(b.model)
    report = fold_model(folded)
    assert b.model.SerializeToString() == original
    if report.skipped:
        event("skipped: overflow")
        # the only refusal a valid random model may get: a float16 value out of range
        assert [s.code for s in report.skipped] == ["overflow"] and b.dtype == F16, report.skipped
        assert folded.SerializeToString() == original
        return
    assert len(report.folded) == 1
    assert count_ops(folded, "BatchNormalization") == 0
    check_model(folded)

    def user_inputs(m):
        inits = {t.name for t in m.graph.initializer}
        return [v.name for v in m.graph.input if v.name not in inits]

    assert user_inputs(folded) == user_inputs(b.model)
    assert [v.name for v in folded.graph.output] == [v.name for v in b.model.graph.output]
    if _ort_runs(family, b.dtype):
        assert_ort_equivalent(b.model, folded, b.feeds, b.dtype)
    assert_f64_equivalent(b.model, folded, b.feeds, b.dtype)
    # idempotent
    again = copy.deepcopy(folded)
    assert not fold_model(again).folded
    assert again.SerializeToString() == folded.SerializeToString()


# ----------------------------------------------------------------------------------------------
# the affine patterns beyond layer -> BN (issue 6): MatMul, chains, decomposed BNs, BN before a
# layer, dequantized weights; checked in onnxruntime with optimizations off by assert_pattern
# ----------------------------------------------------------------------------------------------
@st.composite
def pattern_cases(draw: st.DrawFn) -> tuple[str, dict, list[str]]:
    kind = draw(st.sampled_from(["matmul", "conv_add_bn", "decomposed", "bn_conv", "bn_flatten_gemm", "dq"]))
    seed = draw(st.integers(0, 2**31 - 1))
    if kind == "matmul":
        m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
        pre = draw(st.sampled_from(["", "flatten", "gemm_relu"]))
        feed = (m, k) if pre != "flatten" else (m, k, draw(st.integers(1, 3)))
        add = draw(st.sampled_from([None, (n,), (1, n), ()]))
        return (
            kind,
            dict(pre=pre, x_shape=feed if not pre else None, feed_shape=feed, n=n, add=add, seed=seed),
            ["matmul"],
        )
    if kind in ("conv_add_bn", "decomposed"):
        op = draw(st.sampled_from(["Conv", "ConvTranspose"]))
        group = draw(st.integers(1, 3))
        cin, cout = group * draw(st.integers(1, 3)), group * draw(st.integers(1, 3))
        shape = st.sampled_from([(cout, 1, 1), (1, cout, 1, 1), (), (1,)])
        if kind == "conv_add_bn":
            ops, expect = [("add", draw(shape)), ("bn", None)], ["bn_after_chain"]
        else:
            ops, expect = [("mul", draw(shape)), ("add", draw(shape))], ["decomposed_affine"]
            if draw(st.booleans()):
                ops.append(("bn", None))
                expect.append("bn_after_chain")
        return (
            kind,
            dict(
                ops=ops,
                cin=cin,
                cout=cout,
                op=op,
                group=group,
                bias=draw(st.booleans()),
                size=draw(st.integers(2, 5)),
                seed=seed,
            ),
            expect,
        )
    if kind == "bn_conv":
        group = draw(st.integers(1, 3))
        cin, cout = group * draw(st.integers(1, 3)), group * draw(st.integers(1, 3))
        kernel = draw(st.integers(1, 3))
        size = draw(st.integers(kernel, 6))
        return (
            kind,
            dict(
                cin=cin,
                cout=cout,
                group=group,
                kernel=kernel,
                size=size,
                seed=seed,
                strides=[draw(st.integers(1, 2))] * 2,
                bias=draw(st.booleans()),
                auto_pad=draw(st.sampled_from([None, "VALID"])),
                relu_before=draw(st.booleans()),
            ),
            ["bn_before"],
        )
    if kind == "bn_flatten_gemm":
        return (
            kind,
            dict(
                c=draw(st.integers(1, 4)),
                hw=draw(st.sampled_from([(), (2,), (2, 3), (1, 1)])),
                n=draw(st.integers(1, 4)),
                trans_b=draw(st.integers(0, 1)),
                alpha=draw(st.sampled_from([None, 0.5, -2.0])),
                beta=draw(st.sampled_from([None, 0.0, 1.5])),
                c_shape=draw(st.sampled_from([None, "n", "1n", "scalar"])),
                seed=seed,
            ),
            ["bn_before"],
        )
    return (
        kind,
        dict(
            per_channel=draw(st.booleans()),
            dtype=draw(st.sampled_from([np.int8, np.uint8])),
            zero_point=draw(st.booleans()),
            bias=draw(st.booleans()),
            opset=draw(st.sampled_from([13, 17, 21])),
            seed=seed,
        ),
        ["dequantized_weight"],
    )


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(pattern_cases())
def test_random_affine_patterns_fold_exactly(case: tuple[str, dict, list[str]]) -> None:
    import pattern_checks as tp

    kind, kw, expect = case
    event(kind)
    if kind == "bn_flatten_gemm":
        n = kw["n"]
        kw["c_shape"] = {None: None, "n": (n,), "1n": (1, n), "scalar": ()}[kw["c_shape"]]
    if kind == "dq" and not kw["per_channel"]:
        kw["axis"] = None
    build = {
        "matmul": tp.matmul_model,
        "conv_add_bn": tp.conv_chain,
        "decomposed": tp.conv_chain,
        "bn_conv": tp.bn_conv_model,
        "bn_flatten_gemm": tp.bn_flatten_gemm,
        "dq": tp.dq_model,
    }[kind]
    model, feeds = build(**kw)
    tp.assert_pattern(model, feeds, expect)


# ----------------------------------------------------------------------------------------------
# the fixed point (issue 13): random chains of layers, BNs and what sits between them fold in one
# call, so that folding the output again changes nothing; checked in onnxruntime, optimizations off
# ----------------------------------------------------------------------------------------------
BLOCKS = [
    "conv",
    "relu",
    "identity",
    "dropout",
    "transpose_pair",
    "concat",
    "sum",
    "residual",
    "shape",
    "pool",
    "split",
    "repvgg",
    "slice",
    "layout_bn",
]


def _composite(blocks: list[tuple[str, bool]], tail: str, seed: int) -> tuple[object, dict[str, np.ndarray]]:
    """X [2, 4, 4, 4] -> blocks (each keeps 4 channels, 4 x 4; ``(block, True)``: a BN after it)
    -> tail (``flatten_matmul_bn``, ``bn_flatten_matmul_bn`` or nothing) -> Y."""
    from onnx import TensorProto, helper
    from onnx_builders import GraphBuilder
    from pattern_checks import bn, rnd

    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    gb.input("X", F32, [2, 4, 4, 4])
    prev = "X"

    def conv(x: str, out: str, cout: int = 4) -> None:
        k = int(rng.choice([1, 3]))
        ins = [x, gb.const(f"{out}_w", rnd(rng, [cout, 4, k, k], 0.3))]
        if rng.random() < 0.5:
            ins.append(gb.const(f"{out}_b", rnd(rng, [cout])))
        gb.node("Conv", ins, [out], name=out, pads=[k // 2] * 4)

    for i, (block, with_bn) in enumerate(blocks):
        out = f"v{i}" if not with_bn else f"v{i}_pre"
        if block == "conv":
            conv(prev, out)
        elif block == "relu":
            gb.node("Relu", [prev], [out], name=out)
        elif block in ("identity", "dropout"):
            gb.node(block.capitalize(), [prev], [out], name=out)
        elif block == "transpose_pair":
            gb.node("Transpose", [prev], [f"{out}_t"], name=f"{out}_t", perm=[0, 2, 3, 1])
            gb.node("Transpose", [f"{out}_t"], [out], name=out, perm=[0, 3, 1, 2])
        elif block in ("concat", "sum"):
            conv(prev, f"{out}_a", 2 if block == "concat" else 4)
            conv(prev, f"{out}_b", 2 if block == "concat" else 4)
            op = "Concat" if block == "concat" else "Add"
            gb.node(op, [f"{out}_a", f"{out}_b"], [out], name=out, axis=1 if op == "Concat" else None)
        elif block == "pool":  # 3 x 3, stride 1, padded: the size stays 4 x 4
            op = str(rng.choice(["MaxPool", "AveragePool"]))
            gb.node(op, [prev], [out], name=out, kernel_shape=[3, 3], pads=[1] * 4)
        elif block == "split":  # Conv -> Split [2, 2] -> BN on the first part -> Concat back
            conv(prev, f"{out}_c")
            gb.node(
                "Split",
                [f"{out}_c", gb.const(f"{out}_sizes", np.array([2, 2], np.int64))],
                [f"{out}_p0", f"{out}_p1"],
                name=f"{out}_split",
                axis=1,
            )
            bn(gb, f"{out}_p0", f"{out}_n0", 2, rng, prefix=f"bn{i}_part")
            gb.node("Concat", [f"{out}_n0", f"{out}_p1"], [out], name=out, axis=1)
        elif block == "repvgg":  # (conv -> BN) + (conv -> BN) + BN(identity), kernels 1 or 3
            for part in ("a", "b"):
                conv(prev, f"{out}_{part}")
                bn(gb, f"{out}_{part}", f"{out}_{part}n", 4, rng, prefix=f"bn{i}_{part}")
            bn(gb, prev, f"{out}_id", 4, rng, prefix=f"bn{i}_id")
            gb.node("Add", [f"{out}_an", f"{out}_bn"], [f"{out}_s"], name=f"{out}_s")
            gb.node("Add", [f"{out}_s", f"{out}_id"], [out], name=out)
        elif block == "slice":  # Conv -> Slice [0, 2) and [2, 4) -> BN on the first part -> Concat back
            conv(prev, f"{out}_c")
            for k, (lo, hi) in enumerate(((0, 2), (2, 4))):
                bounds = [
                    gb.const(f"{out}_{n}{k}", np.array([v], np.int64))
                    for n, v in (("lo", lo), ("hi", hi), ("ax", 1))
                ]
                gb.node("Slice", [f"{out}_c", *bounds], [f"{out}_p{k}"], name=f"{out}_slice{k}")
            bn(gb, f"{out}_p0", f"{out}_n0", 2, rng, prefix=f"bn{i}_part")
            gb.node("Concat", [f"{out}_n0", f"{out}_p1"], [out], name=out, axis=1)
        elif block == "layout_bn":  # Conv -> Transpose (H, W) or Reshape [0, 4, -1] -> BN -> back
            conv(prev, f"{out}_c")
            swap = rng.random() < 0.5
            for k, (x, y, shape) in enumerate(
                ((f"{out}_c", f"{out}_l", [0, 4, -1]), (f"{out}_n", out, [0, 4, 4, 4]))
            ):
                if swap:
                    gb.node("Transpose", [x], [y], name=y, perm=[0, 1, 3, 2])
                else:
                    gb.node(
                        "Reshape", [x, gb.const(f"{out}_shape{k}", np.array(shape, np.int64))], [y], name=y
                    )
                if k == 0:
                    bn(gb, y, f"{out}_n", 4, rng, prefix=f"bn{i}_layout")
        elif block == "residual":
            conv(prev, f"{out}_a")
            gb.node("Add", [prev, f"{out}_a"], [out], name=out)
        elif block == "shape":  # a Shape of the value, as a second graph output
            gb.node("Shape", [prev], [f"{out}_shape"], name=f"{out}_shape")
            gb.output(f"{out}_shape", np.int64, [4])
            gb.node("Identity", [prev], [out], name=out)
        else:
            raise AssertionError(block)
        if with_bn:
            bn(gb, out, f"v{i}", 4, rng, prefix=f"bn{i}")
        prev = f"v{i}"
    if tail:
        if tail == "bn_flatten_matmul_bn":
            bn(gb, prev, "tail_bn", 4, rng, prefix="tail_bn1")
            prev = "tail_bn"
        gb.node("Flatten", [prev], ["flat"], name="flatten", axis=1)
        gb.value_info.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, [2, 64]))
        gb.node("MatMul", ["flat", gb.const("mm_w", rnd(rng, [64, 5], 0.2))], ["mm"], name="matmul")
        bn(gb, "mm", "Y", 5, rng, prefix="tail_bn2")
        gb.output("Y", F32, [2, 5])
    else:
        gb.node("Identity", [prev], ["Y"], name="out")
        gb.output("Y", F32, [2, 4, 4, 4])
    return gb.model(17), {"X": rnd(rng, [2, 4, 4, 4])}


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    st.lists(st.tuples(st.sampled_from(BLOCKS), st.booleans()), min_size=1, max_size=6),
    st.sampled_from(["", "flatten_matmul_bn", "bn_flatten_matmul_bn"]),
    st.integers(0, 2**31 - 1),
)
def test_random_composites_reach_the_fixed_point_in_one_call(
    blocks: list[tuple[str, bool]], tail: str, seed: int
) -> None:
    model, feeds = _composite(blocks, tail, seed)
    check_model(model)  # type: ignore[arg-type]
    for merge in (False, True):  # merge_branches off (the default), then on
        folded = copy.deepcopy(model)
        report = fold_model(folded, merge_branches=merge)  # type: ignore[arg-type]
        event(f"merge={merge}: {len(report.folded)} folded, {len(report.skipped)} kept")
        for f in report.folded:
            event(f"pattern {f.pattern}")
        check_model(folded)  # type: ignore[arg-type]
        assert_ort_equivalent(model, folded, feeds, F32)  # type: ignore[arg-type]
        again = copy.deepcopy(folded)
        second = fold_model(again, merge_branches=merge)  # type: ignore[arg-type]
        assert not second.folded and not second.merged_convs, (blocks, tail, merge, second.folded)
        assert again.SerializeToString() == folded.SerializeToString()  # type: ignore[attr-defined]
        # bn_to_affine rewrites only what the folds' fixed point leaves: the same BNs fold the same way
        affine = fold_model(copy.deepcopy(model), bn_to_affine=True, merge_branches=merge)  # type: ignore[arg-type]
        by_rule = [(f.bn, f.pattern) for f in affine.folded if f.pattern != "bn_to_affine"]
        assert by_rule == [(f.bn, f.pattern) for f in report.folded], (blocks, tail, merge)
