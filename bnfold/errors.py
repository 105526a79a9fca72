"""Exceptions bnfold raises at its API boundary."""

from __future__ import annotations


class BnfoldError(Exception):
    """Base class of bnfold's own errors."""


class BadInput(BnfoldError):
    """The input cannot be used (missing, unreadable, not ONNX, bad option): exit code 2."""


class VerificationFailed(BnfoldError):
    """A folded model did not match the original within tolerance."""
