"""External data locations (bnfold.storage.external_data): unsafe, missing and truncated data refused."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from storage_helpers import save_external

import bnfold
from bnfold.errors import BadInput
from bnfold.testing import conv_bn_model


def _with_location(tmp_path: Path, location: str) -> Path:
    src = save_external(conv_bn_model(), tmp_path)
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model.SerializeToString())
    return bad


@pytest.mark.parametrize("stream", [True, None])
def test_unsafe_locations_are_refused(tmp_path: Path, stream: bool | None) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}_outside.bin"
    outside.write_bytes(b"\0" * 4096)
    (tmp_path / "link.bin").symlink_to(outside)
    for location, why in ((str(outside), "absolute"), ("../x.bin", r"\.\."), ("link.bin", "outside")):
        bad = _with_location(tmp_path, location)
        with pytest.raises(BadInput, match=why):
            bnfold.fold(bad, stream_external=stream)
    outside.unlink()


def test_missing_and_truncated_external_data(tmp_path: Path) -> None:
    src = save_external(conv_bn_model(), tmp_path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(BadInput, match="truncated"):
        bnfold.fold(src)
    os.unlink(data)
    with pytest.raises(BadInput, match="missing"):
        bnfold.fold(src)
