"""Exit code 2: every bad input or usage is one line on stderr and writes nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_helpers import assert_usage_error, files, save
from cli_runner import invoke

from bnfold import cli
from bnfold.testing import conv_bn_model


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
