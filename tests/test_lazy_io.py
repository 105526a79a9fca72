"""Large single-file models are folded without loading their big weights (bnfold.storage.embedded): every result here is compared with onnx.load + fold in memory + onnx.save,
and tensor values with numpy."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
from bnfold.errors import BadInput
from bnfold.storage.embedded import Embedded
from bnfold.storage.load import load_model
from bnfold.storage.policy import StoragePolicy
from bnfold.storage.wire import varint_bytes
from bnfold.testing import conv_bn_model

MODELS = sorted((Path(__file__).resolve().parent.parent / "models" / "onnx").glob("*.onnx"))


@pytest.fixture
def force_lazy() -> StoragePolicy:
    """Every file read lazily, every raw_data initializer left in it, every folded tensor in memory."""
    return StoragePolicy(embedded_threshold=0, lazy_min_bytes=1, lazy_min_fraction=0.0, external_threshold=1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _in_memory(src: Path, out: Path, **opts: object) -> bytes:
    """The reference: onnx.load, fold the ModelProto in memory, onnx.save."""
    result = bnfold.fold(onnx.load(str(src)), verify=False, **opts)
    onnx.save(result.model, str(out))
    return out.read_bytes()


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _lazy_candidate(path: Path) -> bool:
    """Whether the lazy path should take the file (thresholds forced low): a main-graph
    initializer with non-empty raw_data, and no external data anywhere."""
    m = onnx.load(str(path), load_external_data=False)
    return any(t.HasField("raw_data") and t.raw_data for t in m.graph.initializer)


@pytest.mark.parametrize("src", MODELS, ids=[p.stem for p in MODELS])
def test_lazy_save_is_byte_identical_to_in_memory_fold(
    tmp_path: Path, src: Path, force_lazy: StoragePolicy
) -> None:
    want = _in_memory(src, tmp_path / "ref.onnx")
    before = _sha(src)
    result = bnfold.fold(src, verify=False, storage_policy=force_lazy)
    assert isinstance(result.spill, Embedded) == _lazy_candidate(src)
    out = result.save(tmp_path / "lazy.onnx")
    assert out.read_bytes() == want
    # the complete model an API user reads serializes to the same bytes
    assert result.model.SerializeToString() == want
    assert result.spill is None  # materialized once
    assert result.save(tmp_path / "again.onnx").read_bytes() == want
    assert _sha(src) == before


def test_lazy_candidate_models_exist() -> None:
    assert (
        sum(_lazy_candidate(p) for p in MODELS) >= 30
    )  # the parametrized test above exercises the lazy path


def _big_model(path: Path) -> onnx.ModelProto:
    """A multi-MB conv/BN chain with tensors carrying fields after raw_data (doc_string 12,
    metadata_props 16), an unused fp16 tensor, and a small one."""
    model = conv_bn_model(blocks=4, channels=192, size=8, seed=3)
    inits = {t.name: t for t in model.graph.initializer}
    inits["w1"].doc_string = "conv 1 weight"
    meta = inits["w2"].metadata_props.add()
    meta.key, meta.value = "origin", "test"
    inits["w3"].doc_string = "last"
    extra = numpy_helper.from_array(np.arange(300_000, dtype=np.float16).reshape(600, 500), "unused_fp16")
    extra.doc_string = "kept as it is"
    model.graph.initializer.append(extra)
    onnx.save(model, str(path))
    return model


def test_big_model_defaults_byte_identical_and_values(tmp_path: Path) -> None:
    src = tmp_path / "big.onnx"
    original = _big_model(src)
    assert src.stat().st_size > 4 * 2**20
    policy = StoragePolicy(embedded_threshold=2**20)  # the default tensor thresholds
    want = _in_memory(src, tmp_path / "ref.onnx")
    before = _sha(src)
    result = bnfold.fold(src, verify=True, storage_policy=policy)
    assert isinstance(result.spill, Embedded)
    assert result.verification is not None and result.verification.status == "passed"
    assert len(result.report.folded) == 4
    out = result.save(tmp_path / "lazy.onnx")
    assert out.read_bytes() == want
    assert _sha(src) == before
    got = _values(onnx.load(str(out)))
    ref = _values(onnx.load(str(tmp_path / "ref.onnx")))
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        np.testing.assert_array_equal(got[name], value)
    # untouched tensors are the original's, bit for bit
    orig = _values(original)
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
    _big_model(src)
    want = _in_memory(src, tmp_path / "ref.onnx")
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
    _big_model(src)
    before = _sha(src)
    result = bnfold.fold(src, verify=False, storage_policy=force_lazy)
    with pytest.raises(BadInput, match="refusing to overwrite"):
        result.save(src)
    assert _sha(src) == before


def test_dry_run_size_and_checker(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    src = tmp_path / "m.onnx"
    _big_model(src)
    want = _in_memory(src, tmp_path / "ref.onnx")
    result = bnfold.fold(src, verify=False, storage_policy=force_lazy)
    assert result.byte_size() == len(want)  # without reading the weights
    assert isinstance(result.spill, Embedded)
    assert result.model.ByteSize() == len(want)
    assert result.byte_size() == len(want)
    onnx.checker.check_model(result.model, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in result.model.graph.initializer)


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
    _big_model(src)
    data = src.read_bytes()
    cut = len(data) - 1 if where == -1 else int(len(data) * where)
    src.write_bytes(data[:cut])
    lazy, plain = _errors(src)
    assert lazy == plain
    assert "\n" not in lazy


def test_corrupt_length_same_error(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    _big_model(src)
    data = bytearray(src.read_bytes())
    # the graph field's length prefix (right after its tag 0x3a), made to overrun the file
    g = data.index(b"\x3a", 2)
    data[g + 1 : g + 4] = b"\xff\xff\x7f"
    src.write_bytes(bytes(data))
    lazy, plain = _errors(src)
    assert lazy == plain


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
    want = _in_memory(src, tmp_path / "ref.onnx")
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


def test_over_protobuf_limit_writes_external_data(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    src = tmp_path / "m.onnx"
    _big_model(src)
    _in_memory(src, tmp_path / "ref.onnx")
    result = bnfold.fold(src, verify=False, storage_policy=force_lazy)
    assert isinstance(result.spill, Embedded)
    # as if the folded model were over 2 GiB
    result.storage_policy = dataclasses.replace(result.storage_policy, single_file_limit=2**20)
    (tmp_path / "out").mkdir()
    out = result.save(tmp_path / "out" / "f.onnx")
    assert (tmp_path / "out" / "f.onnx.data").exists()
    got = _values(onnx.load(str(out)))  # onnx reads the external data back
    ref = _values(onnx.load(str(tmp_path / "ref.onnx")))
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        np.testing.assert_array_equal(got[name], value)


def test_lazy_false_reads_the_whole_file(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    src = tmp_path / "m.onnx"
    _big_model(src)
    want = _in_memory(src, tmp_path / "ref.onnx")
    result = bnfold.fold(src, verify=False, lazy=False, storage_policy=force_lazy)
    assert result.spill is None
    assert result.save(tmp_path / "out.onnx").read_bytes() == want


def test_load_model_stays_complete(tmp_path: Path, force_lazy: StoragePolicy) -> None:
    """The public loader never returns virtual tensors."""
    src = tmp_path / "m.onnx"
    _big_model(src)
    model, _, _ = load_model(src, policy=force_lazy)
    assert model.SerializeToString() == onnx.load(str(src)).SerializeToString()


def test_corrupt_node_same_error(tmp_path: Path) -> None:
    """Bytes the walk skips (a node) but protobuf rejects: the whole file is read, same message."""
    src = tmp_path / "m.onnx"
    model = _big_model(src)
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
