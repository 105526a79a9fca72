"""``bnfold verify REFERENCE.onnx CANDIDATE.onnx``: compare two models (a CI gate)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .options import (
    Atol,
    Dim,
    InputsFile,
    JsonOut,
    JunitOut,
    Provider,
    Quiet,
    Rtol,
    Runs,
    Seed,
    Shape,
    Verbose,
)

if TYPE_CHECKING:
    from bnfold.verification.options import VerifyOptions

    from .console import Console
    from .outcome import VerifyOutcome


def verify_command(
    reference: Annotated[
        Path, typer.Argument(metavar="REFERENCE.onnx", help="The original model.", show_default=False)
    ],
    candidate: Annotated[
        Path,
        typer.Argument(
            metavar="CANDIDATE.onnx", help="The model to check (e.g. folded by any tool).", show_default=False
        ),
    ],
    atol: Atol = None,
    rtol: Rtol = None,
    seed: Seed = 0,
    runs: Runs = 1,
    shape: Shape = None,
    dim: Dim = None,
    inputs: InputsFile = None,
    provider: Provider = "CPUExecutionProvider",
    json_out: JsonOut = None,
    junit_xml: JunitOut = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
    localize: Annotated[
        bool,
        typer.Option(
            "--localize",
            help="Also compare every intermediate tensor both models share by name and report "
            "the first that diverges.",
        ),
    ] = False,
) -> int:
    """Run REFERENCE and CANDIDATE in onnxruntime (optimizations off) on the same seeded inputs
    and compare every output. Exit 0 if all match within tolerance, 1 if not (or onnxruntime
    cannot run the reference, so nothing was proven), 2 for bad input.
    """
    from .console import Console
    from .options import verify_options
    from .outputs import check_report_clash, check_report_path

    console = Console(quiet=quiet, json_stdout=json_out == "-")
    check_report_path(json_out, "--json")
    check_report_path(junit_xml, "--junit-xml")
    check_report_clash([json_out, junit_xml], [reference, candidate])
    options = verify_options(True, atol, rtol, seed, runs, shape, dim, inputs, provider)
    out = compare(reference, candidate, options, console, localize)
    return report_comparison(out, console, json_out, junit_xml, verbose, localize)


def compare(
    reference: Path, candidate: Path, options: VerifyOptions, console: Console, localize: bool = False
) -> VerifyOutcome:
    """Run the comparison (``localize``: and find the first diverging tensor); bad input becomes
    the outcome's status."""
    from bnfold.errors import BadInput

    from .console import progress
    from .exits import EXIT_FAILED, EXIT_OK, bad_input_text
    from .outcome import VerifyOutcome, verification_status
    from .streams import stdout_to_stderr

    start = time.perf_counter()
    out = VerifyOutcome(str(reference), str(candidate))
    unthreaded = dataclasses.replace(options, threads=None)  # (verify never limited threads)
    with stdout_to_stderr(console.json_stdout), progress(console, 1, candidate.name) as bar:
        if bar is not None:
            bar.step("verifying")
        try:
            from bnfold.verification import jsonable, verify_models

            ver = verify_models(str(reference), str(candidate), unthreaded, localize=localize)
        except BadInput as exc:
            out.message = bad_input_text(exc)
            ver = None
    if ver is not None:
        out.verification = jsonable(ver.to_dict())
        out.verification_status = verification_status(ver.status, True)
        if ver.status == "passed":
            out.status, out.exit_code = "passed", EXIT_OK
        else:
            out.status, out.exit_code = "failed", EXIT_FAILED
            out.message = f"not verified: {ver.message}" if ver.status == "error" else ver.message
    out.seconds = time.perf_counter() - start
    return out


def report_comparison(
    out: VerifyOutcome,
    console: Console,
    json_out: str | None,
    junit_path: str | None,
    verbose: bool,
    localized: bool = False,
) -> int:
    from .render.jsondoc import document, write_reports
    from .render.junit import junit_xml
    from .render.summary import append_step_summary, verify_summary_md
    from .render.text import verify_blocks, verify_final_line

    final = verify_final_line(out)
    doc = document("verify", out.exit_code, final, out.seconds, status=out.status)
    doc.update(out.to_dict())
    if out.status == "error":
        console.error(out.message)
    else:
        console.lines(verify_blocks(out, verbose, localized))
    report_code = write_reports(
        doc,
        json_out,
        junit_path,
        lambda: junit_xml("bnfold verify", [(f"{out.reference} vs {out.candidate}", out)], "verify"),
        console.error,
    )
    append_step_summary(verify_summary_md(out, final), console.warn)
    if out.status != "error":
        console.final(final)
    return max(out.exit_code, report_code)
