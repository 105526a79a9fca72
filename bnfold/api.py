"""The public entry point: ``bnfold.fold`` folds, verifies and returns a :class:`FoldResult`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from .errors import BadInput, VerificationFailed
from .io import load_model, save_model
from .onnx_pass import fold_model
from .report import FoldReport, Verification
from .verification import Inputs


@dataclass
class FoldResult:
    """A folded model, what was done to it, and how it compared with the original."""

    model: onnx.ModelProto
    report: FoldReport
    verification: Verification | None = None
    source: Path | None = None

    @property
    def passed(self) -> bool:
        """True unless verification ran and found a difference."""
        return self.verification is None or self.verification.status != "failed"

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the folded model atomically; refuses a fold that failed verification unless ``force``."""
        if not self.passed and not force:
            raise VerificationFailed(
                f"not writing {path}: the folded model failed verification "
                f"({self.verification.message if self.verification else ''})"
            )
        target = Path(path)
        if self.source is not None and target.exists() and target.resolve() == self.source.resolve() \
                and not force:
            raise BadInput(f"{target}: refusing to overwrite the input model (pass force=True)")
        return save_model(self.model, target)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: non-finite numbers (an infinite relative error) become None."""
        from .verification import jsonable

        return jsonable({
            "source": str(self.source) if self.source else None,
            "report": self.report.to_dict(),
            "verification": self.verification.to_dict() if self.verification else None,
        })


def fold(
    model: Any,
    *,
    verify: bool = True,
    inputs: Inputs = None,
    shapes: Mapping[str, list[int] | tuple[int, ...]] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    runs: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> FoldResult:
    """Fold every foldable BatchNormalization of ``model`` and (by default) verify the result.

    ``model`` is a path, ``onnx.ModelProto``, ``onnx_ir.Model`` or ``torch.onnx.ONNXProgram``; it
    is never modified. Verification runs original and folded model in onnxruntime with graph
    optimizations off on seeded random inputs (or ``inputs``); see :func:`bnfold.verify`.
    ``progress``, if given, is called with the name of each long step as it starts
    (``"loading"``, ``"folding"``, ``"verifying"``).
    Raises :class:`bnfold.BadInput` for unreadable models and unusable verification options.
    """
    step = progress or (lambda _name: None)
    step("loading")
    folded, base_dir, path = load_model(model)
    original = folded.SerializeToString() if verify else b""
    step("folding")
    report = fold_model(folded, base_dir)
    result = FoldResult(folded, report, None, path)
    if verify:
        from .verification import check_request, normalize_provider
        from .verification import verify as run_verify

        if not report.changed:
            check_request(folded, inputs, shapes, dims)  # bad options are errors even with nothing to do
            result.verification = Verification(
                passed=True, status="passed", message="nothing folded: the model is unchanged",
                runs=0, seed=seed, provider=normalize_provider(provider),
            )
        else:
            step("verifying")
            reference = onnx.ModelProto()
            reference.ParseFromString(original)
            del original
            result.verification = run_verify(
                reference, folded, inputs=inputs, shapes=shapes, dims=dims, seed=seed, runs=runs,
                atol=atol, rtol=rtol, provider=provider, threads=threads,
            )
    return result
