"""PyTorch front end: fold BatchNorm in a traced ``nn.Module``, and export a folded, verified ONNX.

``bnfold.torch.fold(model, example_inputs)`` captures the model as a ``torch.fx.GraphModule``
(``symbolic_trace`` first, ``torch.export`` when tracing fails), folds at the graph-node level
(:mod:`bnfold.torch.fx_pass`) and compares the folded module with the original on the example inputs.
``bnfold.torch.export(model, example_inputs, path)`` exports with torch.onnx's dynamo exporter,
runs the ONNX pass on what the exporter left, and checks the ONNX file in onnxruntime against the
PyTorch module itself. The caller's model is never modified.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..errors import BadInput, VerificationFailed
from ..report import FoldedPair, FoldReport, OutputCheck, Pattern, Reason, SkippedBN, Status, Verification
from ..rules import Options
from ..verification import compare
from .fx_pass import fold_graph_module
from .tensors import to_numpy

__all__ = ["fold", "export", "TorchFoldResult", "capture"]


@dataclass
class TorchFoldResult:
    """The folded module, the report of what was folded or kept, and the comparison."""

    module: nn.Module  # a torch.fx.GraphModule, or the module itself when folded partially
    report: FoldReport
    verification: Verification | None
    capture: str  # "symbolic_trace", "torch.export", "graph_module", "exported_program"

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "capture": self.capture,
            "report": self.report.to_dict(),
            "verification": self.verification.to_dict() if self.verification else None,
        }


def _as_tuple(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _in_training(model: nn.Module) -> list[str]:
    """Names of what runs in training mode: the model itself (a traced GraphModule's root flag
    means nothing, its graph is fixed) and any BatchNorm or Dropout module."""
    names = [type(model).__name__] if model.training and not isinstance(model, fx.GraphModule) else []
    for name, m in model.named_modules():
        if (
            name
            and m.training
            and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
        ):
            names.append(name)
    return names


def prepare(model: nn.Module, eval: bool) -> nn.Module:
    """A private eval-mode copy of ``model``; refuses a training-mode model unless ``eval``."""
    training = _in_training(model)
    if training and not eval:
        raise BadInput(
            f"the model is in training mode ({', '.join(training[:3])}{' ...' if len(training) > 3 else ''}); "
            "call model.eval() first or pass eval=True to fold an eval-mode copy"
        )
    private = copy.deepcopy(model)
    private.eval()
    return private


def capture(model: Any, example_inputs: tuple[Any, ...] | None) -> tuple[fx.GraphModule, str]:
    """A GraphModule for ``model``: symbolic_trace, else torch.export; BadInput naming both failures."""
    if isinstance(model, torch.export.ExportedProgram):
        return model.module(), "exported_program"
    if isinstance(model, fx.GraphModule):
        return model, "graph_module"
    try:
        return fx.symbolic_trace(model), "symbolic_trace"
    except Exception as trace_error:  # tracing raises many types  # noqa: BLE001 - reported, never raised
        first = f"symbolic_trace failed: {_one_line(trace_error)}"
    if example_inputs is None:
        raise BadInput(f"cannot capture the model ({first}); torch.export needs example_inputs")
    try:
        return torch.export.export(model, example_inputs).module(), "torch.export"
    except Exception as export_error:  # noqa: BLE001 - reported, never raised
        raise BadInput(
            f"cannot capture the model ({first}; torch.export failed: {_one_line(export_error)})"
        ) from None


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _flatten(value: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _compare_outputs(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    names: Sequence[str],
    atol: float | None,
    rtol: float | None,
) -> list[OutputCheck]:
    if len(reference) != len(candidate):
        raise VerificationFailed(
            f"the folded model returns {len(candidate)} outputs, the original {len(reference)}"
        )
    return [compare(n, r, c, atol, rtol) for n, r, c in zip(names, reference, candidate)]


def _verification(checks: list[OutputCheck], start_shapes: dict[str, list[int]]) -> Verification:
    passed = all(c.passed for c in checks)
    return Verification(
        passed=passed,
        status=Status.PASSED if passed else Status.FAILED,
        message=""
        if passed
        else "outputs differ beyond tolerance: " + ", ".join(c.name for c in checks if not c.passed),
        outputs=checks,
        provider="torch",
        input_shapes=start_shapes,
    )


def _numpy(t: torch.Tensor) -> np.ndarray:
    return to_numpy(t.detach())


def fold(
    model: nn.Module | fx.GraphModule | torch.export.ExportedProgram,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    eval: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    partial: bool = False,
    merge_branches: bool = False,
) -> TorchFoldResult:
    """Fold every foldable BatchNorm; never mutates ``model``.

    The patterns are those of the ONNX pass (:mod:`bnfold.rules`): a BN after a Conv /
    ConvTranspose / Linear, after ``x @ W`` with 2-D ``x``, through a constant Add or several BNs in
    a row, before an unpadded Conv or a ``flatten(1)`` -> Linear, and a layer times a constant
    per-channel tensor (a decomposed BN). Ranks (``x @ W``, ``nn.Linear``) are known from
    ``example_inputs`` or from what torch.export recorded.

    Raises BadInput for a model in training mode (unless ``eval=True``) or one that neither
    ``symbolic_trace`` nor ``torch.export`` can capture, unless ``partial=True``: then every
    submodule that ``symbolic_trace`` can capture is folded on its own, and BNs called directly from
    an untraceable ``forward`` are kept with reason ``untraceable``. With ``verify``, the folded
    module is compared with the original module on ``example_inputs``, or, without them, on seeded
    random inputs shaped like those an ExportedProgram (or a GraphModule from torch.export)
    recorded; when no shapes are known, ``verification`` is None. ``merge_branches`` first merges
    the parallel conv / BN / identity branches of one input that an add sums (RepVGG, MobileOne)
    into one conv (pattern ``merged_branches``; ``report.merged_convs`` counts the convs removed).
    """
    options = Options(merge_branches=merge_branches)
    args = _as_tuple(example_inputs)
    gm: nn.Module
    if isinstance(model, torch.export.ExportedProgram):
        reference: Any = model.module()
        gm, how = capture(model, args)
    else:
        if not isinstance(model, nn.Module):
            raise BadInput(
                f"cannot fold a {type(model).__name__}: pass an nn.Module, GraphModule or ExportedProgram"
            )
        private = prepare(model, eval)
        reference = copy.deepcopy(private)
        try:
            gm, how = capture(private, args)
        except BadInput:
            if not partial:
                raise
            gm, how = private, "partial"
    if how == "partial":
        report = _fold_children(gm, args, options)
    else:
        assert isinstance(gm, fx.GraphModule)
        if args is not None and how in ("symbolic_trace", "graph_module"):
            _propagate_shapes(gm, args)
        report = fold_graph_module(gm, options)
    result = TorchFoldResult(gm, report, None, how)
    if verify and args is None:
        args = _inferred_inputs(model, gm)
    if verify and args is not None:
        with torch.no_grad():
            ref = [_numpy(t) for t in _flatten(reference(*args))]
            got = [_numpy(t) for t in _flatten(gm(*args))]
        names = [f"output_{i}" for i in range(len(ref))]
        shapes = {f"input_{i}": list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        result.verification = _verification(_compare_outputs(ref, got, names, atol, rtol), shapes)
    return result


def _inferred_inputs(model: Any, gm: nn.Module, seed: int = 0) -> tuple[torch.Tensor, ...] | None:
    """Seeded random inputs shaped like the example inputs an ExportedProgram recorded, or like the
    placeholders' recorded values of a GraphModule from torch.export; None if shapes are unknown."""
    specs: list[Any] = []
    recorded = (
        getattr(model, "example_inputs", None) if isinstance(model, torch.export.ExportedProgram) else None
    )
    if recorded is not None:
        args, kwargs = recorded
        if kwargs:
            return None
        specs = list(args)
    elif isinstance(gm, fx.GraphModule):
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                val = node.meta.get("val")
                if not isinstance(val, torch.Tensor):
                    return None
                specs.append(val)
    if not specs or not all(isinstance(t, torch.Tensor) for t in specs):
        return None
    try:
        shapes = [tuple(int(d) for d in t.shape) for t in specs]
    except (TypeError, ValueError):  # symbolic sizes
        return None
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, shape in zip(specs, shapes):
        if t.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(t.dtype))
        elif t.dtype == torch.bool:
            out.append(torch.rand(shape, generator=g) < 0.5)
        else:
            out.append(torch.randint(0, 4, shape, generator=g).to(t.dtype))
    return tuple(out)


def _fold_children(module: nn.Module, args: tuple[Any, ...] | None, options: Options) -> FoldReport:
    """Fold inside each traceable child of an untraceable ``module`` (recursively)."""
    report = FoldReport()
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            report.skipped.append(
                SkippedBN(
                    name,
                    Reason.UNTRACEABLE,
                    "called from a forward that neither symbolic_trace nor torch.export can capture",
                    "fx",
                )
            )
            continue
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in child.modules()):
            continue
        try:
            gm = fx.symbolic_trace(child)
        except Exception:  # noqa: BLE001 - reported, never raised
            sub = _fold_children(child, None, options)
        else:
            sub = fold_graph_module(gm, options)
            setattr(module, name, gm)
        for pair in sub.folded:
            pair.bn, pair.target = f"{name}.{pair.bn}", f"{name}.{pair.target}"
        for skip in sub.skipped:
            skip.bn = f"{name}.{skip.bn}"
        report.folded.extend(sub.folded)
        report.skipped.extend(sub.skipped)
        report.merged_convs += sub.merged_convs
    return report


def _propagate_shapes(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Record output shapes on nodes (used to check a Linear's output rank); best effort."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception:  # shape propagation is an aid, not a requirement  # noqa: BLE001 - reported, never raised
        return


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_shapes: Any = None,
    verify: bool = True,
    eval: bool = False,
    exporter_optimize: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    merge_branches: bool = False,
) -> Any:
    """Export ``model`` to ONNX at ``path`` with every BatchNorm folded, proven against PyTorch
    (``merge_branches``: RepVGG-style blocks merged too, as :func:`bnfold.fold` does).

    The dynamo exporter runs with its own optimizer off (``exporter_optimize=False``) so every fold
    is bnfold's exact float64 fold and is listed in the report; with ``exporter_optimize=True`` the
    exporter's folds are counted in ``report.folded`` with pattern ``"exporter"``. The ONNX model
    is run in onnxruntime (optimizations off) on ``example_inputs`` and compared with the PyTorch
    module's outputs; a failed comparison raises VerificationFailed and writes nothing.
    """
    from ..api import FoldResult
    from ..onnx.driver import fold_model
    from ..storage.save import save_model

    args = _as_tuple(example_inputs)
    if args is None:
        raise BadInput("export needs example_inputs")
    private = prepare(model, eval)
    with torch.no_grad():
        expected = [_numpy(t) for t in _flatten(private(*args))]
    kwargs: dict[str, Any] = {"dynamo": True, "optimize": exporter_optimize, "verbose": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_shapes is not None:
        kwargs["dynamic_shapes"] = dynamic_shapes
    program = torch.onnx.export(private, args, **kwargs)
    if program is None:
        raise BadInput("torch.onnx.export returned no program")
    proto = program.model_proto
    bn_in_onnx = _count_onnx_bn(proto)
    report = fold_model(proto, merge_branches=merge_branches)
    exporter_folds = max(_count_bn(private) - bn_in_onnx, 0)
    report.folded.extend(
        FoldedPair(bn=f"<exporter fold {i + 1}>", target="", kind="", graph="main", pattern=Pattern.EXPORTER)
        for i in range(exporter_folds)
    )
    result = FoldResult(proto, report, None, None)
    if verify:
        result.verification = _verify_onnx(proto, args, expected, atol, rtol)
        if not result.verification.passed and not force:
            raise VerificationFailed(
                f"not writing {path}: the ONNX model differs from the PyTorch module "
                f"({result.verification.message}; max abs err {result.verification.max_abs_err:.3g})"
            )
    save_model(proto, Path(path))
    result.source = None
    return result


def _count_onnx_bn(proto: Any) -> int:
    return sum(n.op_type == "BatchNormalization" for n in proto.graph.node)


def _verify_onnx(
    proto: Any, args: tuple[Any, ...], expected: list[np.ndarray], atol: float | None, rtol: float | None
) -> Verification:
    from ..verification.runner import run_all

    weights = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in weights]
    tensors = _flatten(args)
    if len(inputs) != len(tensors):
        raise BadInput(
            f"the ONNX model takes {len(inputs)} inputs, example_inputs has {len(tensors)} tensors"
        )
    feeds = {name: _numpy(t) for name, t in zip(inputs, tensors)}
    names = [o.name for o in proto.graph.output]
    got = run_all(proto, "CPUExecutionProvider", [feeds], names)[0]
    checks = _compare_outputs(expected, [np.asarray(g) for g in got], names, atol, rtol)
    return _verification(checks, {k: list(v.shape) for k, v in feeds.items()})
