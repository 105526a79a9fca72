"""What a command knows about one model once it is done: typed records whose ``to_dict()`` is
the JSON of docs/cli.md (schema v1), and the exit policy (``--strict`` included), written once."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL, EXIT_OK, status_of

if TYPE_CHECKING:
    from bnfold.verification.options import VerifyOptions


@dataclass(frozen=True)
class FoldJob:
    """One model to fold: picklable, so it can be sent to a worker process."""

    input: str
    output: str
    options: VerifyOptions
    verify: bool = True
    dry_run: bool = False
    force: bool = False
    strict: bool = False
    in_place: bool = False
    bn_to_affine: bool = False
    merge_branches: bool = False


@dataclass
class ModelOutcome:
    """One folded model (``models[]`` of the fold JSON); ``traceback`` only with BNFOLD_DEBUG."""

    input: str
    output: str
    written: bool = False
    dry_run: bool = False
    status: str = "error"
    exit_code: int = EXIT_INTERNAL
    message: str = ""
    verification_status: str | None = None
    folded: int = 0
    kept: int = 0
    kept_after_linear: list[str] = field(default_factory=list)
    nodes_before: int | None = None
    nodes_after: int | None = None
    size_before: int | None = None
    size_after: int | None = None
    seconds: float = 0.0
    fold_seconds: float | None = None
    verify_seconds: float | None = None
    warnings: list[str] = field(default_factory=list)
    report: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    traceback: str | None = None

    @classmethod
    def empty(cls, job: FoldJob) -> ModelOutcome:
        return cls(input=job.input, output=job.output, dry_run=job.dry_run)

    def to_dict(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        if doc["traceback"] is None:
            del doc["traceback"]
        return doc

    @property
    def about(self) -> str:
        """The message, prefixed with the input path unless it already names it."""
        return self.message if self.message.startswith(self.input) else f"{self.input}: {self.message}"


@dataclass
class VerifyOutcome:
    """``bnfold verify``'s comparison of two models."""

    reference: str
    candidate: str
    status: str = "error"
    exit_code: int = EXIT_BAD_INPUT
    message: str = ""
    verification_status: str | None = None
    verification: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class InspectOutcome:
    """``bnfold inspect``'s record of one model (``batchnorms`` as in :class:`bnfold.Inspection`)."""

    input: str
    status: str = "error"
    exit_code: int = EXIT_BAD_INPUT
    message: str = ""
    batchnorms: list[dict[str, Any]] = field(default_factory=list)
    foldable: int = 0
    kept: int = 0
    kept_after_linear: list[str] = field(default_factory=list)
    nodes_before: int | None = None
    nodes_after: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def plural(n: int, word: str = "BatchNormalization") -> str:
    return f"{word}{'s' if n != 1 else ''}"


def names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def verification_status(status: str | None, changed: bool) -> str:
    """``passed``/``unchanged``/``failed``/``unverifiable``/``skipped`` from a Verification's status
    (None: not verified)."""
    if status is None:
        return "skipped"
    if status == "passed":
        return "passed" if changed else "unchanged"
    return "unverifiable" if status == "error" else "failed"


def strict_violation(kept: list[str], strict: bool) -> bool:
    """The ``--strict`` rule: a BN kept after a layer it could fold into fails the run."""
    return strict and bool(kept)


def fold_verdict(vstat: str, why: str, kept: list[str], strict: bool) -> tuple[int, str, str | None]:
    """The exit policy of one fold: ``(exit code, message, warning or None)``.

    ``why`` is the verification's message; a failed verification is exit 1, then ``--strict``
    (a BN kept after a layer, or a fold that could not be verified), else 0 with a note."""
    from ..inspection import LINEAR_OPS

    if vstat == "failed":
        return EXIT_FAILED, f"verification failed: {why}", None
    if strict_violation(kept, strict):
        return (
            EXIT_FAILED,
            f"--strict: {len(kept)} {plural(len(kept))} kept after {'/'.join(LINEAR_OPS)}: {names(kept)}",
            None,
        )
    if strict and vstat == "unverifiable":
        return EXIT_FAILED, f"--strict: the fold could not be verified: {why}", None
    if vstat == "unverifiable":
        warning = f"the fold could not be verified ({why}); it was computed exactly but not checked"
        return EXIT_OK, f"not verified: {why}", warning
    if vstat == "skipped":
        return EXIT_OK, "not verified: --no-verify", None
    return EXIT_OK, "", None


def inspect_verdict(kept: list[str], strict: bool) -> tuple[int, str, str]:
    """``(exit code, status, message)`` of one inspected model."""
    from ..inspection import LINEAR_OPS

    if not strict_violation(kept, strict):
        return EXIT_OK, status_of(EXIT_OK), ""
    message = (
        f"--strict: {len(kept)} BatchNormalization(s) after {'/'.join(LINEAR_OPS)} cannot be folded: "
        f"{names(kept)}"
    )
    return EXIT_FAILED, status_of(EXIT_FAILED), message
