"""Exit codes and the usage error: what every command shares (standard library only)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # verification failed or --strict violated
EXIT_BAD_INPUT = 2  # bad input or usage: one line on stderr, nothing written
EXIT_INTERNAL = 3  # a bug in bnfold
EXIT_INTERRUPTED = 130

SCHEMA_VERSION = 1
MAX_ROWS = 50  # rows per table in human output unless --verbose


class UsageProblem(Exception):
    """A bad option combination or value found before any model is processed (exit 2)."""


def status_of(code: int) -> str:
    """The JSON ``status`` of an exit code."""
    return {EXIT_OK: "passed", EXIT_FAILED: "failed"}.get(code, "error")


# The flag of each library parameter a BadInput may name (the library speaks of ``shapes=``).
FLAGS = {"shapes": "--shape", "dims": "--dim", "inputs": "--inputs"}


def bad_input_text(exc: BaseException) -> str:
    """The one-line message of a library error as the command line says it: every BadInput
    message shown by a command goes through here, where the library's parameter names become
    :data:`FLAGS`."""
    from bnfold.errors import flag_message

    return flag_message(exc, FLAGS)
