"""The typer app: registers the commands, nothing else. ``bnfold.cli.run`` makes ``fold`` the
default command and turns errors into exit codes."""

from __future__ import annotations

import typer

from .fold_command import fold_command
from .inspect_command import inspect_command
from .usage import Command, RootGroup
from .verify_command import verify_command

ROOT_HELP = """\
Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm, exactly, and verify the
result with onnxruntime (graph optimizations off).

\b
  bnfold MODEL.onnx [MODEL2.onnx ...] [OPTIONS]   fold; the same as 'bnfold fold ...'
  bnfold verify REFERENCE.onnx CANDIDATE.onnx     compare two models (a CI gate)
  bnfold inspect MODEL.onnx                        list BatchNormalizations, say which fold

See 'bnfold fold --help' for the folding options.

\b
Exit codes: 0 success (also when nothing was foldable), 1 verification failed or
--strict violated, 2 bad input or usage, 3 internal error.
"""

app = typer.Typer(
    name="bnfold",
    cls=RootGroup,
    help=ROOT_HELP,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


app.command(
    "fold", cls=Command, short_help="Fold every foldable BatchNormalization of each MODEL, verify, write it."
)(fold_command)
app.command(
    "verify", cls=Command, short_help="Compare two models in onnxruntime (optimizations off): a CI gate."
)(verify_command)
app.command(
    "inspect", cls=Command, short_help="List every BatchNormalization: what it follows, whether it can fold."
)(inspect_command)

COMMANDS = ("fold", "verify", "inspect")
