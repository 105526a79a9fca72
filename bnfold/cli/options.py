"""The options fold and verify share (same names, same meaning) and how they become one
:class:`~bnfold.verification.options.VerifyOptions`.

Imported when the app is built, so ``--help`` pays for it: typer only, nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .exits import MAX_ROWS, UsageProblem

if TYPE_CHECKING:
    from bnfold.verification.options import VerifyOptions


def integer(text: str) -> int:
    """An option's integer value; the usage error reads ``--runs: 'x' is not an integer``."""
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an integer") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number") from None


MergeBranches = Annotated[
    bool,
    typer.Option(
        "--merge-branches",
        help="Merge the parallel conv / BN / identity branches of one input that an Add sums (RepVGG, MobileOne blocks) into one conv.",
    ),
]


Atol = Annotated[
    float | None,
    typer.Option(
        "--atol",
        metavar="<float>",
        parser=number,
        help="Absolute tolerance [default: 1e-4 x max|ref| for float32, per dtype].",
    ),
]
Rtol = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        metavar="<float>",
        parser=number,
        help="Relative tolerance [default: 1e-4 for float32, per dtype].",
    ),
]
Seed = Annotated[
    int, typer.Option("--seed", metavar="<int>", parser=integer, help="Seed of the random inputs.")
]
Runs = Annotated[
    int,
    typer.Option(
        "--runs", metavar="N", parser=integer, help="Number of random input sets; the worst is reported."
    ),
]
Shape = Annotated[
    list[str] | None,
    typer.Option("--shape", metavar="NAME=1x3x224x224", help="Shape of a graph input (repeatable)."),
]
Dim = Annotated[
    list[str] | None,
    typer.Option(
        "--dim",
        metavar="NAME=VALUE",
        help="Value of a symbolic dimension (repeatable); unset ones are assumed (1 for axis 0, else 32) and reported.",
    ),
]
InputsFile = Annotated[
    Path | None,
    typer.Option(
        "--inputs",
        metavar="FILE.npz",
        help="Arrays to feed, by input name (numpy.savez); the others are random.",
    ),
]
Provider = Annotated[
    str,
    typer.Option(
        "--provider",
        metavar="<str>",
        help="onnxruntime execution provider (full name, or cpu/cuda/tensorrt/...).",
    ),
]
JsonOut = Annotated[
    str | None,
    typer.Option(
        "--json",
        metavar="PATH|-",
        help="Write the full report as JSON to PATH, or to stdout with '-' (human text then goes to stderr).",
    ),
]
JunitOut = Annotated[
    str | None,
    typer.Option(
        "--junit-xml", metavar="PATH", help="Write JUnit XML: one testcase per model and per output."
    ),
]
Quiet = Annotated[
    bool, typer.Option("-q", "--quiet", help="Print only the final PASSED/FAILED line and errors.")
]
Verbose = Annotated[
    bool,
    typer.Option("-v", "--verbose", help=f"Show every row of long tables (default: at most {MAX_ROWS})."),
]


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


def verify_options(
    verify: bool,
    atol: float | None,
    rtol: float | None,
    seed: int,
    runs: int,
    shape: list[str] | None,
    dim: list[str] | None,
    inputs: Path | None,
    provider: str,
) -> VerifyOptions:
    """The flags as one VerifyOptions; UsageProblem for a bad value. The provider is checked
    (and its short name expanded) only when ``verify``."""
    if runs < 1:
        raise UsageProblem(f"--runs must be at least 1, got {runs}")
    for label, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (value >= 0 and value != float("inf")):
            raise UsageProblem(f"{label} must be a finite number >= 0, got {value}")
    if inputs is not None and not inputs.is_file():
        raise UsageProblem(f"--inputs {inputs}: no such file")
    from bnfold.errors import BadInput
    from bnfold.verification.options import VerifyOptions

    full_provider = provider
    if verify:
        from bnfold.verification import check_provider

        try:
            full_provider = check_provider(provider)
        except BadInput as exc:
            raise UsageProblem(f"--provider: {exc}") from None
    return VerifyOptions(
        inputs=str(inputs) if inputs is not None else None,
        shapes=parse_shapes(shape),
        dims=parse_dims(dim),
        seed=seed,
        runs=runs,
        atol=atol,
        rtol=rtol,
        provider=full_provider,
    )


def check_writable_folder(folder: Path, what: str) -> None:
    if not folder.exists():
        raise UsageProblem(f"{what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageProblem(f"{what}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageProblem(f"{what}: folder {folder} is not writable")
