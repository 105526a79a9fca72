"""The ``bnfold`` command line: a thin argparse layer over :mod:`bnfold.api` and :mod:`bnfold.verification`.

``bnfold MODEL.onnx [MODEL2.onnx ...]`` folds (it is ``bnfold fold ...``), ``bnfold verify REF CAND``
compares two models, ``bnfold inspect MODEL.onnx`` lists every BatchNormalization and whether it
can be folded. docs/cli.md documents the options, the exit codes and the JSON schema.

Exit codes: 0 success (also when there is nothing to fold), 1 verification failed or ``--strict``
violated, 2 bad input or usage (one line on stderr, no traceback, nothing written), 3 internal error
(a bug in bnfold; the message asks to set BNFOLD_DEBUG=1 for the traceback).

Only the standard library is imported at module level: ``bnfold --help`` must not pay for onnx,
numpy or onnxruntime (and never imports torch), and argparse starts in about a millisecond where
typer (pydantic, click) took about 0.1 s on every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

from .errors import flag_message, printable  # standard library only

FLAGS = {"shapes": "--shape", "dims": "--dim", "inputs": "--inputs"}  # the flag of each API parameter

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

SCHEMA_VERSION = 1
# A BN kept after one of these is a --strict violation: it could have been folded into a layer.
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MAX_ROWS = 50  # rows per table in human output unless --verbose


def _version() -> str:
    from . import __version__

    return __version__


class UsageProblem(Exception):
    """A bad option combination or value found before any model is processed (exit 2)."""


# ------------------------------------------------------------------------------------------------
# Option parsing


def parse_shapes(values: list[str] | None) -> dict[str, list[int]]:
    """``["x=1x3x224x224", "mask=1,77"]`` -> ``{"x": [1, 3, 224, 224], "mask": [1, 77]}``."""
    shapes: dict[str, list[int]] = {}
    for value in values or []:
        name, sep, spec = value.rpartition("=")
        if not sep or not name:
            raise UsageProblem(f"--shape {value!r}: expected NAME=DIMS, e.g. input=1x3x224x224")
        spec = spec.strip()
        try:
            dims = [] if spec in ("", "scalar") else [int(d) for d in spec.replace(",", "x").split("x")]
        except ValueError:
            raise UsageProblem(
                f"--shape {value!r}: dimensions must be integers, e.g. {name}=1x3x224x224"
            ) from None
        if any(d < 0 for d in dims):
            raise UsageProblem(f"--shape {value!r}: dimensions must not be negative")
        if name in shapes:
            raise UsageProblem(f"--shape given twice for {name!r}")
        shapes[name] = dims
    return shapes


def parse_dims(values: list[str] | None) -> dict[str, int]:
    """``["batch=4"]`` -> ``{"batch": 4}``."""
    dims: dict[str, int] = {}
    for value in values or []:
        name, sep, spec = value.rpartition("=")
        if not sep or not name:
            raise UsageProblem(f"--dim {value!r}: expected NAME=VALUE, e.g. batch=1")
        try:
            n = int(spec)
        except ValueError:
            raise UsageProblem(f"--dim {value!r}: the value must be an integer") from None
        if n < 0:
            raise UsageProblem(f"--dim {value!r}: the value must not be negative")
        if name in dims:
            raise UsageProblem(f"--dim given twice for {name!r}")
        dims[name] = n
    return dims


@dataclass(frozen=True)
class CheckOptions:
    """How to verify: everything :func:`bnfold.verify` takes besides the two models."""

    enabled: bool = True
    atol: float | None = None
    rtol: float | None = None
    seed: int = 0
    runs: int = 1
    shapes: dict[str, list[int]] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    inputs: str | None = None
    provider: str = "CPUExecutionProvider"
    threads: int | None = None

    def verify_options(self) -> Any:
        """These options as the library takes them (a ``bnfold.verification.VerifyOptions``)."""
        from .verification.options import VerifyOptions

        return VerifyOptions(
            self.inputs,
            self.shapes,
            self.dims,
            self.seed,
            self.runs,
            self.atol,
            self.rtol,
            self.provider,
            self.threads,
        )


@dataclass(frozen=True)
class FoldJob:
    """One model to fold: picklable, so it can be sent to a worker process."""

    input: str
    output: str
    check: CheckOptions
    dry_run: bool = False
    force: bool = False
    strict: bool = False
    in_place: bool = False
    bn_to_affine: bool = False


def _check_options(
    verify: bool,
    atol: float | None,
    rtol: float | None,
    seed: int,
    runs: int,
    shape: list[str] | None,
    dim: list[str] | None,
    inputs: Path | None,
    provider: str,
) -> CheckOptions:
    if runs < 1:
        raise UsageProblem(f"--runs must be at least 1, got {runs}")
    for label, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (value >= 0 and value != float("inf")):
            raise UsageProblem(f"{label} must be a finite number >= 0, got {value}")
    if inputs is not None and not inputs.is_file():
        raise UsageProblem(f"--inputs {inputs}: no such file")
    full_provider = provider
    if verify:
        from .errors import BadInput
        from .verification import check_provider

        try:
            full_provider = check_provider(provider)
        except BadInput as exc:
            raise UsageProblem(f"--provider: {exc}") from None
    return CheckOptions(
        enabled=verify,
        atol=atol,
        rtol=rtol,
        seed=seed,
        runs=runs,
        shapes=parse_shapes(shape),
        dims=parse_dims(dim),
        inputs=str(inputs) if inputs is not None else None,
        provider=full_provider,
    )


def _check_writable_folder(folder: Path, what: str) -> None:
    if not folder.exists():
        raise UsageProblem(f"{what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageProblem(f"{what}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageProblem(f"{what}: folder {folder} is not writable")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def default_output(model: Path, output_dir: Path | None = None) -> Path:
    """``dir/model.onnx`` -> ``dir/model.folded.onnx`` (or the same name inside ``output_dir``)."""
    name = f"{model.stem}.folded.onnx"
    return (output_dir / name) if output_dir is not None else model.with_name(name)


def plan_outputs(
    models: list[Path], output: Path | None, output_dir: Path | None, in_place: bool, dry_run: bool
) -> list[Path]:
    """Where each model is written; UsageProblem for anything that would clobber or collide."""
    if output is not None and len(models) > 1:
        raise UsageProblem("-o/--output takes one model; use --output-dir DIR for several")
    if output is not None and output_dir is not None:
        raise UsageProblem("give either -o/--output or --output-dir, not both")
    if in_place and (output is not None or output_dir is not None):
        raise UsageProblem("--in-place writes over each input; it cannot be combined with -o/--output-dir")
    if output_dir is not None:
        _check_writable_folder(output_dir, "--output-dir")
    targets: list[Path] = []
    for model in models:
        if in_place:
            target = model.resolve() if model.exists() else model
        elif output is not None:
            target = output
        else:
            target = default_output(model, output_dir)
        if not in_place and _same_file(target, model):
            raise UsageProblem(f"{target}: the output is the input model; pass --in-place to overwrite it")
        if target.is_dir():
            raise UsageProblem(f"{target}: the output path is a folder")
        if not dry_run and output_dir is None:
            _check_writable_folder(target.parent if str(target.parent) else Path("."), str(target))
        targets.append(target)
    if not in_place:
        seen: dict[str, Path] = {}
        for model, target in zip(models, targets):
            key = str(target.resolve())
            if key in seen:
                raise UsageProblem(f"{seen[key]} and {model} would both be written to {target}")
            seen[key] = model
            for other in models:
                if _same_file(target, other):
                    raise UsageProblem(f"{model} would be written to {target}, which is another input")
    elif len({str(t) for t in targets}) != len(targets):
        raise UsageProblem("the same model is given twice")
    return targets


# ------------------------------------------------------------------------------------------------
# One model: fold, verify, write. Returns a JSON-ready record (see docs/cli.md, "models[]").


def _empty_record(job: FoldJob) -> dict[str, Any]:
    return {
        "input": job.input,
        "output": job.output,
        "written": False,
        "dry_run": job.dry_run,
        "status": "error",
        "exit_code": EXIT_INTERNAL,
        "message": "",
        "verification_status": None,
        "folded": 0,
        "kept": 0,
        "kept_after_linear": [],
        "nodes_before": None,
        "nodes_after": None,
        "size_before": None,
        "size_after": None,
        "seconds": 0.0,
        "fold_seconds": None,
        "verify_seconds": None,
        "warnings": [],
        "report": None,
        "verification": None,
    }


@contextmanager
def _quiet_warnings() -> Iterator[None]:
    """numpy's RuntimeWarnings (overflow, invalid value) on hostile weights would add lines to
    stderr; what they mean is in the report (codes non_finite, overflow), so they are not shown."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def process_model(job: FoldJob, progress: Any = None) -> dict[str, Any]:
    """Fold, verify and write one model; never raises (errors become the record's status)."""
    start = time.perf_counter()
    rec = _empty_record(job)
    try:
        with _quiet_warnings():
            _process(job, rec, progress)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
        from .errors import BadInput

        if isinstance(exc, BadInput):
            rec["exit_code"], rec["message"] = EXIT_BAD_INPUT, flag_message(exc, FLAGS)
        else:
            rec["exit_code"] = EXIT_INTERNAL
            rec["message"] = f"internal error: {type(exc).__name__}: {exc}"
            if os.environ.get("BNFOLD_DEBUG"):
                rec["traceback"] = traceback.format_exc()
        rec["status"] = "error"
        rec["written"] = False
    rec["seconds"] = time.perf_counter() - start
    return rec


def _process(job: FoldJob, rec: dict[str, Any], progress: Any) -> None:
    from .api import fold_with
    from .verification import jsonable

    src = Path(job.input)
    try:
        rec["size_before"] = src.stat().st_size
    except OSError:
        pass  # load_model reports it
    opts = job.check
    # (the output path lets folded tensors of an external-data model be written once, in place)
    result = fold_with(
        job.input,
        opts.verify_options() if opts.enabled else None,
        progress=progress,
        bn_to_affine=job.bn_to_affine,
        output=None if job.dry_run else job.output,
    )
    report, ver = result.report, result.verification
    rec["report"] = report.to_dict()  # plain JSON already: only verification figures can be non-finite
    rec["verification"] = jsonable(ver.to_dict()) if ver is not None else None
    rec["folded"], rec["kept"] = len(report.folded), len(report.skipped)
    rec["nodes_before"], rec["nodes_after"] = report.nodes_before, report.nodes_after
    rec["fold_seconds"] = report.seconds
    rec["verify_seconds"] = ver.seconds if ver is not None and ver.runs else None
    rec["kept_after_linear"] = [s.bn for s in report.skipped if s.producer_op in LINEAR_OPS]

    if ver is None:
        vstat = "skipped"
    elif ver.status == "passed":
        vstat = "passed" if report.changed else "unchanged"
    elif ver.status == "error":
        vstat = "unverifiable"
    else:
        vstat = "failed"
    rec["verification_status"] = vstat

    code, message = EXIT_OK, ""
    if vstat == "failed":
        code, message = EXIT_FAILED, f"verification failed: {ver.message}"  # type: ignore[union-attr]
    elif job.strict and rec["kept_after_linear"]:
        names = rec["kept_after_linear"]
        code = EXIT_FAILED
        message = (
            f"--strict: {len(names)} BatchNormalization{'s' if len(names) != 1 else ''} kept after "
            f"{'/'.join(LINEAR_OPS)}: {_names(names)}"
        )
    elif job.strict and vstat == "unverifiable":
        code, message = EXIT_FAILED, f"--strict: the fold could not be verified: {ver.message}"  # type: ignore[union-attr]
    elif vstat == "unverifiable":
        message = f"not verified: {ver.message}"  # type: ignore[union-attr]
        rec["warnings"].append(
            f"the fold could not be verified ({ver.message}); it was computed exactly but not checked"  # type: ignore[union-attr]
        )
    elif vstat == "skipped":
        message = "not verified: --no-verify"

    write = (code == EXIT_OK or job.force) and not job.dry_run
    if write and job.in_place and not report.changed:
        write = False
        rec["warnings"].append("nothing folded: the input is left untouched")
    if write:
        if progress is not None:
            progress("writing")
        result.save(job.output, force=True)  # the checks above decided; force skips re-checking
        rec["written"] = True
        data = Path(f"{job.output}.data")
        rec["size_after"] = Path(job.output).stat().st_size + (data.stat().st_size if data.exists() else 0)
    else:
        rec["size_after"] = result.byte_size() if report.changed else rec["size_before"]
    rec["exit_code"] = code
    rec["status"] = "passed" if code == EXIT_OK else "failed"
    rec["message"] = message


def _about(rec: dict[str, Any]) -> str:
    """A record's message, prefixed with its input path unless it already names it."""
    msg = rec["message"]
    return msg if msg.startswith(rec["input"]) else f"{rec['input']}: {msg}"


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------
# Formatting


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


def table(rows: list[list[str]], indent: str = "    ") -> list[str]:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _shape(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def verification_lines(v: dict[str, Any], verbose: bool = False, indent: str = "  ") -> list[str]:
    """Human lines for a ``Verification.to_dict()`` (JSON-safe) record."""
    lines: list[str] = []
    inputs = ", ".join(f"{k}={_shape(s)}" for k, s in v.get("input_shapes", {}).items())
    assumed = ", ".join(f"{k}={n}" for k, n in v.get("assumed_dims", {}).items())
    runs = v.get("runs", 0)
    head = (
        f"{indent}verification: onnxruntime {v.get('provider')}, optimizations off, seed {v.get('seed')}, "
        f"{runs} run{'s' if runs != 1 else ''}"
    )
    lines.append(head)
    if inputs:
        lines.append(
            f"{indent}  inputs: {inputs}" + (f" (assumed dims: {assumed}; set with --dim)" if assumed else "")
        )
    outputs = v.get("outputs") or []
    if outputs:
        rows = [
            ["output", "dtype", "shape", "max abs err", "max rel err", "atol", "rtol", "min atol", "result"]
        ]
        shown = outputs if verbose or len(outputs) <= MAX_ROWS else outputs[:MAX_ROWS]
        for o in shown:
            rows.append(
                [
                    o["name"],
                    o["dtype"],
                    _shape(o["shape"]),
                    fmt_err(o["max_abs_err"]),
                    fmt_err(o["max_rel_err"]),
                    fmt_err(o["atol"]),
                    fmt_err(o["rtol"]),
                    fmt_err(o["min_atol"]),
                    "PASSED" if o["passed"] else f"FAILED ({o['mismatches']} elements)",
                ]
            )
        lines.extend(table(rows, indent + "  "))
        if len(shown) < len(outputs):
            lines.append(
                f"{indent}  ... {len(outputs) - len(shown)} more outputs (--verbose or --json for all)"
            )
    if v.get("message"):
        lines.append(f"{indent}  {v['message']}")
    return lines


def model_lines(rec: dict[str, Any], verbose: bool = False) -> list[str]:
    """The human summary of one model record (everything but the final line)."""
    arrow = rec["output"] if not rec["dry_run"] else f"{rec['output']} (dry run)"
    lines = [f"{rec['input']} -> {arrow}"]
    report = rec.get("report")
    if report is not None:
        folded, skipped = report["folded"], report["skipped"]
        if folded:
            lines.append(f"  folded {len(folded)} BatchNormalization{'s' if len(folded) != 1 else ''}:")
            rows = [["BN", "", "target", "kind", "pattern", "graph"]]
            shown = folded if verbose or len(folded) <= MAX_ROWS else folded[:MAX_ROWS]
            rows += [[p["bn"], "->", p["target"], p["kind"], p.get("pattern", ""), p["graph"]] for p in shown]
            lines += table(rows)
            if len(shown) < len(folded):
                lines.append(f"    ... {len(folded) - len(shown)} more (--verbose or --json for all)")
        else:
            lines.append("  folded nothing")
        if skipped:
            lines.append(f"  kept {len(skipped)} BatchNormalization{'s' if len(skipped) != 1 else ''}:")
            rows = [["BN", "follows", "reason", ""]]
            shown = skipped if verbose or len(skipped) <= MAX_ROWS else skipped[:MAX_ROWS]
            for s in shown:
                follows = f"{s['producer_op']} {s['producer']}" if s.get("producer_op") else "-"
                rows.append([s["bn"], follows, s["code"], s["message"]])
            lines += table(rows)
            if len(shown) < len(skipped):
                lines.append(f"    ... {len(skipped) - len(shown)} more (--verbose or --json for all)")
        lines.append(
            f"  nodes: {report['nodes_before']} -> {report['nodes_after']}, "
            f"initializers: {report['initializers_before']} -> {report['initializers_after']}"
        )
        after = fmt_bytes(rec["size_after"]) + ("" if rec["written"] else " (not written)")
        lines.append(f"  size: {fmt_bytes(rec['size_before'])} -> {after}")
    v = rec.get("verification")
    if v is not None and v.get("runs"):
        lines += verification_lines(v, verbose)
    elif rec.get("verification_status") == "unchanged":
        lines.append("  verification: not needed, the model is unchanged")
    elif rec.get("verification_status") == "skipped":
        lines.append("  verification: skipped (--no-verify)")
    timing = f"  time: {fmt_seconds(rec['seconds'])}"
    if rec.get("fold_seconds") is not None:
        timing += f" (fold {fmt_seconds(rec['fold_seconds'])}"
        timing += (
            f", verify {fmt_seconds(rec['verify_seconds'])})"
            if rec.get("verify_seconds") is not None
            else ")"
        )
    lines.append(timing)
    if rec["written"]:
        lines.append(f"  wrote {rec['output']}" + (" (--force)" if rec["exit_code"] else ""))
    elif rec["dry_run"]:
        lines.append("  dry run: nothing written")
    elif rec["status"] == "failed":
        lines.append("  not written (pass --force to write it anyway)")
    return lines


def model_final_line(rec: dict[str, Any]) -> str:
    """``PASSED <n> folded, <k> kept, max abs err <x>`` or ``FAILED ...`` for one model."""
    if rec["status"] == "error":
        what = "bad input" if rec["exit_code"] == EXIT_BAD_INPUT else "error"
        return f"FAILED {what}: {rec['message']}"
    counts = f"{rec['folded']} folded, {rec['kept']} kept"
    v = rec.get("verification") or {}
    vstat = rec["verification_status"]
    word = "PASSED" if rec["exit_code"] == EXIT_OK else "FAILED"
    if vstat == "passed":
        tail = f"max abs err {fmt_err(v.get('max_abs_err'))}"
    elif vstat == "unchanged":
        tail = "nothing to fold, model unchanged"
    elif vstat == "failed":
        bad = [o for o in v.get("outputs", []) if not o["passed"]]
        if bad:
            worst = max(bad, key=lambda o: float("inf") if o["max_abs_err"] is None else o["max_abs_err"])
            tail = (
                f"max abs err {fmt_err(worst['max_abs_err'])} > tolerance "
                f"{fmt_err(worst['atol'])} + {fmt_err(worst['rtol'])}*|ref| (output {worst['name']})"
            )
        else:
            tail = rec["message"]
        tail += ", written anyway (--force)" if rec["written"] else ", not written"
    else:  # unverifiable / skipped
        tail = (
            rec["message"]
            if rec["message"].startswith("not verified")
            else f"not verified: {v.get('message', '')}"
        )
    if rec["exit_code"] == EXIT_FAILED and vstat != "failed":
        tail = rec["message"]
    return f"{word} {counts}, {tail}"


def overall_final_line(records: list[dict[str, Any]]) -> str:
    n = len(records)
    bad = [r for r in records if r["exit_code"] != EXIT_OK]
    folded = sum(r["folded"] for r in records)
    kept = sum(r["kept"] for r in records)
    errs = [
        (r["verification"] or {}).get("max_abs_err")
        for r in records
        if r.get("verification_status") in ("passed", "failed")
    ]
    text = f"{folded} folded, {kept} kept"
    if errs:
        worst = max((float("inf") if e is None else e) for e in errs)
        text += f", max abs err {fmt_err(None if worst == float('inf') else worst)}"
    unverified = sum(1 for r in records if r.get("verification_status") in ("unverifiable", "skipped"))
    if unverified:
        text += f", {unverified} not verified"
    if bad:
        return f"FAILED {len(bad)} of {n} models: {text}"
    return f"PASSED {n} models: {text}"


def summary_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    errs = [
        (r["verification"] or {}).get("max_abs_err")
        for r in records
        if r.get("verification_status") in ("passed", "failed")
    ]
    worst: float | None = None
    if errs:
        w = max((float("inf") if e is None else e) for e in errs)
        worst = None if w == float("inf") else w
    return {
        "models": len(records),
        "passed": sum(1 for r in records if r["status"] == "passed"),
        "failed": sum(1 for r in records if r["status"] == "failed"),
        "errors": sum(1 for r in records if r["status"] == "error"),
        "folded": sum(r["folded"] for r in records),
        "kept": sum(r["kept"] for r in records),
        "not_verified": sum(
            1 for r in records if r.get("verification_status") in ("unverifiable", "skipped")
        ),
        "written": sum(1 for r in records if r["written"]),
        "max_abs_err": worst,
    }


# ------------------------------------------------------------------------------------------------
# Output channels


class Console:
    """Where human text goes: stdout, or stderr when ``--json -`` owns stdout; nothing if quiet."""

    def __init__(self, quiet: bool = False, json_stdout: bool = False) -> None:
        self.quiet = quiet
        self.json_stdout = json_stdout
        self.progress: _Progress | None = None

    @property
    def out(self) -> TextIO:
        return sys.stderr if self.json_stdout else sys.stdout

    def _color(self, stream: TextIO) -> bool:
        return _isatty(stream) and not os.environ.get("NO_COLOR")

    def _emit(self, stream: TextIO, text: str) -> None:
        if self.progress is not None:
            self.progress.clear()
        stream.write(text + "\n")
        stream.flush()
        if self.progress is not None:
            self.progress.draw()

    def lines(self, lines: list[str]) -> None:
        """Body text: suppressed by --quiet. Names from a model cannot break lines or send
        terminal escapes: control characters are escaped."""
        if not self.quiet and lines:
            self._emit(self.out, "\n".join(printable(line) for line in lines))

    def final(self, line: str) -> None:
        """The greppable PASSED/FAILED line: kept by --quiet unless --json - owns stdout."""
        if self.quiet and self.json_stdout:
            return
        line = printable(line)
        stream = self.out
        if self._color(stream):
            word, _, rest = line.partition(" ")
            color = {"PASSED": "green", "FAILED": "red"}.get(word)
            if color:
                line = _style(word, color, bold=True) + " " + rest
        self._emit(stream, line)

    def warn(self, text: str) -> None:
        if not self.quiet:
            self._emit(sys.stderr, f"bnfold: warning: {printable(text)}")

    def error(self, text: str) -> None:
        """One line on stderr, always (even with --quiet)."""
        self._emit(sys.stderr, f"bnfold: error: {printable(text)}")


_ANSI_COLORS = {"red": 31, "green": 32}


def _style(text: str, color: str, bold: bool = False) -> str:
    """``text`` in an ANSI colour (what typer.style wrote); callers check :meth:`Console._color`."""
    return f"\x1b[{_ANSI_COLORS[color]}m" + ("\x1b[1m" if bold else "") + text + "\x1b[0m"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Progress:
    """A one-line status on stderr, redrawn in place; only used when stderr is a terminal."""

    FRAMES = "|/-\\"

    def __init__(self, total: int, label: str) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.label = label
        self.step = ""
        self.start = time.perf_counter()
        self.frame = 0
        self.lock = threading.RLock()
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.width = 0

    def __enter__(self) -> _Progress:
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join()
        self.clear()

    def _spin(self) -> None:
        while not self.stop_event.wait(0.1):
            self.frame += 1
            self.draw()

    def set_step(self, step: str) -> None:
        self.step = step
        self.draw()

    def advance(self, failed: bool) -> None:
        self.done += 1
        self.failed += int(failed)
        self.draw()

    def text(self) -> str:
        elapsed = time.perf_counter() - self.start
        spin = self.FRAMES[self.frame % len(self.FRAMES)]
        if self.total > 1:
            n = 20
            filled = int(n * self.done / self.total)
            bar = "#" * filled + "-" * (n - filled)
            extra = f", {self.failed} failed" if self.failed else ""
            return f"{spin} [{bar}] {self.done}/{self.total} models{extra}  {elapsed:.1f} s"
        return f"{spin} {self.label}: {self.step or 'working'}... {elapsed:.1f} s"

    def draw(self) -> None:
        with self.lock:
            text = self.text()
            try:
                cols = os.get_terminal_size(sys.stderr.fileno()).columns
            except (OSError, ValueError, AttributeError):
                cols = 0
            cols = cols if cols >= 20 else 80  # a pty without a size reports 0
            text = text[: max(cols - 1, 10)]
            sys.stderr.write("\r" + text + " " * max(self.width - len(text), 0))
            sys.stderr.flush()
            self.width = len(text)

    def clear(self) -> None:
        with self.lock:
            if self.width:
                sys.stderr.write("\r" + " " * self.width + "\r")
                sys.stderr.flush()
                self.width = 0


@contextmanager
def _progress(console: Console, total: int, label: str) -> Iterator[_Progress | None]:
    if console.quiet or not _isatty(sys.stderr) or os.environ.get("CI"):
        yield None
        return
    with _Progress(total, label) as p:
        console.progress = p
        try:
            yield p
        finally:
            console.progress = None


@contextmanager
def _stdout_to_stderr(active: bool) -> Iterator[None]:
    """While processing with ``--json -``, send anything printed to stdout (by us, onnx or
    onnxruntime, at the file-descriptor level too) to stderr, so stdout carries only the JSON."""
    if not active:
        yield
        return
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        fd = -1
    if fd != 1 or sys.__stdout__ is None or sys.stdout is not sys.__stdout__:
        from contextlib import redirect_stdout

        with redirect_stdout(sys.stderr):
            yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _write_json(doc: dict[str, Any], target: str | None, console: Console) -> None:
    if target is None:
        return
    from .verification import jsonable

    text = json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from .storage.atomic import write_atomic

        write_atomic(text, target)


def _check_report_path(value: str | None, option: str) -> None:
    if value is None or value == "-":
        return
    p = Path(value)
    if p.is_dir():
        raise UsageProblem(f"{option} {value}: is a folder")
    _check_writable_folder(p.parent if str(p.parent) else Path("."), f"{option} {value}")


def _check_report_clash(reports: list[str | None], models: list[Path]) -> None:
    """A report path must not be a model the run reads or writes."""
    for report in reports:
        if report is None or report == "-":
            continue
        for model in models:
            if _same_file(Path(report), Path(model)):
                raise UsageProblem(f"{report}: the report would overwrite the model {model}")


# ------------------------------------------------------------------------------------------------
# JUnit XML and GitHub step summary


def _junit_case(parent: Any, classname: str, name: str, seconds: float) -> Any:
    import xml.etree.ElementTree as ET

    return ET.SubElement(parent, "testcase", classname=classname, name=name, time=f"{seconds:.3f}")


def _output_failure_text(o: dict[str, Any]) -> str:
    return (
        f"output {o['name']} ({o['dtype']}, {_shape(o['shape'])}): max abs err {fmt_err(o['max_abs_err'])}, "
        f"max rel err {fmt_err(o['max_rel_err'])}, tolerance atol {fmt_err(o['atol'])} + rtol "
        f"{fmt_err(o['rtol'])}*|ref|, {o['mismatches']} elements outside; passes with atol >= "
        f"{fmt_err(o['min_atol'])} or rtol >= {fmt_err(o['min_rtol'])}"
    )


def _junit_verification(suite: Any, classname: str, v: dict[str, Any] | None, vstat: str | None) -> None:
    import xml.etree.ElementTree as ET

    if v is None or not v.get("outputs"):
        return
    for o in v["outputs"]:
        case = _junit_case(suite, classname, f"output {o['name']}", 0.0)
        if not o["passed"]:
            text = _output_failure_text(o)
            ET.SubElement(case, "failure", message=text, type="VerificationFailed").text = text


def junit_xml(suite_name: str, cases: list[tuple[str, dict[str, Any]]], kind: str) -> str:
    """JUnit XML with one testcase per model (or comparison) and one per compared output."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites")
    suite = ET.SubElement(root, "testsuite", name=suite_name)
    for classname, rec in cases:
        case = _junit_case(suite, classname, kind, rec.get("seconds") or 0.0)
        status, msg = rec["status"], rec.get("message") or ""
        if status == "error":
            ET.SubElement(
                case, "error", message=msg, type="BadInput" if rec["exit_code"] == 2 else "Error"
            ).text = msg
        elif status == "failed":
            ET.SubElement(case, "failure", message=msg, type="Failed").text = msg
        elif rec.get("verification_status") in ("unverifiable", "skipped"):
            ET.SubElement(case, "skipped", message=msg)
        _junit_verification(suite, classname, rec.get("verification"), rec.get("verification_status"))
    cases_el = suite.findall("testcase")
    suite.set("tests", str(len(cases_el)))
    suite.set("failures", str(sum(1 for c in cases_el if c.find("failure") is not None)))
    suite.set("errors", str(sum(1 for c in cases_el if c.find("error") is not None)))
    suite.set("skipped", str(sum(1 for c in cases_el if c.find("skipped") is not None)))
    suite.set("time", f"{sum(float(c.get('time', 0)) for c in cases_el):.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def github_summary_fold(records: list[dict[str, Any]], final: str) -> str:
    icon = "✅" if final.startswith("PASSED") else "❌"
    lines = [
        f"### {icon} bnfold: {_md(final)}",
        "",
        "| model | result | folded | kept | nodes | max abs err | output |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        res = {"passed": "✅ passed", "failed": "❌ failed", "error": "❌ error"}[r["status"]]
        if r["status"] == "passed" and r.get("verification_status") in ("unverifiable", "skipped"):
            res = "⚠️ passed, not verified"
        nodes = f"{r['nodes_before']} → {r['nodes_after']}" if r["nodes_before"] is not None else ""
        v = r.get("verification") or {}
        err = fmt_err(v.get("max_abs_err")) if r.get("verification_status") in ("passed", "failed") else ""
        out = f"`{_md(r['output'])}`" if r["written"] else "not written"
        lines.append(
            f"| `{_md(r['input'])}` | {res} | {r['folded']} | {r['kept']} | {nodes} | {err} | {out} |"
        )
    problems = [
        r
        for r in records
        if r["message"] and r["status"] != "passed" or r.get("verification_status") == "unverifiable"
    ]
    if problems:
        lines.append("")
        for r in problems:
            lines.append(f"- `{_md(r['input'])}`: {_md(r['message'])}")
    return "\n".join(lines) + "\n\n"


def github_summary_verify(rec: dict[str, Any], final: str) -> str:
    icon = "✅" if final.startswith("PASSED") else "❌"
    lines = [
        f"### {icon} bnfold verify: {_md(final)}",
        "",
        f"`{_md(rec['reference'])}` vs `{_md(rec['candidate'])}`",
        "",
    ]
    v = rec.get("verification") or {}
    if v.get("outputs"):
        lines += [
            "| output | dtype | max abs err | max rel err | atol | rtol | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for o in v["outputs"]:
            lines.append(
                f"| `{_md(o['name'])}` | {o['dtype']} | {fmt_err(o['max_abs_err'])} | {fmt_err(o['max_rel_err'])} "
                f"| {fmt_err(o['atol'])} | {fmt_err(o['rtol'])} | {'✅' if o['passed'] else '❌'} |"
            )
    return "\n".join(lines) + "\n\n"


def _append_github_summary(text: str, console: Console) -> None:
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        console.warn(f"cannot append to GITHUB_STEP_SUMMARY {path}: {exc.strerror or exc}")


def _write_reports(
    doc: dict[str, Any], json_path: str | None, junit_path: str | None, junit_text: Any, console: Console
) -> int:
    """Write --json and --junit-xml; returns EXIT_BAD_INPUT if one cannot be written."""
    from .errors import BadInput

    code = EXIT_OK
    try:
        _write_json(doc, json_path, console)
    except BadInput as exc:
        console.error(f"--json: {exc}")
        code = EXIT_BAD_INPUT
    if junit_path is not None:
        try:
            from .storage.atomic import write_atomic

            write_atomic(junit_text(), junit_path)
        except BadInput as exc:
            console.error(f"--junit-xml: {exc}")
            code = EXIT_BAD_INPUT
    return code


# ------------------------------------------------------------------------------------------------
# Running several models in worker processes


def _worker_loop(conn: Any, process: Any = None) -> None:  # pragma: no cover - runs in a child process
    """A worker process: receive a FoldJob, send back its record, until it receives None."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us

    def _terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds, so a half-written temp file is removed

    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.stdout.flush()
        os.dup2(2, 1)  # stdout may carry --json -: keep anything a library prints off it
    except OSError:
        pass
    process = process or process_model
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        conn.send(process(job))


def run_parallel(
    jobs: list[FoldJob], workers: int, on_done: Any, on_tick: Any = None, target: Any = None
) -> list[dict[str, Any]]:
    """Process ``jobs`` in at most ``workers`` worker processes (spawned, each reused for
    several jobs) and return their records in job order.

    A worker that dies (a crash inside onnxruntime, out of memory) yields an error record for the
    model it was processing and is replaced; the other models go on. ``on_done(index, record)`` is
    called as each finishes; ``target(connection)`` is the worker function (a test hook; default
    :func:`_worker_loop`).
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    pending = list(range(len(jobs)))
    records: list[dict[str, Any] | None] = [None] * len(jobs)
    active: dict[Any, tuple[Any, int]] = {}  # connection -> (process, job index)

    def finish(idx: int, rec: dict[str, Any]) -> None:
        records[idx] = rec
        on_done(idx, rec)

    def crashed(idx: int, proc: Any) -> dict[str, Any]:
        proc.join(5)
        rec = _empty_record(jobs[idx])
        rec["message"] = f"internal error: the worker process died (exit code {proc.exitcode})"
        return rec

    def start() -> tuple[Any, Any]:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target or _worker_loop, args=(child,), daemon=True, name="bnfold-worker")
        proc.start()
        child.close()
        return parent, proc

    def assign(conn: Any, proc: Any) -> None:
        while pending:
            idx = pending.pop(0)
            try:
                conn.send(jobs[idx])
            except (OSError, EOFError):
                conn.close()
                finish(idx, crashed(idx, proc))
                conn, proc = start()
                continue
            active[conn] = (proc, idx)
            return
        try:
            conn.send(None)  # no more work: let it exit
        except (OSError, EOFError):
            pass
        conn.close()
        proc.join(5)

    try:
        for _ in range(min(workers, len(jobs))):
            assign(*start())
        while active:
            for conn in wait(list(active), timeout=0.25):
                proc, idx = active.pop(conn)  # type: ignore[index]
                try:
                    rec = conn.recv()
                except (EOFError, OSError):
                    conn.close()
                    finish(idx, crashed(idx, proc))
                    if pending:
                        assign(*start())
                    continue
                finish(idx, rec)
                assign(conn, proc)
            if on_tick is not None:
                on_tick()
    except BaseException:
        for proc, _idx in active.values():
            proc.terminate()
        for proc, _idx in active.values():
            proc.join(5)
        raise
    return [r for r in records if r is not None]


# ------------------------------------------------------------------------------------------------
# The command line (argparse: standard library, starts in about a millisecond)
#
# ``bnfold MODEL...`` means ``bnfold fold MODEL...``; ``run`` dispatches on the first argument and
# builds only that command's parser. Usage errors are one line on stderr and exit 2.

COMMANDS = ("fold", "verify", "inspect")

ROOT_USAGE = "bnfold [OPTIONS] MODEL.onnx... | COMMAND [ARGS]..."

ROOT_DESCRIPTION = """\
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

ROOT_COMMANDS = (
    ("fold", "Fold every foldable BatchNormalization of each MODEL, verify, write it."),
    ("verify", "Compare two models in onnxruntime (optimizations off): a CI gate."),
    ("inspect", "List every BatchNormalization: what it follows, whether it can fold."),
)

HELP_HELP = "Show this message and exit."


class _CommandLineError(UsageProblem):
    """A usage error found by the parser (unknown option, missing argument, bad value)."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Exit(Exception):
    """--help / --version: stop here with this exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _help_width() -> int:
    """Text width of --help, as click had it: the terminal's (80 when not a terminal), at most 100."""
    try:
        cols = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        try:
            cols = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            cols = 80
    return max(min(cols, 100) - 2, 50)


def _fill(text: str, width: int) -> str:
    """Paragraphs wrapped to ``width`` and indented by two; a paragraph that starts with a line
    ``\\b`` is kept as written (click's convention)."""
    import textwrap

    out = []
    for para in text.strip("\n").split("\n\n"):
        if para.startswith("\b\n"):
            out.append("\n".join("  " + line for line in para.splitlines()[1:]))
        else:
            out.append(
                textwrap.fill(" ".join(para.split()), width - 2, initial_indent="  ", subsequent_indent="  ")
            )
    return "\n\n".join(out)


class _HelpFormatter(argparse.HelpFormatter):
    """click's layout: ``Usage: ...``, an indented description, ``-o, --output PATH``."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=_help_width())

    def add_usage(self, usage: Any, actions: Any, groups: Any, prefix: str | None = None) -> None:
        super().add_usage(usage, actions, groups, "Usage: ")

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return _fill(text, width)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        text = ", ".join(action.option_strings)
        return f"{text} {action.metavar}" if action.nargs != 0 else text


class _HelpAction(argparse.Action):
    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None
    ) -> None:
        sys.stdout.write(parser.format_help())
        sys.stdout.flush()
        raise _Exit(EXIT_OK)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are exceptions (one line, exit 2), not a usage dump."""

    def __init__(self, command: str, usage: str, description: str) -> None:
        super().__init__(
            prog=f"bnfold {command}",
            usage=usage,
            description=description,
            add_help=False,
            allow_abbrev=False,
            formatter_class=_HelpFormatter,
        )
        self.arguments = self.add_argument_group("Arguments")
        self.options = self.add_argument_group("Options")
        self.required_positionals: list[tuple[str, str]] = []

    def error(self, message: str) -> NoReturn:
        raise _CommandLineError(_parser_message(message), self.prog)

    def add_positional(self, dest: str, metavar: str, help: str, many: bool = False) -> None:
        """A required positional argument, checked after the options so that an unknown option is
        reported as such, not as a missing model."""
        self.arguments.add_argument(
            dest, nargs="*" if many else "?", type=Path, metavar=metavar, help=f"{help}  [required]"
        )
        self.required_positionals.append((dest, metavar))

    def parse(self, args: list[str]) -> dict[str, Any]:
        namespace, extras = self.parse_known_intermixed_args(args)
        if extras:
            raise _CommandLineError(self._extra_message(extras), self.prog)
        values = vars(namespace)
        for dest, metavar in self.required_positionals:
            if values.get(dest) in (None, []):
                raise _CommandLineError(f"missing argument {metavar}", self.prog)
        return values

    def _extra_message(self, extras: list[str]) -> str:
        first = extras[0]
        if first.startswith("-") and first != "-":
            import difflib

            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            close = difflib.get_close_matches(first.partition("=")[0], known, n=1, cutoff=0.75)
            return f"no such option: {first}" + (f" (did you mean {close[0]}?)" if close else "")
        return f"unexpected extra argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}"


def _parser_message(message: str) -> str:
    """argparse's ``argument --runs: ...`` reads ``--runs: ...``."""
    if message.startswith("argument "):
        what, sep, rest = message[len("argument ") :].partition(": ")
        if sep:
            return f"{what.replace('/', ', ')}: {rest}"
    return message


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


# Help texts of the options shared by fold and verify (the same names and meaning in both).
def _add_check_options(opts: Any) -> None:
    opts.add_argument(
        "--atol",
        type=_number,
        metavar="<float>",
        help="Absolute tolerance [default: 1e-4 x max|ref| for float32, per dtype].",
    )
    opts.add_argument(
        "--rtol",
        type=_number,
        metavar="<float>",
        help="Relative tolerance [default: 1e-4 for float32, per dtype].",
    )
    opts.add_argument(
        "--seed", type=_integer, default=0, metavar="<int>", help="Seed of the random inputs.  [default: 0]"
    )
    opts.add_argument(
        "--runs",
        type=_integer,
        default=1,
        metavar="N",
        help="Number of random input sets; the worst is reported.  [default: 1]",
    )
    opts.add_argument(
        "--shape", action="append", metavar="NAME=1x3x224x224", help="Shape of a graph input (repeatable)."
    )
    opts.add_argument(
        "--dim",
        action="append",
        metavar="NAME=VALUE",
        help="Value of a symbolic dimension (repeatable); unset ones are assumed (1 for axis 0, else 32) and reported.",
    )
    opts.add_argument(
        "--inputs",
        type=Path,
        metavar="FILE.npz",
        help="Arrays to feed, by input name (numpy.savez); the others are random.",
    )
    opts.add_argument(
        "--provider",
        default="CPUExecutionProvider",
        metavar="<str>",
        help="onnxruntime execution provider (full name, or cpu/cuda/tensorrt/...).  [default: CPUExecutionProvider]",
    )


_JSON_HELP = "Write the full report as JSON to PATH, or to stdout with '-' (human text then goes to stderr)."
_JUNIT_HELP = "Write JUnit XML: one testcase per model and per output."


def _add_output_options(opts: Any, junit: bool) -> None:
    opts.add_argument("--json", dest="json_out", metavar="PATH|-", help=_JSON_HELP)
    if junit:
        opts.add_argument("--junit-xml", dest="junit_xml_path", metavar="PATH", help=_JUNIT_HELP)


def _add_verbosity_options(opts: Any) -> None:
    opts.add_argument(
        "-q", "--quiet", action="store_true", help="Print only the final PASSED/FAILED line and errors."
    )
    opts.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"Show every row of long tables (default: at most {MAX_ROWS}).",
    )
    opts.add_argument("-h", "--help", action=_HelpAction, nargs=0, default=argparse.SUPPRESS, help=HELP_HELP)


def _fold_parser() -> _Parser:
    p = _Parser("fold", "bnfold fold [OPTIONS] MODEL.onnx...", fold_command.__doc__ or "")
    p.add_positional("models", "MODEL.onnx", "ONNX models to fold.", many=True)
    o = p.options
    o.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="PATH",
        help="Output path (one model only) [default: <stem>.folded.onnx next to the input].",
    )
    o.add_argument(
        "--output-dir", type=Path, metavar="DIR", help="Write <stem>.folded.onnx files into DIR (must exist)."
    )
    o.add_argument("--in-place", action="store_true", help="Overwrite each input model (atomically).")
    o.add_argument(
        "--no-verify", action="store_true", help="Do not run onnxruntime; the final line says 'not verified'."
    )
    _add_check_options(o)
    o.add_argument("--dry-run", action="store_true", help="Fold and verify, report, write nothing.")
    o.add_argument(
        "--force",
        action="store_true",
        help="Write the model even if verification failed (exit code stays 1).",
    )
    o.add_argument(
        "--strict",
        action="store_true",
        help="Exit 1 if a BN after Conv/ConvTranspose/Gemm/MatMul was kept, or the fold could not be verified.",
    )
    o.add_argument(
        "--bn-to-affine",
        action="store_true",
        help="Rewrite BNs that cannot be folded as Mul + Add with precomputed constants (for runtimes without BatchNormalization).",
    )
    _add_output_options(o, junit=True)
    o.add_argument(
        "-j",
        "--jobs",
        type=_integer,
        metavar="N",
        help="Worker processes for several models [default: one per CPU, at most one per model].",
    )
    _add_verbosity_options(o)
    return p


def _verify_parser() -> _Parser:
    p = _Parser(
        "verify", "bnfold verify [OPTIONS] REFERENCE.onnx CANDIDATE.onnx", verify_command.__doc__ or ""
    )
    p.add_positional("reference", "REFERENCE.onnx", "The original model.")
    p.add_positional("candidate", "CANDIDATE.onnx", "The model to check (e.g. folded by any tool).")
    _add_check_options(p.options)
    _add_output_options(p.options, junit=True)
    _add_verbosity_options(p.options)
    return p


def _inspect_parser() -> _Parser:
    p = _Parser("inspect", "bnfold inspect [OPTIONS] MODEL.onnx...", inspect_command.__doc__ or "")
    p.add_positional("models", "MODEL.onnx", "ONNX models to inspect.", many=True)
    p.options.add_argument(
        "--strict",
        action="store_true",
        help="Exit 1 if a BN after Conv/ConvTranspose/Gemm/MatMul cannot be folded.",
    )
    _add_output_options(p.options, junit=False)
    _add_verbosity_options(p.options)
    return p


def root_help() -> str:
    """``bnfold --help``: the commands and the exit codes."""
    width = _help_width()
    lines = [f"Usage: {ROOT_USAGE}", "", _fill(ROOT_DESCRIPTION, width), "", "Options:"]
    lines += ["  --version   Print the version and exit.", f"  -h, --help  {HELP_HELP}", "", "Commands:"]
    lines += [f"  {name:<8} {text}" for name, text in ROOT_COMMANDS]
    return "\n".join(lines) + "\n"


def _dispatch(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write(root_help())
        return EXIT_BAD_INPUT
    first = argv[0]
    if first in ("-h", "--help"):
        sys.stdout.write(root_help())
        return EXIT_OK
    if first == "--version":
        sys.stdout.write(f"bnfold {_version()}\n")
        return EXIT_OK
    command, args = (first, argv[1:]) if first in COMMANDS else ("fold", argv)
    parser, function = {
        "fold": (_fold_parser, fold_command),
        "verify": (_verify_parser, verify_command),
        "inspect": (_inspect_parser, inspect_command),
    }[command]
    return function(**parser().parse(args))


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return its exit code.

    Errors do not propagate: each becomes one line on stderr and its exit code (2 usage or bad
    input, 3 internal error, 130 interrupted). ``main`` is this plus ``sys.exit``; tests call it
    in-process.
    """
    from .errors import BadInput

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(_dispatch(args) or EXIT_OK)
    except _Exit as exc:
        return exc.code
    except _CommandLineError as exc:
        sys.stderr.write(f"bnfold: error: {printable(str(exc))} (see '{exc.prog} --help')\n")
        return EXIT_BAD_INPUT
    except (UsageProblem, BadInput) as exc:
        sys.stderr.write(f"bnfold: error: {printable(flag_message(exc, FLAGS))}\n")
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


def fold_command(
    models: list[Path],
    output: Path | None = None,
    output_dir: Path | None = None,
    in_place: bool = False,
    no_verify: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    runs: int = 1,
    shape: list[str] | None = None,
    dim: list[str] | None = None,
    inputs: Path | None = None,
    provider: str = "CPUExecutionProvider",
    dry_run: bool = False,
    force: bool = False,
    strict: bool = False,
    bn_to_affine: bool = False,
    json_out: str | None = None,
    junit_xml_path: str | None = None,
    jobs: int | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> int:
    """Fold every foldable BatchNormalization of each MODEL, verify, and write MODEL's
    <stem>.folded.onnx (or -o PATH / --output-dir DIR). A fold that fails verification is not
    written (exit 1) unless --force. Writes are atomic: a temporary file in the target folder, then
    a rename; the input is never overwritten unless --in-place.
    """
    console = Console(quiet=quiet, json_stdout=json_out == "-")
    if jobs is not None and jobs < 1:
        raise UsageProblem(f"--jobs must be at least 1, got {jobs}")
    _check_report_path(json_out, "--json")
    _check_report_path(junit_xml_path, "--junit-xml")
    if junit_xml_path == "-":
        raise UsageProblem("--junit-xml needs a file path")
    check = _check_options(not no_verify, atol, rtol, seed, runs, shape, dim, inputs, provider)
    targets = plan_outputs(models, output, output_dir, in_place, dry_run)
    _check_report_clash([json_out, junit_xml_path], [*models, *targets])
    n_workers = min(jobs or (os.cpu_count() or 1), len(models))
    if n_workers > 1:
        threads = max(1, (os.cpu_count() or 1) // n_workers)
        check = CheckOptions(**{**asdict(check), "threads": threads})
    fold_jobs = [
        FoldJob(
            str(m),
            str(t),
            check,
            dry_run=dry_run,
            force=force,
            strict=strict,
            in_place=in_place,
            bn_to_affine=bn_to_affine,
        )
        for m, t in zip(models, targets)
    ]
    start = time.perf_counter()
    records = _run_jobs(fold_jobs, n_workers, console, verbose)
    final = model_final_line(records[0]) if len(records) == 1 else overall_final_line(records)
    code = max(r["exit_code"] for r in records)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "tool": "bnfold",
        "version": _version(),
        "command": "fold",
        "exit_code": code,
        "status": _status_of(code),
        "final_line": final,
        "seconds": time.perf_counter() - start,
        "summary": summary_of(records),
        "models": records,
    }
    report_code = _write_reports(
        doc,
        json_out,
        junit_xml_path,
        lambda: junit_xml("bnfold fold", [(r["input"], r) for r in records], "fold"),
        console,
    )
    _append_github_summary(github_summary_fold(records, final), console)
    if not (len(records) == 1 and records[0]["exit_code"] == EXIT_BAD_INPUT):
        console.final(final)
    return max(code, report_code)


def _status_of(code: int) -> str:
    return {EXIT_OK: "passed", EXIT_FAILED: "failed"}.get(code, "error")


def _run_jobs(jobs: list[FoldJob], workers: int, console: Console, verbose: bool) -> list[dict[str, Any]]:
    multi = len(jobs) > 1

    def show(rec: dict[str, Any]) -> None:
        if rec["status"] == "error":
            console.error(_about(rec))
            if rec.get("traceback"):
                sys.stderr.write(rec["traceback"])
            if multi:
                console.lines(
                    [
                        f"{rec['input']}: FAILED {'bad input' if rec['exit_code'] == EXIT_BAD_INPUT else 'error'}",
                        "",
                    ]
                )
            return
        for w in rec["warnings"]:
            console.warn(f"{rec['input']}: {w}")
        lines = model_lines(rec, verbose)
        if multi:
            lines += [f"{rec['input']}: {model_final_line(rec)}", ""]
        console.lines(lines)

    with (
        _stdout_to_stderr(console.json_stdout),
        _progress(console, len(jobs), Path(jobs[0].input).name) as bar,
    ):
        if workers <= 1:
            records = []
            for job in jobs:
                step = (lambda name, p=bar: p.set_step(name)) if bar is not None else None
                if bar is not None:
                    bar.label = Path(job.input).name
                rec = process_model(job, step)
                records.append(rec)
                if bar is not None:
                    bar.advance(rec["exit_code"] != EXIT_OK)
                show(rec)
            return records
        done: dict[int, dict[str, Any]] = {}
        shown = 0

        def on_done(idx: int, rec: dict[str, Any]) -> None:
            nonlocal shown
            done[idx] = rec
            if bar is not None:
                bar.advance(rec["exit_code"] != EXIT_OK)
            while shown in done:  # print in input order, as soon as possible
                show(done[shown])
                shown += 1

        return run_parallel(jobs, workers, on_done)


def verify_command(
    reference: Path,
    candidate: Path,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    runs: int = 1,
    shape: list[str] | None = None,
    dim: list[str] | None = None,
    inputs: Path | None = None,
    provider: str = "CPUExecutionProvider",
    json_out: str | None = None,
    junit_xml_path: str | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> int:
    """Run REFERENCE and CANDIDATE in onnxruntime (optimizations off) on the same seeded inputs
    and compare every output. Exit 0 if all match within tolerance, 1 if not (or onnxruntime
    cannot run the reference, so nothing was proven), 2 for bad input.
    """
    console = Console(quiet=quiet, json_stdout=json_out == "-")
    _check_report_path(json_out, "--json")
    _check_report_path(junit_xml_path, "--junit-xml")
    _check_report_clash([json_out, junit_xml_path], [reference, candidate])
    check = _check_options(True, atol, rtol, seed, runs, shape, dim, inputs, provider)
    from .errors import BadInput

    start = time.perf_counter()
    rec: dict[str, Any] = {
        "reference": str(reference),
        "candidate": str(candidate),
        "status": "error",
        "exit_code": EXIT_BAD_INPUT,
        "message": "",
        "verification_status": None,
        "verification": None,
    }
    with _stdout_to_stderr(console.json_stdout), _progress(console, 1, candidate.name) as bar:
        if bar is not None:
            bar.set_step("verifying")
        try:
            from .verification import jsonable, verify_models

            ver = verify_models(str(reference), str(candidate), check.verify_options())
        except BadInput as exc:
            rec["message"] = flag_message(exc, FLAGS)
            ver = None
    if ver is not None:
        rec["verification"] = jsonable(ver.to_dict())
        if ver.status == "passed":
            rec.update(status="passed", exit_code=EXIT_OK, verification_status="passed")
        elif ver.status == "error":
            rec.update(
                status="failed",
                exit_code=EXIT_FAILED,
                verification_status="unverifiable",
                message=f"not verified: {ver.message}",
            )
        else:
            rec.update(
                status="failed", exit_code=EXIT_FAILED, verification_status="failed", message=ver.message
            )
    rec["seconds"] = time.perf_counter() - start
    final = verify_final_line(rec)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "tool": "bnfold",
        "version": _version(),
        "command": "verify",
        "exit_code": rec["exit_code"],
        "status": rec["status"],
        "final_line": final,
        "seconds": rec["seconds"],
        **rec,
    }
    if rec["status"] == "error":
        console.error(rec["message"])
    else:
        lines = [f"{reference} vs {candidate}"]
        if rec["verification"] is not None:
            lines += verification_lines(rec["verification"], verbose)
        lines.append(f"  time: {fmt_seconds(rec['seconds'])}")
        console.lines(lines)
    report_code = _write_reports(
        doc,
        json_out,
        junit_xml_path,
        lambda: junit_xml("bnfold verify", [(f"{reference} vs {candidate}", rec)], "verify"),
        console,
    )
    _append_github_summary(github_summary_verify(rec, final), console)
    if rec["status"] != "error":
        console.final(final)
    return max(rec["exit_code"], report_code)


def verify_final_line(rec: dict[str, Any]) -> str:
    if rec["status"] == "error":
        return f"FAILED bad input: {rec['message']}"
    v = rec["verification"] or {}
    outputs = v.get("outputs") or []
    if rec["verification_status"] == "passed":
        return (
            f"PASSED {len(outputs)}/{len(outputs)} outputs match, max abs err {fmt_err(v.get('max_abs_err'))}"
        )
    if rec["verification_status"] == "unverifiable":
        return f"FAILED {rec['message']}"
    bad = [o for o in outputs if not o["passed"]]
    if not bad:
        return f"FAILED {rec['message']}"
    worst = max(bad, key=lambda o: float("inf") if o["max_abs_err"] is None else o["max_abs_err"])
    return (
        f"FAILED {len(bad)}/{len(outputs)} outputs differ, max abs err {fmt_err(worst['max_abs_err'])} > "
        f"tolerance {fmt_err(worst['atol'])} + {fmt_err(worst['rtol'])}*|ref| (output {worst['name']})"
    )


def inspect_command(
    models: list[Path],
    strict: bool = False,
    json_out: str | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> int:
    """List every BatchNormalization: what it follows, whether it can be folded, and why not.
    Writes nothing (the pass runs on an in-memory copy, without verification).
    """
    console = Console(quiet=quiet, json_stdout=json_out == "-")
    _check_report_path(json_out, "--json")
    _check_report_clash([json_out], list(models))
    start = time.perf_counter()
    records = []
    with _stdout_to_stderr(console.json_stdout):
        for model in models:
            rec = inspect_model(str(model), strict)
            records.append(rec)
            if rec["status"] == "error":
                console.error(rec["message"])
            else:
                console.lines(
                    inspect_lines(rec, verbose)
                    + ([f"{model}: {inspect_final_line(rec)}", ""] if len(models) > 1 else [])
                )
    code = max(r["exit_code"] for r in records)
    if len(records) == 1:
        final = inspect_final_line(records[0])
    else:
        bad = sum(1 for r in records if r["exit_code"])
        counts = f"{sum(r['foldable'] for r in records)} foldable, {sum(r['kept'] for r in records)} kept"
        final = (
            f"FAILED {bad} of {len(records)} models: {counts}"
            if bad
            else f"PASSED {len(records)} models: {counts}"
        )
    doc = {
        "schema_version": SCHEMA_VERSION,
        "tool": "bnfold",
        "version": _version(),
        "command": "inspect",
        "exit_code": code,
        "status": _status_of(code),
        "final_line": final,
        "seconds": time.perf_counter() - start,
        "models": records,
    }
    report_code = _write_reports(doc, json_out, None, None, console)
    if not (len(records) == 1 and records[0]["status"] == "error"):
        console.final(final)
    return max(code, report_code)


def inspect_model(path: str, strict: bool = False) -> dict[str, Any]:
    """Every BN of ``path`` in graph order with whether it can be folded (nothing is written)."""
    rec: dict[str, Any] = {
        "input": path,
        "status": "error",
        "exit_code": EXIT_BAD_INPUT,
        "message": "",
        "batchnorms": [],
        "foldable": 0,
        "kept": 0,
        "kept_after_linear": [],
        "nodes_before": None,
        "nodes_after": None,
    }
    from .errors import BadInput

    try:
        from .api import fold

        with _quiet_warnings():
            result = fold(path, verify=False)
    except BadInput as exc:
        rec["message"] = str(exc)
        return rec
    import onnx

    names = [p.bn for p in result.report.folded] + [s.bn for s in result.report.skipped]
    order = _walk_order(onnx.load(path, load_external_data=False), names) if names else {}
    entries = []
    for p in result.report.folded:
        entries.append(
            {
                "bn": p.bn,
                "graph": p.graph,
                "follows_op": p.kind,
                "follows": p.target,
                "foldable": True,
                "code": None,
                "pattern": p.pattern,
                "message": f"folds into {p.kind} {p.target} ({p.pattern})",
            }
        )
    for s in result.report.skipped:
        entries.append(
            {
                "bn": s.bn,
                "graph": s.graph,
                "follows_op": s.producer_op,
                "follows": s.producer,
                "foldable": False,
                "code": s.code,
                "pattern": None,
                "message": s.message,
            }
        )
    entries.sort(key=lambda e: order.get(e["bn"], len(order)))
    rec["batchnorms"] = entries
    rec["foldable"] = len(result.report.folded)
    rec["kept"] = len(result.report.skipped)
    rec["kept_after_linear"] = [
        e["bn"] for e in entries if not e["foldable"] and e["follows_op"] in LINEAR_OPS
    ]
    rec["nodes_before"] = result.report.nodes_before
    rec["nodes_after"] = result.report.nodes_after
    code = EXIT_FAILED if strict and rec["kept_after_linear"] else EXIT_OK
    rec["exit_code"], rec["status"] = code, _status_of(code)
    if code:
        rec["message"] = (
            f"--strict: {len(rec['kept_after_linear'])} BatchNormalization(s) after {'/'.join(LINEAR_OPS)} cannot be folded: {_names(rec['kept_after_linear'])}"
        )
    return rec


def _walk_order(model: Any, names: list[str]) -> dict[str, int]:
    """Position of each BN (named as in the report: node name, else first output) in a walk of
    the original graph, its subgraphs and its functions."""
    wanted = set(names)
    order: dict[str, int] = {}

    def visit(nodes: Any) -> None:
        for node in nodes:
            for key in (node.name, *node.output):
                if key in wanted and key not in order:
                    order[key] = len(order)
            for a in node.attribute:
                if a.type == a.GRAPH:
                    visit(a.g.node)
                elif a.type == a.GRAPHS:
                    for g in a.graphs:
                        visit(g.node)

    visit(model.graph.node)
    for f in model.functions:
        visit(f.node)
    for n in names:
        order.setdefault(n, len(order))
    return order


def inspect_lines(rec: dict[str, Any], verbose: bool = False) -> list[str]:
    n = len(rec["batchnorms"])
    lines = [
        f"{rec['input']}: {n} BatchNormalization{'s' if n != 1 else ''}, {rec['foldable']} foldable, {rec['kept']} kept"
    ]
    if n:
        rows = [["BN", "graph", "follows", "foldable", "pattern / reason"]]
        shown = rec["batchnorms"] if verbose or n <= MAX_ROWS else rec["batchnorms"][:MAX_ROWS]
        for e in shown:
            follows = f"{e['follows_op']} {e['follows']}" if e["follows_op"] else "-"
            reason = e.get("pattern") or "" if e["foldable"] else f"{e['code']}: {e['message']}"
            rows.append([e["bn"], e["graph"], follows, "yes" if e["foldable"] else "no", reason])
        lines += table(rows, "  ")
        if len(shown) < n:
            lines.append(f"  ... {n - len(shown)} more (--verbose or --json for all)")
    return lines


def inspect_final_line(rec: dict[str, Any]) -> str:
    if rec["status"] == "error":
        return f"FAILED bad input: {rec['message']}"
    counts = f"{rec['foldable']} foldable, {rec['kept']} kept"
    if rec["exit_code"]:
        return f"FAILED {counts}, {rec['message']}"
    return f"PASSED {counts}"


def _sigterm_as_interrupt() -> None:
    """Make SIGTERM (a cancelled CI job, ``kill``) unwind like Ctrl-C, so temporary files are
    removed and workers stopped, instead of killing the process on the spot."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def _handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, _handler)
    except (ValueError, OSError):  # pragma: no cover - not the main thread / not supported
        pass


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line and exit with the command's code (raises SystemExit)."""
    _sigterm_as_interrupt()
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


if __name__ == "__main__":  # pragma: no cover
    entry()
