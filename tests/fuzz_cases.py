"""The fuzz cases of tests/test_fuzz.py (and scripts/fuzz.py): valid base models, the
mutations drawn on them, and the properties ``check_case`` / ``check_external_case`` each case
must satisfy (see tests/test_fuzz.py for what they promise)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import strategies as st
from noise_checks import own_floor
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import BadInput, VerificationFailed
from bnfold.testing import conv_bn_model

EXAMPLES = int(os.environ.get("BNFOLD_FUZZ_EXAMPLES", "300"))
REASON_CODE = re.compile(r"^[a-z][a-z_]*$")  # stable, greppable codes (the set grows with the pass)


# ------------------------------------------------------------------------------------------------
# base models (tiny, valid, every one folds)


def _bases() -> list[bytes]:
    import sys

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import onnx_builders as ob

    models = [
        conv_bn_model(blocks=2, seed=0),
        conv_bn_model(blocks=1, seed=1, matmul_bn=True),
        ob.conv_bn(op="ConvTranspose", group=2, cin=4, cout=6, seed=2).model,
        ob.conv_bn(rank=1, bias=False, bn_opset=9, seed=3).model,
        ob.conv_bn(dtype=np.float16, relu=True, seed=4).model,
        ob.conv_bn(weight_form="constant_node", seed=5).model,
        ob.conv_bn(bn_opset=9, opset=9, ir_version=3, seed=6).model,
        ob.gemm_bn(trans_b=1, alpha=0.5, beta=2.0, seed=7).model,
        ob.if_model(seed=8).model,
        ob.function_model(seed=9).model,
    ]
    return [m.SerializeToString() for m in models]


_BASES: list[bytes] = []


def bases() -> list[bytes]:
    if not _BASES:
        _BASES.extend(_bases())
    return _BASES


# ------------------------------------------------------------------------------------------------
# mutations: each takes the model and a ``draw`` function


def _graphs(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    out = []

    def visit(g: onnx.GraphProto) -> None:
        out.append(g)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        visit(sub)

    visit(model.graph)
    return out


def _all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes = [n for g in _graphs(model) for n in g.node]
    nodes += [n for f in model.functions for n in f.node]
    return nodes


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = [t for g in _graphs(model) for t in g.initializer]
    for n in _all_nodes(model):
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                tensors.append(a.t)
    return tensors


def pick(draw: Callable[[Any], Any], seq: Any) -> Any:
    return seq[draw(st.integers(0, len(seq) - 1))]


def m_drop_node_input(model: onnx.ModelProto, draw: Any) -> None:
    nodes = [n for n in _all_nodes(model) if n.input]
    if nodes:
        n = pick(draw, nodes)
        i = draw(st.integers(0, len(n.input) - 1))
        if draw(st.booleans()):
            del n.input[i]
        else:
            n.input[i] = ""


def m_drop_graph_input(model: onnx.ModelProto, draw: Any) -> None:
    if model.graph.input:
        del model.graph.input[draw(st.integers(0, len(model.graph.input) - 1))]


def m_delete_initializer(model: onnx.ModelProto, draw: Any) -> None:
    graphs = [g for g in _graphs(model) if g.initializer]
    if graphs:
        g = pick(draw, graphs)
        del g.initializer[draw(st.integers(0, len(g.initializer) - 1))]


ATTRS = [
    "group",
    "pads",
    "strides",
    "dilations",
    "kernel_shape",
    "epsilon",
    "momentum",
    "training_mode",
    "spatial",
    "is_test",
    "transA",
    "transB",
    "alpha",
    "beta",
    "auto_pad",
    "output_padding",
    "consumed_inputs",
]


def _attr_value(draw: Any, name: str) -> Any:
    if name in ("epsilon", "momentum", "alpha", "beta"):
        return draw(st.sampled_from([0.0, -1.0, 1e-5, 0.5, 2.0, float("nan"), float("inf"), 1e30]))
    if name in ("pads", "strides", "dilations", "kernel_shape", "output_padding", "consumed_inputs"):
        return draw(st.lists(st.integers(-2, 4), min_size=0, max_size=6))
    if name == "auto_pad":
        return draw(st.sampled_from(["NOTSET", "SAME_UPPER", "VALID", "BOGUS"]))
    return draw(st.integers(-2, 6))


def m_change_attribute(model: onnx.ModelProto, draw: Any) -> None:
    n = pick(draw, _all_nodes(model))
    action = draw(st.sampled_from(["set", "delete", "retype"]))
    existing = [
        a for a in n.attribute if a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    ]
    if action == "delete" and existing:
        n.attribute.remove(pick(draw, existing))
        return
    if action == "retype" and existing:
        a = pick(draw, existing)
        name = a.name
        n.attribute.remove(a)
        value = draw(st.sampled_from([1, 1.5, "s", [1, 2], [0.5]]))
        n.attribute.append(helper.make_attribute(name, value))
        return
    name = draw(st.sampled_from(ATTRS))
    for a in list(n.attribute):
        if a.name == name:
            n.attribute.remove(a)
    value = _attr_value(draw, name)
    kind = onnx.AttributeProto.INTS if isinstance(value, list) else None
    n.attribute.append(helper.make_attribute(name, value, attr_type=kind))


def m_reshape_initializer(model: onnx.ModelProto, draw: Any) -> None:
    tensors = _all_tensors(model)
    if not tensors:
        return
    t = pick(draw, tensors)
    if draw(st.booleans()):  # consistent: new data of a new shape
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
        arr = np.random.default_rng(draw(st.integers(0, 99))).standard_normal(shape)
        try:
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        except Exception:
            dtype = np.dtype(np.float32)
        t.CopyFrom(numpy_helper.from_array(arr.astype(dtype), t.name))
    else:  # only the dims change: the data no longer fits
        del t.dims[:]
        t.dims.extend(draw(st.lists(st.integers(0, 7), min_size=0, max_size=4)))


def m_retype_initializer(model: onnx.ModelProto, draw: Any) -> None:
    tensors = _all_tensors(model)
    if not tensors:
        return
    t = pick(draw, tensors)
    new = draw(
        st.sampled_from(
            [
                TensorProto.FLOAT,
                TensorProto.FLOAT16,
                TensorProto.DOUBLE,
                TensorProto.INT64,
                TensorProto.INT8,
                TensorProto.BOOL,
                TensorProto.BFLOAT16,
                TensorProto.STRING,
                TensorProto.FLOAT8E4M3FN,
                99,
            ]
        )
    )
    if draw(st.booleans()) and new not in (
        TensorProto.STRING,
        99,
        TensorProto.BFLOAT16,
        TensorProto.FLOAT8E4M3FN,
    ):
        try:
            arr = numpy_helper.to_array(t)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                t.CopyFrom(numpy_helper.from_array(arr.astype(helper.tensor_dtype_to_np_dtype(new)), t.name))
            return
        except Exception:
            pass
    t.data_type = new  # the stored bytes keep their old meaning


def m_special_values(model: onnx.ModelProto, draw: Any) -> None:
    tensors = [
        t
        for t in _all_tensors(model)
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    ]
    if not tensors:
        return
    t = pick(draw, tensors)
    arr = numpy_helper.to_array(t).copy()
    if arr.size == 0:
        return
    value = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30, -1e-30, 65504.0]))
    flat = arr.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if draw(st.booleans()):
            flat[:] = value
        else:
            flat[draw(st.integers(0, flat.size - 1))] = value
        t.CopyFrom(numpy_helper.from_array(flat.reshape(arr.shape).astype(arr.dtype), t.name))


def m_opset(model: onnx.ModelProto, draw: Any) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = draw(st.integers(1, 30))
    if draw(st.integers(0, 9)) == 0:
        model.ir_version = draw(st.integers(0, 15))


def m_input_type(model: onnx.ModelProto, draw: Any) -> None:
    if not model.graph.input:
        return
    v = pick(draw, model.graph.input)
    tt = v.type.tensor_type
    choice = draw(st.sampled_from(["elem", "rank", "dim", "clear"]))
    if choice == "elem":
        tt.elem_type = draw(st.sampled_from([0, 1, 6, 7, 9, 10, 11, 16, 99]))
    elif choice == "rank":
        dims = draw(st.lists(st.integers(-1, 6), min_size=0, max_size=5))
        tt.ClearField("shape")
        for d in dims:
            tt.shape.dim.add().dim_value = d
    elif choice == "dim" and tt.shape.dim:
        d = pick(draw, tt.shape.dim)
        if draw(st.booleans()):
            d.dim_value = draw(st.integers(-1, 9))
        else:
            d.dim_param = draw(st.sampled_from(["N", "M", ""]))
    else:
        v.ClearField("type")


def m_rename_reference(model: onnx.ModelProto, draw: Any) -> None:
    nodes = [n for n in _all_nodes(model) if n.input or n.output]
    if not nodes:
        return
    names = sorted(
        {x for n in _all_nodes(model) for x in (*n.input, *n.output) if x}
        | {v.name for v in model.graph.output}
        | {"undefined_name"}
    )
    n = pick(draw, nodes)
    if n.output and draw(st.booleans()):
        n.output[draw(st.integers(0, len(n.output) - 1))] = pick(draw, names)
    elif n.input:
        n.input[draw(st.integers(0, len(n.input) - 1))] = pick(draw, names)


def m_node_op(model: onnx.ModelProto, draw: Any) -> None:
    n = pick(draw, _all_nodes(model))
    choice = draw(st.sampled_from(["op", "domain", "shuffle", "duplicate"]))
    if choice == "op":
        n.op_type = draw(
            st.sampled_from(
                [
                    "Conv",
                    "ConvTranspose",
                    "Gemm",
                    "MatMul",
                    "BatchNormalization",
                    "Relu",
                    "Identity",
                    "NoSuchOp",
                ]
            )
        )
    elif choice == "domain":
        n.domain = draw(st.sampled_from(["", "ai.onnx", "com.microsoft", "custom"]))
    elif choice == "shuffle":
        g = model.graph
        order = draw(st.permutations(list(range(len(g.node)))))
        nodes = [onnx.NodeProto() for _ in g.node]
        for dst, src in zip(nodes, order):
            dst.CopyFrom(g.node[src])
        del g.node[:]
        g.node.extend(nodes)
    else:
        g = model.graph
        copy = onnx.NodeProto()
        copy.CopyFrom(pick(draw, list(g.node)))
        g.node.append(copy)


# Mutations that break the graph's structure are refused early; value-level ones (repeated, so
# drawn more often) keep more models foldable and exercise the pass and the numeric check.
MUTATIONS = [
    m_drop_node_input,
    m_drop_graph_input,
    m_delete_initializer,
    m_rename_reference,
    m_node_op,
    m_input_type,
    *[m_change_attribute] * 3,
    *[m_special_values] * 3,
    *[m_reshape_initializer] * 2,
    *[m_retype_initializer] * 2,
    *[m_opset] * 2,
]


def mutate(data: Any) -> bytes:
    """Draw a base model and 1-3 mutations (``data`` is hypothesis' ``st.data()``); maybe
    corrupt the bytes afterwards."""
    draw = data.draw
    model = onnx.ModelProto()
    model.ParseFromString(pick(draw, bases()))
    for _ in range(draw(st.integers(1, 3))):
        mutation = draw(st.sampled_from(MUTATIONS))
        try:
            mutation(model, draw)
        except Exception:
            pass
    raw = bytearray(model.SerializeToString())
    corruption = draw(st.sampled_from(["none"] * 7 + ["flip", "truncate", "splice"]))
    if corruption == "flip" and raw:
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
    elif corruption == "truncate" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif corruption == "splice" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(raw)


# ------------------------------------------------------------------------------------------------
# the property


def _ort_session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    with contextlib.redirect_stdout(io.StringIO()):  # its "EP Error ... falling back" banner
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray] | None:
    """Our own inputs: symbolic dims 2, floats normal, ints in [0, 3), bools True; None if unsure."""
    rng = np.random.default_rng(1234)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type") or not tt.HasField("shape"):
            return None
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            return None
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 2 for d in tt.shape.dim]
        if dtype.kind == "f":
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[v.name] = rng.integers(0, 3, shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[v.name] = np.ones(shape, dtype=bool)
        else:
            return None
    return feeds


TOL = {"float32": 1e-3, "float16": 2e-2, "float64": 1e-8}


# An ill-conditioned original (65504 or 1e30 written into a weight) moves by more than the fixed
# tolerance when its own parameters move by one ulp; a fold, which rounds each tensor once, may then
# differ from it by as much. Such an output is held to this many of the test's own noise estimates
# (``noise_checks.own_floor``: 3 seeds of one-ulp nudges, hence twice bnfold's ten floors); a wrong
# fold (a weight 1 % off) measures more than a thousand.
NOISE_ALLOWANCE = 20


def assert_same_outputs(
    ref: list[np.ndarray], got: list[np.ndarray], noise: Callable[[], float] | None = None
) -> bool:
    """Outputs agree within :data:`TOL` of the output's scale, or, where ``noise`` (the original's
    own rounding noise, computed only when needed) is given, within NOISE_ALLOWANCE times it; True
    when that allowance was needed."""
    floor: float | None = None
    assert len(ref) == len(got)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert r.shape == g.shape and r.dtype == g.dtype, (i, r.shape, g.shape, r.dtype, g.dtype)
        if r.dtype.kind != "f":
            assert np.array_equal(r, g), i
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        assert np.array_equal(np.isnan(r64), np.isnan(g64)), f"output {i}: NaN positions differ"
        finite = np.isfinite(r64)
        assert np.array_equal(r64[~finite & ~np.isnan(r64)], g64[~finite & ~np.isnan(r64)]), (
            f"output {i}: inf"
        )
        if finite.any():
            tol = TOL.get(r.dtype.name, 1e-3)
            scale = float(np.max(np.abs(r64[finite])))
            err = np.abs(r64[finite] - g64[finite])
            bound = tol * max(scale, 1e-6) + tol * np.abs(r64[finite])
            if noise is not None and not np.all(err <= bound):
                floor = noise() if floor is None else floor
                bound = np.maximum(bound, NOISE_ALLOWANCE * floor)
            assert np.all(err <= bound), (
                f"output {i}: max abs err {err.max():.3g}, scale {scale:.3g}, own noise floor {floor}"
            )
    return floor is not None


def check_case(raw: bytes) -> str:
    """The property for one serialized (possibly broken) model; returns the outcome's name."""
    before = bytes(raw)
    try:
        result = bnfold.fold(raw, verify=True)
    except BadInput as exc:
        text = str(exc)
        assert text and "\n" not in text, repr(text)
        return "refused"
    assert raw == before
    report = result.report
    for s in report.skipped:
        assert REASON_CODE.match(s.code) and s.message, s
    _check_cli(raw)
    if not report.changed:
        return "unchanged"
    ver = result.verification
    assert ver is not None
    original = onnx.ModelProto()
    original.ParseFromString(raw)
    try:
        onnx.checker.check_model(original)
    except Exception:
        pass
    else:
        onnx.checker.check_model(result.model)  # a valid model stays valid
    feeds = _feeds(original)
    if feeds is None:
        return "folded, no inputs to check"
    try:
        sess = _ort_session(original)
        ref = [np.asarray(o) for o in sess.run(None, feeds)]
    except Exception:
        return "folded, original does not run"
    if overflows(ref):
        return "folded, original near the float range limit"
    if ver.status == "failed" and huge_constants(original):
        # e.g. a conv bias and a BN mean of 1e30: in float32 the original loses the conv's output
        # entirely ((y + 1e30) - 1e30 == 0), the fold cancels them exactly. Verification sees the
        # difference and bnfold refuses to save; it is not a wrong fold.
        with pytest.raises(VerificationFailed):
            result.save(Path(tempfile.gettempdir()) / "bnfold-fuzz-never-written.onnx")
        return "folded, ill-conditioned original: verification failed, not saved"
    assert ver.status != "failed", f"bnfold's own verification failed: {ver.message}"
    if "rounding noise" in ver.message:
        assert_rounding_noise(original, feeds, ref)
        return "folded, original is rounding noise"
    got = [np.asarray(o) for o in _ort_session(result.model).run(None, feeds)]
    if assert_same_outputs(ref, got, noise=lambda: own_floor(original, feeds)):
        return "folded, outputs match within the original's own rounding noise"
    return "folded, outputs match"


def assert_rounding_noise(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], ref: list[np.ndarray]
) -> None:
    """bnfold said the original's outputs are its own rounding noise (constants that cancel in
    float32, e.g. a conv bias and a BN mean of 1e30): check the claim with this test's own one-ulp
    nudges (twice bnfold's ten floors, for the randomness of the nudges)."""
    largest = max(float(np.abs(r[np.isfinite(r)]).max(initial=0.0)) for r in ref)
    assert own_floor(model, feeds) * 2 * 10 >= largest, "bnfold called outputs noise that are not"


def huge_constants(model: onnx.ModelProto, limit: float = 1e12) -> bool:
    """True if a float constant of the model has a finite magnitude above ``limit``: far beyond
    float32's 7 digits relative to O(1) activations, so the original's own float32 evaluation
    is not a trustworthy reference."""
    for t in _all_tensors(model):
        if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            continue
        try:
            a = numpy_helper.to_array(t).astype(np.float64)
        except Exception:
            continue
        a = a[np.isfinite(a)]
        if a.size and float(np.max(np.abs(a))) > limit:
            return True
    return False


def overflows(outputs: list[np.ndarray]) -> bool:
    """True if a float output is non-finite or close to its dtype's limit (above max ** 0.9):
    there the original and the folded layer overflow at different steps, and no fold can be
    exact (garbage weights, e.g. misaligned external data, get there)."""
    for o in outputs:
        if o.dtype.kind == "f" and o.size:
            a = o.astype(np.float64)
            if not np.all(np.isfinite(a)) or float(np.max(np.abs(a))) > float(np.finfo(o.dtype).max) ** 0.9:
                return True
    return False


def _check_cli(raw: bytes) -> None:
    """The command-line path (no onnxruntime): exit 0/1/2, never 3; a written model loads."""
    from bnfold.cli.outcome import FoldJob
    from bnfold.cli.process import process_model
    from bnfold.verification.options import VerifyOptions

    with tempfile.TemporaryDirectory(prefix="bnfold-fuzz-") as tmp:
        src, out = Path(tmp) / "m.onnx", Path(tmp) / "m.folded.onnx"
        src.write_bytes(raw)
        job = FoldJob(str(src), str(out), VerifyOptions(), verify=False)
        rec = process_model(job)
        assert rec.exit_code in (0, 1, 2), rec.message
        assert src.read_bytes() == raw
        leftovers = sorted(p.name for p in Path(tmp).iterdir() if p.name not in ("m.onnx", "m.folded.onnx"))
        assert not leftovers, leftovers
        if rec.written:
            onnx.load(str(out))
