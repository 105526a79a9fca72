"""Exceptions bnfold raises at its API boundary.

Their messages are always one line: names quoted from a model may hold newlines or other control
characters (a hostile or corrupted file), and those are escaped (``\\n``, ``\\x1b``) so a message can
neither span lines nor drive a terminal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .report import Reason

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` with control characters (newlines, escape sequences, ...) written as escapes."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


class BnfoldError(Exception):
    """Base class of bnfold's own errors; the message is made printable and one line."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(printable(str(message)), *args)


@dataclass(frozen=True)
class Param:
    """A mention of an API parameter in a message: ``shapes=``, ``shapes['x']`` or
    ``dims['N']=3`` (``name``, ``key``, ``value``). A command line spells it as its own flag
    (``--shape``, ``--shape x``, ``--dim N=3``), see :func:`flag_message`."""

    name: str
    key: str | None = None
    value: str | None = None

    def spelled(self, flag: str | None = None) -> str:
        """The API spelling, or with ``flag`` the command line's."""
        if flag is None:
            if self.key is None:
                return f"{self.name}="
            return f"{self.name}[{self.key!r}]" + ("" if self.value is None else f"={self.value}")
        if self.key is None:
            return flag
        return f"{flag} {self.key}" + ("" if self.value is None else f"={self.value}")


class BadInput(BnfoldError):
    """The input cannot be used (missing, unreadable, not ONNX, bad option): exit code 2.

    A message with ``fields`` is a ``str.format`` template (``"{shapes} for unknown input(s):
    {names}"``); a :class:`Param` field names an API parameter in ``str()`` and a flag in
    :func:`flag_message`, any other field is inserted as text (never parsed as a template).
    ``parameter``: the name of the first parameter named, None when none is.
    """

    def __init__(self, message: object = "", *args: object, **fields: object) -> None:
        self.template = str(message)
        self.fields = fields
        params = [f.name for f in fields.values() if isinstance(f, Param)]
        self.parameter: str | None = params[0] if params else None
        super().__init__(self._render({}), *args)

    def _render(self, flags: Mapping[str, str]) -> str:
        if not self.fields:
            return self.template
        return self.template.format(
            **{k: f.spelled(flags.get(f.name)) if isinstance(f, Param) else f for k, f in self.fields.items()}
        )


def flag_message(exc: BaseException, flags: Mapping[str, str]) -> str:
    """``str(exc)`` with the parameters a :class:`BadInput` names spelled as command line flags
    (``flags``: parameter name -> flag, e.g. ``{"shapes": "--shape"}``)."""
    if isinstance(exc, BadInput) and exc.parameter is not None:
        return printable(exc._render(flags))
    return str(exc)


class VerificationFailed(BnfoldError):
    """A folded model did not match the original within tolerance; ``first_divergence``: where
    it broke (a :class:`bnfold.report.Divergence`), when localization found it."""

    def __init__(self, message: object = "", *args: object, first_divergence: object = None) -> None:
        super().__init__(message, *args)
        self.first_divergence = first_divergence


class FoldError(ValueError):
    """A fold that cannot be done exactly; ``code`` is a stable :class:`~bnfold.report.Reason`.

    Raised inside the pass and caught there: it becomes a skip with that reason, never an API error."""

    def __init__(self, code: Reason | str, message: str) -> None:
        super().__init__(message)
        self.code = Reason(code)
        self.message = message
