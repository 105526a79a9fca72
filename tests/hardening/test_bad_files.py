"""Bad model files, missing files, devices and hostile names: one-line errors, exit 2, nothing written or changed.

See tests/hardening_helpers.py for the shared checks."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_runner import invoke, run_module
from hardening_helpers import assert_one_line_error, base_model, mutated, node_named, snapshot

import bnfold
from bnfold.errors import BadInput

# ------------------------------------------------------------------------------------------------
# the catalogue: model files that are refused (exit 2)


def _undefined(m: onnx.ModelProto) -> None:
    node_named(m, "conv1").input[1] = "no_such_weight"


def _cycle(m: onnx.ModelProto) -> None:
    node_named(m, "conv0").input[0] = "y"  # conv0 <- ... <- relu1 (y) <- ... <- conv0


def _duplicate_initializer(m: onnx.ModelProto) -> None:
    t = onnx.TensorProto()
    t.CopyFrom(m.graph.initializer[0])
    m.graph.initializer.append(t)


def _duplicate_output(m: onnx.ModelProto) -> None:
    node_named(m, "relu0").output[0] = "conv0_out"


def _duplicate_input(m: onnx.ModelProto) -> None:
    v = onnx.ValueInfoProto()
    v.CopyFrom(m.graph.input[0])
    m.graph.input.append(v)


def _unimported_domain(m: onnx.ModelProto) -> None:
    node_named(m, "relu0").domain = "com.example"


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
    node_named(optional, "conv0").input.append("")
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
        node_named(m, "conv1").input[1] = "w\n\x1b[31mevil"

    src = tmp_path / "m.onnx"
    src.write_bytes(mutated(change))
    result = invoke(src)
    line = assert_one_line_error(result.exit_code, result.stdout, result.stderr, "reads")
    assert "\x1b" not in line and "\\n\\x1b[31mevil" in line
    with pytest.raises(BadInput) as info:
        bnfold.fold(src)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
