"""Bad external data, bad BNs inside valid models (per-BN skips, the rest folds), bad options and output paths.

See tests/hardening_helpers.py for the shared checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_runner import invoke
from hardening_helpers import (
    assert_one_line_error,
    base_model,
    external_model,
    mutated,
    node_named,
    set_init,
    snapshot,
)
from onnx import helper

import bnfold
from bnfold.errors import BadInput
from bnfold.testing import conv_bn_model

# ------------------------------------------------------------------------------------------------
# external data


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
    src = external_model(folder)
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
    src = external_model(tmp_path, location="out.onnx.data")
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
        node_named(m, "conv1").input[0] = "x"  # keep the second block fed
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
        node_named(m, "relu1").domain = "com.example"
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
