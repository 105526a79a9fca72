"""Assertions for pytest users (any test runner works: failures are ``AssertionError``).

``assert_fold_preserves(model)`` folds a model and asserts that onnxruntime (optimizations off)
gives the same outputs for the original and the folded model; ``assert_models_close(a, b)``
compares any two models, e.g. a fold made by another tool. Failure messages show the error
figures per output: max abs/rel error, the tolerance used, the count of elements outside it and
the smallest tolerances that would have passed.

``conv_bn_model()`` builds a small Conv -> BatchNormalization -> Relu network with random BN
statistics, for smoke tests of a pipeline.

Example::

    from bnfold.testing import assert_fold_preserves

    def test_export_folds_cleanly(tmp_path):
        result = assert_fold_preserves("model.onnx", expect_folded=20, strict=True)
        result.save(tmp_path / "model.folded.onnx")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from .api import FoldResult
    from .report import Verification

__all__ = ["assert_fold_preserves", "assert_models_close", "describe_verification", "conv_bn_model"]

# A BN kept after one of these could have been folded into a layer (see ``strict``).
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _e(x: float) -> str:
    return "0" if x == 0 else f"{x:.3g}" if x != float("inf") else "inf"


def describe_verification(v: Verification) -> str:
    """A multi-line, human description of a verification with the figures of every output."""
    head = f"onnxruntime {v.provider} (optimizations off), seed {v.seed}, {v.runs} run{'s' if v.runs != 1 else ''}"
    if v.input_shapes:
        head += ", inputs " + ", ".join(
            f"{k}={'x'.join(map(str, s)) or 'scalar'}" for k, s in v.input_shapes.items()
        )
    if v.assumed_dims:
        head += " (assumed " + ", ".join(f"{k}={n}" for k, n in v.assumed_dims.items()) + ")"
    lines = [head]
    if v.message:
        lines.append(v.message)
    for o in v.outputs:
        shape = "x".join(map(str, o.shape)) or "scalar"
        figures = f"max abs err {_e(o.max_abs_err)}, max rel err {_e(o.max_rel_err)}"
        if o.passed:
            lines.append(
                f"  ok      {o.name} ({o.dtype}, {shape}): {figures}; atol {_e(o.atol)}, rtol {_e(o.rtol)}"
            )
        else:
            lines.append(
                f"  FAILED  {o.name} ({o.dtype}, {shape}): {figures}; {o.mismatches} element(s) outside "
                f"atol {_e(o.atol)} + rtol {_e(o.rtol)}*|ref|; would pass with atol >= {_e(o.min_atol)} "
                f"(same rtol) or rtol >= {_e(o.min_rtol)} (same atol)"
                + (f" [{o.message}]" if o.message else "")
            )
    return "\n".join(lines)


def assert_models_close(
    reference: Any,
    candidate: Any,
    *,
    inputs: Any = None,
    shapes: Mapping[str, Any] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    runs: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "CPUExecutionProvider",
    allow_unverifiable: bool = False,
) -> Verification:
    """Assert that ``candidate`` computes what ``reference`` computes (see :func:`bnfold.verify`).

    Fails when an output differs beyond tolerance, when onnxruntime cannot run the candidate,
    and, unless ``allow_unverifiable``, when it cannot run the reference (nothing was checked).
    Bad arguments (unreadable model, wrong input names) raise :class:`bnfold.BadInput`.
    Returns the :class:`bnfold.Verification` on success.
    """
    __tracebackhide__ = True
    from .verification import VerifyOptions, verify_models

    options = VerifyOptions(inputs, shapes, dims, seed, runs, atol, rtol, provider)
    v = verify_models(reference, candidate, options)
    if v.status == "passed" or (v.status == "error" and allow_unverifiable):
        return v
    what = "could not be compared" if v.status == "error" else "differ"
    raise AssertionError(f"models {what}: {describe_verification(v)}")


def assert_fold_preserves(
    model: Any,
    *,
    inputs: Any = None,
    shapes: Mapping[str, Any] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    runs: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "CPUExecutionProvider",
    expect_folded: int | None = None,
    strict: bool = False,
    allow_unverifiable: bool = False,
) -> FoldResult:
    """Fold ``model`` and assert the folded model computes what the original computes.

    ``expect_folded`` also asserts the number of BatchNormalizations folded; ``strict`` asserts
    that no BN following Conv/ConvTranspose/Gemm/MatMul was kept. Returns the
    :class:`bnfold.FoldResult` (call ``.save(path)`` to keep the model).
    """
    __tracebackhide__ = True
    from .api import fold_with
    from .verification import VerifyOptions

    result = fold_with(model, VerifyOptions(inputs, shapes, dims, seed, runs, atol, rtol, provider))
    report = result.report
    counts = f"{len(report.folded)} folded, {len(report.skipped)} kept"
    if expect_folded is not None and len(report.folded) != expect_folded:
        kept = "; ".join(f"{s.bn}: {s.code} ({s.message})" for s in report.skipped[:10])
        raise AssertionError(
            f"expected {expect_folded} BatchNormalization(s) folded, got {counts}"
            + (f"; kept: {kept}" if kept else "")
        )
    if strict:
        bad = [s for s in report.skipped if s.producer_op in LINEAR_OPS]
        if bad:
            detail = "; ".join(
                f"{s.bn} after {s.producer_op} {s.producer}: {s.code} ({s.message})" for s in bad[:10]
            )
            raise AssertionError(
                f"{len(bad)} BatchNormalization(s) after {'/'.join(LINEAR_OPS)} kept ({counts}): {detail}"
            )
    v = result.verification
    assert v is not None
    if v.status == "passed" or (v.status == "error" and allow_unverifiable):
        return result
    what = "could not be verified" if v.status == "error" else "changed the model's outputs"
    raise AssertionError(f"the fold ({counts}) {what}: {describe_verification(v)}")


def conv_bn_model(
    *,
    blocks: int = 1,
    channels: int = 4,
    in_channels: int = 3,
    size: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    opset: int = 17,
    batch: str | int = "N",
    matmul_bn: bool = False,
) -> onnx.ModelProto:
    """A chain of ``blocks`` Conv(3x3, pad 1) -> BatchNormalization -> Relu with random weights and
    BN statistics (``seed``); input ``x`` of shape ``[batch, in_channels, size, size]``.

    ``matmul_bn`` appends MatMul -> BatchNormalization, which bnfold keeps (a ``--strict``
    violation). Nodes are named ``conv{i}``/``bn{i}``; the output is ``y``.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    if dtype == "bfloat16":
        import ml_dtypes

        np_dtype: Any = ml_dtypes.bfloat16
        elem = onnx.TensorProto.BFLOAT16
    else:
        np_dtype = np.dtype(dtype)
        elem = helper.np_dtype_to_tensor_dtype(np_dtype)

    def const(name: str, a: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(a).astype(np_dtype), name)

    inits, nodes = [], []
    x = "x"
    for i in range(blocks):
        cin = in_channels if i == 0 else channels
        inits += [
            const(f"w{i}", rng.standard_normal((channels, cin, 3, 3)) / np.sqrt(cin * 9)),
            const(f"bias{i}", rng.standard_normal(channels) * 0.1),
            const(f"gamma{i}", rng.uniform(0.5, 1.5, channels)),
            const(f"beta{i}", rng.standard_normal(channels) * 0.1),
            const(f"mean{i}", rng.standard_normal(channels) * 0.1),
            const(f"var{i}", rng.uniform(0.5, 1.5, channels)),
        ]
        out = "y" if i == blocks - 1 and not matmul_bn else f"relu{i}"
        nodes += [
            helper.make_node(
                "Conv", [x, f"w{i}", f"bias{i}"], [f"conv{i}_out"], name=f"conv{i}", pads=[1, 1, 1, 1]
            ),
            helper.make_node(
                "BatchNormalization",
                [f"conv{i}_out", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"],
                [f"bn{i}_out"],
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"bn{i}_out"], [out], name=f"relu{i}"),
        ]
        x = out
    if matmul_bn:
        inits += [
            const("mm_w", rng.standard_normal((size, size)) / np.sqrt(size)),
            const("mm_gamma", rng.uniform(0.5, 1.5, channels)),
            const("mm_beta", rng.standard_normal(channels) * 0.1),
            const("mm_mean", rng.standard_normal(channels) * 0.1),
            const("mm_var", rng.uniform(0.5, 1.5, channels)),
        ]
        nodes += [
            helper.make_node("MatMul", [x, "mm_w"], ["mm_out"], name="mm"),
            helper.make_node(
                "BatchNormalization",
                ["mm_out", "mm_gamma", "mm_beta", "mm_mean", "mm_var"],
                ["y"],
                name="bn_mm",
            ),
        ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", elem, [batch, in_channels, size, size])],
        [helper.make_tensor_value_info("y", elem, [batch, channels, size, size])],
        inits,
    )
    ir = 8 if opset <= 18 else 9
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
