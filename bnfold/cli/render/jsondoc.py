"""The JSON report (schema v1, docs/cli.md) and writing the report files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from ..exits import EXIT_BAD_INPUT, EXIT_OK, SCHEMA_VERSION, status_of


def document(command: str, code: int, final: str, seconds: float, **rest: Any) -> dict[str, Any]:
    """The top of every document; ``rest`` follows in order (``summary``, ``models``, ...)."""
    from bnfold import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "bnfold",
        "version": __version__,
        "command": command,
        "exit_code": code,
        "status": rest.pop("status", status_of(code)),
        "final_line": final,
        "seconds": seconds,
        **rest,
    }


def write_json(doc: dict[str, Any], target: str | None) -> None:
    """Strict JSON (non-finite figures as null) to ``target``, ``-`` for stdout."""
    if target is None:
        return
    from bnfold.verification import jsonable

    text = json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from bnfold.storage.atomic import write_atomic

        write_atomic(text, target)


def write_reports(
    doc: dict[str, Any],
    json_path: str | None,
    junit_path: str | None,
    junit_text: Callable[[], str] | None,
    error: Callable[[str], None],
) -> int:
    """Write --json and --junit-xml; EXIT_BAD_INPUT if one cannot be written."""
    from bnfold.errors import BadInput

    code = EXIT_OK
    try:
        write_json(doc, json_path)
    except BadInput as exc:
        error(f"--json: {exc}")
        code = EXIT_BAD_INPUT
    if junit_path is not None and junit_text is not None:
        try:
            from bnfold.storage.atomic import write_atomic

            write_atomic(junit_text(), junit_path)
        except BadInput as exc:
            error(f"--junit-xml: {exc}")
            code = EXIT_BAD_INPUT
    return code
