"""Regenerate every bundled model in ``models/onnx/``: ``python models/generate.py``.

Deterministic: torch models are built by ``models.definitions.build`` (seeded) and hand-built
cases draw their numbers from a numpy generator seeded with a hash of the case name. Every file
is checked with ``onnx.checker.check_model(full_check=True)``, must still contain its
BatchNormalization nodes, and (where ``models.cases`` says so) must run in onnxruntime.

Options: ``--only NAME [NAME ...]`` regenerates a subset; ``--no-torch`` skips the torch exports.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent
if str(ROOT.parent) not in sys.path:
    sys.path.insert(0, str(ROOT.parent))

from models.cases import BY_NAME, CASES, HAND_CASES, ONNX_DIR, TORCH_CASES  # noqa: E402

F32, F16, BF16, F64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE


# ------------------------------------------------------------------------------------------------
# helpers for hand-built cases
# ------------------------------------------------------------------------------------------------
def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def np_dtype(elem: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def vi(name: str, elem: int, shape: list[int | str] | tuple[int | str, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def weight(
    rng: np.random.Generator, shape: tuple[int, ...], elem: int = F32, fan_in: int | None = None
) -> np.ndarray:
    fan = fan_in if fan_in is not None else int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan)).astype(np_dtype(elem))


def bias(rng: np.random.Generator, n: int, elem: int = F32) -> np.ndarray:
    return (0.2 * rng.standard_normal(n)).astype(np_dtype(elem))


def bn_stats(rng: np.random.Generator, shape: int | tuple[int, ...], elem: int = F32) -> list[np.ndarray]:
    """[scale, bias, mean, var]: |scale| ~ U(0.5, 1.5) with some negative, var ~ U(0.5, 2)."""
    shape = (shape,) if isinstance(shape, int) else shape
    dt = np_dtype(elem)
    sign = np.where(rng.random(shape) < 0.25, -1.0, 1.0)
    sign.flat[0] = -1.0
    scale = rng.uniform(0.5, 1.5, shape) * sign
    b = 0.3 * rng.standard_normal(shape)
    mean = 0.5 * rng.standard_normal(shape)
    var = rng.uniform(0.5, 2.0, shape)
    return [a.astype(dt) for a in (scale, b, mean, var)]


def bn_inits(
    rng: np.random.Generator, prefix: str, shape: int | tuple[int, ...], elem: int = F32
) -> tuple[list[str], list[TensorProto]]:
    names = [f"{prefix}.{p}" for p in ("scale", "bias", "mean", "var")]
    return names, [tensor(n, a) for n, a in zip(names, bn_stats(rng, shape, elem))]


def bn_node(x: str, params: list[str], y: str | list[str], name: str, **attrs: object) -> onnx.NodeProto:
    outs = [y] if isinstance(y, str) else y
    attrs.setdefault("epsilon", 1e-3)
    return helper.make_node("BatchNormalization", [x, *params], outs, name=name, **attrs)


def make_model(
    graph: onnx.GraphProto,
    opset: int,
    *,
    ir: int | None = None,
    extra_opsets: list[onnx.OperatorSetIdProto] | None = None,
    functions: list[onnx.FunctionProto] | None = None,
    doc: str = "",
) -> onnx.ModelProto:
    """A model stamped with ``opset`` and the smallest IR version for it (or ``ir``).

    For IR < 4, every initializer is also listed as a graph input, as that IR requires.
    """
    opsets = [helper.make_opsetid("", opset), *(extra_opsets or [])]
    if ir is None:
        ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    if ir < 4:
        listed = {v.name for v in graph.input}
        for t in graph.initializer:
            if t.name not in listed:
                graph.input.append(vi(t.name, t.data_type, list(t.dims)))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir, functions=functions or [])
    model.producer_name = "bnfold models/generate.py"
    model.doc_string = doc
    return model


def conv_bn_graph(
    name: str,
    *,
    elem: int = F32,
    param_elem: int | None = None,
    opset_attrs: dict | None = None,
    bn_shape: tuple[int, ...] | None = None,
    bn_outputs: list[str] | None = None,
) -> onnx.GraphProto:
    """X[1,3,6,6] -> Conv(4 out, 3x3, pads 1, bias) -> BN -> Relu -> Y."""
    rng = rng_for(name)
    params, bn_t = bn_inits(rng, "bn", bn_shape or 4, param_elem or elem)
    inits = [tensor("W", weight(rng, (4, 3, 3, 3), elem)), tensor("B", bias(rng, 4, elem)), *bn_t]
    outs = bn_outputs or ["bn_out"]
    nodes = [
        helper.make_node(
            "Conv", ["X", "W", "B"], ["conv_out"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]
        ),
        bn_node("conv_out", params, outs, "bn", **(opset_attrs or {})),
        helper.make_node("Relu", ["bn_out"], ["Y"], name="relu"),
    ]
    outputs = [vi("Y", elem, [1, 4, 6, 6])]
    outputs += [vi(o, param_elem or elem, [4]) for o in outs[1:]]
    return helper.make_graph(nodes, name, [vi("X", elem, [1, 3, 6, 6])], outputs, inits)


# ------------------------------------------------------------------------------------------------
# hand-built cases
# ------------------------------------------------------------------------------------------------
def case_bn6_is_test(name: str) -> onnx.ModelProto:
    return make_model(conv_bn_graph(name, opset_attrs={"is_test": 1}), 6)


def case_bn6_training(name: str) -> onnx.ModelProto:
    return make_model(conv_bn_graph(name, opset_attrs={"is_test": 0}), 6)


def case_bn7_spatial1(name: str) -> onnx.ModelProto:
    return make_model(conv_bn_graph(name, opset_attrs={"spatial": 1}), 7)


def case_bn7_spatial0(name: str) -> onnx.ModelProto:
    return make_model(conv_bn_graph(name, opset_attrs={"spatial": 0}, bn_shape=(4, 6, 6)), 7)


def case_bn9(name: str) -> onnx.ModelProto:
    return make_model(conv_bn_graph(name), 9)


def case_bn14_training(name: str) -> onnx.ModelProto:
    g = conv_bn_graph(
        name,
        opset_attrs={"training_mode": 1, "momentum": 0.9},
        bn_outputs=["bn_out", "running_mean", "running_var"],
    )
    return make_model(g, 14)


def case_bn15_mixed_types(name: str) -> onnx.ModelProto:
    return make_model(conv_bn_graph(name, elem=F16, param_elem=F32), 15)


def case_fp16(name: str) -> onnx.ModelProto:
    return make_model(conv_bn_graph(name, elem=F16), 15)


def case_bf16(name: str) -> onnx.ModelProto:
    return make_model(conv_bn_graph(name, elem=BF16), 22)


def case_fp64_conv(name: str) -> onnx.ModelProto:
    return make_model(conv_bn_graph(name, elem=F64), 15)


def gemm_bn_graph(
    name: str,
    *,
    m: int = 3,
    k: int = 6,
    n: int = 5,
    elem: int = F32,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float | None = None,
    beta: float | None = None,
    c_shape: tuple[int, ...] | None = (5,),
) -> onnx.GraphProto:
    """A -> Gemm -> BN -> Y (no activation: the BN output is the graph output)."""
    rng = rng_for(name)
    a_shape = [k, m] if trans_a else [m, k]
    b_shape = (n, k) if trans_b else (k, n)
    params, bn_t = bn_inits(rng, "bn", n, elem)
    inits = [tensor("Bm", weight(rng, b_shape, elem, fan_in=k))]
    inputs = ["A", "Bm"]
    if c_shape is not None:
        inits.append(tensor("C", (0.2 * rng.standard_normal(c_shape)).astype(np_dtype(elem))))
        inputs.append("C")
    attrs: dict[str, object] = {}
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    if alpha is not None:
        attrs["alpha"] = alpha
    if beta is not None:
        attrs["beta"] = beta
    nodes = [
        helper.make_node("Gemm", inputs, ["gemm_out"], name="gemm", **attrs),
        bn_node("gemm_out", params, "Y", "bn"),
    ]
    return helper.make_graph(nodes, name, [vi("A", elem, a_shape)], [vi("Y", elem, [m, n])], [*inits, *bn_t])


def case_fp64_gemm(name: str) -> onnx.ModelProto:
    return make_model(gemm_bn_graph(name, elem=F64, trans_b=1), 15)


def case_gemm_transb_alpha_beta_c(name: str) -> onnx.ModelProto:
    return make_model(gemm_bn_graph(name, trans_b=1, alpha=0.7, beta=1.3), 13)


def case_gemm_no_c(name: str) -> onnx.ModelProto:
    return make_model(gemm_bn_graph(name, c_shape=None), 13)


def case_gemm_transa(name: str) -> onnx.ModelProto:
    return make_model(gemm_bn_graph(name, trans_a=1, c_shape=(1, 5)), 13)


def case_constant_nodes(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    values = {"W": weight(rng, (4, 3, 3, 3)), "B": bias(rng, 4)}
    params = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    values.update(zip(params, bn_stats(rng, 4)))
    consts = [
        helper.make_node("Constant", [], [k], name=f"const_{k}", value=tensor(k, v))
        for k, v in values.items()
    ]
    nodes = [
        *consts,
        helper.make_node("Conv", ["X", "W", "B"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("conv_out", params, "bn_out", "bn"),
        helper.make_node("Relu", ["bn_out"], ["Y"], name="relu"),
    ]
    g = helper.make_graph(nodes, name, [vi("X", F32, [1, 3, 6, 6])], [vi("Y", F32, [1, 4, 6, 6])])
    return make_model(g, 13)


def case_ir3_initializer_inputs(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    p1, t1 = bn_inits(rng, "bn1", 4)
    p2, t2 = bn_inits(rng, "bn2", 5)
    inits = [
        tensor("W1", weight(rng, (4, 3, 3, 3))),
        tensor("W2", weight(rng, (5, 4, 1, 1))),
        tensor("B2", bias(rng, 5)),
        *t1,
        *t2,
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("c1", p1, "b1", "bn1", spatial=1),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2"),
        bn_node("c2", p2, "Y", "bn2"),
    ]
    g = helper.make_graph(nodes, name, [vi("X", F32, [1, 3, 6, 6])], [vi("Y", F32, [1, 5, 6, 6])], inits)
    return make_model(g, 8, ir=3)


def case_bn_param_graph_input(name: str) -> onnx.ModelProto:
    g = conv_bn_graph(name)
    mean = next(t for t in g.initializer if t.name == "bn.mean")
    g.input.append(vi(mean.name, mean.data_type, list(mean.dims)))
    return make_model(g, 13)


def case_shared_weight(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    p1, t1 = bn_inits(rng, "bn1", 4)
    p2, t2 = bn_inits(rng, "bn2", 4)
    inits = [tensor("W", weight(rng, (4, 3, 3, 3))), tensor("B", bias(rng, 4)), *t1, *t2]
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("c1", p1, "Y1", "bn1"),
        helper.make_node("Conv", ["X", "W"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        bn_node("c2", p2, "Y2", "bn2"),
    ]
    g = helper.make_graph(
        nodes,
        name,
        [vi("X", F32, [1, 3, 6, 6])],
        [vi("Y1", F32, [1, 4, 6, 6]), vi("Y2", F32, [1, 4, 3, 3])],
        inits,
    )
    return make_model(g, 13)


def case_dequantize_weight(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    params, bn_t = bn_inits(rng, "bn", 4)
    inits = [
        tensor("Wq", rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)),
        tensor("Wq.scale", np.array(0.004, np.float32)),
        tensor("Wq.zero", np.array(3, np.int8)),
        tensor("B", bias(rng, 4)),
        *bn_t,
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "Wq.scale", "Wq.zero"], ["W"], name="dequant"),
        helper.make_node("Conv", ["X", "W", "B"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("conv_out", params, "Y", "bn"),
    ]
    g = helper.make_graph(nodes, name, [vi("X", F32, [1, 3, 6, 6])], [vi("Y", F32, [1, 4, 6, 6])], inits)
    return make_model(g, 13)


def case_if_branch(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    params, bn_t = bn_inits(rng, "bn", 4)
    outer = [tensor("W", weight(rng, (4, 3, 3, 3))), bn_t[0], bn_t[1]]  # scale, bias outside
    then_g = helper.make_graph(
        [
            helper.make_node("Conv", ["X", "W"], ["then_conv"], name="then_conv", pads=[1, 1, 1, 1]),
            bn_node("then_conv", params, "then_y", "then_bn"),
        ],
        "then_branch",
        [],
        [vi("then_y", F32, [1, 4, 6, 6])],
        [bn_t[2], bn_t[3]],  # mean, var inside
    )
    else_g = helper.make_graph(
        [
            helper.make_node("Conv", ["X", "W"], ["else_conv"], name="else_conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["else_conv"], ["else_y"], name="else_relu"),
        ],
        "else_branch",
        [],
        [vi("else_y", F32, [1, 4, 6, 6])],
    )
    nodes = [helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(
        nodes,
        name,
        [vi("X", F32, [1, 3, 6, 6]), vi("cond", TensorProto.BOOL, [])],
        [vi("Y", F32, [1, 4, 6, 6])],
        outer,
    )
    return make_model(g, 13)


def case_if_producer_outside(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    params, bn_t = bn_inits(rng, "bn", 4)
    then_g = helper.make_graph(
        [bn_node("conv_out", params, "then_y", "then_bn")],
        "then_branch",
        [],
        [vi("then_y", F32, [1, 4, 6, 6])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["conv_out"], ["else_y"], name="else_relu")],
        "else_branch",
        [],
        [vi("else_y", F32, [1, 4, 6, 6])],
    )
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    g = helper.make_graph(
        nodes,
        name,
        [vi("X", F32, [1, 3, 6, 6]), vi("cond", TensorProto.BOOL, [])],
        [vi("Y", F32, [1, 4, 6, 6])],
        [tensor("W", weight(rng, (4, 3, 3, 3))), *bn_t],
    )
    return make_model(g, 13)


def case_loop_body(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    params, bn_t = bn_inits(rng, "bn", 4)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("Conv", ["x_in", "W"], ["body_conv"], name="body_conv", pads=[1, 1, 1, 1]),
            bn_node("body_conv", params, "body_bn", "body_bn"),
            helper.make_node("Relu", ["body_bn"], ["x_out"], name="body_relu"),
        ],
        "loop_body",
        [
            vi("iter", TensorProto.INT64, []),
            vi("cond_in", TensorProto.BOOL, []),
            vi("x_in", F32, [1, 4, 5, 5]),
        ],
        [vi("cond_out", TensorProto.BOOL, []), vi("x_out", F32, [1, 4, 5, 5])],
        bn_t,
    )
    outer = [
        tensor("W", (0.5 * weight(rng, (4, 4, 3, 3))).astype(np.float32)),
        tensor("trip_count", np.array(3, np.int64)),
        tensor("cond", np.array(True)),
    ]
    nodes = [helper.make_node("Loop", ["trip_count", "cond", "X"], ["Y"], name="loop", body=body)]
    g = helper.make_graph(nodes, name, [vi("X", F32, [1, 4, 5, 5])], [vi("Y", F32, [1, 4, 5, 5])], outer)
    return make_model(g, 13)


def case_local_function(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    values = {"W": weight(rng, (4, 3, 3, 3)), "B": bias(rng, 4)}
    params = ["bn_scale", "bn_bias", "bn_mean", "bn_var"]
    values.update(zip(params, bn_stats(rng, 4)))
    consts = [helper.make_node("Constant", [], [k], value=tensor(k, v)) for k, v in values.items()]
    fn = helper.make_function(
        "local",
        "ConvBNRelu",
        ["x"],
        ["y"],
        [
            *consts,
            helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", *params], ["n"], epsilon=1e-3),
            helper.make_node("Relu", ["n"], ["y"]),
        ],
        opset_imports=[helper.make_opsetid("", 13)],
    )
    nodes = [
        helper.make_node("ConvBNRelu", ["X"], ["h"], name="block", domain="local"),
        helper.make_node("Sigmoid", ["h"], ["Y"], name="sigmoid"),
    ]
    g = helper.make_graph(nodes, name, [vi("X", F32, [1, 3, 6, 6])], [vi("Y", F32, [1, 4, 6, 6])])
    return make_model(g, 13, extra_opsets=[helper.make_opsetid("local", 1)], functions=[fn])


def case_conv_two_consumers(name: str) -> onnx.ModelProto:
    g = conv_bn_graph(name)
    g.node.append(helper.make_node("Relu", ["conv_out"], ["Z"], name="relu2"))
    g.output.append(vi("Z", F32, [1, 4, 6, 6]))
    return make_model(g, 13)


def case_conv_graph_output(name: str) -> onnx.ModelProto:
    g = conv_bn_graph(name)
    g.output.append(vi("conv_out", F32, [1, 4, 6, 6]))
    return make_model(g, 13)


def case_bn_after_relu(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    params, bn_t = bn_inits(rng, "bn", 4)
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        bn_node("relu_out", params, "Y", "bn"),
    ]
    g = helper.make_graph(
        nodes,
        name,
        [vi("X", F32, [1, 3, 6, 6])],
        [vi("Y", F32, [1, 4, 6, 6])],
        [tensor("W", weight(rng, (4, 3, 3, 3))), *bn_t],
    )
    return make_model(g, 13)


def case_bn_on_input(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    params, bn_t = bn_inits(rng, "bn", 3)
    g = helper.make_graph(
        [bn_node("X", params, "Y", "bn")],
        name,
        [vi("X", F32, [1, 3, 6, 6])],
        [vi("Y", F32, [1, 3, 6, 6])],
        bn_t,
    )
    return make_model(g, 13)


def case_conv_transpose1d_grouped(name: str) -> onnx.ModelProto:
    rng = rng_for(name)
    group, cin, cout_g = 3, 6, 2
    params, bn_t = bn_inits(rng, "bn", cout_g * group)
    inits = [tensor("W", weight(rng, (cin, cout_g, 3))), tensor("B", bias(rng, cout_g * group)), *bn_t]
    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["X", "W", "B"],
            ["ct_out"],
            name="convT",
            group=group,
            strides=[2],
            output_padding=[1],
            pads=[1, 1],
        ),
        bn_node("ct_out", params, "Y", "bn"),
    ]
    # L_out = (7 - 1) * 2 - 2 + 3 + 1 = 14
    g = helper.make_graph(nodes, name, [vi("X", F32, [2, cin, 7])], [vi("Y", F32, [2, 6, 14])], inits)
    return make_model(g, 13)


def case_conv3d_same_upper(name: str) -> onnx.ModelProto:
    # ORT rejects dilation together with SAME_* auto_pad, so the dilated conv uses explicit pads
    # and the second conv uses auto_pad=SAME_UPPER with an even kernel (asymmetric padding).
    rng = rng_for(name)
    p1, t1 = bn_inits(rng, "bn1", 4)
    p2, t2 = bn_inits(rng, "bn2", 3)
    inits = [
        tensor("W1", weight(rng, (4, 2, 3, 3, 3))),
        tensor("W2", weight(rng, (3, 4, 2, 2, 2))),
        tensor("B2", bias(rng, 3)),
        *t1,
        *t2,
    ]
    nodes = [
        # out = [(5+2-3)/2+1, (6+4-5)/1+1, (7+2-3)/2+1] = [3, 6, 4]
        helper.make_node(
            "Conv",
            ["X", "W1"],
            ["c1"],
            name="conv3d_dilated",
            strides=[2, 1, 2],
            dilations=[1, 2, 1],
            pads=[1, 2, 1, 1, 2, 1],
        ),
        bn_node("c1", p1, "b1", "bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
        # SAME_UPPER: out = ceil(in / stride) = [3, 3, 2]
        helper.make_node(
            "Conv",
            ["r1", "W2", "B2"],
            ["c2"],
            name="conv3d_same_upper",
            auto_pad="SAME_UPPER",
            strides=[1, 2, 2],
        ),
        bn_node("c2", p2, "Y", "bn2"),
    ]
    g = helper.make_graph(
        nodes, name, [vi("X", F32, [1, 2, 5, 6, 7])], [vi("Y", F32, [1, 3, 3, 3, 2])], inits
    )
    return make_model(g, 13)


# --- issue 13: what sits between a layer and its BN --------------------------------------------
def _conv(
    rng: np.random.Generator, x: str, out: str, cin: int, cout: int, k: int, inits: list, bias_: bool = False
):
    inits.append(tensor(f"{out}.w", weight(rng, (cout, cin, k, k))))
    ins = [x, f"{out}.w"]
    if bias_:
        inits.append(tensor(f"{out}.b", bias(rng, cout)))
        ins.append(f"{out}.b")
    return helper.make_node("Conv", ins, [out], name=out, pads=[k // 2] * 4, kernel_shape=[k, k])


def case_csp_concat(name: str) -> onnx.ModelProto:
    """YOLOv5 BottleneckCSP tail: two bias-free convs -> Concat -> BN (eps 1e-3) -> Relu."""
    rng = rng_for(name)
    inits: list = []
    params, bn_t = bn_inits(rng, "bn", 8)
    nodes = [
        _conv(rng, "X", "cv3", 3, 4, 1, inits),
        _conv(rng, "X", "cv2", 3, 4, 3, inits),
        helper.make_node("Concat", ["cv3", "cv2"], ["cat"], name="cat", axis=1),
        bn_node("cat", params, "bn_out", "bn"),
        helper.make_node("Relu", ["bn_out"], ["Y"], name="act"),
    ]
    g = helper.make_graph(
        nodes, name, [vi("X", F32, [1, 3, 6, 6])], [vi("Y", F32, [1, 8, 6, 6])], inits + bn_t
    )
    return make_model(g, 13)


def case_mixconv(name: str) -> onnx.ModelProto:
    """MixNet MixConv: Split -> convs of kernel 3, 5, 7 on the parts -> Concat -> BN."""
    rng = rng_for(name)
    inits: list = [tensor("split", np.array([2, 2, 2], np.int64))]
    params, bn_t = bn_inits(rng, "bn", 6)
    nodes = [helper.make_node("Split", ["X", "split"], ["x0", "x1", "x2"], name="split", axis=1)]
    nodes += [_conv(rng, f"x{i}", f"mix{i}", 2, 2, k, inits) for i, k in enumerate((3, 5, 7))]
    nodes += [
        helper.make_node("Concat", ["mix0", "mix1", "mix2"], ["cat"], name="cat", axis=1),
        bn_node("cat", params, "Y", "bn"),
    ]
    g = helper.make_graph(
        nodes, name, [vi("X", F32, [1, 6, 8, 8])], [vi("Y", F32, [1, 6, 8, 8])], inits + bn_t
    )
    return make_model(g, 13)


def case_fpn_neck(name: str) -> onnx.ModelProto:
    """Conv -> Resize(nearest, x2) -> BN folds; Conv -> MaxPool -> BN with a negative scale stays."""
    rng = rng_for(name)
    inits: list = [tensor("scales", np.array([1, 1, 2, 2], np.float32))]
    p1, bn1 = bn_inits(rng, "bn_up", 4)
    p2, bn2 = bn_inits(rng, "bn_pool", 4)  # its first scale is negative (bn_stats)
    nodes = [
        _conv(rng, "X", "lateral", 3, 4, 1, inits, bias_=True),
        helper.make_node("Resize", ["lateral", "", "scales"], ["up"], name="up", mode="nearest"),
        bn_node("up", p1, "Y_up", "bn_up"),
        _conv(rng, "X", "down", 3, 4, 3, inits, bias_=True),
        helper.make_node("MaxPool", ["down"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        bn_node("pool", p2, "Y_pool", "bn_pool"),
    ]
    outputs = [vi("Y_up", F32, [1, 4, 12, 12]), vi("Y_pool", F32, [1, 4, 3, 3])]
    g = helper.make_graph(nodes, name, [vi("X", F32, [1, 3, 6, 6])], outputs, inits + bn1 + bn2)
    return make_model(g, 13)


def case_exporter_passthrough(name: str) -> onnx.ModelProto:
    """paddle2onnx Conv -> Add(bias) -> Identity -> BN; tf2onnx Conv -> Transpose pair -> BN;
    Conv -> Dropout (inference) -> BN: all three fold, the ops between go."""
    rng = rng_for(name)
    inits: list = [tensor("add.b", bias(rng, 4).reshape(4, 1, 1))]
    ps = [bn_inits(rng, f"bn{i}", 4) for i in range(3)]
    nodes = [
        _conv(rng, "X", "c0", 3, 4, 3, inits),
        helper.make_node("Add", ["c0", "add.b"], ["a0"], name="add"),
        helper.make_node("Identity", ["a0"], ["i0"], name="identity"),
        bn_node("i0", ps[0][0], "Y0", "bn0"),
        _conv(rng, "X", "c1", 3, 4, 3, inits, bias_=True),
        helper.make_node("Transpose", ["c1"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["nhwc"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        bn_node("nchw", ps[1][0], "Y1", "bn1"),
        _conv(rng, "X", "c2", 3, 4, 1, inits, bias_=True),
        helper.make_node("Dropout", ["c2"], ["d2"], name="dropout"),
        bn_node("d2", ps[2][0], "Y2", "bn2"),
    ]
    outputs = [vi(f"Y{i}", F32, [1, 4, 6, 6]) for i in range(3)]
    g = helper.make_graph(
        nodes, name, [vi("X", F32, [1, 3, 6, 6])], outputs, inits + [t for p in ps for t in p[1]]
    )
    return make_model(g, 13)


def case_sum_of_convs(name: str) -> onnx.ModelProto:
    """Conv 3x3 + Conv 1x1 -> Add -> BN folds into both; Conv + X (identity) -> Add -> BN stays."""
    rng = rng_for(name)
    inits: list = []
    p1, bn1 = bn_inits(rng, "bn_sum", 3)
    p2, bn2 = bn_inits(rng, "bn_res", 3)
    nodes = [
        _conv(rng, "X", "k3", 3, 3, 3, inits, bias_=True),
        _conv(rng, "X", "k1", 3, 3, 1, inits, bias_=True),
        helper.make_node("Add", ["k3", "k1"], ["sum"], name="sum"),
        bn_node("sum", p1, "Y_sum", "bn_sum"),
        _conv(rng, "X", "branch", 3, 3, 3, inits),
        helper.make_node("Add", ["branch", "X"], ["res"], name="residual"),
        bn_node("res", p2, "Y_res", "bn_res"),
    ]
    outputs = [vi("Y_sum", F32, [1, 3, 6, 6]), vi("Y_res", F32, [1, 3, 6, 6])]
    g = helper.make_graph(nodes, name, [vi("X", F32, [1, 3, 6, 6])], outputs, inits + bn1 + bn2)
    return make_model(g, 13)


def case_bn_flatten_matmul_bn(name: str) -> onnx.ModelProto:
    """BN -> Flatten -> MatMul -> BN: the second BN's fold makes the MatMul a Gemm, which then takes
    the first (both fold in one call)."""
    rng = rng_for(name)
    p1, bn1 = bn_inits(rng, "bn_in", 3)
    p2, bn2 = bn_inits(rng, "bn_out", 5)
    nodes = [
        bn_node("X", p1, "b", "bn_in"),
        helper.make_node("Flatten", ["b"], ["f"], name="flatten", axis=1),
        helper.make_node("MatMul", ["f", "W"], ["m"], name="matmul"),
        bn_node("m", p2, "Y", "bn_out"),
    ]
    g = helper.make_graph(
        nodes,
        name,
        [vi("X", F32, [2, 3, 2, 2])],
        [vi("Y", F32, [2, 5])],
        [tensor("W", weight(rng, (12, 5), fan_in=12)), *bn1, *bn2],
        value_info=[vi("f", F32, [2, 12])],
    )
    return make_model(g, 13)


def case_conv_shape_reader(name: str) -> onnx.ModelProto:
    """Conv -> BN, with the conv output read by Shape (-> ConstantOfShape, a graph output) and by
    CastLike's type input: they read only its shape and type, so the BN folds (they then read the
    conv's new output)."""
    g = conv_bn_graph(name)
    half = numpy_helper.from_array(np.array([0.5], np.float32), "half")
    g.node.extend(
        [
            helper.make_node("Shape", ["conv_out"], ["shape"], name="shape"),
            helper.make_node("ConstantOfShape", ["shape"], ["halves"], name="halves", value=half),
            helper.make_node("Constant", [], ["two"], name="two", value_float=2.0),
            helper.make_node("CastLike", ["two", "conv_out"], ["two_like"], name="cast_like"),
        ]
    )
    g.output.extend([vi("halves", F32, [1, 4, 6, 6]), vi("two_like", F32, [])])
    return make_model(g, 15)


def case_levit_linear_norm(name: str) -> onnx.ModelProto:
    """LeViT's LinearNorm, bn(linear(x).flatten(0, 1)).reshape_as(x): MatMul on [B, N, K] ->
    Reshape([-1, C]) -> BN -> Reshape back folds (the BN becomes an Add); a second MatMul ->
    Flatten(axis=1) -> BN over tokens x features stays (channel_axis)."""
    rng = rng_for(name)
    p1, bn1 = bn_inits(rng, "bn_tok", 4)
    p2, bn2 = bn_inits(rng, "bn_mixed", 20)
    inits = [
        tensor("W1", weight(rng, (6, 4), fan_in=6)),
        tensor("W2", weight(rng, (6, 4), fan_in=6)),
        tensor("to2d", np.array([-1, 4], np.int64)),
        tensor("back", np.array([2, 5, 4], np.int64)),
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["m1"], name="linear"),
        helper.make_node("Reshape", ["m1", "to2d"], ["f1"], name="flatten01"),
        bn_node("f1", p1, "b1", "bn_tok"),
        helper.make_node("Reshape", ["b1", "back"], ["Y"], name="reshape_as"),
        helper.make_node("MatMul", ["X", "W2"], ["m2"], name="linear_mixed"),
        helper.make_node("Flatten", ["m2"], ["f2"], name="flatten_mixed", axis=1),
        bn_node("f2", p2, "Y_mixed", "bn_mixed"),
    ]
    outputs = [vi("Y", F32, [2, 5, 4]), vi("Y_mixed", F32, [2, 20])]
    g = helper.make_graph(nodes, name, [vi("X", F32, [2, 5, 6])], outputs, inits + bn1 + bn2)
    return make_model(g, 13)


def case_repvgg_block(name: str) -> onnx.ModelProto:
    """RepVGG block: Relu -> (Conv 3x3 -> BN) + (Conv 1x1 -> BN) + BN(identity) -> Relu. By default
    the branch BNs fold and the identity BN stays (needs_merge_branches); with merge_branches the
    block becomes one 3x3 Conv."""
    rng = rng_for(name)
    inits: list = []
    ps = [bn_inits(rng, f"bn_{b}", 4) for b in ("dense", "pointwise", "identity")]
    nodes = [
        helper.make_node("Relu", ["X"], ["x"], name="relu_in"),
        _conv(rng, "x", "dense", 4, 4, 3, inits),
        bn_node("dense", ps[0][0], "dense_bn", "bn_dense"),
        _conv(rng, "x", "pointwise", 4, 4, 1, inits),
        bn_node("pointwise", ps[1][0], "pointwise_bn", "bn_pointwise"),
        bn_node("x", ps[2][0], "identity_bn", "bn_identity"),
        helper.make_node("Add", ["dense_bn", "pointwise_bn"], ["sum"], name="add_branches"),
        helper.make_node("Add", ["sum", "identity_bn"], ["block"], name="add_identity"),
        helper.make_node("Relu", ["block"], ["Y"], name="relu_out"),
    ]
    g = helper.make_graph(
        nodes,
        name,
        [vi("X", F32, ["N", 4, 6, 6])],
        [vi("Y", F32, ["N", 4, 6, 6])],
        inits + [t for p in ps for t in p[1]],
    )
    return make_model(g, 13)


HAND_BUILDERS: dict[str, Callable[[str], onnx.ModelProto]] = {
    name: fn for name, fn in globals().items() if name.startswith("case_") and callable(fn)
}


# ------------------------------------------------------------------------------------------------
# torch exports
# ------------------------------------------------------------------------------------------------
def _strip_node_metadata(model: onnx.ModelProto) -> None:
    """Drop per-node metadata (stack traces with local paths): smaller, machine-independent files."""

    def visit(nodes) -> None:
        for n in nodes:
            del n.metadata_props[:]
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g.node)

    visit(model.graph.node)


def export_torch(case_name: str, model_name: str, legacy: bool) -> onnx.ModelProto:
    import torch

    from models.definitions import build

    module, x = build(model_name)
    if legacy:
        f = io.BytesIO()
        torch.onnx.export(
            module,
            (x,),
            f,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
        )
        model = onnx.load_from_string(f.getvalue())
    else:
        program = torch.onnx.export(
            module,
            (x,),
            dynamo=True,
            optimize=False,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
        )
        model = program.model_proto
    _strip_node_metadata(model)
    model.doc_string = f"{case_name}: models.definitions.build({model_name!r}) exported by models/generate.py"
    return model


# ------------------------------------------------------------------------------------------------
# checks and main
# ------------------------------------------------------------------------------------------------
def count_bn(model: onnx.ModelProto) -> int:
    def in_graph(g: onnx.GraphProto) -> int:
        total = 0
        for n in g.node:
            total += n.op_type == "BatchNormalization"
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    total += in_graph(a.g)
        return total

    return in_graph(model.graph) + sum(
        n.op_type == "BatchNormalization" for f in model.functions for n in f.node
    )


def check_runs(model: onnx.ModelProto) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in i.shape]
        if i.type == "tensor(bool)":
            feeds[i.name] = np.array(True)
        else:
            dt = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}[
                i.type
            ]
            feeds[i.name] = rng.standard_normal(shape).astype(dt)
    for out in sess.run(None, feeds):
        assert np.all(np.isfinite(np.asarray(out, dtype=np.float64))), "non-finite output"


def generate(names: list[str] | None, with_torch: bool) -> None:
    assert set(HAND_BUILDERS) == {c.name for c in HAND_CASES}, (
        "models/cases.py and generate.py disagree: "
        f"{sorted(set(HAND_BUILDERS) ^ {c.name for c in HAND_CASES})}"
    )
    ONNX_DIR.mkdir(exist_ok=True)
    selected = [c for c in CASES if names is None or c.name in names]
    if names:
        unknown = set(names) - set(BY_NAME)
        if unknown:
            raise SystemExit(f"unknown case(s): {sorted(unknown)}")
    warnings.filterwarnings("ignore")
    for case in selected:
        if case in TORCH_CASES:
            if not with_torch:
                continue
            model = export_torch(case.name, case.torch_model or "", case.name.endswith("_legacy"))
        else:
            model = HAND_BUILDERS[case.name](case.name)
            model.doc_string = case.description
        onnx.checker.check_model(model, full_check=True)
        bns = count_bn(model)
        assert bns > 0, f"{case.name}: no BatchNormalization left in the exported model"
        assert bns == case.expected_folded + len(case.expected_skip_codes), (
            f"{case.name}: {bns} BN nodes, but the registry expects "
            f"{case.expected_folded} folds + {len(case.expected_skip_codes)} kept"
        )
        if case.runs_in_ort:
            check_runs(model)
        data = model.SerializeToString(deterministic=True)
        case.path.write_bytes(data)
        print(f"{case.file:40s} {len(data):7d} bytes  {bns:2d} BN")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="regenerate only these cases")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch exports")
    args = parser.parse_args(argv)
    generate(args.only, not args.no_torch)


if __name__ == "__main__":
    main()
