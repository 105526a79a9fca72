"""The bounded rank walk of bnfold.onnx.shapes (no shape inference pass): ranks through Shape,
Size, Gather, Unsqueeze, Squeeze and Reshapes whose shapes are computed (the legacy exporter's
``Concat(Unsqueeze(Gather(Shape(x), i)), ...)``), each against the rank onnxruntime computes, and
the cases it cannot prove."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from onnx_builders import F32, GraphBuilder, run_ort

from bnfold.onnx.edits import Scope
from bnfold.onnx.index import NameAllocator
from bnfold.onnx.tensor_store import MemoryStore

I64 = np.int64


def _model_of(build: Callable[[GraphBuilder], str], opset: int) -> tuple[object, str]:
    """X [2, 3, 4] -> ``build`` -> its value as the graph output, declared without a shape."""
    gb = GraphBuilder()
    gb.input("X", F32, [2, 3, 4])
    value = build(gb)
    gb.output(value, F32, None)
    model = gb.model(opset)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    return model, value


def _walked_rank(model: object, value: str, opset: int) -> int | None:
    graph = model.graph  # type: ignore[attr-defined]
    ir = model.ir_version  # type: ignore[attr-defined]
    return Scope.build(graph, "main", {"": opset}, ir, MemoryStore(), NameAllocator(set())).rank(value)


def _rank_of(build: Callable[[GraphBuilder], str], opset: int = 17) -> tuple[int | None, int]:
    """(the walk's rank of the value ``build`` returns, the rank onnxruntime computes for it)."""
    model, value = _model_of(build, opset)
    (got,) = run_ort(model, {"X": np.ones((2, 3, 4), np.float32)})  # type: ignore[arg-type]
    return _walked_rank(model, value, opset), np.asarray(got).ndim


def _legacy_reshape(gb: GraphBuilder) -> str:
    """Y = Reshape(X, Concat(Unsqueeze(Gather(Shape(X), 0)), Unsqueeze(Gather(Shape(X), 1)), [-1]))."""
    gb.node("Shape", ["X"], ["s"])
    parts = []
    for i in (0, 1):
        gb.node("Gather", ["s", gb.const(f"i{i}", np.array(i, I64))], [f"g{i}"], axis=0)
        gb.node("Unsqueeze", [f"g{i}", gb.const(f"ax{i}", np.array([0], I64))], [f"u{i}"])
        parts.append(f"u{i}")
    gb.node("Concat", [*parts, gb.const("rest", np.array([-1], I64))], ["shape"], axis=0)
    gb.node("Reshape", ["X", "shape"], ["Y"])
    return "Y"


def _dynamo_reshape(gb: GraphBuilder) -> str:
    """Y = Reshape(X, Concat(Reshape(Mul(Squeeze(Shape(X, 0, 1)), 3), [-1]), [4])): [B * 3, 4]."""
    gb.node("Shape", ["X"], ["s"], start=0, end=1)
    gb.node("Squeeze", ["s", gb.const("sq", np.array([0], I64))], ["b"])
    gb.node("Mul", ["b", gb.const("three", np.array(3, I64))], ["bn"])
    gb.node("Reshape", ["bn", gb.const("flat", np.array([-1], I64))], ["bn1"])
    gb.node("Concat", ["bn1", gb.const("c", np.array([4], I64))], ["shape"], axis=0)
    gb.node("Reshape", ["X", "shape"], ["Y"])
    return "Y"


def _shape_slice(start: int, end: int | None) -> Callable[[GraphBuilder], str]:
    def build(gb: GraphBuilder) -> str:
        gb.node("Shape", ["X"], ["s"], start=start, end=end)
        gb.node("ConstantOfShape", ["s"], ["Z"])  # a tensor of rank len(s)
        return "Z"

    return build


def _unsqueeze_opset11(gb: GraphBuilder) -> str:
    gb.node("Unsqueeze", ["X"], ["Y"], axes=[0, 4])
    return "Y"


def _squeeze_with_axes(gb: GraphBuilder) -> str:
    gb.node("Unsqueeze", ["X", gb.const("a", np.array([1], I64))], ["u"])
    gb.node("Squeeze", ["u", gb.const("b", np.array([1], I64))], ["Y"])
    return "Y"


def _resize(gb: GraphBuilder) -> str:
    gb.node("Resize", ["X", "", gb.const("scales", np.array([1, 1, 2], np.float32))], ["Y"], mode="nearest")
    return "Y"


def _size_and_gather(gb: GraphBuilder) -> str:
    gb.node("Size", ["X"], ["n"])
    gb.node("Unsqueeze", ["n", gb.const("a", np.array([0], I64))], ["n1"])  # [1]
    gb.node("Gather", ["X", gb.const("idx", np.array([[0, 1]], I64))], ["Y"], axis=1)  # rank 3 + 2 - 1
    return "Y"


@pytest.mark.parametrize(
    ("build", "opset"),
    [
        (_legacy_reshape, 17),
        (_dynamo_reshape, 17),
        (_shape_slice(0, None), 17),
        (_shape_slice(-2, None), 17),
        (_shape_slice(1, 99), 17),
        (_shape_slice(-9, -1), 17),
        (_unsqueeze_opset11, 11),
        (_squeeze_with_axes, 17),
        (_size_and_gather, 17),
        (_resize, 17),
    ],
    ids=[
        "legacy_reshape",
        "dynamo_reshape",
        "shape",
        "shape_negative_start",
        "shape_end_clamped",
        "shape_clamped_start_negative_end",
        "unsqueeze_axes_attribute",
        "squeeze_axes_input",
        "size_and_gather",
        "resize",
    ],
)
def test_the_walk_proves_the_rank_onnxruntime_computes(
    build: Callable[[GraphBuilder], str], opset: int
) -> None:
    walked, actual = _rank_of(build, opset)
    assert walked == actual


def _unknown_length(gb: GraphBuilder) -> str:
    gb.input("S", I64, [None])  # a shape of unknown length
    gb.node("Concat", ["S", gb.const("c", np.array([4], I64))], ["shape"], axis=0)
    gb.node("Reshape", ["X", "shape"], ["Y"])
    return "Y"


def _squeeze_without_axes(gb: GraphBuilder) -> str:
    gb.node("Squeeze", ["X"], ["Y"])
    return "Y"


def _unsqueeze_of_a_vector(gb: GraphBuilder) -> str:
    gb.node("Shape", ["X"], ["s"])
    gb.node("Unsqueeze", ["s", gb.const("a", np.array([0], I64))], ["u"])  # [1, 3]: not a length
    gb.node("Reshape", ["X", "u"], ["Y"])
    return "Y"


@pytest.mark.parametrize(
    "build", [_unknown_length, _squeeze_without_axes, _unsqueeze_of_a_vector], ids=lambda f: f.__name__
)
def test_what_the_walk_cannot_prove_is_unknown(build: Callable[[GraphBuilder], str]) -> None:
    model, value = _model_of(build, 17)
    assert _walked_rank(model, value, 17) is None
