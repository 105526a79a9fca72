"""``bnfold [fold] MODEL.onnx...``: fold, verify and write each model (the default command)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .exits import UsageProblem
from .options import (
    Atol,
    Dim,
    InputsFile,
    JsonOut,
    JunitOut,
    MergeBranches,
    Provider,
    Quiet,
    Rtol,
    Runs,
    Seed,
    Shape,
    Verbose,
)
from .options import integer as _integer

if TYPE_CHECKING:
    from .console import Console
    from .outcome import FoldJob, ModelOutcome


@dataclass(frozen=True)
class Reports:
    """Where the reports go and how much text to print."""

    json_out: str | None = None
    junit_xml: str | None = None
    quiet: bool = False
    verbose: bool = False


Strict = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Exit 1 if a BN after Conv/ConvTranspose/Gemm/MatMul was kept, or the fold could not be verified.",
    ),
]
BnToAffine = Annotated[
    bool,
    typer.Option(
        "--bn-to-affine",
        help="Rewrite BNs that cannot be folded as Mul + Add with precomputed constants (for runtimes without BatchNormalization).",
    ),
]


def fold_command(
    models: Annotated[
        list[Path], typer.Argument(metavar="MODEL.onnx", help="ONNX models to fold.", show_default=False)
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            metavar="PATH",
            help="Output path (one model only) [default: <stem>.folded.onnx next to the input].",
        ),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", metavar="DIR", help="Write <stem>.folded.onnx files into DIR (must exist)."
        ),
    ] = None,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Overwrite each input model (atomically).")
    ] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Do not run onnxruntime; the final line says 'not verified'.")
    ] = False,
    atol: Atol = None,
    rtol: Rtol = None,
    seed: Seed = 0,
    runs: Runs = 1,
    shape: Shape = None,
    dim: Dim = None,
    inputs: InputsFile = None,
    provider: Provider = "CPUExecutionProvider",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Fold and verify, report, write nothing.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Write the model even if verification failed (exit code stays 1).")
    ] = False,
    strict: Strict = False,
    bn_to_affine: BnToAffine = False,
    merge_branches: MergeBranches = False,
    json_out: JsonOut = None,
    junit_xml: JunitOut = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "-j",
            "--jobs",
            metavar="N",
            parser=_integer,
            help="Worker processes for several models [default: one per CPU, at most one per model].",
        ),
    ] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> int:
    """Fold every foldable BatchNormalization of each MODEL, verify, and write MODEL's
    <stem>.folded.onnx (or -o PATH / --output-dir DIR). A fold that fails verification is not
    written (exit 1) unless --force. Writes are atomic: a temporary file in the target folder, then
    a rename; the input is never overwritten unless --in-place.
    """
    from .options import verify_options
    from .outcome import FoldJob
    from .outputs import check_report_clash, check_report_path, plan_outputs

    reports = Reports(json_out, junit_xml, quiet, verbose)
    if jobs is not None and jobs < 1:
        raise UsageProblem(f"--jobs must be at least 1, got {jobs}")
    check_report_path(json_out, "--json")
    check_report_path(junit_xml, "--junit-xml")
    if junit_xml == "-":
        raise UsageProblem("--junit-xml needs a file path")
    options = verify_options(not no_verify, atol, rtol, seed, runs, shape, dim, inputs, provider)
    targets = plan_outputs(models, output, output_dir, in_place, dry_run)
    check_report_clash([json_out, junit_xml], [*models, *targets])
    n_workers = min(jobs or (os.cpu_count() or 1), len(models))
    if n_workers > 1:
        from dataclasses import replace

        options = replace(options, threads=max(1, (os.cpu_count() or 1) // n_workers))
    fold_jobs = [
        FoldJob(
            str(m),
            str(t),
            options,
            not no_verify,
            dry_run,
            force,
            strict,
            in_place,
            bn_to_affine,
            merge_branches,
        )
        for m, t in zip(models, targets)
    ]
    return run_fold(fold_jobs, n_workers, reports)


def run_fold(jobs: list[FoldJob], workers: int, reports: Reports) -> int:
    """Process the jobs, print and write the reports; the exit code."""
    from .console import Console
    from .render.jsondoc import document, write_reports
    from .render.junit import junit_xml
    from .render.summary import append_step_summary, fold_summary_md
    from .render.text import fold_summary, model_final_line, overall_final_line

    console = Console(quiet=reports.quiet, json_stdout=reports.json_out == "-")
    start = time.perf_counter()
    outcomes = _run_jobs(jobs, workers, console, reports.verbose)
    final = model_final_line(outcomes[0]) if len(outcomes) == 1 else overall_final_line(outcomes)
    code = max(o.exit_code for o in outcomes)
    doc = document(
        "fold",
        code,
        final,
        time.perf_counter() - start,
        summary=fold_summary(outcomes),
        models=[o.to_dict() for o in outcomes],
    )
    report_code = write_reports(
        doc,
        reports.json_out,
        reports.junit_xml,
        lambda: junit_xml("bnfold fold", [(o.input, o) for o in outcomes], "fold"),
        console.error,
    )
    append_step_summary(fold_summary_md(outcomes, final), console.warn)
    from .exits import EXIT_BAD_INPUT

    if not (len(outcomes) == 1 and outcomes[0].exit_code == EXIT_BAD_INPUT):
        console.final(final)
    return max(code, report_code)


def _show(out: ModelOutcome, console: Console, verbose: bool, multi: bool) -> None:
    from .exits import EXIT_BAD_INPUT
    from .render.text import model_blocks, model_final_line

    if out.status == "error":
        console.error(out.about)
        if out.traceback:
            sys.stderr.write(out.traceback)
        if multi:
            what = "bad input" if out.exit_code == EXIT_BAD_INPUT else "error"
            console.lines([f"{out.input}: FAILED {what}", ""])
        return
    for w in out.warnings:
        console.warn(f"{out.input}: {w}")
    blocks = model_blocks(out, verbose)
    if multi:
        blocks += [f"{out.input}: {model_final_line(out)}", ""]
    console.lines(blocks)


def _run_jobs(jobs: list[FoldJob], workers: int, console: Console, verbose: bool) -> list[ModelOutcome]:
    from .console import progress
    from .exits import EXIT_OK
    from .process import process_model
    from .streams import stdout_to_stderr
    from .workers import run_parallel

    multi = len(jobs) > 1
    with stdout_to_stderr(console.json_stdout), progress(console, len(jobs), Path(jobs[0].input).name) as bar:
        if workers <= 1:
            outcomes = []
            for job in jobs:
                if bar is not None:
                    bar.set_label(Path(job.input).name)
                out = process_model(job, bar.step if bar is not None else None)
                outcomes.append(out)
                if bar is not None:
                    bar.advance(out.exit_code != EXIT_OK)
                _show(out, console, verbose, multi)
            return outcomes
        done: dict[int, ModelOutcome] = {}
        shown = 0

        def on_done(idx: int, out: ModelOutcome) -> None:
            nonlocal shown
            done[idx] = out
            if bar is not None:
                bar.advance(out.exit_code != EXIT_OK)
            while shown in done:  # print in input order, as soon as possible
                _show(done[shown], console, verbose, multi)
                shown += 1

        return run_parallel(jobs, workers, on_done)
