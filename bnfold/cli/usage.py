"""The help layout and the one-line usage errors of the typer commands.

typer's arguments show their Python type in help and ``{NAME}`` in the usage line; these
commands show ``MODEL.onnx...`` as the product specifies. A usage error of the parser (typer's
click) becomes one line, ``<what>: <why> (see 'bnfold fold --help')``, never a boxed panel.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from typer._click.core import Context
from typer._click.exceptions import BadOptionUsage, BadParameter, MissingParameter, NoSuchOption, UsageError
from typer._click.formatting import HelpFormatter
from typer.core import TyperArgument, TyperCommand, TyperGroup

ROOT_USAGE = "[OPTIONS] MODEL.onnx... | COMMAND [ARGS]..."


def _argument_name(param: Any) -> str:
    name = str(param.metavar or param.name).strip("{}")
    return name + ("..." if param.nargs != 1 else "")


class Command(TyperCommand):
    """A command whose help lists ``ARGUMENT  help  [required]`` without type labels."""

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_argument_name(p) for p in self.get_params(ctx) if isinstance(p, TyperArgument)]

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        params = self.get_params(ctx)
        arguments = [
            (str(p.metavar or p.name), f"{p.help or ''}  [required]" if p.required else p.help or "")
            for p in params
            if isinstance(p, TyperArgument)
        ]
        options = [r for p in params if not isinstance(p, TyperArgument) and (r := p.get_help_record(ctx))]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class RootGroup(TyperGroup):
    """``bnfold``: the usage line says a model may come first (``fold`` is the default), and
    ``--version`` is answered by :func:`bnfold.cli.run` before the app is built (a typer
    option would cost pydantic on every run), so help lists it here."""

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        return [ROOT_USAGE]

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        rows = [("--version", "Print the version and exit.")]
        rows += [r for p in self.get_params(ctx) if (r := p.get_help_record(ctx))]
        with formatter.section("Options"):
            formatter.write_dl(rows)
        self.format_commands(ctx, formatter)


def _opts(param: Any) -> str:
    return ", ".join(param.opts) if getattr(param, "opts", None) else str(param.name)


def _param_of(params: list[Any], option: str) -> Any:
    for p in params:
        if option in getattr(p, "opts", []):
            return p
    return None


def _close_match(params: list[Any], option: str) -> str:
    known = [o for p in params for o in getattr(p, "opts", []) if o.startswith("--")]
    close = difflib.get_close_matches(option.partition("=")[0], known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _describe(exc: UsageError, params: list[Any], args: list[str]) -> str:
    if isinstance(exc, NoSuchOption):
        return f"no such option: {exc.option_name}{_close_match(params, exc.option_name)}"
    if isinstance(exc, MissingParameter) and exc.param is not None:
        if isinstance(exc.param, TyperArgument):
            return f"missing argument {str(exc.param.metavar or exc.param.name)}"
        return f"missing option {_opts(exc.param)}"
    if isinstance(exc, BadParameter) and exc.param is not None:
        return f"{_opts(exc.param)}: {exc.message}"
    if isinstance(exc, BadOptionUsage):
        param = _param_of(params, exc.option_name)
        what = _opts(param) if param is not None else exc.option_name
        if "requires an argument" in exc.message:
            return f"{what}: expected one argument"
        given = [a.partition("=")[2] for a in args if a.startswith(f"{exc.option_name}=")]
        if "does not take a value" in exc.message and given:
            return f"{what}: ignored explicit argument {given[0]!r}"
        return f"{what}: {exc.message[:1].lower()}{exc.message[1:].rstrip('.')}"
    extra = re.fullmatch(r"Got unexpected extra argument(?:s|\(s\))? \((.*)\)", exc.message)
    if extra:
        extras = extra.group(1)
        return f"unexpected extra argument{'s' if ' ' in extras else ''}: {extras}"
    return exc.message[:1].lower() + exc.message[1:].rstrip(".")


def usage_line(exc: UsageError, command: Any, prog: str, args: list[str]) -> str:
    """The one-line message of a parser error in ``command`` (``prog``: its name, e.g.
    ``bnfold fold``; ``args``: what it was given), naming the command's help."""
    params = list(command.params) if command is not None else []
    return f"{_describe(exc, params, args)} (see '{prog} --help')"
