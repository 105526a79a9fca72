"""Loading (bnfold.storage.load): the lazy path for large files gives the same errors as reading the
whole file, and the public loader always returns complete models."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from storage_helpers import big_model, in_memory

import bnfold
from bnfold.errors import BadInput
from bnfold.storage.load import load_model
from bnfold.storage.policy import StoragePolicy
from bnfold.testing import conv_bn_model


def _errors(path: Path) -> tuple[str, str]:
    """The BadInput message with the lazy path forced, and with it off."""
    messages = []
    for policy in (
        StoragePolicy(embedded_threshold=0, lazy_min_bytes=1, lazy_min_fraction=0.0),
        StoragePolicy(embedded_threshold=1 << 62),
    ):
        with pytest.raises(BadInput) as info:
            bnfold.fold(path, verify=False, storage_policy=policy)
        messages.append(str(info.value))
    return messages[0], messages[1]


@pytest.mark.parametrize("where", [0.001, 0.3, 0.5, 0.9, -1])
def test_truncated_file_same_error(tmp_path: Path, where: float) -> None:
    src = tmp_path / "m.onnx"
    big_model(src)
    data = src.read_bytes()
    cut = len(data) - 1 if where == -1 else int(len(data) * where)
    src.write_bytes(data[:cut])
    lazy, plain = _errors(src)
    assert lazy == plain
    assert "\n" not in lazy


def test_corrupt_length_same_error(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    big_model(src)
    data = bytearray(src.read_bytes())
    # the graph field's length prefix (right after its tag 0x3a), made to overrun the file
    g = data.index(b"\x3a", 2)
    data[g + 1 : g + 4] = b"\xff\xff\x7f"
    src.write_bytes(bytes(data))
    lazy, plain = _errors(src)
    assert lazy == plain


def test_corrupt_node_same_error(tmp_path: Path) -> None:
    """Bytes the walk skips (a node) but protobuf rejects: the whole file is read, same message."""
    src = tmp_path / "m.onnx"
    model = big_model(src)
    data = bytearray(src.read_bytes())
    node = model.graph.node[0].SerializeToString()
    at = data.index(node)
    data[at : at + len(node)] = b"\xff" * len(node)
    src.write_bytes(bytes(data))
    lazy, plain = _errors(src)
    assert lazy == plain
    assert "not an ONNX model" in lazy


def test_invalid_structure_same_error(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    model = conv_bn_model(blocks=2, channels=64)
    model.graph.initializer.append(model.graph.initializer[0])  # defined twice
    onnx.save(model, str(src))
    lazy, plain = _errors(src)
    assert lazy == plain
    assert "defined twice" in lazy


def test_lazy_false_reads_the_whole_file(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    src = tmp_path / "m.onnx"
    big_model(src)
    want = in_memory(src, tmp_path / "ref.onnx")
    result = bnfold.fold(src, verify=False, lazy=False, storage_policy=force_lazy)
    assert result.spill is None
    assert result.save(tmp_path / "out.onnx").read_bytes() == want


def test_load_model_stays_complete(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    """The public loader never returns virtual tensors."""
    src = tmp_path / "m.onnx"
    big_model(src)
    model, _, _ = load_model(src, policy=force_lazy)
    assert model.SerializeToString() == onnx.load(str(src)).SerializeToString()
