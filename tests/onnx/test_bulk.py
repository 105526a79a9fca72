"""The bulk path for plain Conv -> BN pairs (``bnfold.onnx.bulk.prepare`` and
``folding.fold_conv_many``) must give exactly what the one-by-one path gives.

Numerics of the one-by-one path are checked against onnxruntime elsewhere (test_property.py,
tests/rules); here both paths run on the same models and must produce the same bytes and the
same report, and the mixed models are also checked in onnxruntime with optimizations off.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import assert_ort_equivalent, check_model, count_ops

from bnfold.errors import FoldError
from bnfold.folding import bn_affine, fold_conv, fold_conv_many
from bnfold.onnx import bulk
from bnfold.onnx.driver import fold_model
from bnfold.storage.spill import FileStore

MODELS = sorted((Path(__file__).resolve().parents[2] / "models" / "onnx").glob("*.onnx"))


def _fold_both(model: onnx.ModelProto, base_dir: str = "") -> tuple:
    """(bytes, report) of the bulk path and of the one-by-one path."""
    results = []
    for at_once in (True, False):
        m = copy.deepcopy(model)
        report = fold_model(m, FileStore(base_dir), bulk=at_once)
        results.append((m.SerializeToString(deterministic=True), report))
    return results


def _same(results: list) -> None:
    (bulk_bytes, bulk), (single_bytes, single) = results
    assert [(f.bn, f.target, f.pattern, f.kind) for f in bulk.folded] == [
        (f.bn, f.target, f.pattern, f.kind) for f in single.folded
    ]
    assert [(s.bn, s.code, s.message) for s in bulk.skipped] == [
        (s.bn, s.code, s.message) for s in single.skipped
    ]
    assert (bulk.nodes_before, bulk.nodes_after, bulk.initializers_before, bulk.initializers_after) == (
        single.nodes_before,
        single.nodes_after,
        single.initializers_before,
        single.initializers_after,
    )
    assert bulk_bytes == single_bytes


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_bulk_and_one_by_one_agree_on_the_model_zoo(path: Path) -> None:
    _same(_fold_both(onnx.load(str(path)), str(path.parent)))


def _mixed_model(seed: int) -> onnx.ModelProto:
    """A chain of Conv -> BN blocks with every twist the bulk path must either fold identically or
    leave to the one-by-one path: shared weights and BN parameters, biases (shared too), float16
    and float64 layers, float16 overflow, NaN and negative variance, a Conv output with a second
    consumer or as graph output, BN -> BN, a BN before a Conv, grouped convs, a weight computed by a node."""
    rng = np.random.default_rng(seed)
    c = 4
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, np.ndarray] = {}
    outputs: list[str] = []
    x = "x"
    shared_w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
    inits["shared.w"] = shared_w
    inits["shared.bias"] = rng.standard_normal(c).astype(np.float32)
    for name, v in zip(
        ("g", "b", "m", "v"),
        (rng.normal(1, 0.3, c), rng.normal(0, 0.3, c), rng.normal(0, 0.3, c), rng.uniform(0.5, 2, c)),
    ):
        inits[f"shared.{name}"] = v.astype(np.float32)
    for i in range(24):
        twist = rng.integers(0, 14)
        dtype = np.float32
        w_name, b_name = f"w{i}", f"cb{i}"
        group = 2 if twist == 9 else 1
        w = rng.standard_normal((c, c // group, 3, 3)).astype(dtype)
        params = [f"g{i}", f"be{i}", f"m{i}", f"v{i}"]
        stats = [rng.normal(1, 0.3, c), rng.normal(0, 0.3, c), rng.normal(0, 0.3, c), rng.uniform(0.5, 2, c)]
        if twist == 1:
            w_name = "shared.w"
        elif twist == 2:
            params = ["shared.g", "shared.b", "shared.m", "shared.v"]
        elif twist == 5:
            stats[0][1] = np.nan
        elif twist == 6:
            stats[3][2] = -3.0
        elif twist == 10:
            stats[0][:] = 1e6  # overflows float16 only
        inits.update({p: s.astype(np.float32) for p, s in zip(params, stats) if p not in inits})
        if w_name not in inits:
            inits[w_name] = w
        conv_inputs = [x, w_name]
        if twist == 3:
            inits[b_name] = rng.standard_normal(c).astype(dtype)
            conv_inputs.append(b_name)
        elif twist == 4:
            conv_inputs.append("shared.bias")
        if twist == 13:  # a weight computed by a node, not an initializer
            nodes.append(helper.make_node("Identity", [w_name], [f"{w_name}.id"], name=f"id{i}"))
            conv_inputs[1] = f"{w_name}.id"
        if twist == 12:  # a BN before the Conv
            pre = f"pre{i}"
            nodes.append(helper.make_node("BatchNormalization", [x, *params], [pre], name=f"prebn{i}"))
            conv_inputs[0] = pre
            params = [f"g{i}b", f"be{i}b", f"m{i}b", f"v{i}b"]
            inits.update({p: s.astype(np.float32) for p, s in zip(params, stats)})
        y = f"conv{i}.y"
        nodes.append(
            helper.make_node("Conv", conv_inputs, [y], name=f"conv{i}", pads=[1, 1, 1, 1], group=group)
        )
        if twist == 7:
            nodes.append(helper.make_node("Relu", [y], [f"side{i}"], name=f"side{i}"))
            outputs.append(f"side{i}")
        if twist == 8:
            outputs.append(y)
        bn_out = f"bn{i}.y"
        attrs = {"epsilon": float(rng.choice([1e-5, 1e-3]))}
        nodes.append(helper.make_node("BatchNormalization", [y, *params], [bn_out], name=f"bn{i}", **attrs))
        if twist == 11:  # BN -> BN
            second = f"bn{i}b.y"
            nodes.append(helper.make_node("BatchNormalization", [bn_out, *params], [second], name=f"bn{i}b"))
            bn_out = second
        x = f"relu{i}.y"
        nodes.append(helper.make_node("Relu", [bn_out], [x], name=f"relu{i}"))
    outputs.append(x)
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, c, 6, 6]) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def _to_dtype(model: onnx.ModelProto, dtype: type) -> onnx.ModelProto:
    """The same model with every conv weight/bias in ``dtype`` (BN parameters stay float32)."""
    m = copy.deepcopy(model)
    layer_inputs = {n for node in m.graph.node if node.op_type == "Conv" for n in node.input[1:]}
    for t in m.graph.initializer:
        if t.name in layer_inputs:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    return m


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_bulk_and_one_by_one_agree_on_mixed_chains(
    seed: int, dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _mixed_model(seed)
    if dtype is not np.float32:
        model = _to_dtype(model, dtype)
    applied: list[bool] = []
    original_rewrite = bulk.rewrite

    def spy(*args: object) -> bool:
        applied.append(original_rewrite(*args))  # type: ignore[arg-type]
        return applied[-1]

    monkeypatch.setattr(bulk, "rewrite", spy)
    results = _fold_both(model)
    assert any(applied)  # the bulk path folded some pairs
    _same(results)
    folded = onnx.ModelProto()
    folded.ParseFromString(results[0][0])
    report = results[0][1]
    assert report.folded and report.skipped  # both paths were exercised
    assert count_ops(folded, "BatchNormalization") == len(report.skipped)
    if dtype is np.float32:  # onnxruntime's CPU Conv runs float32 only
        check_model(folded)
        feeds = {"x": np.random.default_rng(seed).standard_normal((1, 4, 6, 6)).astype(np.float32)}
        assert_ort_equivalent(model, folded, feeds)


def test_bulk_false_folds_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(bulk, "rewrite", lambda *args: calls.append(args) or False)
    fold_model(_mixed_model(0), bulk=False)
    assert calls == []
    fold_model(_mixed_model(0))
    assert calls  # the default takes the bulk path for plain pairs


def test_fold_conv_many_matches_fold_conv_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    weights, biases, params, epsilons = [], [], [], []
    for k in range(400):
        c = int(rng.integers(1, 9))
        dtype = (np.float32, np.float16, np.float64)[k % 3]
        w = (rng.standard_normal((c, int(rng.integers(1, 4)), 3, 3)) * (1e4 if k % 17 == 0 else 1)).astype(
            dtype
        )
        b = rng.standard_normal(c).astype(dtype) if k % 2 else None
        g, be, m = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
        v = (np.abs(rng.standard_normal(c)) * (1e-9 if k % 13 == 0 else 1)).astype(np.float32)
        if k % 29 == 0:
            v[0] = -1
        if k % 31 == 0:
            g[0] = np.nan
        if k % 37 == 0:
            w.flat[0] = np.inf
        if k % 41 == 0 and b is not None:
            b[0] = np.inf
        weights.append(w)
        biases.append(b)
        params.append((g, be, m, v))
        epsilons.append(float("nan") if k % 43 == 0 else 1e-5)
    many = fold_conv_many(weights, biases, params, epsilons)
    refused = 0
    for k, got in enumerate(many):
        try:
            expected = fold_conv(weights[k], biases[k], bn_affine(*params[k], epsilons[k]))
        except FoldError:
            assert got is None, k
            refused += 1
            continue
        assert got is not None, k
        for e, g_ in zip(expected, got):
            assert e.dtype == g_.dtype and e.shape == g_.shape and e.tobytes() == g_.tobytes(), k
    assert 20 < refused < 100  # the refusals were exercised, and most pairs fold


@pytest.mark.parametrize(
    "dtype",
    [
        np.float16,
        np.float32,
        np.float64,
        np.int8,
        np.uint8,
        np.int16,
        np.uint16,
        np.int32,
        np.uint32,
        np.int64,
        np.uint64,
    ],
)
def test_new_tensors_are_what_numpy_helper_builds(dtype: type) -> None:
    """tensor_store.plain_tensor builds plain numeric tensors itself: the bytes must be from_array's."""
    from bnfold.onnx.tensor_store import plain_tensor

    rng = np.random.default_rng(5)
    for shape in ((), (3,), (2, 3, 4), (0, 2)):
        a = (rng.standard_normal(shape) * 10).astype(dtype)
        for arr in (a, a.T):  # a transposed view is not C-contiguous
            assert (
                plain_tensor(arr, "t").SerializeToString()
                == numpy_helper.from_array(arr, "t").SerializeToString()
            )
