"""``bnfold.inspect``: the BNs of a model in graph order, whether each folds, as data."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import bnfold
from bnfold.inspection import BatchNormInfo, Inspection
from bnfold.testing import conv_bn_model


def test_inspect_lists_every_bn_in_graph_order(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=2, matmul_bn=True), str(src))
    before = src.read_bytes()
    found = bnfold.inspect(src)
    assert isinstance(found, Inspection)
    assert [b.bn for b in found.batchnorms] == ["bn0", "bn1", "bn_mm"]
    assert [b.foldable for b in found.batchnorms] == [True, True, False]
    assert (found.foldable, found.kept, found.kept_after_linear) == (2, 1, ["bn_mm"])
    mm = found.batchnorms[2]
    assert (mm.follows_op, mm.code, mm.pattern) == ("MatMul", "channel_axis", None)
    conv = found.batchnorms[0]
    assert (conv.follows_op, conv.follows, conv.pattern, conv.code) == ("Conv", "conv0", "bn_after", None)
    assert conv.message == "folds into Conv conv0 (bn_after)"
    # the node counts are those of the fold itself: two BNs gone
    assert found.nodes_before - found.nodes_after == 2
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_inspect_accepts_a_model_proto_and_matches_the_path() -> None:
    model = conv_bn_model(blocks=3)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    found = bnfold.inspect(model)
    assert model == copy  # the caller's model is not modified
    assert [b.bn for b in found.batchnorms] == ["bn0", "bn1", "bn2"]
    assert all(isinstance(b, BatchNormInfo) and b.foldable for b in found.batchnorms)


def test_inspect_accepts_an_onnx_ir_model() -> None:
    import onnx_ir

    model = conv_bn_model(blocks=2)
    found = bnfold.inspect(onnx_ir.from_proto(model))
    assert [b.bn for b in found.batchnorms] == ["bn0", "bn1"]
    assert found.to_dict() == bnfold.inspect(model).to_dict()


def test_to_dict_is_the_json_record() -> None:
    found = bnfold.inspect(conv_bn_model(matmul_bn=True))
    doc = found.to_dict()
    assert list(doc) == ["batchnorms", "foldable", "kept", "kept_after_linear", "nodes_before", "nodes_after"]
    assert list(doc["batchnorms"][0]) == [
        "bn",
        "graph",
        "follows_op",
        "follows",
        "foldable",
        "code",
        "pattern",
        "message",
    ]
    assert doc["kept_after_linear"] == ["bn_mm"] and doc["foldable"] == 1


def test_inspect_refuses_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(bnfold.BadInput):
        bnfold.inspect(tmp_path / "junk.onnx")


def test_inspect_is_public_and_lazy() -> None:
    assert "inspect" in bnfold.__all__ and callable(bnfold.inspect)
    assert bnfold.inspect is __import__("bnfold.inspection", fromlist=["inspect"]).inspect


def test_inspect_with_merge_branches_matches_fold() -> None:
    path = Path(__file__).resolve().parents[1] / "models" / "onnx" / "case_repvgg_block.onnx"
    plain = bnfold.inspect(path)
    assert [b.code for b in plain.batchnorms if not b.foldable] == ["needs_merge_branches"]
    merged = bnfold.inspect(path, merge_branches=True)
    report = bnfold.fold(path, verify=False, merge_branches=True).report
    assert sorted((b.bn, b.pattern) for b in merged.batchnorms) == sorted(
        (p.bn, p.pattern) for p in report.folded
    )
    assert merged.kept == 0 and merged.nodes_after == report.nodes_after
