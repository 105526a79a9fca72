"""Where each model and report is written, refused before any work when it would clobber an
input, collide with another output or land in a folder that cannot be written."""

from __future__ import annotations

import os
from pathlib import Path

from .exits import UsageProblem
from .options import check_writable_folder


def same_file(a: Path, b: Path) -> bool:
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


def _check_options(output: Path | None, output_dir: Path | None, in_place: bool, n_models: int) -> None:
    if output is not None and n_models > 1:
        raise UsageProblem("-o/--output takes one model; use --output-dir DIR for several")
    if output is not None and output_dir is not None:
        raise UsageProblem("give either -o/--output or --output-dir, not both")
    if in_place and (output is not None or output_dir is not None):
        raise UsageProblem("--in-place writes over each input; it cannot be combined with -o/--output-dir")
    if output_dir is not None:
        check_writable_folder(output_dir, "--output-dir")


def plan_outputs(
    models: list[Path], output: Path | None, output_dir: Path | None, in_place: bool, dry_run: bool
) -> list[Path]:
    """Where each model is written; UsageProblem for anything that would clobber or collide."""
    _check_options(output, output_dir, in_place, len(models))
    targets: list[Path] = []
    for model in models:
        if in_place:
            target = model.resolve() if model.exists() else model
        elif output is not None:
            target = output
        else:
            target = default_output(model, output_dir)
        if not in_place and same_file(target, model):
            raise UsageProblem(f"{target}: the output is the input model; pass --in-place to overwrite it")
        if target.is_dir():
            raise UsageProblem(f"{target}: the output path is a folder")
        if not dry_run and output_dir is None:
            check_writable_folder(target.parent if str(target.parent) else Path("."), str(target))
        targets.append(target)
    if not in_place:
        seen: dict[str, Path] = {}
        for model, target in zip(models, targets):
            key = str(target.resolve())
            if key in seen:
                raise UsageProblem(f"{seen[key]} and {model} would both be written to {target}")
            seen[key] = model
            for other in models:
                if same_file(target, other):
                    raise UsageProblem(f"{model} would be written to {target}, which is another input")
    elif len({str(t) for t in targets}) != len(targets):
        raise UsageProblem("the same model is given twice")
    return targets


def check_report_path(value: str | None, option: str) -> None:
    """``--json``/``--junit-xml PATH`` must be a file in a writable folder (``-`` is stdout)."""
    if value is None or value == "-":
        return
    p = Path(value)
    if p.is_dir():
        raise UsageProblem(f"{option} {value}: is a folder")
    check_writable_folder(p.parent if str(p.parent) else Path("."), f"{option} {value}")


def check_report_clash(reports: list[str | None], models: list[Path]) -> None:
    """A report path must not be a model the run reads or writes."""
    for report in reports:
        if report is None or report == "-":
            continue
        for model in models:
            if same_file(Path(report), Path(model)):
                raise UsageProblem(f"{report}: the report would overwrite the model {model}")
