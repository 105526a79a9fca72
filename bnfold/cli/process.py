"""One model: fold, verify, write, and the outcome (never an exception)."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from .exits import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, bad_input_text
from .outcome import FoldJob, ModelOutcome, fold_verdict, verification_status
from .streams import quiet_warnings

Progress = Callable[[str], None]


def process_model(job: FoldJob, progress: Progress | None = None) -> ModelOutcome:
    """Fold, verify and write one model; errors become the outcome's status (one model's
    failure must not stop the others). ``progress`` is called with each step's name."""
    start = time.perf_counter()
    out = ModelOutcome.empty(job)
    try:
        with quiet_warnings():
            _process(job, out, progress)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
        from bnfold.errors import BadInput

        if isinstance(exc, BadInput):
            out.exit_code, out.message = EXIT_BAD_INPUT, bad_input_text(exc)
        else:
            out.exit_code = EXIT_INTERNAL
            out.message = f"internal error: {type(exc).__name__}: {exc}"
            if os.environ.get("BNFOLD_DEBUG"):
                out.traceback = traceback.format_exc()
        out.status = "error"
        out.written = False
    out.seconds = time.perf_counter() - start
    return out


def _process(job: FoldJob, out: ModelOutcome, progress: Progress | None) -> None:
    from bnfold.api import fold_with
    from bnfold.inspection import kept_after_linear
    from bnfold.verification import jsonable

    try:
        out.size_before = Path(job.input).stat().st_size
    except OSError:
        pass  # load_model reports it
    # (the output path lets folded tensors of an external-data model be written once, in place)
    result = fold_with(
        job.input,
        job.options if job.verify else None,
        progress=progress,
        bn_to_affine=job.bn_to_affine,
        merge_branches=job.merge_branches,
        output=None if job.dry_run else job.output,
    )
    report, ver = result.report, result.verification
    out.report = report.to_dict()  # plain JSON already: only verification figures can be non-finite
    out.verification = jsonable(ver.to_dict()) if ver is not None else None
    out.folded, out.kept = len(report.folded), len(report.skipped)
    out.nodes_before, out.nodes_after = report.nodes_before, report.nodes_after
    out.fold_seconds = report.seconds
    out.verify_seconds = ver.seconds if ver is not None and ver.runs else None
    out.kept_after_linear = kept_after_linear(report)
    vstat = verification_status(ver.status if ver is not None else None, report.changed)
    out.verification_status = vstat
    code, message, warning = fold_verdict(
        vstat, ver.message if ver is not None else "", out.kept_after_linear, job.strict
    )
    if warning is not None:
        out.warnings.append(warning)

    write = (code == EXIT_OK or job.force) and not job.dry_run
    if write and job.in_place and not report.changed:
        write = False
        out.warnings.append("nothing folded: the input is left untouched")
    if write:
        if progress is not None:
            progress("writing")
        result.save(job.output, force=True)  # the checks above decided; force skips re-checking
        out.written = True
        data = Path(f"{job.output}.data")
        out.size_after = Path(job.output).stat().st_size + (data.stat().st_size if data.exists() else 0)
    else:
        out.size_after = result.byte_size() if report.changed else out.size_before
    out.exit_code = code
    out.status = "passed" if code == EXIT_OK else "failed"
    out.message = message
