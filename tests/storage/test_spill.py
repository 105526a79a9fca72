"""The spill file (bnfold.storage.spill): folded tensors of an external-data model wait beside the
output and become its data file; a failed save leaves it reusable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from storage_helpers import digest, run_ort, save_external, spill_files

import bnfold
from bnfold.errors import BadInput
from bnfold.testing import conv_bn_model


@pytest.mark.parametrize("stream", [True, False])
def test_spill_beside_the_output_becomes_its_data_file(tmp_path: Path, stream: bool) -> None:
    """With the output path known, folded tensors are written once: the spill file in the output
    folder is renamed to ``<output>.data`` and the untouched tensors appended to it. Later saves
    (same path, another folder) still write the right data."""
    src_dir, out_dir, other = tmp_path / "src", tmp_path / "out", tmp_path / "other"
    for d in (src_dir, out_dir, other):
        d.mkdir()
    src = save_external(conv_bn_model(blocks=3, channels=16), src_dir)
    before = digest(src_dir)
    out = out_dir / "f.onnx"
    result = bnfold.fold(src, stream_external=stream, output=out)
    assert result.verification is not None and result.verification.status == "passed"
    assert len(spill_files(out_dir)) == int(stream)  # folded tensors wait beside the output
    result.save(out)
    assert sorted(p.name for p in out_dir.iterdir()) == ["f.onnx", "f.onnx.data"]
    assert digest(src_dir) == before
    x = np.random.default_rng(3).standard_normal([1, 3, 8, 8]).astype(np.float32)
    want = run_ort(src, x)
    np.testing.assert_allclose(run_ort(out, x), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    onnx.checker.check_model(str(out), full_check=True)
    first = (out.read_bytes(), (out_dir / "f.onnx.data").read_bytes())
    result.save(out)  # again over itself: reads the adopted file through the open descriptor
    result.save(other / "g.onnx")
    (out_dir / "f.onnx.data").unlink()  # whatever happens to the written files afterwards
    result.save(other / "h.onnx")
    for p in (out, other / "g.onnx", other / "h.onnx"):
        if p.exists() and Path(f"{p}.data").exists():
            np.testing.assert_allclose(run_ort(p, x), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert (
        onnx.load(str(other / "g.onnx")).SerializeToString()
        == onnx.load(str(other / "h.onnx")).SerializeToString()
    )
    assert len(first[1]) > 0
    del result
    assert spill_files(out_dir) == [] and spill_files(other) == []


def test_spill_beside_the_output_with_in_place_save(tmp_path: Path) -> None:
    src = save_external(conv_bn_model(blocks=2, channels=8), tmp_path, location="model.onnx.data")
    x = np.random.default_rng(1).standard_normal([1, 3, 8, 8]).astype(np.float32)
    want = run_ort(src, x)
    result = bnfold.fold(src, stream_external=True, verify=False, output=src)
    result.save(src, force=True)
    np.testing.assert_allclose(run_ort(src, x), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    del result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_a_failed_save_leaves_the_spill_beside_the_output_reusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while appending to the spill file: no output, the spill file cut back to what
    it held, and a retry writes a correct model."""
    import errno

    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    model = conv_bn_model(blocks=3, channels=16)
    y = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Mul", [y, "untouched"], ["scaled"]))
    model.graph.initializer.append(
        onnx.numpy_helper.from_array(np.full((1, 16, 1, 1), 0.5, np.float32), "untouched")
    )
    model.graph.output[0].name = "scaled"
    src = save_external(model, src_dir)
    out = out_dir / "f.onnx"
    result = bnfold.fold(src, stream_external=True, verify=False, output=out)
    (spill,) = spill_files(out_dir)
    held = (out_dir / spill).read_bytes()

    real_write = os.write

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def partly(fd: int, data: bytes) -> int:  # some bytes land, then the disk is full
        real_write(fd, bytes(memoryview(data)[: max(1, len(data) // 2)]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "copy_file_range", full)
        m.setattr(os, "write", partly)
        with pytest.raises(BadInput, match="No space left on device"):
            result.save(out)
    assert sorted(p.name for p in out_dir.iterdir()) == [spill]
    assert (out_dir / spill).read_bytes() == held
    result.save(out)
    bnfold.testing.assert_models_close(src, out)
    assert sorted(p.name for p in out_dir.iterdir()) == ["f.onnx", "f.onnx.data"]
