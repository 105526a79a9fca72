"""bnfold.onnx.view.OnnxView, the ONNX implementation of the rules' GraphView (named apart from
tests/rules/test_view.py: test files need distinct basenames): what it answers on a real graph, and the
layering of bnfold/onnx (never storage nor the command line)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper
from onnx_builders import Built, conv_bn

import bnfold.onnx
from bnfold.onnx.edits import Scope
from bnfold.onnx.index import NameAllocator
from bnfold.onnx.tensor_store import MemoryStore
from bnfold.onnx.view import OnnxView
from bnfold.rules.view import GraphView, NotConstant

ONNX_PACKAGE = Path(bnfold.onnx.__file__).parent


def _view() -> tuple[OnnxView, Built]:
    built = conv_bn(seed=0)
    graph = built.model.graph
    scope = Scope.build(graph, "main", {"": 15}, built.model.ir_version, MemoryStore(), NameAllocator(set()))
    return OnnxView(scope, set()), built


def test_answers_about_values_by_name() -> None:
    view, built = _view()
    graph = built.model.graph
    checked: GraphView = view
    conv = next(n for n in graph.node if n.op_type == "Conv")
    bn = next(n for n in graph.node if n.op_type == "BatchNormalization")
    x = conv.output[0]
    producer = checked.producer(x)
    assert producer is not None and (producer.op, producer.inputs, producer.outputs) == (
        "Conv",
        tuple(conv.input),
        tuple(conv.output),
    )
    consumer = checked.consumer(x)
    assert consumer is not None and consumer.op == "BatchNormalization" and consumer.name == bn.name
    assert checked.uses(x) == 1 and not checked.is_graph_output(x)
    assert checked.is_graph_output(bn.output[0]) and checked.consumer(bn.output[0]) is None
    assert checked.producer(graph.input[0].name) is None and not checked.produced_outside(graph.input[0].name)
    weight = next(t for t in graph.initializer if t.name == conv.input[1])
    np.testing.assert_array_equal(checked.constant(weight.name), numpy_helper.to_array(weight))
    assert view.const(weight.name).name == weight.name  # remembered for applying the plan
    assert checked.rank(graph.input[0].name) == 4 and checked.dtype(graph.input[0].name) == np.float32
    assert checked.attr_float(consumer, "epsilon", 1e-5) == next(
        (a.f for a in bn.attribute if a.name == "epsilon"), 1e-5
    )
    with pytest.raises(NotConstant, match="graph input"):
        checked.constant(graph.input[0].name)


def test_forget_drops_the_remembered_constants() -> None:
    view, built = _view()
    name = built.model.graph.initializer[0].name
    view.constant(name)
    view.forget()
    with pytest.raises(KeyError):
        view.const(name)


def test_onnx_layer_imports_no_storage_or_cli() -> None:
    banned = ("bnfold.storage", "bnfold.cli", "bnfold.api", "torch")
    for path in sorted(ONNX_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                prefix = {0: "", 1: "bnfold.onnx.", 2: "bnfold."}[node.level]
                names = [prefix + (node.module or "")]
            else:
                continue
            for name in names:
                assert not any(name == b or name.startswith(b + ".") for b in banned), (path.name, name)
