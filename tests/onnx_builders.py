"""Builders for small Conv/ConvTranspose/Gemm -> BatchNormalization models, and two independent
oracles used by the tests: onnxruntime with every optimization off, and a float64 torch
evaluator for the dtypes and opsets onnxruntime's CPU provider cannot run (bfloat16, float64
Conv, BN opset 1/6).

Nothing here imports bnfold: the oracles must not share code with what they check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)

# significand bits (incl. the implicit one): a value rounded to nearest is within 2**-p relative
PRECISION = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53}


def elem_type(dtype: Any) -> int:
    dtype = np.dtype(dtype)
    if dtype == BF16:
        return TensorProto.BFLOAT16
    return helper.np_dtype_to_tensor_dtype(dtype)


def np_dtype(elem: int) -> np.dtype:
    if elem == TensorProto.BFLOAT16:
        return BF16
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def default_ir(opset: int) -> int:
    """The IR version that goes with an opset (onnx's own table, capped at what ORT reads)."""
    if opset <= 6:
        return 3
    return min(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]), 10)


# ----------------------------------------------------------------------------------------------
# random BN statistics and tensors
# ----------------------------------------------------------------------------------------------
def bn_stats(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    """gamma ~ N(1, 0.5) (some negative), beta ~ N(0, 1), mean ~ N(0, 1), var ~ U(0.5, 2)."""
    return {
        "scale": rng.normal(1.0, 0.5, c),
        "B": rng.normal(0.0, 1.0, c),
        "mean": rng.normal(0.0, 1.0, c),
        "var": rng.uniform(0.5, 2.0, c),
    }


def cast(a: np.ndarray, dtype: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).astype(np.dtype(dtype))


@dataclass
class Built:
    """A model and everything a test needs to check it."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    dtype: np.dtype = F32
    bn_names: list[str] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)


class GraphBuilder:
    """Collects nodes, initializers and constants; ``const`` picks the form of each constant."""

    def __init__(self, *, const_form: str = "initializer") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.const_form = const_form

    def const(self, name: str, array: np.ndarray, form: str | None = None) -> str:
        form = form or self.const_form
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if form == "initializer":
            self.initializers.append(tensor)
        elif form == "constant_node":
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_c", value=tensor))
        elif form == "input":  # a plain graph input: not a constant
            self.inputs.append(helper.make_tensor_value_info(name, tensor.data_type, list(array.shape)))
        elif form == "initializer_input":  # initializer also listed as a graph input
            self.initializers.append(tensor)
            self.inputs.append(helper.make_tensor_value_info(name, tensor.data_type, list(array.shape)))
        else:
            raise ValueError(form)
        return name

    def input(self, name: str, dtype: Any, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type(dtype), list(shape)))
        return name

    def output(self, name: str, dtype: Any, shape: Sequence[int | str] | None = None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type(dtype), shape))
        return name

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        outputs: Sequence[str],
        name: str | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> onnx.NodeProto:
        n = helper.make_node(
            op,
            list(inputs),
            list(outputs),
            name=name or outputs[0],
            domain=domain,
            **{k: v for k, v in attrs.items() if v is not None},
        )
        self.nodes.append(n)
        return n

    def graph(self, name: str = "g") -> onnx.GraphProto:
        return helper.make_graph(
            self.nodes, name, self.inputs, self.outputs, self.initializers, value_info=self.value_info
        )

    def model(
        self,
        opset: int,
        ir_version: int | None = None,
        functions: Sequence[onnx.FunctionProto] = (),
        extra_opsets: Sequence[onnx.OperatorSetIdProto] = (),
    ) -> onnx.ModelProto:
        m = helper.make_model(
            self.graph(),
            opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
            functions=list(functions),
        )
        m.ir_version = ir_version if ir_version is not None else default_ir(opset)
        if m.ir_version < 4:  # IR < 4: every initializer must also be a graph input
            listed = {v.name for v in m.graph.input}
            for t in m.graph.initializer:
                if t.name not in listed:
                    m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        m.producer_name = "bnfold-tests"
        m.producer_version = "1"
        return m


def add_bn(
    gb: GraphBuilder,
    x: str,
    y: str,
    stats: Mapping[str, np.ndarray],
    *,
    dtype: Any,
    bn_opset: int,
    prefix: str,
    epsilon: float | None = None,
    param_dtype: Any = None,
    mean_dtype: Any = None,
    param_form: str | None = None,
    training: bool = False,
    extra_outputs: Sequence[str] = (),
    **attrs: Any,
) -> onnx.NodeProto:
    """A BatchNormalization node of ``bn_opset`` flavour with inference attributes."""
    p_dtype = param_dtype or dtype
    m_dtype = mean_dtype or p_dtype
    names = [
        gb.const(f"{prefix}_scale", cast(stats["scale"], p_dtype), param_form),
        gb.const(f"{prefix}_B", cast(stats["B"], p_dtype), param_form),
        gb.const(f"{prefix}_mean", cast(stats["mean"], m_dtype), param_form),
        gb.const(f"{prefix}_var", cast(stats["var"], m_dtype), param_form),
    ]
    if bn_opset == 1:
        attrs.setdefault("consumed_inputs", [0, 0, 0, 1, 1])
    if bn_opset in (1, 6):
        attrs.setdefault("is_test", 0 if training else 1)
    if bn_opset >= 14 and training:
        attrs.setdefault("training_mode", 1)
    if epsilon is not None:
        attrs["epsilon"] = float(epsilon)
    return gb.node("BatchNormalization", [x, *names], [y, *extra_outputs], name=prefix, **attrs)


def conv_bn(
    *,
    op: str = "Conv",
    rank: int = 2,
    cin: int = 4,
    cout: int = 6,
    group: int = 1,
    kernel: int | Sequence[int] = 3,
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    auto_pad: str | None = None,
    output_padding: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    bias: bool = True,
    dtype: Any = F32,
    bn_opset: int = 15,
    opset: int | None = None,
    ir_version: int | None = None,
    epsilon: float | None = None,
    param_dtype: Any = None,
    mean_dtype: Any = None,
    weight_form: str = "initializer",
    param_form: str = "initializer",
    batch: int = 2,
    size: int | Sequence[int] = 5,
    seed: int = 0,
    relu: bool = False,
    scale_weight: float = 1.0,
) -> Built:
    """X -> Conv|ConvTranspose -> BatchNormalization [-> Relu] -> Y."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    ks = [kernel] * rank if isinstance(kernel, int) else list(kernel)
    sizes = [size] * rank if isinstance(size, int) else list(size)
    if op == "Conv":
        wshape = [cout, cin // group, *ks]
    else:
        wshape = [cin, cout // group, *ks]
    fan_in = (cin // group) * int(np.prod(ks))
    weight = rng.normal(0.0, scale_weight / math.sqrt(fan_in), wshape)
    gb = GraphBuilder()
    x = gb.input("X", dtype, [batch, cin, *sizes])
    w = gb.const("W", cast(weight, dtype), weight_form)
    ins = [x, w]
    if bias:
        ins.append(gb.const("Bc", cast(rng.normal(0, 1, cout), dtype), weight_form))
    gb.node(
        op,
        ins,
        ["conv_out"],
        name="conv",
        kernel_shape=ks,
        group=group if group != 1 else None,
        strides=strides,
        dilations=dilations,
        pads=pads,
        auto_pad=auto_pad,
        output_padding=output_padding,
        output_shape=output_shape,
    )
    out = "bn_out" if relu else "Y"
    add_bn(
        gb,
        "conv_out",
        out,
        bn_stats(rng, cout),
        dtype=dtype,
        bn_opset=bn_opset,
        prefix="bn",
        epsilon=epsilon,
        param_dtype=param_dtype,
        mean_dtype=mean_dtype,
        param_form=param_form,
    )
    if relu:
        gb.node("Relu", [out], ["Y"])
    gb.output("Y", dtype, [None] * (rank + 2))
    opset = opset or default_opset(bn_opset, dtype)
    model = gb.model(opset, ir_version)
    feeds = {"X": cast(rng.normal(0, 1, [batch, cin, *sizes]), dtype)}
    return Built(model, feeds, dtype, ["bn"], ["conv"])


def default_opset(bn_opset: int, dtype: Any) -> int:
    """The model opset to use for a BN flavour (bfloat16 Conv needs opset 22)."""
    if np.dtype(dtype) == BF16:
        return 22
    return bn_opset if bn_opset != 15 else 17


def gemm_bn(
    *,
    m: int = 3,
    k: int = 5,
    n: int = 4,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float | None = None,
    beta: float | None = None,
    c_shape: Sequence[int] | None = (4,),
    dtype: Any = F32,
    bn_opset: int = 15,
    opset: int | None = None,
    ir_version: int | None = None,
    weight_form: str = "initializer",
    param_form: str = "initializer",
    epsilon: float | None = None,
    seed: int = 0,
) -> Built:
    """X -> Gemm(X, B, C) -> BatchNormalization -> Y (Y is [m, n])."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    gb = GraphBuilder()
    a_shape = [k, m] if trans_a else [m, k]
    x = gb.input("X", dtype, a_shape)
    b_shape = [n, k] if trans_b else [k, n]
    ins = [x, gb.const("W", cast(rng.normal(0, 1 / math.sqrt(k), b_shape), dtype), weight_form)]
    if c_shape is not None:
        ins.append(gb.const("C", cast(rng.normal(0, 1, c_shape), dtype), weight_form))
    opset = opset or default_opset(bn_opset, dtype)
    gb.node(
        "Gemm",
        ins,
        ["gemm_out"],
        name="gemm",
        transA=trans_a or None,
        transB=trans_b or None,
        alpha=alpha,
        beta=beta,
        broadcast=1 if opset < 7 and c_shape is not None else None,
    )
    add_bn(
        gb,
        "gemm_out",
        "Y",
        bn_stats(rng, n),
        dtype=dtype,
        bn_opset=bn_opset,
        prefix="bn",
        epsilon=epsilon,
        param_form=param_form,
    )
    gb.output("Y", dtype, [m, n])
    model = gb.model(opset, ir_version)
    feeds = {"X": cast(rng.normal(0, 1, a_shape), dtype)}
    return Built(model, feeds, dtype, ["bn"], ["gemm"])


# ----------------------------------------------------------------------------------------------
# oracles
# ----------------------------------------------------------------------------------------------
def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` in onnxruntime (CPU) with every graph optimization off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3  # errors only
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def ort_tolerance(dtype: Any) -> tuple[float, float]:
    """(rtol, atol relative to max |reference|) for ORT runs of original vs folded in ``dtype``."""
    name = np.dtype(dtype).name
    return {
        "float32": (1e-5, 1e-5),
        "float64": (1e-12, 1e-12),
        "float16": (1e-2, 1e-2),
        "bfloat16": (5e-2, 5e-2),
    }[name]


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float, what: str = "") -> None:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = np.abs(a - e)
    bad = err > atol + rtol * np.abs(e)
    assert not np.any(bad), (
        f"{what}: {int(bad.sum())}/{bad.size} elements differ; max abs err {err.max():.3g}, "
        f"atol {atol:.3g}, rtol {rtol:.3g}"
    )


def assert_ort_equivalent(
    original: onnx.ModelProto, folded: onnx.ModelProto, feeds: Mapping[str, np.ndarray], dtype: Any = F32
) -> None:
    """Original and folded give the same outputs in ORT with optimizations off."""
    ref = run_ort(original, feeds)
    got = run_ort(folded, feeds)
    rtol, arel = ort_tolerance(dtype)
    assert len(ref) == len(got)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert r.dtype == g.dtype, f"output {i}: dtype {g.dtype} != {r.dtype}"
        scale = max(1.0, float(np.max(np.abs(r.astype(np.float64)))) if r.size else 1.0)
        assert_close(g, r, rtol, arel * scale, f"output {i}")


# ----- float64 torch evaluator ------------------------------------------------------------------
def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return vals


def _spatial_pads(
    a: dict[str, Any], in_sizes: Sequence[int], ks: Sequence[int], strides: Sequence[int], dil: Sequence[int]
) -> list[int]:
    rank = len(ks)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(rank):
            out = -(-in_sizes[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (ks[i] - 1) * dil[i] + 1 - in_sizes[i])
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
        return pads_b + pads_e
    if auto == "VALID":
        return [0] * (2 * rank)
    return list(a.get("pads", [0] * (2 * rank)))


def _conv(torch: Any, x: Any, w: Any, b: Any, a: dict[str, Any]) -> Any:
    import torch.nn.functional as F

    rank = w.dim() - 2
    ks = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * rank))
    dil = list(a.get("dilations", [1] * rank))
    pads = _spatial_pads(a, list(x.shape[2:]), ks, strides, dil)
    pad_arg: list[int] = []
    for i in reversed(range(rank)):
        pad_arg += [pads[i], pads[i + rank]]
    x = F.pad(x, pad_arg)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return fn(x, w, b, stride=strides, dilation=dil, groups=int(a.get("group", 1)))


def _conv_transpose(torch: Any, x: Any, w: Any, b: Any, a: dict[str, Any]) -> Any:
    import torch.nn.functional as F

    rank = w.dim() - 2
    ks = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * rank))
    dil = list(a.get("dilations", [1] * rank))
    out_pad = list(a.get("output_padding", [0] * rank))
    group = int(a.get("group", 1))
    full_sizes = [
        (x.shape[2 + i] - 1) * strides[i] + (ks[i] - 1) * dil[i] + 1 + out_pad[i] for i in range(rank)
    ]
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if "output_shape" in a:
        target = list(a["output_shape"])[-rank:]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [x.shape[2 + i] * strides[i] for i in range(rank)]
    else:
        target = None
    if target is not None and auto != "VALID":
        pads_b, pads_e = [], []
        for i in range(rank):
            total = full_sizes[i] - target[i]
            # ONNX: SAME_UPPER puts the extra padding at the end of the *input* grid, i.e. crops
            # total // 2 at the start of the output
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto != "SAME_LOWER" else big)
            pads_e.append(big if auto != "SAME_LOWER" else small)
        pads = pads_b + pads_e
    elif auto == "VALID":
        pads = [0] * (2 * rank)
    else:
        pads = list(a.get("pads", [0] * (2 * rank)))
    # full transposed convolution, then crop the pads (handles asymmetric pads)
    op = [0] * rank
    y = None
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    y = fn(x, w, b, stride=strides, dilation=dil, groups=group, output_padding=op)
    extra = [full_sizes[i] - y.shape[2 + i] for i in range(rank)]
    if any(extra):  # output_padding: extra rows at the end, receiving only the bias
        pad_arg: list[int] = []
        for i in reversed(range(rank)):
            pad_arg += [0, extra[i]]
        y = F.pad(y, pad_arg)
        if b is not None:
            mask = torch.ones_like(y[:1, :1])
            for i in range(rank):
                idx = [slice(None)] * (2 + rank)
                idx[2 + i] = slice(full_sizes[i] - extra[i], None)
                mask[tuple(idx)] = 0
            y = y + (1 - mask) * b.reshape([1, -1] + [1] * rank)
    sl = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[i + rank]) for i in range(rank)]
    return y[tuple(sl)]


def eval_f64(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, absolute: bool = False
) -> list[np.ndarray]:
    """Evaluate a plain graph of Conv/ConvTranspose/Gemm/BatchNormalization(inference)/Relu/
    Identity/Constant/Add/Mul/Shape/Expand/CastLike nodes in float64 with torch.

    ``absolute`` replaces every constant, input and alpha by its absolute value (BN excluded):
    evaluated on a single folded layer this is ``|W| * |x| + |b|``, the scale of its rounding error.
    """
    import torch

    vals: dict[str, Any] = {}
    for k, v in {**_values(model), **feeds}.items():
        vals[k] = torch.from_numpy(np.asarray(v).astype(np.float64))
        if absolute:
            vals[k] = vals[k].abs()
    for node in model.graph.node:
        a = _attrs(node)
        ins = [vals[i] if i else None for i in node.input]
        op = node.op_type
        if op == "Constant":
            if "value" in a:
                t = numpy_helper.to_array(a["value"]).astype(np.float64)
            else:
                (key,) = a
                t = np.asarray(a[key], dtype=np.float64)
            out = torch.from_numpy(t)
            out = out.abs() if absolute else out
        elif op == "Conv":
            out = _conv(torch, ins[0], ins[1], ins[2] if len(ins) > 2 else None, a)
        elif op == "ConvTranspose":
            out = _conv_transpose(torch, ins[0], ins[1], ins[2] if len(ins) > 2 else None, a)
        elif op == "Gemm":
            A = ins[0].T if a.get("transA", 0) else ins[0]
            B = ins[1].T if a.get("transB", 0) else ins[1]
            alpha = float(a.get("alpha", 1.0))
            out = (abs(alpha) if absolute else alpha) * (A @ B)
            if len(ins) > 2 and ins[2] is not None:
                beta = float(a.get("beta", 1.0))
                out = out + (abs(beta) if absolute else beta) * ins[2]
        elif op == "BatchNormalization":
            assert not absolute
            x, g, b, m, v = ins
            shape = [1, -1] + [1] * (x.dim() - 2)
            eps = float(a.get("epsilon", 1e-5))
            out = (x - m.reshape(shape)) / torch.sqrt(v.reshape(shape) + eps) * g.reshape(shape) + b.reshape(
                shape
            )
        elif op == "Relu":
            out = torch.relu(ins[0])
        elif op == "Identity":
            out = ins[0]
        elif op == "Add":
            out = ins[0] + ins[1]
        elif op == "Mul":
            out = ins[0] * ins[1]
        elif op == "Shape":
            shp = list(ins[0].shape)[a.get("start", 0) : a.get("end", None)]
            out = torch.tensor(shp, dtype=torch.float64)
        elif op == "Expand":
            out = ins[0].expand([int(s) for s in ins[1].tolist()]).clone()
        elif op == "CastLike":
            out = ins[0]
        else:
            raise NotImplementedError(op)
        vals[node.output[0]] = out
    return [vals[o.name].numpy() for o in model.graph.output]


def assert_f64_equivalent(
    original: onnx.ModelProto, folded: onnx.ModelProto, feeds: Mapping[str, np.ndarray], dtype: Any
) -> None:
    """For a single folded layer: the folded layer evaluated in float64 equals the original
    layer + BN in float64 up to the rounding of the folded tensors into ``dtype``:
    ``|y' - y| <= 2**-p * (|W'| * |x| + |b'|)`` elementwise (plus float64 evaluation noise)."""
    ref = eval_f64(original, feeds)
    got = eval_f64(folded, feeds)
    bound = eval_f64(folded, feeds, absolute=True)
    u = 2.0 ** -PRECISION[np.dtype(dtype).name]
    for i, (r, g, b) in enumerate(zip(ref, got, bound)):
        tol = u * b * 1.0001 + 1e-12 * (b + np.abs(r)) + 1e-30
        err = np.abs(g - r)
        bad = err > tol
        assert not np.any(bad), (
            f"output {i}: {int(bad.sum())}/{bad.size} elements exceed the rounding bound; "
            f"worst err/bound {float(np.max(err / tol)):.3g}"
        )


def count_ops(model: onnx.ModelProto, op: str) -> int:
    """Nodes of type ``op`` in the graph, its subgraphs and the model's functions."""
    n = 0

    def visit(nodes: Sequence[onnx.NodeProto]) -> None:
        nonlocal n
        for node in nodes:
            n += node.op_type == op
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g.node)
                for g in a.graphs:
                    visit(g.node)

    visit(model.graph.node)
    for f in model.functions:
        visit(f.node)
    return n


def check_model(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def initializer(model_or_graph: onnx.ModelProto | onnx.GraphProto, name: str) -> np.ndarray:
    g = model_or_graph.graph if isinstance(model_or_graph, onnx.ModelProto) else model_or_graph
    for t in g.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def node_named(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    for n in graph.node:
        if n.name == name:
            return n
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# control flow and functions
# ----------------------------------------------------------------------------------------------
def _conv_bn_nodes(
    gb: GraphBuilder, x: str, y: str, w: str, b: str | None, bn_params: Sequence[str], prefix: str
) -> None:
    gb.node(
        "Conv",
        [x, w] + ([b] if b else []),
        [f"{prefix}_conv_out"],
        name=f"{prefix}_conv",
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    )
    gb.node("BatchNormalization", [f"{prefix}_conv_out", *bn_params], [y], name=f"{prefix}_bn")


def _outer_params(
    gb: GraphBuilder, rng: np.random.Generator, cin: int, cout: int, prefix: str, form: str = "initializer"
) -> tuple[str, str, list[str]]:
    w = gb.const(f"{prefix}W", rng.normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32), form)
    b = gb.const(f"{prefix}Bc", rng.normal(0, 1, cout).astype(np.float32), form)
    st = bn_stats(rng, cout)
    params = [gb.const(f"{prefix}{k}", st[k].astype(np.float32), form) for k in ("scale", "B", "mean", "var")]
    return w, b, params


def if_model(*, shared_weight: bool = False, seed: int = 0) -> Built:
    """``If(cond)``: the then branch is Conv->BN on outer-scope weights and BN parameters; the else
    branch is a plain Conv (on the same outer weight when ``shared_weight``)."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    x = gb.input("X", F32, [1, 3, 5, 5])
    cond = gb.input("cond", np.bool_, [])
    w, b, params = _outer_params(gb, rng, 3, 4, "t_")
    then = GraphBuilder()
    _conv_bn_nodes(then, x, "then_y", w, b, params, "then")
    then.output("then_y", F32, [1, 4, 5, 5])
    other = GraphBuilder()
    w2 = w if shared_weight else gb.const("e_W", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32))
    other.node("Conv", [x, w2], ["else_y"], name="else_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    other.output("else_y", F32, [1, 4, 5, 5])
    gb.node("If", [cond], ["Y"], name="if", then_branch=then.graph("then"), else_branch=other.graph("else"))
    gb.output("Y", F32, [1, 4, 5, 5])
    feeds = {"X": rng.normal(0, 1, (1, 3, 5, 5)).astype(np.float32), "cond": np.array(True)}
    return Built(gb.model(17), feeds, F32, ["then_bn"], ["then_conv"])


def loop_model(seed: int = 0) -> Built:
    """``Loop`` 3 times: v += BN(Conv(X, W)) with X, W and the BN parameters from the outer scope."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    x = gb.input("X", F32, [1, 3, 5, 5])
    v0 = gb.input("V0", F32, [1, 4, 5, 5])
    w, b, params = _outer_params(gb, rng, 3, 4, "l_")
    trip = gb.const("trip", np.array(3, dtype=np.int64))
    body = GraphBuilder()
    body.input("i", np.int64, [])
    body.input("c_in", np.bool_, [])
    body.input("v_in", F32, [1, 4, 5, 5])
    _conv_bn_nodes(body, x, "body_y", w, b, params, "loop")
    body.node("Add", ["v_in", "body_y"], ["v_out"], name="acc")
    body.node("Identity", ["c_in"], ["c_out"], name="cond_pass")
    body.output("c_out", np.bool_, [])
    body.output("v_out", F32, [1, 4, 5, 5])
    gb.node("Loop", [trip, "", v0], ["Y"], name="loop", body=body.graph("body"))
    gb.output("Y", F32, [1, 4, 5, 5])
    feeds = {
        "X": rng.normal(0, 1, (1, 3, 5, 5)).astype(np.float32),
        "V0": rng.normal(0, 1, (1, 4, 5, 5)).astype(np.float32),
    }
    return Built(gb.model(17), feeds, F32, ["loop_bn"], ["loop_conv"])


def scan_model(seed: int = 0) -> Built:
    """``Scan`` over the first axis of X: y_t = BN(Conv(x_t, W)), W and BN params from outside."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    x = gb.input("X", F32, [3, 1, 3, 5, 5])
    s0 = gb.input("S0", F32, [1])
    w, b, params = _outer_params(gb, rng, 3, 4, "s_")
    body = GraphBuilder()
    body.input("s_in", F32, [1])
    body.input("x_t", F32, [1, 3, 5, 5])
    _conv_bn_nodes(body, "x_t", "y_t", w, b, params, "scan")
    body.node("Identity", ["s_in"], ["s_out"], name="state")
    body.output("s_out", F32, [1])
    body.output("y_t", F32, [1, 4, 5, 5])
    gb.node("Scan", [s0, x], ["S", "Y"], name="scan", body=body.graph("body"), num_scan_inputs=1)
    gb.output("S", F32, [1])
    gb.output("Y", F32, [3, 1, 4, 5, 5])
    feeds = {"X": rng.normal(0, 1, (3, 1, 3, 5, 5)).astype(np.float32), "S0": np.zeros(1, np.float32)}
    return Built(gb.model(17), feeds, F32, ["scan_bn"], ["scan_conv"])


def function_model(
    *, seed: int = 0, weight_as_input: bool = False, eps_ref: bool = False, calls: int = 1
) -> Built:
    """A model-local function ``local.ConvBN`` (Conv -> BN with Constant-node parameters in its
    body) called from the main graph."""
    rng = np.random.default_rng(seed)
    fb = GraphBuilder(const_form="constant_node")
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    f_inputs = ["x"]
    if weight_as_input:
        f_inputs.append("w")
        wname = "w"
    else:
        wname = fb.const("fw", w)
    b = fb.const("fb", rng.normal(0, 1, 4).astype(np.float32))
    st = bn_stats(rng, 4)
    params = [fb.const(f"f{k}", st[k].astype(np.float32)) for k in ("scale", "B", "mean", "var")]
    fb.node("Conv", ["x", wname, b], ["conv_out"], name="f_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    bn = fb.node("BatchNormalization", ["conv_out", *params], ["y"], name="f_bn")
    attributes: list[str] = []
    attribute_protos = []
    if eps_ref:
        a = onnx.AttributeProto()
        a.name = "epsilon"
        a.ref_attr_name = "eps"
        a.type = onnx.AttributeProto.FLOAT
        bn.attribute.append(a)
        attribute_protos.append(helper.make_attribute("eps", 1e-3))
    func = helper.make_function(
        "local",
        "ConvBN",
        f_inputs,
        ["y"],
        fb.nodes,
        [helper.make_opsetid("", 17)],
        attributes=attributes,
    )
    if attribute_protos:
        func.attribute_proto.extend(attribute_protos)
    gb = GraphBuilder()
    gb.input("X", F32, [1, 3, 5, 5])
    ins = ["X"]
    if weight_as_input:
        ins.append(gb.const("W", w))
    prev = "X"
    for i in range(calls):
        out = "Y" if i == calls - 1 else f"h{i}"
        if i:
            gb.node(
                "Conv",
                [prev, gb.const(f"adapt{i}", rng.normal(0, 0.3, (3, 4, 1, 1)).astype(np.float32))],
                [f"a{i}"],
                name=f"adapt{i}",
                kernel_shape=[1, 1],
            )
            prev = f"a{i}"
        gb.node("ConvBN", [prev, *ins[1:]], [out], name=f"call{i}", domain="local")
        prev = out
    gb.output("Y", F32, [1, 4, 5, 5])
    model = gb.model(17, functions=[func], extra_opsets=[helper.make_opsetid("local", 1)])
    feeds = {"X": rng.normal(0, 1, (1, 3, 5, 5)).astype(np.float32)}
    return Built(model, feeds, F32, ["f_bn"], ["f_conv"])
