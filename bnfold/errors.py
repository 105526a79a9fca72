"""Exceptions bnfold raises at its API boundary.

Their messages are always one line: names quoted from a model may hold newlines or other control
characters (a hostile or corrupted file), and those are escaped (``\\n``, ``\\x1b``) so a message can
neither span lines nor drive a terminal.
"""

from __future__ import annotations

import re

from .report import Reason

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with control characters (newlines, escape sequences, ...) written as escapes."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


class BnfoldError(Exception):
    """Base class of bnfold's own errors; the message is made printable and one line."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(printable(str(message)), *args)


class BadInput(BnfoldError):
    """The input cannot be used (missing, unreadable, not ONNX, bad option): exit code 2."""


class VerificationFailed(BnfoldError):
    """A folded model did not match the original within tolerance."""


class FoldError(ValueError):
    """A fold that cannot be done exactly; ``code`` is a stable :class:`~bnfold.report.Reason`.

    Raised inside the pass and caught there: it becomes a skip with that reason, never an API error."""

    def __init__(self, code: Reason | str, message: str) -> None:
        super().__init__(message)
        self.code = Reason(code)
        self.message = message
