"""``bnfold.inspect(model)``: every BatchNormalization of a model, in graph order, with whether it
can be folded and why not. Nothing is written: the pass runs on an in-memory copy, unverified.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from .report import FoldReport

# A BN kept after one of these could have been folded into a layer (what ``--strict`` refuses).
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class BatchNormInfo:
    """One BatchNormalization: the layer it follows and whether it folds.

    ``pattern`` names the fold pattern when ``foldable``; ``code`` is the reason code when not.
    ``follows_op``/``follows`` are the producer's op type and name (None for a graph input).
    """

    bn: str
    graph: str
    follows_op: str | None
    follows: str | None
    foldable: bool
    code: str | None
    pattern: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect` found: the BNs in graph order and the node counts around a fold."""

    batchnorms: tuple[BatchNormInfo, ...]
    nodes_before: int
    nodes_after: int

    @property
    def foldable(self) -> int:
        return sum(1 for b in self.batchnorms if b.foldable)

    @property
    def kept(self) -> int:
        return sum(1 for b in self.batchnorms if not b.foldable)

    @property
    def kept_after_linear(self) -> list[str]:
        """BNs that stay although they follow a layer (Conv, ConvTranspose, Gemm, MatMul)."""
        return [b.bn for b in self.batchnorms if not b.foldable and b.follows_op in LINEAR_OPS]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batchnorms": [b.to_dict() for b in self.batchnorms],
            "foldable": self.foldable,
            "kept": self.kept,
            "kept_after_linear": self.kept_after_linear,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


def kept_after_linear(report: FoldReport) -> list[str]:
    """The BNs of a fold report kept after a layer they could have been folded into."""
    return [s.bn for s in report.skipped if s.producer_op in LINEAR_OPS]


def inspect(model: Any, *, merge_branches: bool = False) -> Inspection:
    """Every BatchNormalization of ``model`` (anything :func:`bnfold.fold` accepts) in graph order,
    walking subgraphs and functions, with whether it can be folded (``merge_branches``: as
    :func:`bnfold.fold` with that option). Raises :class:`bnfold.BadInput` for a model that cannot
    be read."""
    from .api import fold

    with warnings.catch_warnings():  # numpy overflow on hostile weights: the report says it
        warnings.simplefilter("ignore", RuntimeWarning)
        report = fold(model, verify=False, merge_branches=merge_branches).report
    entries = [
        BatchNormInfo(
            bn=p.bn,
            graph=p.graph,
            follows_op=p.kind,
            follows=p.target,
            foldable=True,
            code=None,
            pattern=p.pattern,
            message=f"folds into {p.kind} {p.target} ({p.pattern})",
        )
        for p in report.folded
    ] + [
        BatchNormInfo(
            bn=s.bn,
            graph=s.graph,
            follows_op=s.producer_op,
            follows=s.producer,
            foldable=False,
            code=s.code,
            pattern=None,
            message=s.message,
        )
        for s in report.skipped
    ]
    order = _walk_order(_original(model), [e.bn for e in entries]) if entries else {}
    entries.sort(key=lambda e: order.get(e.bn, len(order)))
    return Inspection(tuple(entries), report.nodes_before, report.nodes_after)


def _original(model: Any) -> onnx.ModelProto:
    """The unfolded graph of ``model`` (without its weights when it is a file)."""
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(Path(model)), load_external_data=False)
    if isinstance(model, onnx.ModelProto):
        return model
    from .storage.load import load_model

    proto: onnx.ModelProto = load_model(model)[0]
    return proto


def _walk_order(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """Position of each BN (named as in the report: node name, else first output) in a walk of
    the original graph, its subgraphs and its functions."""
    wanted = set(names)
    order: dict[str, int] = {}

    def visit(nodes: Any) -> None:
        for node in nodes:
            for key in (node.name, *node.output):
                if key in wanted and key not in order:
                    order[key] = len(order)
            for a in node.attribute:
                if a.type == a.GRAPH:
                    visit(a.g.node)
                elif a.type == a.GRAPHS:
                    for g in a.graphs:
                        visit(g.node)

    visit(model.graph.node)
    for f in model.functions:
        visit(f.node)
    for n in names:
        order.setdefault(n, len(order))
    return order
