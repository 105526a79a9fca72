"""The typer app: help, version, parsing, one-line usage errors, colour on a terminal."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import assert_usage_error
from cli_runner import invoke, run_module

from bnfold.cli.console import Console


def test_no_arguments_shows_help_and_exits_2() -> None:
    result = invoke()
    assert result.exit_code == 2
    assert "Usage:" in result.stderr


def test_help_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for word in ("verify", "inspect", "Exit codes"):
        assert word in result.stdout
    result = invoke("fold", "--help")
    assert result.exit_code == 0
    for opt in (
        "--no-verify",
        "--atol",
        "--rtol",
        "--seed",
        "--runs",
        "--shape",
        "--dim",
        "--inputs",
        "--dry-run",
        "--strict",
        "--json",
        "--quiet",
        "--provider",
        "--in-place",
        "--output-dir",
        "--force",
        "--junit-xml",
    ):
        assert opt in result.stdout, opt
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("bnfold ")


def test_short_help_and_help_of_every_command() -> None:
    for args in (["-h"], ["--help"]):
        result = invoke(*args)
        assert result.exit_code == 0 and result.stderr == ""
        assert result.stdout.startswith("Usage: bnfold ")
        for word in ("fold", "verify", "inspect", "--version", "Exit codes"):
            assert word in result.stdout, word
    for command, usage in (
        ("fold", "MODEL.onnx..."),
        ("verify", "REFERENCE.onnx CANDIDATE.onnx"),
        ("inspect", "MODEL.onnx..."),
    ):
        for flag in ("-h", "--help"):
            result = invoke(command, flag)
            assert result.exit_code == 0 and result.stderr == "", (command, flag)
            assert result.stdout.startswith(f"Usage: bnfold {command} [OPTIONS] {usage}\n"), result.stdout
            assert "-q, --quiet" in result.stdout and "-h, --help" in result.stdout
    # --help wins over a missing argument, and works after other options
    assert invoke("fold", "-q", "--help").exit_code == 0


def test_fold_help_lists_options_with_their_metavars_and_defaults() -> None:
    text = invoke("fold", "--help").stdout
    flat = " ".join(text.split())  # help texts may wrap
    for piece in (
        "-o, --output PATH",
        "--output-dir DIR",
        "-j, --jobs N",
        "--runs N",
        "--seed <int>",
        "--atol <float>",
        "--rtol <float>",
        "--provider <str>",
        "--shape NAME=1x3x224x224",
        "--dim NAME=VALUE",
        "--inputs FILE.npz",
        "--json PATH|-",
        "--junit-xml PATH",
        "-q, --quiet",
        "-v, --verbose",
        "--bn-to-affine",
        "--merge-branches",
        "--no-verify",
        "MODEL.onnx ONNX models to fold. [required]",
        "Seed of the random inputs. [default: 0]",
        "the worst is reported. [default: 1]",
        "[default: CPUExecutionProvider]",
        "Shape of a graph input (repeatable).",
        "Value of a symbolic dimension (repeatable)",
    ):
        assert piece in flat, piece
    text = invoke("verify", "--help").stdout
    assert "REFERENCE.onnx" in text and "CANDIDATE.onnx" in text and "--junit-xml PATH" in text
    assert "--output" not in text and "--jobs" not in text
    text = invoke("inspect", "--help").stdout
    assert (
        "--strict" in text and "--json PATH|-" in text and "--junit-xml" not in text and "--atol" not in text
    )


def _parse(command: str, args: list[str]) -> dict[str, Any]:
    """What typer's parser makes of ``bnfold COMMAND ARGS``: the command function's arguments
    (as typer's callback wrapper hands them over: an unset repeatable option is None)."""
    from typer.main import _normalize_collection_value, get_command

    from bnfold.cli.app import app

    group = get_command(app)
    sub = group.commands[command]  # type: ignore[attr-defined]
    ctx = sub.make_context(f"bnfold {command}", list(args))
    by_name = {p.name: p for p in sub.params}
    return {k: _normalize_collection_value(by_name[k], v) for k, v in ctx.params.items()}


def test_parsed_defaults_match_the_command_functions() -> None:
    import inspect

    from bnfold.cli.fold_command import fold_command
    from bnfold.cli.inspect_command import inspect_command
    from bnfold.cli.verify_command import verify_command

    for command, function, args in (
        ("fold", fold_command, ["m.onnx"]),
        ("verify", verify_command, ["a.onnx", "b.onnx"]),
        ("inspect", inspect_command, ["m.onnx"]),
    ):
        values = _parse(command, args)
        params = inspect.signature(function).parameters
        assert set(values) == set(params), function.__name__
        for name, p in params.items():
            if p.default is not inspect.Parameter.empty:
                assert values[name] == p.default, (function.__name__, name, values[name])


def test_options_and_models_may_be_mixed_and_repeated(tmp_path: Path) -> None:
    values = _parse(
        "fold",
        [
            "a.onnx",
            "--shape",
            "x=1x3",
            "b.onnx",
            "--dim",
            "N=2",
            "--shape",
            "y=4",
            "-qv",
            "--runs=3",
            "-j2",
            "--",
            "-c.onnx",
        ],
    )
    assert values["models"] == [Path("a.onnx"), Path("b.onnx"), Path("-c.onnx")]
    assert values["shape"] == ["x=1x3", "y=4"] and values["dim"] == ["N=2"]
    assert (values["quiet"], values["verbose"], values["runs"], values["jobs"]) == (True, True, 3, 2)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["a.onnx", "--frobnicate"], "no such option: --frobnicate"),
        (["a.onnx", "--runz", "2"], "no such option: --runz (did you mean --runs?)"),
        (["--frobnicate"], "no such option: --frobnicate"),
        (["fold"], "missing argument MODEL.onnx"),
        (["fold", "-q"], "missing argument MODEL.onnx"),
        (["inspect"], "missing argument MODEL.onnx"),
        (["verify", "a.onnx"], "missing argument CANDIDATE.onnx"),
        (["verify", "a.onnx", "b.onnx", "c.onnx"], "unexpected extra argument: c.onnx"),
        (["a.onnx", "--runs", "abc"], "--runs: 'abc' is not an integer"),
        (["a.onnx", "--runs=1.5"], "--runs: '1.5' is not an integer"),
        (["a.onnx", "-j", "many"], "-j, --jobs: 'many' is not an integer"),
        (["a.onnx", "--seed", "x"], "--seed: 'x' is not an integer"),
        (["a.onnx", "--atol", "abc"], "--atol: 'abc' is not a number"),
        (["a.onnx", "--runs"], "--runs: expected one argument"),
        (["verify", "a.onnx", "b.onnx", "--rtol"], "--rtol: expected one argument"),
        (["inspect", "a.onnx", "--atol", "1"], "no such option: --atol"),
        (["a.onnx", "--out", "x.onnx"], "no such option: --out"),  # no abbreviations
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], expect: str) -> None:
    result = invoke(*args)
    assert_usage_error(result, result.stderr)
    assert result.stdout == ""
    assert expect in result.stderr, result.stderr
    command = args[0] if args[0] in ("fold", "verify", "inspect") else "fold"
    assert result.stderr.rstrip().endswith(f"(see 'bnfold {command} --help')"), result.stderr
    assert "usage:" not in result.stderr.lower()


def test_usage_errors_in_a_real_process() -> None:
    for args in (["model.onnx", "--frobnicate"], ["fold"], ["model.onnx", "--runs", "abc"]):
        proc = run_module(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("bnfold: error: ") and "Traceback" not in proc.stderr
    proc = run_module("--version")
    assert proc.returncode == 0 and proc.stdout == f"bnfold {__import__('bnfold').__version__}\n"
    proc = run_module("-h")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: bnfold ") and proc.stderr == ""


def test_final_word_is_coloured_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    for stream_cls, env, coloured in ((Tty, None, True), (Tty, "1", False), (io.StringIO, None, False)):
        if env is None:
            monkeypatch.delenv("NO_COLOR", raising=False)
        else:
            monkeypatch.setenv("NO_COLOR", env)
        for line, code in (
            ("PASSED 1 folded, 0 kept", "\x1b[1;32mPASSED\x1b[0m"),  # rich: bold and colour in one SGR
            ("FAILED 1 folded, 0 kept", "\x1b[1;31mFAILED\x1b[0m"),
        ):
            stream = stream_cls()
            with redirect_stdout(stream):
                Console().final(line)
            text = stream.getvalue()
            expected = (code + line[6:] if coloured else line) + "\n"
            assert text == expected, (stream_cls, env, text)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["a.onnx", "--quiet=1"], "-q, --quiet: ignored explicit argument '1' (see 'bnfold fold --help')"),
        (["verify", "a", "b", "c", "d"], "unexpected extra arguments: c d (see 'bnfold verify --help')"),
        (["inspect", "a.onnx", "--jsn", "-"], "no such option: --jsn (did you mean --json?)"),
    ],
)
def test_more_parser_errors_read_as_before(args: list[str], expect: str) -> None:
    result = invoke(*args)
    assert_usage_error(result, result.stderr)
    assert result.stderr.startswith("bnfold: error: ") and expect in result.stderr, result.stderr
