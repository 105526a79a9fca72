"""The storage thresholds (bnfold.storage.policy) reach every step that uses them: loading, the
pass's tensor store and saving. Folded models are checked against the source in onnxruntime."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from storage_helpers import has_inline_weights, run_ort, save_external

import bnfold
from bnfold.storage.policy import PROTOBUF_LIMIT, StoragePolicy
from bnfold.storage.spill import Spill
from bnfold.testing import conv_bn_model


def test_defaults_are_the_products() -> None:
    policy = StoragePolicy()
    assert (policy.stream_threshold, policy.embedded_threshold, policy.lazy_min_bytes) == (
        512 * 2**20,
        16 * 2**20,
        16 * 1024,
    )
    assert (policy.lazy_min_fraction, policy.external_threshold) == (0.5, 1024)
    assert policy.single_file_limit == PROTOBUF_LIMIT == 2**31 - 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.external_threshold = 1  # type: ignore[misc]


def _close_to_source(src: Path, out: Path) -> None:
    x = np.random.default_rng(5).standard_normal([1, 3, 8, 8]).astype(np.float32)
    want = run_ort(src, x)
    np.testing.assert_allclose(run_ort(out, x), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_stream_threshold_decides_whether_external_data_stays_on_disk(tmp_path: Path) -> None:
    src = save_external(conv_bn_model(blocks=2, channels=16), tmp_path)
    loaded = bnfold.fold(src, verify=False)  # a few KiB: read into memory by default
    streamed = bnfold.fold(src, verify=False, storage_policy=StoragePolicy(stream_threshold=0))
    assert loaded.spill is None
    assert isinstance(streamed.spill, Spill) and streamed.spill.size > 0  # folded tensors went to disk
    for name, result in (("loaded.onnx", loaded), ("streamed.onnx", streamed)):
        _close_to_source(src, result.save(tmp_path / name))


def test_external_threshold_decides_which_tensors_leave_the_proto(tmp_path: Path) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = save_external(conv_bn_model(blocks=2, channels=16), src_dir)
    never = StoragePolicy(external_threshold=1 << 40)  # no tensor is large enough to leave the proto
    kept = bnfold.fold(src, verify=False, stream_external=True, storage_policy=never)
    assert isinstance(kept.spill, Spill) and kept.spill.size == 0  # folded weights stayed inline
    out = kept.save(tmp_path / "kept.onnx")
    assert has_inline_weights(out)  # and the save left them there
    _close_to_source(src, out)
    default = bnfold.fold(src, verify=False, stream_external=True)
    out = default.save(tmp_path / "default.onnx")
    assert not has_inline_weights(out)
    _close_to_source(src, out)
