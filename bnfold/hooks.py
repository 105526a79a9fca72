"""pre-commit hooks: ``bnfold-check`` and ``bnfold-fold`` (``.pre-commit-hooks.yaml``).

``bnfold-check FILE...`` folds each model in memory without verifying it and writes nothing; it
fails when a model still has a BatchNormalization bnfold would fold, printing the command that
folds it. ``bnfold-fold FILE...`` folds each model, verifies it in onnxruntime and replaces the
file (atomically) only when verification passed; a fold that fails or cannot run verification
is never written.

Exit codes (pre-commit's convention: a hook that changes files fails): 0 nothing to fold;
1 a model would fold (check), was folded, or its fold was not verified (fold); 2 bad input or
usage, one line per problem on stderr. With several files the largest code wins; every file is
processed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from . import BadInput, FoldResult, fold

__all__ = ["check_main", "fold_main"]

CLEAN, CHANGED, BAD_INPUT = 0, 1, 2


class _Usage(Exception):
    """A bad command line: exit 2 with one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


@dataclass
class _Options:
    files: list[str]
    bn_to_affine: bool = False
    verify: dict[str, Any] = field(default_factory=dict)  # fold()'s verification options


def _pair(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.rpartition("=")
    if not sep or not name or not value:
        raise _Usage(f"{what} wants NAME=VALUE, got {text!r}")
    return name, value


def _shape(text: str) -> tuple[str, list[int]]:
    name, value = _pair(text, "--shape")
    try:
        dims = [int(d) for d in value.lower().split("x")]
    except ValueError:
        raise _Usage(
            f"--shape {text!r}: the shape is positive integers joined by 'x', as 1x3x224x224"
        ) from None
    if any(d < 1 for d in dims):
        raise _Usage(f"--shape {text!r}: dimensions must be positive")
    return name, dims


def _dim(text: str) -> tuple[str, int]:
    name, value = _pair(text, "--dim")
    if not value.isdigit() or int(value) < 1:
        raise _Usage(f"--dim {text!r}: the value must be a positive integer")
    return name, int(value)


def _parse(prog: str, argv: Sequence[str], verifies: bool) -> _Options:
    parser = _Parser(prog=prog, description=(__doc__ or "").split("\n\n")[1])
    parser.add_argument("files", nargs="*", metavar="MODEL.onnx")
    parser.add_argument(
        "--bn-to-affine", action="store_true", help="also rewrite unfoldable BNs as Mul + Add"
    )
    if verifies:
        parser.add_argument("--shape", action="append", default=[], metavar="NAME=1x3x224x224")
        parser.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE")
        parser.add_argument("--atol", type=float)
        parser.add_argument("--rtol", type=float)
        parser.add_argument("--runs", type=int, default=1)
        parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    options = _Options(files=list(args.files), bn_to_affine=args.bn_to_affine)
    if verifies:
        options.verify = {
            "shapes": dict(_shape(s) for s in args.shape) or None,
            "dims": dict(_dim(d) for d in args.dim) or None,
            "atol": args.atol,
            "rtol": args.rtol,
            "runs": args.runs,
            "seed": args.seed,
        }
    return options


def _fold_command(path: str, bn_to_affine: bool) -> str:
    flags = " --bn-to-affine" if bn_to_affine else ""
    return f"bnfold {shlex.quote(path)} --in-place{flags}"


def _count(result: FoldResult) -> str:
    n = len(result.report.folded)
    return f"{n} BatchNormalization{'s' if n != 1 else ''}"


def _check_one(path: str, options: _Options) -> int:
    result = fold(path, verify=False, bn_to_affine=options.bn_to_affine)
    if not result.report.changed:
        return CLEAN
    print(f"{path}: {_count(result)} can be folded; fold with: {_fold_command(path, options.bn_to_affine)}")
    return CHANGED


def _fold_one(path: str, options: _Options) -> int:
    result = fold(path, verify=True, bn_to_affine=options.bn_to_affine, **options.verify)
    if not result.report.changed:
        return CLEAN
    verification = result.verification
    if verification is None or verification.status != "passed":
        why = verification.message if verification else "not verified"
        hint = ""
        if verification is not None and verification.status == "error":  # it could not run
            hint = f"; to accept an unverified fold: {_fold_command(path, options.bn_to_affine)} --no-verify"
        print(
            f"{path}: not written: the fold of {_count(result)} was not verified ({why}){hint}",
            file=sys.stderr,
        )
        return CHANGED
    result.save(path, force=True)  # (force: replace the input; verification passed, checked above)
    print(f"{path}: folded {_count(result)} in place (verified, max abs err {verification.max_abs_err:.2g})")
    return CHANGED


def _main(prog: str, argv: Sequence[str] | None, verifies: bool) -> int:
    try:
        options = _parse(prog, sys.argv[1:] if argv is None else argv, verifies)
    except _Usage as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return BAD_INPUT
    worst = CLEAN
    for path in options.files:
        try:
            code = (_fold_one if verifies else _check_one)(path, options)
        except BadInput as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            code = BAD_INPUT
        worst = max(worst, code)
    return worst


def check_main(argv: Sequence[str] | None = None) -> int:
    """``bnfold-check``: exit 1 when a model has a BN that bnfold would fold (writes nothing)."""
    return _main("bnfold-check", argv, verifies=False)


def fold_main(argv: Sequence[str] | None = None) -> int:
    """``bnfold-fold``: fold each model in place when its fold passes verification."""
    return _main("bnfold-fold", argv, verifies=True)
