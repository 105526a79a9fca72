"""bnfold: fold BatchNormalization into the layer before it, exactly, and prove it.

``import bnfold`` is light: onnxruntime is imported when verification runs, torch only by
``bnfold.torch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "fold",
    "verify",
    "inspect",
    "Inspection",
    "BatchNormInfo",
    "FoldResult",
    "FoldReport",
    "FoldedPair",
    "SkippedBN",
    "Verification",
    "OutputCheck",
    "BnfoldError",
    "BadInput",
    "VerificationFailed",
    "load_model",
    "save_model",
]

_LAZY = {
    "fold": "api",
    "FoldResult": "api",
    "verify": "verification",
    "inspect": "inspection",
    "Inspection": "inspection",
    "BatchNormInfo": "inspection",
    "FoldReport": "report",
    "FoldedPair": "report",
    "SkippedBN": "report",
    "Verification": "report",
    "OutputCheck": "report",
    "BnfoldError": "errors",
    "BadInput": "errors",
    "VerificationFailed": "errors",
    "load_model": "io",
    "save_model": "io",
}

if TYPE_CHECKING:
    from .api import FoldResult, fold
    from .errors import BadInput, BnfoldError, VerificationFailed
    from .inspection import BatchNormInfo, Inspection, inspect
    from .io import load_model, save_model
    from .report import FoldedPair, FoldReport, OutputCheck, SkippedBN, Verification
    from .verification import verify


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"bnfold.{module}"), name)
    globals()[name] = value
    return value
