"""External data: folded in bounded memory, streamed to the output, unsafe locations refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bnfold
from bnfold.errors import BadInput
from bnfold.testing import conv_bn_model


def _save_external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> Path:
    path = folder / "model.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def has_inline_weights(path: Path) -> bool:
    """True if a tensor of at least 1 KiB is stored inside the model file itself."""
    m = onnx.load(str(path), load_external_data=False)
    return any(
        t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() >= 1024 for t in m.graph.initializer
    )


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("stream", [True, False])
def test_external_model_folds_and_streams(tmp_path: Path, stream: bool) -> None:
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    model = conv_bn_model(blocks=3, channels=16)
    src = _save_external(model, src_dir)
    before = _digest(src_dir)
    result = bnfold.fold(src, stream_external=stream)
    assert len(result.report.folded) == 3
    assert result.verification is not None and result.verification.status == "passed"
    out = result.save(out_dir / "folded.onnx")
    assert _digest(src_dir) == before  # the input and its data are untouched
    assert (out_dir / "folded.onnx.data").exists()  # external data in, external data out (streamed or not)
    assert not has_inline_weights(out)
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]
    x = np.random.default_rng(0).standard_normal([1, 3, 8, 8]).astype(np.float32)
    want, got = _run(src, x), _run(out, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    reloaded = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    assert not [n for n in reloaded.graph.node if n.op_type == "BatchNormalization"]


def test_streamed_fold_can_be_saved_in_place(tmp_path: Path) -> None:
    src = _save_external(conv_bn_model(blocks=2, channels=8), tmp_path, location="model.onnx.data")
    x = np.random.default_rng(1).standard_normal([1, 3, 8, 8]).astype(np.float32)
    want = _run(src, x)
    result = bnfold.fold(src, stream_external=True, verify=False)
    result.save(src, force=True)
    got = _run(src, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def _with_location(tmp_path: Path, location: str) -> Path:
    src = _save_external(conv_bn_model(), tmp_path)
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
    src = _save_external(conv_bn_model(), tmp_path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(BadInput, match="truncated"):
        bnfold.fold(src)
    os.unlink(data)
    with pytest.raises(BadInput, match="missing"):
        bnfold.fold(src)


def _spill_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".bnfold-spill-"))


@pytest.mark.parametrize("stream", [True, False])
def test_spill_beside_the_output_becomes_its_data_file(tmp_path: Path, stream: bool) -> None:
    """With the output path known, folded tensors are written once: the spill file in the output
    folder is renamed to ``<output>.data`` and the untouched tensors appended to it. Later saves
    (same path, another folder) still write the right data."""
    src_dir, out_dir, other = tmp_path / "src", tmp_path / "out", tmp_path / "other"
    for d in (src_dir, out_dir, other):
        d.mkdir()
    src = _save_external(conv_bn_model(blocks=3, channels=16), src_dir)
    before = _digest(src_dir)
    out = out_dir / "f.onnx"
    result = bnfold.fold(src, stream_external=stream, output=out)
    assert result.verification is not None and result.verification.status == "passed"
    assert len(_spill_files(out_dir)) == int(stream)  # folded tensors wait beside the output
    result.save(out)
    assert sorted(p.name for p in out_dir.iterdir()) == ["f.onnx", "f.onnx.data"]
    assert _digest(src_dir) == before
    x = np.random.default_rng(3).standard_normal([1, 3, 8, 8]).astype(np.float32)
    want = _run(src, x)
    np.testing.assert_allclose(_run(out, x), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    onnx.checker.check_model(str(out), full_check=True)
    first = (out.read_bytes(), (out_dir / "f.onnx.data").read_bytes())
    result.save(out)  # again over itself: reads the adopted file through the open descriptor
    result.save(other / "g.onnx")
    (out_dir / "f.onnx.data").unlink()  # whatever happens to the written files afterwards
    result.save(other / "h.onnx")
    for p in (out, other / "g.onnx", other / "h.onnx"):
        if p.exists() and Path(f"{p}.data").exists():
            np.testing.assert_allclose(_run(p, x), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert (
        onnx.load(str(other / "g.onnx")).SerializeToString()
        == onnx.load(str(other / "h.onnx")).SerializeToString()
    )
    assert len(first[1]) > 0
    del result
    assert _spill_files(out_dir) == [] and _spill_files(other) == []


def test_spill_beside_the_output_with_in_place_save(tmp_path: Path) -> None:
    src = _save_external(conv_bn_model(blocks=2, channels=8), tmp_path, location="model.onnx.data")
    x = np.random.default_rng(1).standard_normal([1, 3, 8, 8]).astype(np.float32)
    want = _run(src, x)
    result = bnfold.fold(src, stream_external=True, verify=False, output=src)
    result.save(src, force=True)
    np.testing.assert_allclose(_run(src, x), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
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
    src = _save_external(model, src_dir)
    out = out_dir / "f.onnx"
    result = bnfold.fold(src, stream_external=True, verify=False, output=out)
    (spill,) = _spill_files(out_dir)
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
