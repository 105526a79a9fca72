"""Fold every bundled model in ``models/onnx`` and check the result independently of bnfold.

For each case of ``models/cases.py``: the exact number of folds and the exact sorted reason codes
of the BNs that stay, the BN count, ``onnx.checker`` (full check), an unchanged interface (input
and output names, order and types, opset imports, IR version), idempotence, and numerics: original
and folded model run side by side in onnxruntime with all graph optimizations off (or in the ONNX
reference evaluator where onnxruntime has no kernel) on seeded random inputs, compared with
tolerances derived from the output dtype and magnitude. Torch-exported models are also compared
with the PyTorch module they came from. bnfold's own verifier is never used here.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from onnx_builders import run_ort  # noqa: E402

import bnfold  # noqa: E402
from models.cases import CASES, TORCH_CASES, Case  # noqa: E402

# (rtol, atol as a fraction of max|reference|) per output dtype: |a - b| <= atol + rtol * |b|
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (5e-3, 5e-3),
    "bfloat16": (2e-2, 2e-2),
}
DYNAMIC_DIM = 3  # value for symbolic dims (torch models were exported with batch 2 or 4)

_original_cache: dict[str, onnx.ModelProto] = {}
_folded_cache: dict[str, bnfold.FoldResult] = {}


def ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


def load(case: Case) -> onnx.ModelProto:
    if case.name not in _original_cache:
        _original_cache[case.name] = onnx.load(case.path)
    return _original_cache[case.name]


def folded(case: Case) -> bnfold.FoldResult:
    if case.name not in _folded_cache:
        _folded_cache[case.name] = bnfold.fold(case.path, verify=False)
    return _folded_cache[case.name]


def count_bn(model: onnx.ModelProto) -> int:
    def nodes(ns) -> int:
        total = 0
        for n in ns:
            total += n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    total += nodes(a.g.node)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    total += sum(nodes(g.node) for g in a.graphs)
        return total

    return nodes(model.graph.node) + sum(nodes(f.node) for f in model.functions)


def runtime_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs callers feed. For IR < 4 initializers are listed as inputs but are constants."""
    if model.ir_version >= 4:
        return list(model.graph.input)
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def make_feeds(model: onnx.ModelProto, seed: int) -> list[dict[str, np.ndarray]]:
    """Seeded random feeds; one feed set per combination of values of the bool inputs."""
    rng = np.random.default_rng(seed)
    base: dict[str, np.ndarray] = {}
    bools: list[str] = []
    for v in runtime_inputs(model):
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else DYNAMIC_DIM for d in tt.shape.dim]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if dtype == np.bool_:
            bools.append(v.name)
        elif dtype.kind in "iu":
            base[v.name] = rng.integers(0, 4, size=shape).astype(dtype)
        else:
            base[v.name] = np.asarray(rng.standard_normal(shape)).astype(dtype)
    out = []
    for values in itertools.product([True, False], repeat=len(bools)):
        feeds = dict(base)
        feeds.update({n: np.array(b) for n, b in zip(bools, values)})
        out.append(feeds)
    return out


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return [np.asarray(o) for o in ReferenceEvaluator(model).run(None, feeds)]


def to_opset9(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnx import version_converter

    return version_converter.convert_version(model, 9)


def assert_close(actual: np.ndarray, reference: np.ndarray, what: str) -> None:
    assert actual.dtype == reference.dtype, f"{what}: dtype {actual.dtype} != {reference.dtype}"
    assert actual.shape == reference.shape, f"{what}: shape {actual.shape} != {reference.shape}"
    rtol, atol_frac = TOLERANCES[reference.dtype.name]
    a = actual.astype(np.float64)
    r = reference.astype(np.float64)
    assert np.all(np.isfinite(r)), f"{what}: non-finite reference output"
    atol = atol_frac * max(float(np.max(np.abs(r))), 1e-6)
    err = np.abs(a - r)
    np.testing.assert_allclose(
        a,
        r,
        rtol=rtol,
        atol=atol,
        err_msg=f"{what}: max abs err {err.max():.3g} (atol {atol:.3g}, rtol {rtol:g})",
    )


def compare_models(case: Case, original: onnx.ModelProto, result: onnx.ModelProto) -> None:
    mode = case.numerics
    if mode == "unchanged":
        assert result.SerializeToString(deterministic=True) == original.SerializeToString(
            deterministic=True
        ), "nothing was folded, so the model must be byte-identical"
        if not case.runs_in_ort:
            return
        mode = "ort"
    if mode == "ort_opset9":
        original, result, mode = to_opset9(original), to_opset9(result), "ort"
    runner = {"ort": run_ort, "reference": run_reference}[mode]
    names = [o.name for o in original.graph.output]
    for seed in (0, 1):
        for feeds in make_feeds(original, seed):
            ref = runner(original, feeds)
            got = runner(result, feeds)
            assert len(ref) == len(got) == len(names)
            for name, r, g in zip(names, ref, got):
                flags = {k: bool(v) for k, v in feeds.items() if v.dtype == np.bool_}
                assert_close(g, r, f"{case.name} output '{name}' seed {seed} {flags}")


# ------------------------------------------------------------------------------------------------
def test_registry_files_exist_and_are_small() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    total = 0
    for case in CASES:
        assert case.path.is_file(), f"{case.path} missing: run python models/generate.py"
        size = case.path.stat().st_size
        assert size < 64 * 1024, f"{case.file} is {size} bytes"
        total += size
        assert case.expected_skip_codes == sorted(case.expected_skip_codes)
        assert case.numerics in ("ort", "ort_opset9", "reference", "unchanged")
    assert total < 1024 * 1024
    on_disk = {p.name for p in CASES[0].path.parent.glob("*.onnx")}
    assert on_disk == {c.file for c in CASES}, "models/onnx and models/cases.py disagree"


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_fold_counts_and_codes(case: Case) -> None:
    original = load(case)
    res = folded(case)
    codes = sorted(s.code for s in res.report.skipped)
    detail = [(s.bn, s.code, s.message) for s in res.report.skipped]
    assert len(res.report.folded) == case.expected_folded, detail
    assert codes == case.expected_skip_codes, detail
    n_before = count_bn(original)
    assert n_before == case.expected_folded + len(case.expected_skip_codes)
    assert count_bn(res.model) == n_before - case.expected_folded


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_folded_model_is_valid_with_same_interface(case: Case) -> None:
    original = load(case)
    out = folded(case).model
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in out.opset_import] == [
        (o.domain, o.version) for o in original.opset_import
    ]

    def sig(values: list[onnx.ValueInfoProto]) -> list[tuple[str, bytes]]:
        return [(v.name, v.type.SerializeToString(deterministic=True)) for v in values]

    assert sig(runtime_inputs(out)) == sig(runtime_inputs(original))
    assert sig(list(out.graph.output)) == sig(list(original.graph.output))
    assert [f.name for f in out.functions] == [f.name for f in original.functions]
    assert out.doc_string == original.doc_string
    assert out.producer_name == original.producer_name


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_folding_is_idempotent(case: Case) -> None:
    first = folded(case)
    again = bnfold.fold(first.model, verify=False)
    assert not again.report.folded
    assert sorted(s.code for s in again.report.skipped) == case.expected_skip_codes
    assert again.model.SerializeToString(deterministic=True) == first.model.SerializeToString(
        deterministic=True
    )


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_numerics_match_original(case: Case) -> None:
    compare_models(case, load(case), folded(case).model)


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_defs():
    pytest.importorskip("torch")
    from models import definitions

    return definitions


@pytest.mark.parametrize("case", TORCH_CASES, ids=ids(TORCH_CASES))
def test_folded_onnx_matches_pytorch(case: Case, torch_defs) -> None:
    import torch

    module, _ = torch_defs.build(case.torch_model)
    out = folded(case).model
    (feeds,) = make_feeds(out, seed=7)
    (x,) = feeds.values()
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    (got,) = run_ort(out, feeds)
    assert_close(got, expected, f"{case.name} vs PyTorch")


@pytest.mark.parametrize("name", ["rep_net", "rep_net_legacy"])
def test_rep_net_merges_every_block_with_merge_branches(name: str, torch_defs) -> None:
    """With merge_branches every BN of RepNet goes and each block becomes one Conv; checked in
    onnxruntime against the PyTorch module."""
    import torch

    case = _case(name)
    result = bnfold.fold(case.path, verify=False, merge_branches=True)
    assert [str(p.pattern) for p in result.report.folded] == ["merged_branches"] * 15
    assert result.report.merged_convs == 6 and not result.report.skipped
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert count_bn(out) == 0 and sum(n.op_type == "Conv" for n in out.graph.node) == 5
    module, _ = torch_defs.build(case.torch_model)
    (feeds,) = make_feeds(out, seed=7)
    (x,) = feeds.values()
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    (got,) = run_ort(out, feeds)
    assert_close(got, expected, f"{name} merged vs PyTorch")


# ------------------------------------------------------------------------------------------------
# targeted checks on individual cases
def _case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_shared_weight_is_copied_not_overwritten() -> None:
    case = _case("case_shared_weight")
    out = folded(case).model
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and convs[0].input[1] != convs[1].input[1]


def test_if_branch_keeps_outer_weight_for_else_branch() -> None:
    case = _case("case_if_branch")
    original, out = load(case), folded(case).model
    (if_node,) = out.graph.node
    branches = {a.name: a.g for a in if_node.attribute}
    (else_conv,) = [n for n in branches["else_branch"].node if n.op_type == "Conv"]
    assert else_conv.input[1] == "W"
    np.testing.assert_array_equal(_initializer(out, "W"), _initializer(original, "W"))


def test_param_graph_input_is_kept() -> None:
    out = folded(_case("case_bn_param_graph_input")).model
    assert "bn.mean" in [v.name for v in out.graph.input]
    assert "bn.mean" in [t.name for t in out.graph.initializer]


def test_dtypes_are_preserved() -> None:
    expected = {
        "case_fp16": onnx.TensorProto.FLOAT16,
        "case_bf16": onnx.TensorProto.BFLOAT16,
        "case_fp64_conv": onnx.TensorProto.DOUBLE,
        "case_fp64_gemm": onnx.TensorProto.DOUBLE,
        "case_bn15_mixed_types": onnx.TensorProto.FLOAT16,
    }
    for name, elem in expected.items():
        out = folded(_case(name)).model
        (layer,) = [n for n in out.graph.node if n.op_type in ("Conv", "Gemm")]
        types = {t.name: t.data_type for t in out.graph.initializer}
        for inp in layer.input[1:]:
            assert types[inp] == elem, f"{name}: {inp} has type {types[inp]}, expected {elem}"


def test_local_function_folded_in_place() -> None:
    out = folded(_case("case_local_function")).model
    (fn,) = out.functions
    assert [n.op_type for n in fn.node if n.op_type != "Constant"] == ["Conv", "Relu"]
    assert [n.op_type for n in out.graph.node] == ["ConvBNRelu", "Sigmoid"]


# ------------------------------------------------------------------------------------------------
# bnfold's own verifier on the bundled models (everything else in this file avoids it)
def test_bnfold_verifier_handles_scalar_bool_input() -> None:
    res = bnfold.fold(_case("case_if_branch").path)
    assert res.verification is not None
    assert res.verification.status == "passed", res.verification.message


# ------------------------------------------------------------------------------------------------
# torch definitions: the torch-only cases build, run, and have randomized BN statistics
def test_torch_definitions_build_and_run(torch_defs) -> None:
    import torch

    for name in [*torch_defs.EXPORTED, *torch_defs.TORCH_ONLY]:
        module, x = torch_defs.build(name)
        assert not module.training
        with torch.no_grad():
            y = module(x)
        assert torch.isfinite(y.float()).all(), name
        again, x2 = torch_defs.build(name)
        assert torch.equal(x, x2)
        for (k, a), (_, b) in zip(module.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), f"{name}.{k} is not deterministic"
        bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            assert (bn.running_var > 0).all()
            assert (bn.weight < 0).any(), "gamma must include negative values"
            assert not torch.all(bn.running_mean == 0)
    assert issubclass(torch_defs.BNWithActivation, torch.nn.BatchNorm2d)


def test_control_flow_net_defeats_symbolic_trace(torch_defs) -> None:
    import torch.fx

    module, _ = torch_defs.build("control_flow_net")
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(module)
