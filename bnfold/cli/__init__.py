"""The ``bnfold`` command line: a typer app (:mod:`bnfold.cli.app`) over :mod:`bnfold.api`,
:mod:`bnfold.inspection` and :mod:`bnfold.verification`.

``bnfold MODEL.onnx [MODEL2.onnx ...]`` folds (it is ``bnfold fold ...``), ``bnfold verify REF CAND``
compares two models, ``bnfold inspect MODEL.onnx`` lists every BatchNormalization and whether it
can be folded. docs/cli.md documents the options, the exit codes and the JSON schema.

Exit codes: 0 success (also when there is nothing to fold), 1 verification failed or ``--strict``
violated, 2 bad input or usage (one line on stderr, no traceback, nothing written), 3 internal error
(a bug in bnfold; the message asks to set BNFOLD_DEBUG=1 for the traceback).

This module imports only the standard library: ``bnfold --version`` pays for nothing else, and
``--help`` for typer alone (onnx, numpy, onnxruntime and rich are imported by the commands that use
them; torch never).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from ..errors import printable  # standard library only
from .exits import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, UsageProblem, bad_input_text
from .streams import sigterm_as_interrupt

COMMANDS = ("fold", "verify", "inspect")


def _dispatch(args: list[str]) -> int:
    """Run the app on ``args``: a first word that is no command (a model, an option) means fold."""
    if args[:1] == ["--version"]:
        from .. import __version__

        sys.stdout.write(f"bnfold {__version__}\n")
        return EXIT_OK
    if args and args[0] not in COMMANDS and args[0] not in ("-h", "--help"):
        args = ["fold", *args]
    from typer._click.core import Context
    from typer._click.exceptions import UsageError
    from typer.exceptions import Exit
    from typer.main import get_command

    from .app import app

    group = get_command(app)
    if not args:
        sys.stderr.write(group.make_context("bnfold", [], resilient_parsing=True).get_help() + "\n")
        return EXIT_BAD_INPUT
    # A command is entered directly, below a root context that parses nothing: parsing the root's
    # options would cost pydantic (typer's coercion) even for ``bnfold fold --help``.
    command = group.commands.get(args[0])  # type: ignore[attr-defined]
    try:
        if command is None:  # bnfold -h / --help
            with group.make_context("bnfold", args) as ctx:
                return int(group.invoke(ctx) or EXIT_OK)
        root = Context(group, info_name="bnfold", **group.context_settings)
        with command.make_context(args[0], args[1:], parent=root) as ctx:
            return int(command.invoke(ctx) or EXIT_OK)
    except Exit as exc:
        return int(exc.exit_code)
    except UsageError as exc:
        from .usage import usage_line

        prog = f"bnfold {args[0]}" if command is not None else "bnfold"
        raise UsageProblem(usage_line(exc, command, prog, args)) from None


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return its exit code.

    Errors do not propagate: each becomes one line on stderr and its exit code (2 usage or bad
    input, 3 internal error, 130 interrupted). ``main`` is this plus ``sys.exit``; tests call it
    in-process.
    """
    from ..errors import BadInput

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except UsageProblem as exc:
        sys.stderr.write(f"bnfold: error: {printable(str(exc))}\n")
        return EXIT_BAD_INPUT
    except BadInput as exc:
        sys.stderr.write(f"bnfold: error: {printable(bad_input_text(exc))}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("bnfold: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("BNFOLD_DEBUG"):
            traceback.print_exc()
        sys.stderr.write(
            f"bnfold: internal error: {type(exc).__name__}: {printable(str(exc))} (set BNFOLD_DEBUG=1 for the traceback)\n"
        )
        return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line and exit with the command's code (raises SystemExit)."""
    sigterm_as_interrupt()
    sys.exit(run(argv))


def entry() -> NoReturn:
    """The ``bnfold`` console script and ``python -m bnfold``: :func:`main`, then a quick exit.

    Interpreter shutdown would free a large model's objects one by one after all the work is
    done (about 0.1 s for a 5000-layer model); instead the exit handlers run (temporary files
    are removed), the output streams are flushed, and the process ends with the same code.
    """
    import atexit

    try:
        main()
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_handlers is None:  # pragma: no cover - not CPython: exit the normal way
        sys.exit(code)
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)
