"""Numerical verification of two ONNX models with the same interface, in onnxruntime
(optimizations off): :func:`verify`, with its options as one :class:`VerifyOptions`.

Modules: :mod:`.inputs` (the feeds), :mod:`.compare` (tolerances and comparison),
:mod:`.runner` (onnxruntime sessions, the only importer of onnxruntime), :mod:`.noise` (the
noise floor), :mod:`.divergence` (the first diverging tensor), :mod:`.verifier`.
"""

from __future__ import annotations

from .compare import compare, default_tolerances, describe_error, jsonable
from .divergence import describe_divergence, localize
from .inputs import Inputs, check_request
from .options import VerifyOptions
from .runner import check_provider, normalize_provider
from .verifier import verify, verify_models

__all__ = [
    "Inputs",
    "VerifyOptions",
    "check_provider",
    "check_request",
    "compare",
    "default_tolerances",
    "describe_divergence",
    "describe_error",
    "jsonable",
    "localize",
    "normalize_provider",
    "verify",
    "verify_models",
]
