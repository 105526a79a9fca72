"""The command line: exit codes, outputs, atomic writes, JSON/JUnit reports, parallel workers.

Models are built here with onnx.helper (``bnfold.testing.conv_bn_model``): a few kB each, so
every case runs in milliseconds; worker-process cases use two models.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_runner import invoke, run_module
from onnx import numpy_helper

from bnfold import cli
from bnfold.cli.console import Console
from bnfold.cli.outcome import FoldJob, ModelOutcome
from bnfold.cli.outputs import default_output
from bnfold.cli.process import process_model
from bnfold.cli.workers import run_parallel, worker_loop
from bnfold.testing import assert_models_close, conv_bn_model
from bnfold.verification.options import VerifyOptions

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "cli.md"
FINAL_PASSED = re.compile(r"^PASSED \d+ folded, \d+ kept, max abs err \S+$")


# ------------------------------------------------------------------------------------------------
# helpers


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    save(conv_bn_model(blocks=1, seed=0), tmp_path / "a.onnx")
    save(conv_bn_model(blocks=2, seed=1), tmp_path / "b.onnx")
    return tmp_path


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def assert_usage_error(result: Any, stderr: str) -> None:
    assert result.exit_code == 2, (result.stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bnfold: error: "), stderr
    assert "Traceback" not in stderr and "Traceback" not in result.stdout


# ------------------------------------------------------------------------------------------------
# a tiny JSON Schema checker for the schemas in docs/cli.md (type, enum, required, properties,
# additionalProperties, items, oneOf, $ref to #/$defs/...)


def doc_schemas() -> dict[str, dict[str, Any]]:
    text = DOCS.read_text()
    found = dict(re.findall(r"<!-- schema: (\w+) -->\s*```json\n(.*?)\n```", text, re.S))
    schemas = {k: json.loads(v) for k, v in found.items()}
    defs = schemas["fold"]["$defs"]
    for s in schemas.values():
        s.setdefault("$defs", defs)
    return schemas


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
    "integer": int,
    "number": (int, float),
}


def validate(value: Any, schema: dict[str, Any], defs: dict[str, Any], path: str = "$") -> None:
    if "$ref" in schema:
        validate(value, defs[schema["$ref"].split("/")[-1]], defs, path)
        return
    if "oneOf" in schema:
        errors = []
        for sub in schema["oneOf"]:
            try:
                validate(value, sub, defs, path)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{path}: matches no alternative: {errors}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(value, _TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
            for t in types
        )
        assert ok, f"{path}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing {key!r}"
        for key, v in value.items():
            if key in props:
                validate(v, props[key], defs, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                raise AssertionError(f"{path}: unexpected key {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                validate(v, schema["additionalProperties"], defs, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            validate(v, schema["items"], defs, f"{path}[{i}]")


def check_schema(doc: dict[str, Any]) -> None:
    schema = doc_schemas()[doc["command"]]
    validate(doc, schema, schema["$defs"])
    json.dumps(doc, allow_nan=False)  # strict JSON: no inf/nan


# ------------------------------------------------------------------------------------------------
# folding: exit 0


def test_fold_writes_next_to_input_and_keeps_input(folder: Path) -> None:
    src = folder / "a.onnx"
    before = src.read_bytes()
    result = invoke(src)
    assert result.exit_code == 0, result.output
    assert FINAL_PASSED.match(last_line(result.stdout)), result.stdout
    assert last_line(result.stdout).startswith("PASSED 1 folded, 0 kept")
    out = folder / "a.folded.onnx"
    assert src.read_bytes() == before
    assert "BatchNormalization" not in ops(out)
    onnx.checker.check_model(onnx.load(str(out)))
    assert_models_close(src, out)
    # the summary has the pieces the issue asks for
    text = result.stdout
    for piece in (
        "bn0",
        "conv0",
        "Conv",
        "nodes: 3 -> 2",
        "size:",
        "max abs err",
        "PASSED",
        "time:",
        "wrote",
    ):
        assert piece in text, piece
    assert not [n for n in files(folder) if n.endswith(".tmp")]


def test_fold_with_output_option_and_fold_subcommand(folder: Path) -> None:
    out = folder / "x.onnx"
    result = invoke("fold", folder / "b.onnx", "-o", out)
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout).startswith("PASSED 2 folded, 0 kept, max abs err ")
    assert ops(out).count("BatchNormalization") == 0


def test_in_place_overwrites_only_with_flag(folder: Path) -> None:
    src = folder / "a.onnx"
    before = src.read_bytes()
    result = invoke(src, "-o", src)
    assert_usage_error(result, result.stderr)
    assert "--in-place" in result.stderr
    assert src.read_bytes() == before
    result = invoke(src, "--in-place")
    assert result.exit_code == 0, result.output
    assert "BatchNormalization" not in ops(src)
    assert files(folder) == {"a.onnx", "b.onnx"}


def test_dry_run_writes_nothing(folder: Path) -> None:
    result = invoke(folder / "a.onnx", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: nothing written" in result.stdout
    assert files(folder) == {"a.onnx", "b.onnx"}


def test_nothing_to_fold_is_success(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    src = save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "r.onnx"
    )
    result = invoke(src)
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout) == "PASSED 0 folded, 0 kept, nothing to fold, model unchanged"
    result = invoke(src, "--in-place")
    assert result.exit_code == 0
    assert "left untouched" in result.stderr


def test_no_verify(folder: Path) -> None:
    result = invoke(folder / "a.onnx", "--no-verify")
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout) == "PASSED 1 folded, 0 kept, not verified: --no-verify"
    assert (folder / "a.folded.onnx").exists()


def test_quiet_prints_only_the_final_line(folder: Path) -> None:
    result = invoke(folder / "a.onnx", "-q")
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) == 1
    assert FINAL_PASSED.match(result.stdout.strip())


def test_verification_options_reach_onnxruntime(folder: Path) -> None:
    out = folder / "r.json"
    result = invoke(folder / "a.onnx", "--dim", "N=3", "--runs", "2", "--seed", "7", "--json", out)
    assert result.exit_code == 0, result.output
    v = json.loads(out.read_text())["models"][0]["verification"]
    assert v["input_shapes"] == {"x": [3, 3, 8, 8]}
    assert (v["runs"], v["seed"], v["assumed_dims"]) == (2, 7, {})
    result = invoke(folder / "a.onnx", "--shape", "x=2x3x8x8", "--atol", "0.5", "--rtol", "0", "--json", out)
    assert result.exit_code == 0, result.output
    v = json.loads(out.read_text())["models"][0]["verification"]
    assert v["input_shapes"] == {"x": [2, 3, 8, 8]}
    assert v["outputs"][0]["atol"] == 0.5 and v["outputs"][0]["rtol"] == 0
    arrays = folder / "in.npz"
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(arrays, x=x)
    result = invoke(folder / "a.onnx", "--inputs", arrays, "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["models"][0]["verification"]["input_shapes"] == {"x": [5, 3, 8, 8]}


def test_provider_short_name(folder: Path) -> None:
    result = invoke(folder / "a.onnx", "--provider", "cpu", "--dry-run", "-q")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------------
# folding: exit 1


def test_failed_verification_is_not_written(folder: Path) -> None:
    # zero tolerance: the exact fold still differs from the unfolded network by float32 rounding
    result = invoke(folder / "a.onnx", "--atol", "0", "--rtol", "0")
    assert result.exit_code == 1, result.output
    line = last_line(result.stdout)
    assert line.startswith("FAILED 1 folded, 0 kept, max abs err ") and "not written" in line, line
    assert files(folder) == {"a.onnx", "b.onnx"}
    result = invoke(folder / "a.onnx", "--atol", "0", "--rtol", "0", "--force")
    assert result.exit_code == 1
    assert "written anyway (--force)" in last_line(result.stdout)
    assert (folder / "a.folded.onnx").exists()


def test_strict_fails_on_kept_bn_after_matmul(tmp_path: Path) -> None:
    src = save(conv_bn_model(matmul_bn=True), tmp_path / "mm.onnx")
    result = invoke(src)
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout).startswith("PASSED 1 folded, 1 kept")
    assert "bn_mm" in result.stdout and "channel_axis" in result.stdout
    (tmp_path / "mm.folded.onnx").unlink()
    result = invoke(src, "--strict")
    assert result.exit_code == 1, result.output
    assert last_line(result.stdout).startswith("FAILED 1 folded, 1 kept, --strict:")
    assert "bn_mm" in last_line(result.stdout)
    assert files(tmp_path) == {"mm.onnx"}


def test_unverifiable_model_is_written_with_warning(tmp_path: Path) -> None:
    # onnxruntime's CPU provider has no bfloat16 Conv: the original cannot run
    src = save(conv_bn_model(dtype="bfloat16"), tmp_path / "bf.onnx")
    result = invoke(src, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    line = last_line(result.stdout)
    assert line.startswith(
        "PASSED 1 folded, 0 kept, not verified: onnxruntime cannot run the reference model"
    ), line
    assert "warning" in result.stderr and "could not be verified" in result.stderr
    assert (tmp_path / "bf.folded.onnx").exists()
    rec = json.loads((tmp_path / "r.json").read_text())["models"][0]
    assert rec["verification_status"] == "unverifiable" and rec["status"] == "passed"
    (tmp_path / "bf.folded.onnx").unlink()
    result = invoke(src, "--strict")
    assert result.exit_code == 1
    assert last_line(result.stdout).startswith(
        "FAILED 1 folded, 0 kept, --strict: the fold could not be verified"
    )
    assert not (tmp_path / "bf.folded.onnx").exists()


# ------------------------------------------------------------------------------------------------
# folding: exit 2 (one line on stderr, nothing written)


def _bad_inputs(folder: Path) -> dict[str, list[Any]]:
    (folder / "junk.onnx").write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "sub").mkdir()
    np.savez(folder / "wrong_name.npz", y=np.zeros((1, 3, 8, 8), np.float32))
    np.savez(folder / "wrong_dtype.npz", x=np.zeros((1, 3, 8, 8), np.float64))
    np.savez(folder / "wrong_shape.npz", x=np.zeros((1, 4, 8, 8), np.float32))
    np.save(folder / "plain.npy", np.zeros(3))
    a = folder / "a.onnx"
    return {
        "missing file": [folder / "nope.onnx"],
        "not onnx": [folder / "junk.onnx"],
        "empty file": [folder / "empty.onnx"],
        "directory": [folder / "sub"],
        "bad float": [a, "--atol", "abc"],
        "negative atol": [a, "--atol", "-1"],
        "runs zero": [a, "--runs", "0"],
        "unknown option": [a, "--frobnicate"],
        "-o with two models": [a, folder / "b.onnx", "-o", folder / "x.onnx"],
        "missing output dir": [a, folder / "b.onnx", "--output-dir", folder / "nope"],
        "missing -o folder": [a, "-o", folder / "nope" / "x.onnx"],
        "-o is a folder": [a, "-o", folder / "sub"],
        "in-place with -o": [a, "--in-place", "-o", folder / "x.onnx"],
        "bad shape": [a, "--shape", "x=1xAx8"],
        "shape without name": [a, "--shape", "1x3x8x8"],
        "shape of unknown input": [a, "--shape", "y=1x3x8x8"],
        "shape rank mismatch": [a, "--shape", "x=1x3x8"],
        "shape static dim mismatch": [a, "--shape", "x=1x5x8x8"],
        "bad dim": [a, "--dim", "N=abc"],
        "unknown dim": [a, "--dim", "batch=2"],
        "missing inputs file": [a, "--inputs", folder / "nope.npz"],
        "inputs not npz": [a, "--inputs", folder / "plain.npy"],
        "inputs wrong name": [a, "--inputs", folder / "wrong_name.npz"],
        "inputs wrong dtype": [a, "--inputs", folder / "wrong_dtype.npz"],
        "inputs wrong shape": [a, "--inputs", folder / "wrong_shape.npz"],
        "unknown provider": [a, "--provider", "NoSuchExecutionProvider"],
        "json folder missing": [a, "--json", folder / "nope" / "r.json"],
        "jobs zero": [a, "-j", "0"],
        "json over the input": [a, "--json", a],
        "junit over the output": [a, "--junit-xml", folder / "a.folded.onnx"],
        "verify json over a model": ["verify", a, a, "--json", a],
        "inspect json over the model": ["inspect", a, "--json", a],
    }


def test_exit_2_cases(folder: Path) -> None:
    cases = _bad_inputs(folder)
    baseline = files(folder)
    for name, args in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2, (name, result.stdout, result.stderr)
        assert_usage_error(result, result.stderr)
        assert result.stdout.strip() == "", (name, result.stdout)
        assert files(folder) == baseline, (name, files(folder) - baseline)


def test_unreadable_external_data_is_bad_input(tmp_path: Path) -> None:
    model = conv_bn_model(channels=16)
    onnx.save(
        model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0
    )
    (tmp_path / "ext.data").unlink()
    result = invoke(tmp_path / "ext.onnx")
    assert_usage_error(result, result.stderr)
    assert "external data" in result.stderr
    assert files(tmp_path) == {"ext.onnx"}


def test_read_only_output_folder_is_usage_error(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_access = os.access
    monkeypatch.setattr(
        cli.os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode)
    )
    result = invoke(folder / "a.onnx")
    assert_usage_error(result, result.stderr)
    assert "not writable" in result.stderr
    assert files(folder) == {"a.onnx", "b.onnx"}


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder_for_real(folder: Path) -> None:
    ro = folder / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = invoke(folder / "a.onnx", "-o", ro / "x.onnx")
        assert_usage_error(result, result.stderr)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_same_stem_collision_is_usage_error(tmp_path: Path) -> None:
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    (tmp_path / "out").mkdir()
    a = save(conv_bn_model(), tmp_path / "d1" / "m.onnx")
    b = save(conv_bn_model(seed=3), tmp_path / "d2" / "m.onnx")
    result = invoke(a, b, "--output-dir", tmp_path / "out", "-j", "1")
    assert_usage_error(result, result.stderr)
    assert list((tmp_path / "out").iterdir()) == []


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


# ------------------------------------------------------------------------------------------------
# atomic writes


def test_failed_write_leaves_no_temp_file_and_input_untouched(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnfold.io

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bnfold.io.os, "replace", broken_replace)
    src = folder / "a.onnx"
    before = src.read_bytes()
    for extra in ([], ["--in-place"]):
        result = invoke(src, *extra)
        assert result.exit_code == 2, result.output
        assert "No space left on device" in result.stderr
        assert src.read_bytes() == before
        assert files(folder) == {"a.onnx", "b.onnx"}, files(folder)


def test_interrupted_write_leaves_no_temp_file(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfold.io

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bnfold.io.os, "fsync", interrupted)
    result = invoke(folder / "a.onnx")
    assert result.exit_code == 130
    assert result.stderr.strip() == "bnfold: interrupted"
    assert files(folder) == {"a.onnx", "b.onnx"}


def test_existing_output_is_replaced_atomically_keeping_mode(folder: Path) -> None:
    out = folder / "a.folded.onnx"
    out.write_bytes(b"old")
    out.chmod(0o640)
    result = invoke(folder / "a.onnx")
    assert result.exit_code == 0
    assert out.read_bytes() != b"old" and (out.stat().st_mode & 0o777) == 0o640


# ------------------------------------------------------------------------------------------------
# JSON, JUnit, GitHub summary


def test_json_stdout_is_pure_and_matches_schema(folder: Path) -> None:
    result = invoke(folder / "a.onnx", "--json", "-")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    check_schema(doc)
    assert doc["status"] == "passed" and doc["exit_code"] == 0
    assert doc["models"][0]["folded"] == 1 and doc["models"][0]["written"]
    assert doc["final_line"] == last_line(result.stderr)  # human text went to stderr
    assert "wrote" in result.stderr
    result = invoke(folder / "a.onnx", "--json", "-", "--quiet")
    assert result.stderr == ""
    json.loads(result.stdout)


def test_json_for_several_models_and_failures(tmp_path: Path) -> None:
    a = save(conv_bn_model(seed=0), tmp_path / "a.onnx")
    mm = save(conv_bn_model(matmul_bn=True), tmp_path / "mm.onnx")
    bf = save(conv_bn_model(dtype="bfloat16"), tmp_path / "bf.onnx")
    report = tmp_path / "r.json"
    junit = tmp_path / "j.xml"
    result = invoke(
        a, mm, bf, tmp_path / "missing.onnx", "--strict", "-j", "1", "--json", report, "--junit-xml", junit
    )
    assert result.exit_code == 2, result.output
    doc = json.loads(report.read_text())
    check_schema(doc)
    by_name = {Path(m["input"]).name: m for m in doc["models"]}
    assert by_name["a.onnx"]["status"] == "passed" and by_name["a.onnx"]["written"]
    assert by_name["mm.onnx"]["status"] == "failed" and by_name["mm.onnx"]["kept_after_linear"] == ["bn_mm"]
    assert (
        by_name["bf.onnx"]["verification_status"] == "unverifiable" and by_name["bf.onnx"]["exit_code"] == 1
    )
    assert by_name["missing.onnx"]["status"] == "error" and by_name["missing.onnx"]["exit_code"] == 2
    assert doc["summary"]["models"] == 4 and doc["summary"]["errors"] == 1
    assert last_line(result.stdout).startswith("FAILED 3 of 4 models")
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("errors"), suite.get("failures")) == ("1", "2")
    error = suite.find("testcase/error")
    assert error is not None and "no such file" in error.get("message")


def test_infinite_errors_become_null(folder: Path) -> None:
    bad = corrupt(folder / "b.onnx", folder / "bad.onnx")
    result = invoke("verify", folder / "b.onnx", bad, "--json", "-")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    check_schema(doc)
    out = doc["verification"]["outputs"][0]
    assert out["passed"] is False and out["max_rel_err"] is None  # relu zeros in the reference


def test_junit_xml_and_github_summary(tmp_path: Path) -> None:
    a = save(conv_bn_model(seed=0), tmp_path / "a.onnx")
    mm = save(conv_bn_model(matmul_bn=True), tmp_path / "mm.onnx")
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    junit = tmp_path / "junit.xml"
    result = invoke(
        a, mm, "--strict", "-j", "1", "--junit-xml", junit, env={"GITHUB_STEP_SUMMARY": str(summary)}
    )
    assert result.exit_code == 1
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert len(cases) == 4  # per model: "fold" + one per output
    assert suite.get("tests") == "4" and suite.get("failures") == "1"
    failed = [c for c in cases if c.find("failure") is not None]
    assert failed[0].get("classname").endswith("mm.onnx") and "--strict" in failed[0].find("failure").get(
        "message"
    )
    text = summary.read_text()
    assert text.startswith("# earlier step\n")  # appended, not overwritten
    assert "| model | result |" in text and "a.onnx" in text and "❌ failed" in text

    bad = corrupt(a, tmp_path / "bad.onnx")
    result = invoke("verify", a, bad, "--junit-xml", junit)
    assert result.exit_code == 1
    failure = ET.parse(junit).getroot().find("testsuite/testcase[@name='output y']/failure")
    assert failure is not None and "max abs err" in failure.get("message")


# ------------------------------------------------------------------------------------------------
# verify


def corrupt(src: Path, dst: Path) -> Path:
    """Fold ``src`` with bnfold, then change one weight of the result."""
    import bnfold

    model = bnfold.fold(str(src), verify=False).model
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 4:
            a = a.copy()
            a.flat[0] += 1.0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            break
    return save(model, dst)


def ort_fold(src: Path, dst: Path) -> Path:
    """The model as onnxruntime's optimizer rewrites it (saved with optimized_model_filepath): a
    candidate made by another tool. Whether that release fuses Conv+BN does not matter to the
    tests that use it: the candidate computes the same function either way."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return dst


def test_verify_passes_another_tools_fold_and_catches_corruption(folder: Path) -> None:
    ref = folder / "b.onnx"
    theirs = ort_fold(ref, folder / "b.ort.onnx")
    result = invoke("verify", ref, theirs, "--runs", "2")
    assert result.exit_code == 0, result.output
    assert re.match(r"^PASSED 1/1 outputs match, max abs err \S+$", last_line(result.stdout))
    bad = corrupt(ref, folder / "bad.onnx")
    result = invoke("verify", ref, bad)
    assert result.exit_code == 1, result.output
    line = last_line(result.stdout)
    assert line.startswith("FAILED 1/1 outputs differ, max abs err ") and "(output y)" in line


def test_verify_json_schema_and_bad_input(folder: Path) -> None:
    ref = folder / "a.onnx"
    result = invoke("verify", ref, ref, "--json", "-")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    check_schema(doc)
    assert doc["verification"]["outputs"][0]["max_abs_err"] == 0
    # different interfaces, missing file, bad option: exit 2, one line
    other = save(conv_bn_model(in_channels=2), folder / "c.onnx")
    other_model = onnx.load(str(other))
    other_model.graph.output[0].name = "z"
    other_model.graph.node[-1].output[0] = "z"
    save(other_model, other)
    for args in (
        [ref, other],
        [ref, folder / "nope.onnx"],
        [ref, ref, "--runs", "x"],
        [ref, ref, "--dim", "M=1"],
    ):
        result = invoke("verify", *args)
        assert_usage_error(result, result.stderr)


def test_verify_unverifiable_reference_fails_the_gate(tmp_path: Path) -> None:
    bf = save(conv_bn_model(dtype="bfloat16"), tmp_path / "bf.onnx")
    result = invoke("verify", bf, bf)
    assert result.exit_code == 1
    assert last_line(result.stdout).startswith(
        "FAILED not verified: onnxruntime cannot run the reference model"
    )


# ------------------------------------------------------------------------------------------------
# inspect


def test_inspect_lists_every_bn_and_writes_nothing(tmp_path: Path) -> None:
    src = save(conv_bn_model(blocks=2, matmul_bn=True), tmp_path / "m.onnx")
    result = invoke("inspect", src)
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout) == "PASSED 2 foldable, 1 kept"
    lines = result.stdout.splitlines()
    rows = [ln.split()[0] for ln in lines if ln.strip().startswith("bn")]
    assert rows == ["bn0", "bn1", "bn_mm"]  # graph order
    assert "channel_axis" in result.stdout
    assert files(tmp_path) == {"m.onnx"}
    result = invoke("inspect", src, "--strict", "--json", "-")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    check_schema(doc)
    bns = doc["models"][0]["batchnorms"]
    assert [b["foldable"] for b in bns] == [True, True, False]
    assert bns[2]["follows_op"] == "MatMul" and bns[2]["code"] == "channel_axis"
    result = invoke("inspect", tmp_path / "nope.onnx")
    assert_usage_error(result, result.stderr)


# ------------------------------------------------------------------------------------------------
# several models in worker processes


def test_parallel_workers_in_process(tmp_path: Path) -> None:
    a = save(conv_bn_model(seed=0), tmp_path / "a.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(a, tmp_path / "junk.onnx", "--output-dir", out, "-j", "2")
    assert result.exit_code == 2, result.output
    assert files(out) == {"a.folded.onnx"}  # the bad model did not stop the good one
    assert "junk.onnx" in result.stderr and "Traceback" not in result.stderr
    assert last_line(result.stdout).startswith("FAILED 1 of 2 models: 1 folded, 0 kept")
    # output in input order
    assert result.stdout.index("a.onnx") < result.stdout.index("junk.onnx")


def _crash_on_purpose(job: FoldJob) -> ModelOutcome:  # runs in a spawned worker
    if job.input.endswith("crash.onnx"):
        os._exit(7)
    return process_model(job)


def test_a_crashing_worker_fails_only_its_model(tmp_path: Path) -> None:
    import functools

    paths = [
        save(conv_bn_model(seed=i), tmp_path / name)
        for i, name in enumerate(("a.onnx", "crash.onnx", "c.onnx", "d.onnx"))
    ]
    check = VerifyOptions()
    jobs = [FoldJob(str(p), str(default_output(p)), check) for p in paths]
    seen: list[int] = []
    target = functools.partial(worker_loop, process=_crash_on_purpose)
    records = run_parallel(jobs, 2, lambda i, r: seen.append(i), target=target)
    assert sorted(seen) == [0, 1, 2, 3]
    assert records[1].status == "error" and "worker process died (exit code 7)" in records[1].message
    assert [r.status for i, r in enumerate(records) if i != 1] == ["passed"] * 3
    assert all(Path(r.output).exists() for i, r in enumerate(records) if i != 1)


# ------------------------------------------------------------------------------------------------
# real subprocesses: python -m bnfold


def test_subprocess_parallel_json_stdout(tmp_path: Path) -> None:
    a = save(conv_bn_model(seed=0), tmp_path / "a.onnx")
    b = save(conv_bn_model(seed=1, blocks=2), tmp_path / "b.onnx")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_module(a, b, "--output-dir", out, "-j", "2", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # nothing but JSON on stdout
    check_schema(doc)
    assert [m["folded"] for m in doc["models"]] == [1, 2]
    assert files(out) == {"a.folded.onnx", "b.folded.onnx"}
    assert last_line(proc.stderr).startswith("PASSED 2 models: 3 folded, 0 kept, max abs err ")
    assert_models_close(b, out / "b.folded.onnx")


def test_subprocess_exit_codes(tmp_path: Path) -> None:
    a = save(conv_bn_model(seed=0), tmp_path / "a.onnx")
    proc = run_module(tmp_path / "missing.onnx")
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("bnfold: error: ") and "Traceback" not in proc.stderr
    proc = run_module(a, "--atol", "0", "--rtol", "0", "-q")
    assert proc.returncode == 1 and proc.stdout.startswith("FAILED ")
    proc = run_module(a, "--json", "-")  # one model: processed in the main process
    assert proc.returncode == 0
    check_schema(json.loads(proc.stdout))
    assert FINAL_PASSED.match(last_line(proc.stderr))
    theirs = ort_fold(a, tmp_path / "a.ort.onnx")
    proc = run_module("verify", a, theirs, "-q")
    assert proc.returncode == 0, proc.stderr
    proc = run_module("verify", a, corrupt(a, tmp_path / "bad.onnx"), "-q")
    assert proc.returncode == 1


_PROBE = """
import sys, time
t = time.perf_counter()
from bnfold.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("CODE", code, "SECONDS", time.perf_counter() - t, file=sys.stderr)
print("MODULES", *sorted(m for m in ("onnxruntime", "torch", "onnx", "numpy", "typer", "click", "pydantic", "rich") if m in sys.modules), file=sys.stderr)
"""


def _probe(*args: Any) -> tuple[int, set[str], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )
    code = int(re.search(r"CODE (\S+)", proc.stderr).group(1))
    modules = set(re.search(r"MODULES(.*)", proc.stderr).group(1).split())
    return code, modules, proc.stdout


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code, modules, out = _probe("--help")
    assert code == 0 and "verify" in out
    # typer is the parser now (its vendored click; pydantic only once a command runs): nothing
    # else, no onnxruntime, torch, onnx, numpy, rich for --help
    assert modules == {"typer"}, modules
    code, modules, _ = _probe("fold", "--help")
    assert code == 0 and modules == {"typer"}, modules
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    best = float("inf")
    for _ in range(3):  # whole process, interpreter start included
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bnfold", "--help"], capture_output=True, env=env, check=True)
        best = min(best, time.perf_counter() - t)
    assert best < 0.5, best


def test_no_verify_never_imports_onnxruntime(folder: Path) -> None:
    code, modules, out = _probe(folder / "a.onnx", "--no-verify", "-q")
    assert code == 0 and out.startswith("PASSED")
    assert "onnxruntime" not in modules and "torch" not in modules
    code, modules, _ = _probe(folder / "a.onnx", "-q")
    assert code == 0 and "onnxruntime" in modules and "torch" not in modules


def test_bn_to_affine_flag(tmp_path: Path) -> None:
    """--bn-to-affine turns a BN that cannot fold (after a Relu) into Mul + Add, checked in ORT."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    params = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in (
            ("g", rng.normal(1, 0.5, 3)),
            ("b", rng.normal(0, 1, 3)),
            ("m", rng.normal(0, 1, 3)),
            ("v", rng.uniform(0.5, 2, 3)),
        )
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        params,
    )
    src = tmp_path / "relu_bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    result = invoke(src, "-o", tmp_path / "out.onnx", "--bn-to-affine")
    assert result.exit_code == 0, result.output
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.op_type for n in out.graph.node] == ["Relu", "Mul", "Add"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    want = ort.InferenceSession(str(src), opts).run(None, feed)[0]
    got = ort.InferenceSession(str(tmp_path / "out.onnx"), opts).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    plain = invoke(src, "-o", tmp_path / "plain.onnx")
    assert plain.exit_code == 0 and "unsupported_producer" in plain.output


def test_the_quick_exit_keeps_codes_output_and_cleanup(tmp_path: Path) -> None:
    """``python -m bnfold`` ends without interpreter teardown: the exit code, everything written
    to stdout/stderr (a pipe here, so buffered) and the removal of temporary files survive."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    folder = tmp_path / "ext"
    folder.mkdir()
    src = folder / "m.onnx"
    onnx.save(
        conv_bn_model(blocks=2, channels=8),
        str(src),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    ok = run_module(src, "-o", tmp_path / "out.onnx", "--json", "-", env_extra={"TMPDIR": str(scratch)})
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["models"][0]["exit_code"] == 0  # the whole JSON document arrived
    assert FINAL_PASSED.match(last_line(ok.stderr))
    # the spill file of the external-data model is gone (onnxruntime leaves a '.ses' file of its own)
    assert [p.name for p in scratch.iterdir() if "bnfold" in p.name] == []
    assert (tmp_path / "out.onnx.data").exists()
    bad = run_module(tmp_path / "missing.onnx")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    help_ = run_module("--help")
    assert help_.returncode == 0 and "fold" in help_.stdout
