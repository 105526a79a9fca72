"""Large single-file models are folded without loading their big weights (bnfold.storage.embedded):
every result here is compared with onnx.load + fold in memory + onnx.save, and tensor values with
numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from storage_helpers import MODELS, big_model, in_memory, lazy_candidate, sha, values

import bnfold
from bnfold.errors import BadInput
from bnfold.storage.embedded import Embedded
from bnfold.storage.policy import StoragePolicy


@pytest.mark.parametrize("src", MODELS, ids=[p.stem for p in MODELS])
def test_lazy_save_is_byte_identical_to_in_memory_fold(
    tmp_path: Path, src: Path, force_lazy: StoragePolicy
) -> None:
    want = in_memory(src, tmp_path / "ref.onnx")
    before = sha(src)
    result = bnfold.fold(src, verify=False, storage_policy=force_lazy)
    assert isinstance(result.spill, Embedded) == lazy_candidate(src)
    out = result.save(tmp_path / "lazy.onnx")
    assert out.read_bytes() == want
    # the complete model an API user reads serializes to the same bytes
    assert result.model.SerializeToString() == want
    assert result.spill is None  # materialized once
    assert result.save(tmp_path / "again.onnx").read_bytes() == want
    assert sha(src) == before


def test_lazy_candidate_models_exist() -> None:
    assert sum(lazy_candidate(p) for p in MODELS) >= 30  # the parametrized test above exercises the lazy path


def test_big_model_defaults_byte_identical_and_values(tmp_path: Path) -> None:
    src = tmp_path / "big.onnx"
    original = big_model(src)
    assert src.stat().st_size > 4 * 2**20
    policy = StoragePolicy(embedded_threshold=2**20)  # the default tensor thresholds
    want = in_memory(src, tmp_path / "ref.onnx")
    before = sha(src)
    result = bnfold.fold(src, verify=True, storage_policy=policy)
    assert isinstance(result.spill, Embedded)
    assert result.verification is not None and result.verification.status == "passed"
    assert len(result.report.folded) == 4
    out = result.save(tmp_path / "lazy.onnx")
    assert out.read_bytes() == want
    assert sha(src) == before
    got = values(onnx.load(str(out)))
    ref = values(onnx.load(str(tmp_path / "ref.onnx")))
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        np.testing.assert_array_equal(got[name], value)
    # untouched tensors are the original's, bit for bit
    orig = values(original)
    np.testing.assert_array_equal(got["unused_fp16"], orig["unused_fp16"])
    # folded weights: W * gamma / sqrt(var + eps), in numpy
    for i in range(4):
        g, v = orig[f"gamma{i}"].astype(np.float64), orig[f"var{i}"].astype(np.float64)
        scale = g / np.sqrt(v + 1e-5)
        expect = (orig[f"w{i}"].astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
        conv = next(n for n in onnx.load(str(out)).graph.node if n.name == f"conv{i}")
        np.testing.assert_allclose(got[conv.input[1]], expect, rtol=2e-7, atol=0)


def test_in_place_save(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    src = tmp_path / "m.onnx"
    big_model(src)
    want = in_memory(src, tmp_path / "ref.onnx")
    result = bnfold.fold(src, verify=False, storage_policy=force_lazy)
    assert isinstance(result.spill, Embedded)
    result.save(src, force=True)
    assert src.read_bytes() == want
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # the result still reads the original weights (the file it opened), not the new file
    assert result.save(tmp_path / "second.onnx").read_bytes() == want
    assert result.model.SerializeToString() == want


def test_refuses_to_overwrite_input_without_force(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    src = tmp_path / "m.onnx"
    big_model(src)
    before = sha(src)
    result = bnfold.fold(src, verify=False, storage_policy=force_lazy)
    with pytest.raises(BadInput, match="refusing to overwrite"):
        result.save(src)
    assert sha(src) == before


def test_dry_run_size_and_checker(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    src = tmp_path / "m.onnx"
    big_model(src)
    want = in_memory(src, tmp_path / "ref.onnx")
    result = bnfold.fold(src, verify=False, storage_policy=force_lazy)
    assert result.byte_size() == len(want)  # without reading the weights
    assert isinstance(result.spill, Embedded)
    assert result.model.ByteSize() == len(want)
    assert result.byte_size() == len(want)
    onnx.checker.check_model(result.model, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in result.model.graph.initializer)
