"""Hardening: bad input, hostile files and faults never crash bnfold or lose data.

The bad-input catalogue: every entry runs through the command line (``bnfold.cli.run``, a few also
as a real subprocess) and, where it applies, the Python API. Expected: exit code 2 with one line
``bnfold: error: <what is wrong>`` on stderr and no traceback, the input files byte-identical
afterwards, and no output or temporary file left behind. Problems inside an otherwise valid model
(NaN statistics, negative variance, mismatched BN shapes) are per-BN skips with a reason code: the
rest of the model folds and the run exits 0.

Faults: processes killed (SIGKILL, SIGINT) while writing leave the previous file or the new one,
never a truncated one; a full disk (ENOSPC from the writes) is a clear error and removes the
temporary files; several processes folding the same model at once all produce the same valid
output.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_runner import invoke, run_module
from onnx import helper, numpy_helper

import bnfold
from bnfold.errors import BadInput
from bnfold.testing import conv_bn_model

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# helpers


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden temporary files included) with its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def assert_one_line_error(code: int, stdout: str, stderr: str, expect: str = "") -> str:
    assert code == 2, (stdout, stderr)
    assert stdout.strip() == "", stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), stderr
    assert "Traceback" not in stderr
    assert expect.lower() in lines[0].lower(), (expect, lines[0])
    return lines[0]


def base_model() -> onnx.ModelProto:
    return conv_bn_model(blocks=2, seed=0)


def mutated(change: Callable[[onnx.ModelProto], None]) -> bytes:
    model = base_model()
    change(model)
    return model.SerializeToString()


def set_init(name: str, value: np.ndarray) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        for t in model.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array(value, name))
                return
        raise KeyError(name)

    return change


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


# ------------------------------------------------------------------------------------------------
# the catalogue: model files that are refused (exit 2)


def _undefined(m: onnx.ModelProto) -> None:
    _node(m, "conv1").input[1] = "no_such_weight"


def _cycle(m: onnx.ModelProto) -> None:
    _node(m, "conv0").input[0] = "y"  # conv0 <- ... <- relu1 (y) <- ... <- conv0


def _duplicate_initializer(m: onnx.ModelProto) -> None:
    t = onnx.TensorProto()
    t.CopyFrom(m.graph.initializer[0])
    m.graph.initializer.append(t)


def _duplicate_output(m: onnx.ModelProto) -> None:
    _node(m, "relu0").output[0] = "conv0_out"


def _duplicate_input(m: onnx.ModelProto) -> None:
    v = onnx.ValueInfoProto()
    v.CopyFrom(m.graph.input[0])
    m.graph.input.append(v)


def _unimported_domain(m: onnx.ModelProto) -> None:
    _node(m, "relu0").domain = "com.example"


def _new_opset(m: onnx.ModelProto) -> None:
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 1


def _new_ir(m: onnx.ModelProto) -> None:
    m.ir_version = onnx.IR_VERSION + 1


def _unknown_input_type(m: onnx.ModelProto) -> None:
    m.graph.input[0].type.tensor_type.elem_type = 99


def _no_graph(m: onnx.ModelProto) -> None:
    m.ClearField("graph")


MODEL_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty file": (lambda: b"", "empty file"),
    "text": (lambda: b"This is not a model.\nJust text.\n", "not an ONNX model"),
    "PNG header": (lambda: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(64)), "not an ONNX model"),
    "random bytes": (lambda: np.random.default_rng(0).bytes(4096), "not an ONNX model"),
    "truncated at 10%": (
        lambda: base_model().SerializeToString()[: len(base_model().SerializeToString()) // 10],
        "not an ONNX model",
    ),
    "truncated at 50%": (
        lambda: base_model().SerializeToString()[: len(base_model().SerializeToString()) // 2],
        "not an ONNX model",
    ),
    "truncated by one byte": (lambda: base_model().SerializeToString()[:-1], "not an ONNX model"),
    "protobuf without a graph": (lambda: mutated(_no_graph), "no graph"),
    "undefined tensor": (lambda: mutated(_undefined), "reads 'no_such_weight', which no graph input"),
    "cycle": (lambda: mutated(_cycle), "cycle"),
    "duplicate initializer": (lambda: mutated(_duplicate_initializer), "initializer 'w0' is defined twice"),
    "duplicate node output": (lambda: mutated(_duplicate_output), "'conv0_out' is defined twice"),
    "duplicate graph input": (lambda: mutated(_duplicate_input), "graph input 'x' is declared twice"),
    "domain not imported": (lambda: mutated(_unimported_domain), "opset_import does not list"),
    "opset newer than onnx knows": (lambda: mutated(_new_opset), "is newer than the installed onnx"),
    "IR version newer than onnx knows": (lambda: mutated(_new_ir), "is newer than the installed onnx"),
    "unknown input element type": (lambda: mutated(_unknown_input_type), "element type 99"),
}


@pytest.mark.parametrize("case", list(MODEL_FILES))
def test_bad_model_file_is_refused_cleanly(tmp_path: Path, case: str) -> None:
    make, expect = MODEL_FILES[case]
    src = tmp_path / "model.onnx"
    src.write_bytes(make())
    good = tmp_path / "good.onnx"
    onnx.save(base_model(), str(good))
    before = snapshot(tmp_path)
    for args in (
        [src],
        [src, "--no-verify"],
        [src, "-o", tmp_path / "out.onnx"],
        ["inspect", src],
        ["verify", src, good],
        ["verify", good, src],
    ):
        if case == "unknown input element type" and (
            args[-1] == "--no-verify" or args[0] == "inspect" or (len(args) > 2 and args[1] == good)
        ):
            continue  # the fold is fine, inventing inputs fails; as a candidate it is a model that does not run
        result = invoke(*args)
        assert_one_line_error(result.exit_code, result.stdout, result.stderr, expect)
        assert snapshot(tmp_path) == before, args
    with pytest.raises(BadInput) as info:
        bnfold.fold(src)
    assert expect.lower() in str(info.value).lower() and "\n" not in str(info.value)
    with pytest.raises(BadInput):
        bnfold.verify(src, good)
    if case not in ("empty file", "unknown input element type"):  # bytes are parsed as a model too
        with pytest.raises(BadInput):
            bnfold.fold(src.read_bytes(), verify=False)
    assert snapshot(tmp_path) == before


def test_structural_check_accepts_valid_oddities() -> None:
    """What the structural check must not refuse: nodes out of topological order (onnxruntime
    sorts them), subgraphs reading outer-scope values, IR < 4 initializers listed as inputs, an
    initializer overriding a graph input's default, empty optional inputs."""
    import onnx_builders as ob

    from bnfold.storage.structure import check_structure

    unsorted = base_model()
    nodes = list(unsorted.graph.node)[::-1]
    del unsorted.graph.node[:]
    unsorted.graph.node.extend(nodes)
    optional = base_model()
    _node(optional, "conv0").input.append("")
    for model in (
        unsorted,
        optional,
        ob.if_model().model,
        ob.loop_model().model,
        ob.scan_model().model,
        ob.function_model().model,
        ob.conv_bn(bn_opset=9, opset=9, ir_version=3).model,
        ob.conv_bn(param_form="initializer_input").model,
    ):
        check_structure(model)
    result = bnfold.fold(unsorted)
    assert len(result.report.folded) == 2 and result.verification.status == "passed"


def test_structural_check_in_subgraphs_and_functions() -> None:
    import onnx_builders as ob

    from bnfold.storage.structure import check_structure

    model = ob.if_model().model
    then = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    then.node[0].input[0] = "nowhere"
    with pytest.raises(BadInput, match="in subgraph 'then_branch' of node 'if'.*reads 'nowhere'"):
        check_structure(model)
    model = ob.function_model().model
    next(n for n in model.functions[0].node if n.input).input[0] = "nowhere"
    with pytest.raises(BadInput, match="in function .* reads 'nowhere'"):
        check_structure(model)
    model = ob.loop_model().model
    body = next(a.g for a in model.graph.node[0].attribute if a.name == "body")
    body.node[-1].output[0] = body.node[0].output[0]
    with pytest.raises(BadInput, match="defined twice in subgraph 'body'"):
        check_structure(model)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "folder.onnx").mkdir()
    before = snapshot(tmp_path)
    for path, expect in (
        (tmp_path / "missing.onnx", "no such file"),
        (tmp_path / "folder.onnx", "is a directory"),
    ):
        for args in ([path], ["inspect", path], ["verify", path, path]):
            result = invoke(*args)
            assert_one_line_error(result.exit_code, result.stdout, result.stderr, expect)
        with pytest.raises(BadInput, match=expect):
            bnfold.fold(path)
    assert snapshot(tmp_path) == before


def test_devices_pipes_and_huge_inputs(tmp_path: Path) -> None:
    """Nothing that would hang (a pipe), never end (/dev/zero) or exhaust memory (a declared
    input of 10^12 elements) is read or allocated."""
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.onnx"
    model = base_model()
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = 10**6
    huge.write_bytes(model.SerializeToString())
    before = snapshot(tmp_path)
    for path, expect, api_expect in (
        (Path("/dev/zero"), "not a regular file", "not a regular file"),
        (fifo, "not a regular file", "not a regular file"),
        (
            huge,
            "give a smaller one with --shape x=",
            r"give a smaller one with shapes\['x'\]=",
        ),  # flag vs parameter
    ):
        result = invoke(path)
        assert_one_line_error(result.exit_code, result.stdout, result.stderr, expect)
        with pytest.raises(BadInput, match=api_expect):
            bnfold.fold(path)
    assert snapshot(tmp_path) == before
    result = invoke(huge, "--shape", "x=1x3x8x8", "--dry-run")
    assert result.exit_code == 2 and "does not match the declared shape" in result.stderr  # static dims stay


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(base_model(), str(src))
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == src:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    result = invoke(src)
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, "cannot read (Permission denied)")


def test_bad_input_as_a_real_process(tmp_path: Path) -> None:
    """The same guarantees end to end: exit status, one stderr line, nothing written."""
    cases = {
        "missing": (tmp_path / "missing.onnx", None, "no such file"),
        "random": (tmp_path / "random.onnx", np.random.default_rng(1).bytes(1000), "not an ONNX model"),
        "truncated": (tmp_path / "trunc.onnx", base_model().SerializeToString()[:-3], "not an ONNX model"),
        "cycle": (tmp_path / "cycle.onnx", mutated(_cycle), "cycle"),
    }
    for path, data, _ in cases.values():
        if data is not None:
            path.write_bytes(data)
    before = snapshot(tmp_path)
    for name, (path, _, expect) in cases.items():
        proc = run_module(path)
        assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, expect)
        assert snapshot(tmp_path) == before, name


def test_several_models_one_bad(tmp_path: Path) -> None:
    """A bad model is that model's error; the good one is still folded, the run exits 2."""
    good = tmp_path / "good.onnx"
    onnx.save(base_model(), str(good))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    result = invoke(good, bad, "-j", "1")
    assert result.exit_code == 2
    assert (tmp_path / "good.folded.onnx").exists() and not (tmp_path / "bad.folded.onnx").exists()
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("bnfold: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"bnfold: error: {bad} is not an ONNX model"), (
        result.stderr
    )
    assert "Traceback" not in result.stderr + result.stdout


def test_hostile_names_cannot_break_lines_or_drive_the_terminal(tmp_path: Path) -> None:
    def change(m: onnx.ModelProto) -> None:
        _node(m, "conv1").input[1] = "w\n\x1b[31mevil"

    src = tmp_path / "m.onnx"
    src.write_bytes(mutated(change))
    result = invoke(src)
    line = assert_one_line_error(result.exit_code, result.stdout, result.stderr, "reads")
    assert "\x1b" not in line and "\\n\\x1b[31mevil" in line
    with pytest.raises(BadInput) as info:
        bnfold.fold(src)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# external data


def _external(tmp_path: Path, location: str = "weights.bin") -> Path:
    src = tmp_path / "model.onnx"
    onnx.save(
        conv_bn_model(blocks=2, channels=16),
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return src


def _relocate(src: Path, location: str) -> None:
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    src.write_bytes(model.SerializeToString())


EXTERNAL_CASES = ["missing", "truncated", "absolute path", "parent folder", "symlink outside", "bad offset"]


@pytest.mark.parametrize("case", EXTERNAL_CASES)
def test_bad_external_data_is_refused(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    src = _external(folder)
    data = folder / "weights.bin"
    outside = tmp_path / "secret.bin"
    outside.write_bytes(data.read_bytes())  # a readable file with plausible content
    expect = {
        "missing": "missing",
        "truncated": "truncated",
        "absolute path": "absolute",
        "parent folder": "..",
        "symlink outside": "outside",
        "bad offset": "offset",
    }[case]
    if case == "missing":
        data.unlink()
    elif case == "truncated":
        data.write_bytes(data.read_bytes()[:1000])
    elif case == "absolute path":
        _relocate(src, str(outside))
    elif case == "parent folder":
        _relocate(src, "../secret.bin")
    elif case == "symlink outside":
        (folder / "link.bin").symlink_to(outside)
        _relocate(src, "link.bin")
    elif case == "bad offset":
        model = onnx.load(str(src), load_external_data=False)
        for e in model.graph.initializer[0].external_data:
            if e.key == "offset":
                e.value = "-5"
        src.write_bytes(model.SerializeToString())
    before = snapshot(tmp_path)
    for args in ([src], [src, "--no-verify"], ["inspect", src], ["verify", src, src]):
        result = invoke(*args)
        assert_one_line_error(result.exit_code, result.stdout, result.stderr, expect)
        assert snapshot(tmp_path) == before, args
    for stream in (None, True):
        with pytest.raises(BadInput, match=expect.replace(".", r"\.")):
            bnfold.fold(src, stream_external=stream)
    assert snapshot(tmp_path) == before


def test_output_never_replaces_the_inputs_external_data(tmp_path: Path) -> None:
    src = _external(tmp_path, location="out.onnx.data")
    before = snapshot(tmp_path)
    result = bnfold.fold(src, stream_external=True)
    with pytest.raises(BadInput, match="would replace the external data of the input"):
        result.save(tmp_path / "out.onnx")
    with pytest.raises(BadInput, match="holds the external data of the input"):
        result.save(tmp_path / "out.onnx.data")
    cli = invoke(src, "-o", tmp_path / "out.onnx.data")
    assert_one_line_error(cli.exit_code, cli.stdout, cli.stderr, "holds the external data")
    assert snapshot(tmp_path) == before
    result.save(src, force=True)  # in place: model and data are replaced together
    bnfold.testing.assert_models_close(conv_bn_model(blocks=2, channels=16), src)


# ------------------------------------------------------------------------------------------------
# problems inside an otherwise valid model: per-BN skips, the rest folds (exit 0)

SKIPS = {
    "BN parameter shape": (set_init("gamma1", np.ones(5, np.float32)), "param_shape"),
    "BN channels do not match the conv": (
        lambda m: [set_init(n, np.ones(5, np.float32))(m) for n in ("gamma1", "beta1", "mean1", "var1")],
        "channel_mismatch",
    ),
    "NaN mean": (set_init("mean1", np.array([np.nan, 0, 0, 0], np.float32)), "non_finite"),
    "Inf variance": (set_init("var1", np.array([1, np.inf, 1, 1], np.float32)), "non_finite"),
    "NaN weight": (set_init("w1", np.full((4, 4, 3, 3), np.nan, np.float32)), "non_finite"),
    "Inf bias": (set_init("bias1", np.array([0, 0, -np.inf, 0], np.float32)), "non_finite"),
    "negative variance": (set_init("var1", np.array([1, -2, 1, 1], np.float32)), "invalid_variance"),
    "zero-size weight": (set_init("w1", np.zeros((0, 4, 3, 3), np.float32)), "channel_mismatch"),
    "zero-size BN parameters": (
        lambda m: [set_init(n, np.zeros(0, np.float32))(m) for n in ("gamma1", "beta1", "mean1", "var1")],
        "channel_mismatch",
    ),
}


@pytest.mark.parametrize("case", list(SKIPS))
def test_bad_bn_is_skipped_with_a_reason_and_the_rest_folds(tmp_path: Path, case: str) -> None:
    change, code = SKIPS[case]
    src = tmp_path / "m.onnx"
    src.write_bytes(mutated(change))
    before = src.read_bytes()
    result = invoke(src, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    final = result.stdout.strip().splitlines()[-1]
    assert final.startswith("PASSED 1 folded, 1 kept"), final
    import json

    doc = json.loads((tmp_path / "r.json").read_text())
    skipped = doc["models"][0]["report"]["skipped"]
    assert [(s["bn"], s["code"]) for s in skipped] == [("bn1", code)]
    assert src.read_bytes() == before
    out = tmp_path / "m.folded.onnx"
    folded = onnx.load(str(out))
    assert [n.name for n in folded.graph.node if n.op_type == "BatchNormalization"] == ["bn1"]
    if case not in (
        "zero-size weight",
        "zero-size BN parameters",
        "BN parameter shape",
        "BN channels do not match the conv",
    ):  # onnxruntime cannot run those
        bnfold.testing.assert_models_close(src, out)


def test_zero_size_channels_fold(tmp_path: Path) -> None:
    """A conv with zero output channels and empty BN parameters folds (there is nothing to scale)."""

    def change(m: onnx.ModelProto) -> None:
        for name in ("w0", "bias0", "gamma0", "beta0", "mean0", "var0"):
            shape = (0, 3, 3, 3) if name == "w0" else (0,)
            set_init(name, np.zeros(shape, np.float32))(m)
        _node(m, "conv1").input[0] = "x"  # keep the second block fed
        m.graph.output.append(helper.make_tensor_value_info("relu0", onnx.TensorProto.FLOAT, None))

    src = tmp_path / "m.onnx"
    src.write_bytes(mutated(change))
    result = invoke(src)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith("PASSED 2 folded, 0 kept")


def test_numeric_warnings_do_not_reach_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    import bnfold.api

    real = bnfold.api.fold_model

    def noisy(*args: Any, **kwargs: Any) -> Any:
        warnings.warn("overflow encountered in cast", RuntimeWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bnfold.api, "fold_model", noisy)
    src = tmp_path / "m.onnx"
    onnx.save(base_model(), str(src))
    for args in ([src, "--dry-run"], ["inspect", src]):
        result = invoke(*args)
        assert result.exit_code == 0 and result.stderr == "", result.stderr


def test_unknown_domain_folds_but_is_not_verified(tmp_path: Path) -> None:
    """A custom op onnxruntime lacks: the fold is exact but cannot be checked. Exit 0 with a
    warning and 'not verified'; --strict makes it exit 1 and write nothing."""

    def change(m: onnx.ModelProto) -> None:
        _node(m, "relu1").domain = "com.example"
        m.opset_import.append(helper.make_opsetid("com.example", 1))

    src = tmp_path / "m.onnx"
    src.write_bytes(mutated(change))
    result = invoke(src)
    assert result.exit_code == 0
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("bnfold: warning: ")]
    assert len(warnings) == 1 and "com.example" in warnings[0] and "onnxruntime_src" not in warnings[0]
    assert result.stdout.strip().splitlines()[-1].startswith("PASSED 2 folded, 0 kept, not verified: ")
    (tmp_path / "m.folded.onnx").unlink()
    result = invoke(src, "--strict")
    assert result.exit_code == 1 and not (tmp_path / "m.folded.onnx").exists()


# ------------------------------------------------------------------------------------------------
# options and output paths


def test_bad_inputs_files(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(base_model(), str(src))
    np.savez(tmp_path / "name.npz", nope=np.zeros((1, 3, 8, 8), np.float32))
    np.savez(tmp_path / "shape.npz", x=np.zeros((1, 3, 9, 8), np.float32))
    np.savez(tmp_path / "rank.npz", x=np.zeros((3, 8, 8), np.float32))
    np.savez(tmp_path / "dtype.npz", x=np.zeros((1, 3, 8, 8), np.int64))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(tmp_path / "pickled.npz", x=np.array([object()], dtype=object))
    before = snapshot(tmp_path)
    for name, expect in (
        ("name", "unknown names: nope"),
        ("shape", "does not match the declared shape"),
        ("rank", "rank 3"),
        ("dtype", "must have dtype float32"),
        ("corrupt", "cannot read"),
        ("pickled", "cannot read"),
    ):
        result = invoke(src, "--inputs", tmp_path / f"{name}.npz")
        assert_one_line_error(result.exit_code, result.stdout, result.stderr, expect)
        with pytest.raises(BadInput):
            bnfold.fold(src, inputs=tmp_path / f"{name}.npz")
        assert snapshot(tmp_path) == before, name


def test_output_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(base_model(), str(src))
    (tmp_path / "link.onnx").symlink_to(src)
    os.link(src, tmp_path / "hard.onnx")
    (tmp_path / "ro").mkdir()
    before = snapshot(tmp_path)
    cases = {
        "missing folder": ([src, "-o", tmp_path / "nope" / "out.onnx"], "does not exist"),
        "output is the input": ([src, "-o", src], "pass --in-place"),
        "output is a symlink to the input": ([src, "-o", tmp_path / "link.onnx"], "pass --in-place"),
        "output is a hard link of the input": ([src, "-o", tmp_path / "hard.onnx"], "pass --in-place"),
        "output is a folder": ([src, "-o", tmp_path / "ro"], "folder"),
    }
    for name, (args, expect) in cases.items():
        result = invoke(*args)
        assert_one_line_error(result.exit_code, result.stdout, result.stderr, expect)
        assert snapshot(tmp_path) == before, name
    # a read-only folder (root ignores permission bits, so the check is made to see one)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode)
    )
    result = invoke(src, "-o", tmp_path / "ro" / "out.onnx")
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, "not writable")
    assert snapshot(tmp_path) == before
    with pytest.raises(BadInput, match="refusing to overwrite the input"):
        bnfold.fold(src).save(src)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# full disk


class _FullDisk:
    """Writes go through until ``budget`` bytes, then fail with ENOSPC (as a full disk does)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def take(self, n: int) -> int:
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(n, self.budget)
        self.budget -= n
        return n


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make every ``os.write`` and file-object write fail with ENOSPC after a byte budget."""
    import io as _io

    def install(budget: int) -> None:
        disk = _FullDisk(budget)
        real_write = os.write
        real_fdopen = os.fdopen

        def write(fd: int, data: Any) -> int:
            n = disk.take(len(data))
            return real_write(fd, bytes(memoryview(data)[:n]))

        class Writer(_io.RawIOBase):
            def __init__(self, fd: int) -> None:
                self.fd = fd

            def writable(self) -> bool:
                return True

            def write(self, data: Any) -> int:
                return write(self.fd, data)

            def fileno(self) -> int:
                return self.fd

            def close(self) -> None:
                if not self.closed:
                    os.close(self.fd)
                super().close()

        def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode:
                return _io.BufferedWriter(Writer(fd))
            return real_fdopen(fd, mode, *args, **kwargs)

        def no_copy_file_range(*args: Any) -> int:
            raise OSError(errno.EXDEV, "not here")  # forces the write() fallback

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fdopen", fdopen)
        monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)

    return install


@pytest.mark.parametrize("budget", [0, 1000, 20000])
def test_full_disk_while_writing(tmp_path: Path, full_disk: Callable[[int], None], budget: int) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=3, channels=32), str(src))
    old = tmp_path / "m.folded.onnx"
    old.write_bytes(b"previous output")
    before = snapshot(tmp_path)
    full_disk(budget)
    result = invoke(src)
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, "No space left on device")
    assert snapshot(tmp_path) == before  # previous output kept, no temporary file
    result = invoke(src, "--in-place")
    assert_one_line_error(result.exit_code, result.stdout, result.stderr, "No space left on device")
    assert snapshot(tmp_path) == before


def test_read_only_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder looks writable but the file system refuses (EROFS): exit 2, nothing written."""
    import tempfile

    src = tmp_path / "m.onnx"
    onnx.save(base_model(), str(src))
    before = snapshot(tmp_path)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    for args in ([src], [src, "--in-place"], [src, "--json", tmp_path / "r.json", "--dry-run"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("bnfold: error: ")]
        assert len(errors) == 1 and "Read-only file system" in errors[0], result.stderr
        assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("budget", [0, 5000, 12000])
def test_full_disk_while_writing_external_data(
    tmp_path: Path, full_disk: Callable[[int], None], budget: int
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    src = _external(folder)
    result = bnfold.fold(src, stream_external=True)
    (out_dir / "f.onnx").write_bytes(b"previous")
    (out_dir / "f.onnx.data").write_bytes(b"previous data")
    before = snapshot(tmp_path)
    full_disk(budget)
    with pytest.raises(BadInput, match="No space left on device"):
        result.save(out_dir / "f.onnx")
    assert snapshot(tmp_path) == before


def test_failed_external_save_can_be_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that fails half-way leaves the in-memory model pointing at its old data."""
    folder = tmp_path / "m"
    folder.mkdir()
    src = _external(folder)
    result = bnfold.fold(src, stream_external=True)
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    with monkeypatch.context() as m:
        m.setattr(os, "write", failing_write)
        m.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "no")))
        with pytest.raises(BadInput, match="No space left on device"):
            result.save(tmp_path / "f.onnx")
    assert calls["n"] > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    result.save(tmp_path / "f.onnx")
    bnfold.testing.assert_models_close(src, tmp_path / "f.onnx")


def test_a_saved_result_does_not_depend_on_what_it_wrote(tmp_path: Path) -> None:
    """After ``save``, overwriting or deleting the written files must not change what the next
    ``save`` of the same result writes (found with the kill test: saves of two results to one
    path alternated, and the third save copied the second's data)."""
    results = []
    for i in range(2):
        folder = tmp_path / f"src{i}"
        folder.mkdir()
        path = folder / "m.onnx"
        onnx.save(
            conv_bn_model(blocks=2, channels=32, seed=i),
            str(path),
            save_as_external_data=True,
            location="m.data",
            size_threshold=0,
        )
        results.append((path, bnfold.fold(path, stream_external=True, verify=False)))
    out = tmp_path / "out.onnx"
    (a_src, a), (b_src, b) = results
    a.save(out)
    b.save(out)
    a.save(out)
    bnfold.testing.assert_models_close(a_src, out)
    (tmp_path / "out.onnx.data").unlink()
    a.save(tmp_path / "again.onnx")
    bnfold.testing.assert_models_close(a_src, tmp_path / "again.onnx")


def test_full_temp_folder_while_folding_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folded tensors of a large model spill to a temporary file; a full disk there is a clear error."""
    import bnfold.storage.spill

    folder = tmp_path / "m"
    folder.mkdir()
    src = _external(folder)
    spills = tmp_path / "tmp"
    spills.mkdir()
    monkeypatch.setenv("TMPDIR", str(spills))
    monkeypatch.setattr("tempfile.tempdir", None)

    def full(self: Any, name: str, array: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(bnfold.storage.spill.Spill, "store_array", full)
    with pytest.raises(BadInput, match="No space left on device.*TMPDIR"):
        bnfold.fold(src, stream_external=True)
    assert list(spills.iterdir()) == []  # the spill file is gone


# ------------------------------------------------------------------------------------------------
# killed while writing

_WRITER = r"""
import os, sys, signal
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bnfold.storage.atomic import write_atomic
target = Path(sys.argv[2])
a = bytes([1]) * int(sys.argv[3])
b = bytes([2]) * int(sys.argv[3])
print("ready", flush=True)
i = 0
try:
    while True:
        write_atomic(a if i % 2 else b, target)
        i += 1
except KeyboardInterrupt:
    sys.exit(130)
"""


def _default_sigint() -> None:
    """Run in the child before exec: Ctrl-C as a terminal delivers it. A shell starts background
    jobs with SIGINT ignored, and a Python started so never raises KeyboardInterrupt (the test would
    then wait for a child that cannot be interrupted), so the test must not depend on how it was run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_loop(
    tmp_path: Path,
    sig: int,
    rounds: int,
    check: Callable[[], None],
    start: Callable[[], Any],
    delays: tuple[float, float],
) -> None:
    rng = np.random.default_rng(sig)
    for _ in range(rounds):
        proc = start()
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(*delays)))
        proc.send_signal(sig)
        proc.wait(30)
        proc.stdout.close()
        check()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_while_writing_leaves_old_or_new_file(tmp_path: Path, sig: int) -> None:
    target = tmp_path / "out.onnx"
    size = 8 * 2**20
    target.write_bytes(bytes([2]) * size)
    wanted = {hashlib.sha256(bytes([v]) * size).hexdigest() for v in (1, 2)}

    def start() -> Any:
        return subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(REPO), str(target), str(size)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )

    def check() -> None:
        assert hashlib.sha256(target.read_bytes()).hexdigest() in wanted
        temps = [p for p in tmp_path.iterdir() if p != target]
        if sig == signal.SIGINT:
            assert temps == []  # Ctrl-C unwinds and removes the temporary file
        for p in temps:  # SIGKILL cannot be cleaned up after: a hidden .out.onnx.*.tmp may stay
            assert p.name.startswith(".out.onnx.") and p.name.endswith(".tmp"), p
            p.unlink()

    _kill_loop(tmp_path, sig, 6, check, start, (0.05, 0.4))


_PAIR_WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import bnfold
folds = [bnfold.fold(p, stream_external=True, verify=False) for p in sys.argv[2:4]]
print("ready", flush=True)
i = 0
try:
    while True:
        folds[i % 2].save(sys.argv[4])
        i += 1
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_external_data_save_keeps_model_and_data_paired(tmp_path: Path, sig: int) -> None:
    """A model with external data is two files renamed one after the other; Ctrl-C or SIGTERM at any
    moment leaves both old or both new (the signal waits until the pair is in place)."""
    sources = []
    for i in range(2):
        folder = tmp_path / f"src{i}"
        folder.mkdir()
        path = folder / "m.onnx"
        onnx.save(
            conv_bn_model(blocks=2, channels=192, in_channels=192, size=4, seed=i),
            str(path),
            save_as_external_data=True,
            location="m.data",
            size_threshold=0,
        )
        sources.append(path)
    pairs = set()
    for i, path in enumerate(sources):
        ref = tmp_path / f"ref{i}"
        ref.mkdir()
        bnfold.fold(path, stream_external=True, verify=False).save(ref / "out.onnx")
        pairs.add(((ref / "out.onnx").read_bytes(), (ref / "out.onnx.data").read_bytes()))
    assert len(pairs) == 2
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    script = (
        _PAIR_WRITER
        if sig == signal.SIGINT
        else _PAIR_WRITER.replace(
            "import bnfold\n",
            "import bnfold, signal\nfrom bnfold.cli.streams import sigterm_as_interrupt\nsigterm_as_interrupt()\n",
        )
    )

    def start() -> Any:
        return subprocess.Popen(
            [sys.executable, "-c", script, str(REPO), *map(str, sources), str(out)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )

    def check() -> None:
        names = sorted(p.name for p in out_dir.iterdir())
        assert names in ([], ["out.onnx", "out.onnx.data"]), names  # no temporary file either
        if names:
            assert (out.read_bytes(), (out_dir / "out.onnx.data").read_bytes()) in pairs

    _kill_loop(tmp_path, sig, 6, check, start, (0.05, 0.3))


def _big_model(path: Path) -> None:
    onnx.save(conv_bn_model(blocks=3, channels=448, in_channels=448, size=4, seed=3), str(path))  # ~22 MB


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_cli_killed_at_random_moments(tmp_path: Path, sig: int) -> None:
    """``bnfold`` on a ~22 MB model killed at random moments: the output is the previous one or
    the complete new one, never a truncated file; the input is never touched."""
    src = tmp_path / "big.onnx"
    _big_model(src)
    out = tmp_path / "big.folded.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "1"}
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bnfold", src, "--no-verify", "-q"], check=True, env=env, capture_output=True
    )
    elapsed = time.perf_counter() - t
    new = hashlib.sha256(out.read_bytes()).hexdigest()
    old = b"previous output"
    src_hash = hashlib.sha256(src.read_bytes()).hexdigest()
    seen: set[str] = set()

    def start() -> Any:
        out.write_bytes(old)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "print('ready', flush=True)\nimport runpy, sys\nsys.argv[0] = 'bnfold'\n"
                "runpy.run_module('bnfold', run_name='__main__')",
                src,
                "--no-verify",
                "-q",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_default_sigint,
        )
        procs.append(proc)
        return proc

    procs: list[Any] = []

    def check() -> None:
        proc = procs[-1]
        err = proc.stderr.read()
        proc.stderr.close()
        data = out.read_bytes()
        state = "old" if data == old else "new" if hashlib.sha256(data).hexdigest() == new else "CORRUPT"
        assert state != "CORRUPT", len(data)
        seen.add(state)
        assert hashlib.sha256(src.read_bytes()).hexdigest() == src_hash
        temps = [p for p in tmp_path.iterdir() if p not in (src, out)]
        if sig == signal.SIGINT:
            if proc.returncode == 130:
                assert err.strip().splitlines()[-1] == "bnfold: interrupted", err
            assert temps == [], temps
        for p in temps:
            assert p.name.startswith(".big.folded.onnx.") and p.name.endswith(".tmp"), p
            p.unlink()

    # Aim at the second half of a run, where the output is written.
    _kill_loop(tmp_path, sig, 8, check, start, (elapsed * 0.4, elapsed * 1.1))
    print(
        f"{signal.Signals(sig).name}: outputs seen {sorted(seen)}, exit codes {[p.returncode for p in procs]}, "
        f"a clean run takes {elapsed:.2f} s"
    )
    assert seen  # at least one state observed (typically both)


# ------------------------------------------------------------------------------------------------
# several processes at once


def test_concurrent_runs_on_the_same_model(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=3, channels=64, seed=5), str(src))
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    ext_src = ext_dir / "m.onnx"
    onnx.save(
        conv_bn_model(blocks=3, channels=64, seed=5),
        str(ext_src),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "1"}
    env.pop("GITHUB_STEP_SUMMARY", None)
    commands = [
        [src, "-q"],
        [src, "-q"],
        [src, "-q", "-o", tmp_path / "own1.onnx"],
        [src, "-q", "-o", tmp_path / "own2.onnx"],
        [ext_src, "-q"],
        [ext_src, "-q"],
        [ext_src, "-q", "-o", ext_dir / "own.onnx"],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bnfold", *map(str, c)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for c in commands
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.startswith("PASSED 3 folded"), out
    outputs = [tmp_path / "m.folded.onnx", tmp_path / "own1.onnx", tmp_path / "own2.onnx"]
    assert len({p.read_bytes() for p in outputs}) == 1
    for p in outputs:
        bnfold.testing.assert_models_close(src, p)
    # external data in, external data out: the data files are identical, and so are the models
    # once their data is loaded (each names its own data file)
    ext_outputs = [ext_dir / "m.folded.onnx", ext_dir / "own.onnx"]
    assert len({Path(f"{p}.data").read_bytes() for p in ext_outputs}) == 1
    assert len({onnx.load(str(p)).SerializeToString() for p in ext_outputs}) == 1
    for p in ext_outputs:
        bnfold.testing.assert_models_close(ext_src, p)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in ext_dir.iterdir() if p.name.startswith(".")) == []


def test_concurrent_in_place_runs(tmp_path: Path) -> None:
    """Three ``--in-place`` runs on one file at once: each reads the original or a complete fold
    (renames are atomic), so the file ends as the fold, whichever finishes last."""
    model = conv_bn_model(blocks=3, channels=64, seed=6)
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    reference = tmp_path / "ref"
    reference.mkdir()
    onnx.save(model, str(reference / "m.onnx"))
    assert invoke(reference / "m.onnx", "-q").exit_code == 0
    want = (reference / "m.folded.onnx").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "1"}
    env.pop("GITHUB_STEP_SUMMARY", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bnfold", str(src), "--in-place", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.startswith("PASSED "), out
    assert src.read_bytes() == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "ref"]


def test_concurrent_streamed_saves_of_external_data(tmp_path: Path) -> None:
    """Several processes saving the same fold (model + .data pair) over one path at once."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = _external(src_dir)
    out = tmp_path / "out.onnx"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bnfold\n"
        "r = bnfold.fold(sys.argv[2], stream_external=True, verify=False)\n"
        "for _ in range(5): r.save(sys.argv[3])\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(REPO), str(src), str(out)], stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data", "src"]
    bnfold.testing.assert_models_close(src, out)
