"""``bnfold inspect MODEL.onnx...``: every BatchNormalization and whether it can be folded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .options import JsonOut, MergeBranches, Quiet, Verbose

if TYPE_CHECKING:
    from .outcome import InspectOutcome


def inspect_command(
    models: Annotated[
        list[Path], typer.Argument(metavar="MODEL.onnx", help="ONNX models to inspect.", show_default=False)
    ],
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Exit 1 if a BN after Conv/ConvTranspose/Gemm/MatMul cannot be folded."
        ),
    ] = False,
    merge_branches: MergeBranches = False,
    json_out: JsonOut = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> int:
    """List every BatchNormalization: what it follows, whether it can be folded, and why not.
    Writes nothing (the pass runs on an in-memory copy, without verification).
    """
    from .console import Console
    from .outputs import check_report_clash, check_report_path
    from .render.jsondoc import document, write_reports
    from .render.text import inspect_blocks, inspect_final_line, inspect_overall_line
    from .streams import stdout_to_stderr

    console = Console(quiet=quiet, json_stdout=json_out == "-")
    check_report_path(json_out, "--json")
    check_report_clash([json_out], list(models))
    start = time.perf_counter()
    outcomes = []
    with stdout_to_stderr(console.json_stdout):
        for model in models:
            out = inspect_model(str(model), strict, merge_branches)
            outcomes.append(out)
            if out.status == "error":
                console.error(out.message)
            else:
                more = [f"{model}: {inspect_final_line(out)}", ""] if len(models) > 1 else []
                console.lines([*inspect_blocks(out, verbose), *more])
    code = max(o.exit_code for o in outcomes)
    final = inspect_final_line(outcomes[0]) if len(outcomes) == 1 else inspect_overall_line(outcomes)
    doc = document(
        "inspect", code, final, time.perf_counter() - start, models=[o.to_dict() for o in outcomes]
    )
    report_code = write_reports(doc, json_out, None, None, console.error)
    if not (len(outcomes) == 1 and outcomes[0].status == "error"):
        console.final(final)
    return max(code, report_code)


def inspect_model(path: str, strict: bool = False, merge_branches: bool = False) -> InspectOutcome:
    """:func:`bnfold.inspect` of ``path`` as the command's record (bad input becomes its status)."""
    from bnfold.errors import BadInput
    from bnfold.inspection import inspect

    from .exits import bad_input_text
    from .outcome import InspectOutcome, inspect_verdict

    out = InspectOutcome(path)
    try:
        found = inspect(path, merge_branches=merge_branches)
    except BadInput as exc:
        out.message = bad_input_text(exc)
        return out
    out.batchnorms = [b.to_dict() for b in found.batchnorms]
    out.foldable, out.kept = found.foldable, found.kept
    out.kept_after_linear = found.kept_after_linear
    out.nodes_before, out.nodes_after = found.nodes_before, found.nodes_after
    out.exit_code, out.status, out.message = inspect_verdict(out.kept_after_linear, strict)
    return out
