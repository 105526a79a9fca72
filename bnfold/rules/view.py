"""The graph view a fold rule reads: the small protocol each front end implements.

Values are named by strings and nodes are :class:`NodeRef` records (op type, inputs, outputs by
name): no protobuf or torch.fx object crosses it. The ONNX index implements it in
:mod:`bnfold.onnx.view`; a torch.fx graph can implement it too (modules mapped to ONNX op types).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class NotConstant(Exception):
    """A value is not a constant; the message says why."""


class BadTensor(NotConstant):
    """A constant whose data cannot be read (corrupt, missing external data, bad type)."""


class AttributeRef(Exception):
    """An attribute refers to an enclosing function's attribute (``ref_attr_name``)."""


class BadAttribute(Exception):
    """An attribute has the wrong type for its operator (a malformed model)."""


@dataclass(frozen=True)
class NodeRef:
    """A node as a rule sees it. ``key`` identifies it for the front end (ONNX: its index in its
    graph, -1 for a constant the pass added); ``domain`` is ``""`` for the standard domain."""

    key: int
    op: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    name: str

    @property
    def standard(self) -> bool:
        """True for an op of the default ONNX domain."""
        return self.domain in ("", "ai.onnx")

    @property
    def label(self) -> str:
        """The node's name, else its first output's name."""
        return self.name or (self.outputs[0] if self.outputs else "")


class GraphView(Protocol):
    """One graph (or function body) as fold rules read it. Lookups never change the graph."""

    @property
    def opset(self) -> int:
        """The version of the default operator set."""
        ...

    def producer(self, value: str) -> NodeRef | None:
        """The node of this graph that computes ``value``, else None."""
        ...

    def produced_outside(self, value: str) -> bool:
        """True when an enclosing graph computes ``value`` (a subgraph reads it)."""
        ...

    def consumer(self, value: str) -> NodeRef | None:
        """The only node of this graph reading ``value`` (None unless it has exactly one use, by a
        node here, and is not a graph output)."""
        ...

    def uses(self, value: str) -> int:
        """References to ``value``: node inputs, graph outputs and nested subgraphs."""
        ...

    def metadata_reads(self, value: str) -> tuple[tuple[NodeRef, int], ...]:
        """``(node, input index)`` of the references to ``value`` by nodes of this graph that read
        only its shape or element type (ONNX: Shape, Size, CastLike's second input). A fold does not
        change what they compute: they are not consumers, and read the name that stays."""
        ...

    def readers(self, value: str) -> tuple[NodeRef, ...]:
        """The nodes of this graph reading ``value``, once per reference (metadata readers too). It
        may miss references a rule must not rely on (nested subgraphs, graph outputs, nodes the pass
        inserted): compare with :meth:`uses` before trusting it to be complete."""
        ...

    def uses_after_release(self, value: str, released: Sequence[str]) -> int:
        """References to ``value`` left once each of ``released`` is dropped once, with what that
        leaves unused."""
        ...

    def is_graph_output(self, value: str) -> bool: ...

    def constant(self, value: str) -> np.ndarray:
        """The constant value of ``value``; raises NotConstant (BadTensor when unreadable)."""
        ...

    def rank(self, value: str) -> int | None:
        """The rank of ``value`` when it is provable, else None."""
        ...

    def static_shape(self, value: str) -> tuple[int, ...] | None:
        """The shape of ``value`` when every dimension is fixed for every run (ONNX: declared with
        fixed dims; torch: recorded by torch.export, whose guards fix it), else None."""
        ...

    def dtype(self, value: str) -> np.dtype | None:
        """The element type of ``value`` when known, else None."""
        ...

    def attr(self, node: NodeRef, name: str, default: object = None) -> object:
        """Attribute ``name`` of ``node`` or ``default``; raises AttributeRef for a reference."""
        ...

    def attr_int(self, node: NodeRef, name: str, default: int) -> int:
        """An integer attribute; AttributeRef for a reference, BadAttribute for another type."""
        ...

    def attr_float(self, node: NodeRef, name: str, default: float) -> float:
        """A float attribute; AttributeRef for a reference, BadAttribute for another type."""
        ...

    def folded_into(self, node: NodeRef) -> bool:
        """True when ``node`` is a layer that already absorbed a fold in this pass."""
        ...
