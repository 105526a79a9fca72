"""The rules over the GraphView protocol alone: a view made of plain dicts (no protobuf, as a torch.fx
view would be) gets the same plans, and the rules import nothing of the front ends."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import bnfold.rules
from bnfold.report import Pattern, Reason
from bnfold.rules import Options, plan_bn
from bnfold.rules.plan import FoldAfter, FoldBefore, Skip, ToAffine
from bnfold.rules.view import GraphView, NodeRef, NotConstant

RULES = Path(bnfold.rules.__file__).parent


class DictView:
    """A graph as dicts: nodes in order, constants by name, attributes by node key."""

    def __init__(self, nodes: list[NodeRef], constants: dict[str, np.ndarray], outputs: Sequence[str] = ()):
        self.nodes = nodes
        self.constants = constants
        self.outputs = set(outputs)
        self.attrs: dict[int, dict[str, object]] = {}
        self.ranks: dict[str, int] = {}

    @property
    def opset(self) -> int:
        return 17

    def producer(self, value: str) -> NodeRef | None:
        return next((n for n in self.nodes if value in n.outputs), None)

    def produced_outside(self, value: str) -> bool:
        return False

    def consumer(self, value: str) -> NodeRef | None:
        users = [n for n in self.nodes if value in n.inputs]
        return users[0] if self.uses(value) == 1 and len(users) == 1 else None

    def uses(self, value: str) -> int:
        return sum(n.inputs.count(value) for n in self.nodes) + (value in self.outputs)

    def readers(self, value: str) -> tuple[NodeRef, ...]:
        return tuple(n for n in self.nodes for name in n.inputs if name == value)

    def uses_after_release(self, value: str, released: Sequence[str]) -> int:
        return self.uses(value)

    def metadata_reads(self, value: str) -> tuple[tuple[NodeRef, int], ...]:
        return tuple((n, 0) for n in self.nodes if n.op in ("Shape", "Size") and n.inputs[:1] == (value,))

    def is_graph_output(self, value: str) -> bool:
        return value in self.outputs

    def constant(self, value: str) -> np.ndarray:
        if value not in self.constants:
            raise NotConstant(f"'{value}' is not constant")
        return self.constants[value]

    def rank(self, value: str) -> int | None:
        return self.ranks.get(value)

    def static_shape(self, value: str) -> tuple[int, ...] | None:
        return None

    def dtype(self, value: str) -> np.dtype | None:
        return np.dtype(np.float32)

    def attr(self, node: NodeRef, name: str, default: object = None) -> object:
        return self.attrs.get(node.key, {}).get(name, default)

    def attr_int(self, node: NodeRef, name: str, default: int) -> int:
        return int(self.attr(node, name, default))  # type: ignore[call-overload]

    def attr_float(self, node: NodeRef, name: str, default: float) -> float:
        return float(self.attr(node, name, default))  # type: ignore[arg-type]

    def folded_into(self, node: NodeRef) -> bool:
        return False


def _bn_params(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    return {
        "g": rng.normal(1, 0.2, c).astype(np.float32),
        "b": rng.normal(0, 0.2, c).astype(np.float32),
        "m": rng.normal(0, 0.2, c).astype(np.float32),
        "v": rng.uniform(0.5, 2, c).astype(np.float32),
    }


def _expected_scale_shift(p: dict[str, np.ndarray], eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    g, b, m, v = (p[k].astype(np.float64) for k in "gbmv")
    s = g / np.sqrt(v + eps)
    return s, b - m * s


def test_dict_view_satisfies_the_protocol() -> None:
    view: GraphView = DictView([], {})
    assert view.opset == 17


def test_conv_bn_plan_over_plain_dicts() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 1, 3).astype(np.float32)
    params = _bn_params(rng, 3)
    conv = NodeRef(0, "Conv", "", ("x", "w", "bias"), ("h",), "conv")
    bn = NodeRef(1, "BatchNormalization", "", ("h", "g", "b", "m", "v"), ("y",), "bn")
    view = DictView([conv, bn], {"w": w, "bias": bias, **params}, outputs=["y"])
    plan = plan_bn(view, bn, Options())
    assert isinstance(plan, FoldAfter)
    assert plan.pattern is Pattern.BN_AFTER and plan.absorbed == (bn,) and plan.target == conv
    new_b, new_w = plan.layer.tensors
    assert (new_b.index, new_b.old, new_b.name) == (2, "bias", "bias_folded")
    assert (new_w.index, new_w.old, new_w.name) == (1, "w", "w_folded")
    s, t = _expected_scale_shift(params)  # exact float64 math, rounded once
    np.testing.assert_array_equal(
        new_w.value, (w.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
    )
    np.testing.assert_array_equal(new_b.value, (bias.astype(np.float64) * s + t).astype(np.float32))


def test_rule_order_graph_input_then_consumer_then_affine() -> None:
    rng = np.random.default_rng(1)
    params = _bn_params(rng, 2)
    bn = NodeRef(0, "BatchNormalization", "", ("x", "g", "b", "m", "v"), ("y",), "bn")
    conv = NodeRef(1, "Conv", "", ("y", "w"), ("z",), "conv")
    w = rng.normal(0, 1, (4, 2, 1, 1)).astype(np.float32)
    view = DictView([bn, conv], {"w": w, **params}, outputs=["z"])
    assert isinstance(plan_bn(view, bn, Options()), FoldBefore)
    view.attrs[1] = {"pads": [1, 1, 1, 1]}
    refusal = plan_bn(view, bn, Options())
    assert isinstance(refusal, Skip) and refusal.code is Reason.PADDING
    assert "cannot fold into its producer" in refusal.message
    view.ranks["x"] = 4
    affine = plan_bn(view, bn, Options(bn_to_affine=True))
    assert isinstance(affine, ToAffine) and affine.scale.shape == (2, 1, 1)
    s, t = _expected_scale_shift(params)
    np.testing.assert_array_equal(affine.scale.ravel(), s.astype(np.float32))
    np.testing.assert_array_equal(affine.shift.ravel(), t.astype(np.float32))


@pytest.mark.parametrize("path", sorted(RULES.glob("*.py")), ids=lambda p: p.name)
def test_rules_import_no_front_end(path: Path) -> None:
    """Rules see the graph through the view only: no protobuf, torch, bnfold.onnx, storage or CLI."""
    banned = ("onnx", "torch", "bnfold.onnx", "bnfold.storage", "bnfold.cli")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = {0: "", 1: "bnfold.rules.", 2: "bnfold."}[node.level]
            names = [prefix + (node.module or "")]
        else:
            continue
        for name in names:
            assert not any(name == b or name.startswith(b + ".") for b in banned), (path.name, name)
