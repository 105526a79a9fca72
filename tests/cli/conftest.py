"""The ``folder`` fixture: two small Conv+BN models (one and two blocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import save

from bnfold.testing import conv_bn_model


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    save(conv_bn_model(blocks=1, seed=0), tmp_path / "a.onnx")
    save(conv_bn_model(blocks=2, seed=1), tmp_path / "b.onnx")
    return tmp_path
