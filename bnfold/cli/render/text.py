"""Human text of the outcomes, as lines and tables (:class:`Table`): the console prints tables
as aligned plain columns (byte-identical whatever the terminal) or, on a terminal, with rich."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, MAX_ROWS
from ..outcome import InspectOutcome, ModelOutcome, VerifyOutcome, plural


@dataclass(frozen=True)
class Table:
    """Rows of cells (the first is the header), indented by ``indent``."""

    rows: list[list[str]]
    indent: str = "    "

    def lines(self) -> list[str]:
        """Left-aligned columns separated by two spaces."""
        if not self.rows:
            return []
        widths = [max(len(r[i]) for r in self.rows) for i in range(len(self.rows[0]))]
        return [self.indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in self.rows]


Block = str | Table


def plain(blocks: list[Block]) -> list[str]:
    """The blocks as plain lines."""
    lines: list[str] = []
    for b in blocks:
        lines.extend(b.lines() if isinstance(b, Table) else [b])
    return lines


def fmt_err(x: float | None) -> str:
    """An error figure: None (a non-finite value in JSON) reads as inf."""
    if x is None:
        return "inf"
    if x == 0:
        return "0"
    return f"{x:.2e}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def fmt_shape(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _shown(items: list[Any], verbose: bool) -> list[Any]:
    return items if verbose or len(items) <= MAX_ROWS else items[:MAX_ROWS]


def verification_blocks(
    v: dict[str, Any], verbose: bool = False, indent: str = "  ", localized: bool = False
) -> list[Block]:
    """A ``Verification.to_dict()`` (JSON-safe) record (``localized``: localization ran)."""
    inputs = ", ".join(f"{k}={fmt_shape(s)}" for k, s in v.get("input_shapes", {}).items())
    assumed = ", ".join(f"{k}={n}" for k, n in v.get("assumed_dims", {}).items())
    runs = v.get("runs", 0)
    blocks: list[Block] = [
        f"{indent}verification: onnxruntime {v.get('provider')}, optimizations off, seed {v.get('seed')}, "
        f"{runs} run{'s' if runs != 1 else ''}"
    ]
    if inputs:
        blocks.append(
            f"{indent}  inputs: {inputs}" + (f" (assumed dims: {assumed}; set with --dim)" if assumed else "")
        )
    outputs = v.get("outputs") or []
    if outputs:
        rows = [
            [
                "output",
                "dtype",
                "shape",
                "max abs err",
                "max rel err",
                "atol",
                "rtol",
                "min atol",
                "noise floor",
                "err/noise",
                "result",
            ]
        ]
        shown = _shown(outputs, verbose)
        for o in shown:
            rows.append(
                [o["name"], o["dtype"], fmt_shape(o["shape"])]
                + [fmt_err(o[k]) for k in ("max_abs_err", "max_rel_err", "atol", "rtol", "min_atol")]
                + [_optional(o.get("noise_floor"), fmt_err), _optional(o.get("err_over_noise"), fmt_ratio)]
                + ["PASSED" if o["passed"] else f"FAILED ({o['mismatches']} elements)"]
            )
        blocks.append(Table(rows, indent + "  "))
        if len(shown) < len(outputs):
            blocks.append(
                f"{indent}  ... {len(outputs) - len(shown)} more outputs (--verbose or --json for all)"
            )
    divergence = divergence_line(v, localized)
    if divergence is not None:
        blocks.append(f"{indent}  {divergence}")
    if v.get("message"):
        blocks.append(f"{indent}  {v['message']}")
    return blocks


def _report_blocks(report: dict[str, Any], verbose: bool) -> list[Block]:
    folded, skipped = report["folded"], report["skipped"]
    blocks: list[Block] = []
    if folded:
        blocks.append(f"  folded {len(folded)} {plural(len(folded))}:")
        shown = _shown(folded, verbose)
        rows = [["BN", "", "target", "kind", "pattern", "graph"]]
        rows += [[p["bn"], "->", p["target"], p["kind"], p.get("pattern", ""), p["graph"]] for p in shown]
        blocks.append(Table(rows))
        if len(shown) < len(folded):
            blocks.append(f"    ... {len(folded) - len(shown)} more (--verbose or --json for all)")
    else:
        blocks.append("  folded nothing")
    if skipped:
        blocks.append(f"  kept {len(skipped)} {plural(len(skipped))}:")
        shown = _shown(skipped, verbose)
        rows = [["BN", "follows", "reason", ""]]
        for s in shown:
            follows = f"{s['producer_op']} {s['producer']}" if s.get("producer_op") else "-"
            rows.append([s["bn"], follows, s["code"], s["message"]])
        blocks.append(Table(rows))
        if len(shown) < len(skipped):
            blocks.append(f"    ... {len(skipped) - len(shown)} more (--verbose or --json for all)")
    if report.get("merged_convs"):
        n = report["merged_convs"]
        blocks.append(f"  merged branches: {n} {plural(n, 'conv')} removed")
    blocks.append(
        f"  nodes: {report['nodes_before']} -> {report['nodes_after']}, "
        f"initializers: {report['initializers_before']} -> {report['initializers_after']}"
    )
    return blocks


def model_blocks(out: ModelOutcome, verbose: bool = False) -> list[Block]:
    """The human summary of one folded model (everything but the final line)."""
    arrow = out.output if not out.dry_run else f"{out.output} (dry run)"
    blocks: list[Block] = [f"{out.input} -> {arrow}"]
    if out.report is not None:
        blocks += _report_blocks(out.report, verbose)
        after = fmt_bytes(out.size_after) + ("" if out.written else " (not written)")
        blocks.append(f"  size: {fmt_bytes(out.size_before)} -> {after}")
    v = out.verification
    if v is not None and v.get("runs"):
        blocks += verification_blocks(v, verbose)
    elif out.verification_status == "unchanged":
        blocks.append("  verification: not needed, the model is unchanged")
    elif out.verification_status == "skipped":
        blocks.append("  verification: skipped (--no-verify)")
    timing = f"  time: {fmt_seconds(out.seconds)}"
    if out.fold_seconds is not None:
        timing += f" (fold {fmt_seconds(out.fold_seconds)}"
        timing += f", verify {fmt_seconds(out.verify_seconds)})" if out.verify_seconds is not None else ")"
    blocks.append(timing)
    if out.written:
        blocks.append(f"  wrote {out.output}" + (" (--force)" if out.exit_code else ""))
    elif out.dry_run:
        blocks.append("  dry run: nothing written")
    elif out.status == "failed":
        blocks.append("  not written (pass --force to write it anyway)")
    return blocks


def worst_output(outputs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The failed output with the largest error (None: no output failed)."""
    bad = [o for o in outputs if not o["passed"]]
    if not bad:
        return None
    return max(bad, key=lambda o: float("inf") if o["max_abs_err"] is None else o["max_abs_err"])


def fmt_ratio(x: float | None) -> str:
    """An error in noise floors (``0.8``, ``1.2e+03``); None (no floor) reads as ``-``."""
    return "-" if x is None else f"{x:.2g}"


def _optional(x: float | None, fmt: Callable[[float | None], str]) -> str:
    return "-" if x is None else fmt(x)


def in_noise_floors(outputs: list[dict[str, Any]], shown: dict[str, Any] | None = None) -> str:
    """`` = 0.8 noise floors``: the error of ``shown`` (default: the output with the largest
    error) in noise floors, and the largest ratio of any other output when that one is higher;
    empty when no floor was measured."""
    if not outputs:
        return ""
    if shown is None:
        shown = max(outputs, key=lambda o: float("inf") if o["max_abs_err"] is None else o["max_abs_err"])
    ratio = shown.get("err_over_noise")
    tail = f" = {fmt_ratio(ratio)} noise floors" if ratio is not None else ""
    ratios = [o for o in outputs if o.get("err_over_noise") is not None]
    top = max(ratios, key=lambda o: o["err_over_noise"]) if ratios else None
    if top is not None and top is not shown and (ratio is None or top["err_over_noise"] > ratio):
        tail += f" (output {top['name']}: {fmt_ratio(top['err_over_noise'])} noise floors)"
    return tail


def divergence_line(v: dict[str, Any], localized: bool) -> str | None:
    """The localization's line (``first divergence: ...``): when it ran (``localized``) or found
    a divergence (a failed fold localizes by itself); else None."""
    from bnfold.report import Divergence
    from bnfold.verification import describe_divergence

    found = v.get("first_divergence")
    if not localized and not found:
        return None
    return describe_divergence(Divergence(**found) if found else None)


def _tolerance(o: dict[str, Any]) -> str:
    return f"tolerance {fmt_err(o['atol'])} + {fmt_err(o['rtol'])}*|ref| (output {o['name']})"


def model_final_line(out: ModelOutcome) -> str:
    """``PASSED <n> folded, <k> kept, max abs err <x>`` or ``FAILED ...`` for one model."""
    if out.status == "error":
        what = "bad input" if out.exit_code == EXIT_BAD_INPUT else "error"
        return f"FAILED {what}: {out.message}"
    counts = f"{out.folded} folded, {out.kept} kept"
    v = out.verification or {}
    vstat = out.verification_status
    word = "PASSED" if out.exit_code == EXIT_OK else "FAILED"
    if vstat == "passed":
        tail = f"max abs err {fmt_err(v.get('max_abs_err'))}{in_noise_floors(v.get('outputs') or [])}"
    elif vstat == "unchanged":
        tail = "nothing to fold, model unchanged"
    elif vstat == "failed":
        worst = worst_output(v.get("outputs", []))
        tail = (
            f"max abs err {fmt_err(worst['max_abs_err'])}{in_noise_floors([worst])} > {_tolerance(worst)}"
            if worst
            else out.message
        )
        tail += ", written anyway (--force)" if out.written else ", not written"
    else:  # unverifiable / skipped
        tail = (
            out.message if out.message.startswith("not verified") else f"not verified: {v.get('message', '')}"
        )
    if out.exit_code == EXIT_FAILED and vstat != "failed":
        tail = out.message
    return f"{word} {counts}, {tail}"


def _worst_err(outcomes: list[ModelOutcome]) -> tuple[bool, float | None]:
    """(whether any model was compared, the largest max abs err; None for infinite)."""
    errs = [
        (o.verification or {}).get("max_abs_err")
        for o in outcomes
        if o.verification_status in ("passed", "failed")
    ]
    if not errs:
        return False, None
    worst = max((float("inf") if e is None else e) for e in errs)
    return True, None if worst == float("inf") else worst


def not_verified(outcomes: list[ModelOutcome]) -> int:
    return sum(1 for o in outcomes if o.verification_status in ("unverifiable", "skipped"))


def overall_final_line(outcomes: list[ModelOutcome]) -> str:
    n = len(outcomes)
    bad = [o for o in outcomes if o.exit_code != EXIT_OK]
    text = f"{sum(o.folded for o in outcomes)} folded, {sum(o.kept for o in outcomes)} kept"
    compared, worst = _worst_err(outcomes)
    if compared:
        text += f", max abs err {fmt_err(worst)}"
    if not_verified(outcomes):
        text += f", {not_verified(outcomes)} not verified"
    if bad:
        return f"FAILED {len(bad)} of {n} models: {text}"
    return f"PASSED {n} models: {text}"


def fold_summary(outcomes: list[ModelOutcome]) -> dict[str, Any]:
    """The ``summary`` object of the fold JSON."""
    return {
        "models": len(outcomes),
        "passed": sum(1 for o in outcomes if o.status == "passed"),
        "failed": sum(1 for o in outcomes if o.status == "failed"),
        "errors": sum(1 for o in outcomes if o.status == "error"),
        "folded": sum(o.folded for o in outcomes),
        "kept": sum(o.kept for o in outcomes),
        "not_verified": not_verified(outcomes),
        "written": sum(1 for o in outcomes if o.written),
        "max_abs_err": _worst_err(outcomes)[1],
    }


def verify_blocks(out: VerifyOutcome, verbose: bool = False, localized: bool = False) -> list[Block]:
    blocks: list[Block] = [f"{out.reference} vs {out.candidate}"]
    if out.verification is not None:
        blocks += verification_blocks(out.verification, verbose, localized=localized)
    blocks.append(f"  time: {fmt_seconds(out.seconds)}")
    return blocks


def verify_final_line(out: VerifyOutcome) -> str:
    if out.status == "error":
        return f"FAILED bad input: {out.message}"
    v = out.verification or {}
    outputs = v.get("outputs") or []
    if out.verification_status == "passed":
        return (
            f"PASSED {len(outputs)}/{len(outputs)} outputs match, "
            f"max abs err {fmt_err(v.get('max_abs_err'))}{in_noise_floors(outputs)}"
        )
    worst = worst_output(outputs) if out.verification_status != "unverifiable" else None
    if worst is None:
        return f"FAILED {out.message}"
    bad = sum(1 for o in outputs if not o["passed"])
    return (
        f"FAILED {bad}/{len(outputs)} outputs differ, "
        f"max abs err {fmt_err(worst['max_abs_err'])}{in_noise_floors([worst])} > {_tolerance(worst)}"
    )


def inspect_blocks(out: InspectOutcome, verbose: bool = False) -> list[Block]:
    n = len(out.batchnorms)
    blocks: list[Block] = [f"{out.input}: {n} {plural(n)}, {out.foldable} foldable, {out.kept} kept"]
    if n:
        rows = [["BN", "graph", "follows", "foldable", "pattern / reason"]]
        shown = _shown(out.batchnorms, verbose)
        for e in shown:
            follows = f"{e['follows_op']} {e['follows']}" if e["follows_op"] else "-"
            reason = e.get("pattern") or "" if e["foldable"] else f"{e['code']}: {e['message']}"
            rows.append([e["bn"], e["graph"], follows, "yes" if e["foldable"] else "no", reason])
        blocks.append(Table(rows, "  "))
        if len(shown) < n:
            blocks.append(f"  ... {n - len(shown)} more (--verbose or --json for all)")
    return blocks


def inspect_final_line(out: InspectOutcome) -> str:
    if out.status == "error":
        return f"FAILED bad input: {out.message}"
    counts = f"{out.foldable} foldable, {out.kept} kept"
    if out.exit_code:
        return f"FAILED {counts}, {out.message}"
    return f"PASSED {counts}"


def inspect_overall_line(outcomes: list[InspectOutcome]) -> str:
    bad = sum(1 for o in outcomes if o.exit_code)
    counts = f"{sum(o.foldable for o in outcomes)} foldable, {sum(o.kept for o in outcomes)} kept"
    return (
        f"FAILED {bad} of {len(outcomes)} models: {counts}"
        if bad
        else f"PASSED {len(outcomes)} models: {counts}"
    )
