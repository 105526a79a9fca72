"""The GitHub step summary (Markdown appended to ``$GITHUB_STEP_SUMMARY``)."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..outcome import ModelOutcome, VerifyOutcome
from .text import fmt_err


def _md(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _result(o: ModelOutcome) -> str:
    if o.status == "passed" and o.verification_status in ("unverifiable", "skipped"):
        return "⚠️ passed, not verified"
    return {"passed": "✅ passed", "failed": "❌ failed", "error": "❌ error"}[o.status]


def fold_summary_md(outcomes: list[ModelOutcome], final: str) -> str:
    icon = "✅" if final.startswith("PASSED") else "❌"
    lines = [
        f"### {icon} bnfold: {_md(final)}",
        "",
        "| model | result | folded | kept | nodes | max abs err | output |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        nodes = f"{o.nodes_before} → {o.nodes_after}" if o.nodes_before is not None else ""
        v = o.verification or {}
        err = fmt_err(v.get("max_abs_err")) if o.verification_status in ("passed", "failed") else ""
        written = f"`{_md(o.output)}`" if o.written else "not written"
        lines.append(
            f"| `{_md(o.input)}` | {_result(o)} | {o.folded} | {o.kept} | {nodes} | {err} | {written} |"
        )
    problems = [
        o for o in outcomes if o.message and o.status != "passed" or o.verification_status == "unverifiable"
    ]
    if problems:
        lines.append("")
        lines += [f"- `{_md(o.input)}`: {_md(o.message)}" for o in problems]
    return "\n".join(lines) + "\n\n"


def verify_summary_md(out: VerifyOutcome, final: str) -> str:
    icon = "✅" if final.startswith("PASSED") else "❌"
    lines = [
        f"### {icon} bnfold verify: {_md(final)}",
        "",
        f"`{_md(out.reference)}` vs `{_md(out.candidate)}`",
        "",
    ]
    v = out.verification or {}
    if v.get("outputs"):
        lines += [
            "| output | dtype | max abs err | max rel err | atol | rtol | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for o in v["outputs"]:
            errs = " | ".join(fmt_err(o[k]) for k in ("max_abs_err", "max_rel_err", "atol", "rtol"))
            lines.append(f"| `{_md(o['name'])}` | {o['dtype']} | {errs} | {'✅' if o['passed'] else '❌'} |")
    return "\n".join(lines) + "\n\n"


def append_step_summary(text: str, warn: Callable[[str], None]) -> None:
    """Append to ``$GITHUB_STEP_SUMMARY`` when it is set; a failure is a warning."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        warn(f"cannot append to GITHUB_STEP_SUMMARY {path}: {exc.strerror or exc}")
