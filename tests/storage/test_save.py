"""Saving (bnfold.storage.save): external data in, external data out (streamed), in-place saves, and a
model over the single-file limit written with its data beside it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from storage_helpers import big_model, digest, has_inline_weights, in_memory, run_ort, save_external, values

import bnfold
from bnfold.storage.embedded import Embedded
from bnfold.storage.policy import StoragePolicy
from bnfold.testing import conv_bn_model


@pytest.mark.parametrize("stream", [True, False])
def test_external_model_folds_and_streams(tmp_path: Path, stream: bool) -> None:
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    model = conv_bn_model(blocks=3, channels=16)
    src = save_external(model, src_dir)
    before = digest(src_dir)
    result = bnfold.fold(src, stream_external=stream)
    assert len(result.report.folded) == 3
    assert result.verification is not None and result.verification.status == "passed"
    out = result.save(out_dir / "folded.onnx")
    assert digest(src_dir) == before  # the input and its data are untouched
    assert (out_dir / "folded.onnx.data").exists()  # external data in, external data out (streamed or not)
    assert not has_inline_weights(out)
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]
    x = np.random.default_rng(0).standard_normal([1, 3, 8, 8]).astype(np.float32)
    want, got = run_ort(src, x), run_ort(out, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    reloaded = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    assert not [n for n in reloaded.graph.node if n.op_type == "BatchNormalization"]


def test_streamed_fold_can_be_saved_in_place(tmp_path: Path) -> None:
    src = save_external(conv_bn_model(blocks=2, channels=8), tmp_path, location="model.onnx.data")
    x = np.random.default_rng(1).standard_normal([1, 3, 8, 8]).astype(np.float32)
    want = run_ort(src, x)
    result = bnfold.fold(src, stream_external=True, verify=False)
    result.save(src, force=True)
    got = run_ort(src, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_over_protobuf_limit_writes_external_data(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    src = tmp_path / "m.onnx"
    big_model(src)
    in_memory(src, tmp_path / "ref.onnx")
    result = bnfold.fold(src, verify=False, storage_policy=force_lazy)
    assert isinstance(result.spill, Embedded)
    # as if the folded model were over 2 GiB
    result.storage_policy = dataclasses.replace(result.storage_policy, single_file_limit=2**20)
    (tmp_path / "out").mkdir()
    out = result.save(tmp_path / "out" / "f.onnx")
    assert (tmp_path / "out" / "f.onnx.data").exists()
    got = values(onnx.load(str(out)))  # onnx reads the external data back
    ref = values(onnx.load(str(tmp_path / "ref.onnx")))
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        np.testing.assert_array_equal(got[name], value)
