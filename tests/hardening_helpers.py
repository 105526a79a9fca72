"""Shared by the hardening tests (tests/hardening/): file snapshots, the one-line error check and
the small model the catalogue mutates."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

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


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def external_model(tmp_path: Path, location: str = "weights.bin") -> Path:
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
