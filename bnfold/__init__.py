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
    "load_model": "storage.load",
    "save_model": "storage.save",
}

if TYPE_CHECKING:
    from .api import FoldResult, fold
    from .errors import BadInput, BnfoldError, VerificationFailed
    from .inspection import BatchNormInfo, Inspection, inspect
    from .report import FoldedPair, FoldReport, OutputCheck, SkippedBN, Verification
    from .storage.load import load_model
    from .storage.save import save_model
    from .verification import verify


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"bnfold.{module}"), name)
    globals()[name] = value
    return value
