"""Model files laid out unusually on the wire (bnfold.storage.wire): left in the file only where the
saved bytes are still those of onnx.load + fold in memory + onnx.save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from storage_helpers import in_memory

import bnfold
from bnfold.storage.embedded import Embedded
from bnfold.storage.policy import StoragePolicy
from bnfold.storage.wire import varint_bytes
from bnfold.testing import conv_bn_model


def _field(number: int, payload: bytes) -> bytes:
    return varint_bytes((number << 3) | 2) + varint_bytes(len(payload)) + payload


def _model_bytes_with_extra_initializer(model: onnx.ModelProto, tensor_bytes: bytes) -> bytes:
    """``model`` serialized with one more initializer, given as raw wire bytes, at the end of
    its (single) graph field."""
    g = model.graph.SerializeToString() + _field(5, tensor_bytes)
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    return rest.SerializeToString() + _field(7, g)


def _check_odd_file(tmp_path: Path, data: bytes, expect_lazy: bool, policy: StoragePolicy) -> None:
    src = tmp_path / "odd.onnx"
    src.write_bytes(data)
    want = in_memory(src, tmp_path / "ref.onnx")
    result = bnfold.fold(src, verify=False, storage_policy=policy)
    assert isinstance(result.spill, Embedded) == expect_lazy
    assert result.save(tmp_path / "lazy.onnx").read_bytes() == want


def test_raw_data_twice_keeps_the_last(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    model = conv_bn_model(blocks=2, channels=8)
    first, last = np.zeros(64, np.float32), np.arange(64, dtype=np.float32)
    t = numpy_helper.from_array(first, "twice")
    wire = t.SerializeToString() + _field(9, last.tobytes())
    data = _model_bytes_with_extra_initializer(model, wire)
    loaded = onnx.load_from_string(data)
    np.testing.assert_array_equal(
        numpy_helper.to_array(loaded.graph.initializer[-1]), last
    )  # protobuf: last wins
    _check_odd_file(
        tmp_path, data, expect_lazy=True, policy=force_lazy
    )  # the others are still left in the file
    out = onnx.load(str(tmp_path / "lazy.onnx"))
    np.testing.assert_array_equal(
        numpy_helper.to_array(next(x for x in out.graph.initializer if x.name == "twice")), last
    )


def test_unusual_field_orders(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    model = conv_bn_model(blocks=2, channels=8)
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    # raw_data first, doc_string before it, name last; dims packed
    wire = (
        _field(9, value.tobytes())
        + _field(12, b"doc")
        + varint_bytes(2 << 3)
        + b"\x01"
        + _field(1, b"\x03\x04")
        + _field(8, b"odd")
    )
    data = _model_bytes_with_extra_initializer(model, wire)
    assert numpy_helper.to_array(onnx.load_from_string(data).graph.initializer[-1]).tolist() == value.tolist()
    _check_odd_file(tmp_path, data, expect_lazy=True, policy=force_lazy)


def test_unknown_tensor_field_stays_embedded(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    model = conv_bn_model(blocks=2, channels=8)
    t = numpy_helper.from_array(np.ones(16, np.float32), "unknown_field")
    wire = varint_bytes(50 << 3) + b"\x07" + t.SerializeToString()  # field 50: unknown to onnx
    _check_odd_file(
        tmp_path, _model_bytes_with_extra_initializer(model, wire), expect_lazy=True, policy=force_lazy
    )


def test_graph_field_twice_reads_whole_file(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    model = conv_bn_model(blocks=2, channels=8)
    extra = onnx.GraphProto()
    extra.initializer.append(numpy_helper.from_array(np.ones(16, np.float32), "merged"))
    data = model.SerializeToString() + _field(7, extra.SerializeToString())  # protobuf merges both
    assert "merged" in {t.name for t in onnx.load_from_string(data).graph.initializer}
    _check_odd_file(tmp_path, data, expect_lazy=False, policy=force_lazy)
