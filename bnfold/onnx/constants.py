"""Constant values of an indexed scope: initializers, Constant nodes, and small constant-only
subgraphs evaluated with the ONNX reference evaluator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BadInput
from ..rules.view import BadTensor, NotConstant
from .index import ScopeIndex
from .ops import (
    EVALUABLE_OPS,
    MAX_EVALUATED_ELEMENTS,
    MAX_EVALUATED_NODES,
    ONNX_DOMAINS,
    SHAPE_ONLY_INPUTS,
    TYPE_ONLY_INPUTS,
)

if TYPE_CHECKING:
    from .edits import Scope


@dataclass
class Const:
    """A value that is a compile-time constant, and where it comes from."""

    name: str
    scope: Scope  # the scope that defines it
    kind: str  # "initializer", "constant_node", "computed"
    value: np.ndarray


CACHE_LIMIT = 1 << 20  # constants up to this many bytes stay cached for repeated lookups


def _read(name: str, load: Callable[[], np.ndarray]) -> np.ndarray:
    try:
        return np.asarray(load())
    except NotConstant:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy/onnx raise many types for corrupt tensors
        raise BadTensor(f"'{name}' cannot be read: {type(exc).__name__}: {exc}") from None


def _np_to_tensor_type(dtype: np.dtype) -> int:
    if dtype.name == "bfloat16":
        return onnx.TensorProto.BFLOAT16
    return onnx.helper.np_dtype_to_tensor_dtype(dtype)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.ref_attr_name:
            raise NotConstant(f"Constant '{node.name}' refers to a function attribute")
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    raise NotConstant(f"Constant '{node.name}' holds no numeric tensor")


class ConstantIndex(ScopeIndex):
    """The index with constant lookups (its element types and shapes come from
    :class:`~bnfold.onnx.shapes.ShapeIndex`)."""

    def constant(self, name: str) -> Const:
        """Resolve ``name`` to a constant or raise NotConstant with the reason."""
        c = self._cache.get(name)
        if c is not None:
            return c
        index = self.initializers.get(name)
        if index is None:
            owner = self.owner(name)
            if owner is None:
                raise NotConstant(f"'{name}' is not defined")
            if owner is not self:
                return owner.constant(name)
        if index is not None:  # an initializer of this scope: the common case, checked first
            if name in self.inputs and self.ir_version >= 4:
                raise NotConstant(f"'{name}' is a graph input (an initializer callers may override)")
            tensor = self.proto.initializer[index]
            try:
                value = np.asarray(self.store.read(tensor))
            except BadInput as exc:
                raise BadTensor(str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - numpy/onnx raise many types for corrupt tensors
                raise BadTensor(f"'{name}' cannot be read: {type(exc).__name__}: {exc}") from None
            c = Const(name, self.as_scope, "initializer", value)
        elif name in self.producer:
            node = self.proto.node[self.producer[name]]
            if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
                c = Const(
                    name, self.as_scope, "constant_node", _read(name, lambda: _constant_node_value(node))
                )
            else:
                c = Const(name, self.as_scope, "computed", self._evaluate(name))
        else:
            raise NotConstant(f"'{name}' is a graph input")
        if c.value.nbytes <= CACHE_LIMIT:  # large weights are read once per fold, not retained
            self._cache[name] = c
        return c

    def close(self) -> None:
        """Drop the cached constants (they refer back to this scope): the index can be freed
        without the cyclic garbage collector."""
        self._cache.clear()

    def initializer_constant(self, name: str, value: np.ndarray) -> Const:
        """The constant for initializer ``name`` of this scope whose current ``value`` the caller
        has just read from the graph (what :meth:`constant` would return, without reading again)."""
        c = self._cache.get(name)
        if c is None:
            c = Const(name, self.as_scope, "initializer", value)
            if value.nbytes <= CACHE_LIMIT:
                self._cache[name] = c
        return c

    def elem_type(self, name: str) -> int:
        """The ONNX element type of ``name``, else 0 (see :class:`~bnfold.onnx.shapes.ShapeIndex`)."""
        raise NotImplementedError

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        """The fixed declared shape of ``name``, else None (see :class:`~bnfold.onnx.shapes.ShapeIndex`)."""
        raise NotImplementedError

    def _evaluate(self, name: str) -> np.ndarray:
        """Evaluate the small constant-only subgraph that computes ``name``."""
        order: list[int] = []
        leaves: dict[str, np.ndarray] = {}
        type_only: dict[str, int] = {}
        shape_only: dict[str, tuple[int, ...]] = {}
        seen: set[str] = set()

        def visit(value: str) -> None:
            if value in type_only:
                # Only its type is known (a CastLike target elsewhere): its value is not constant.
                raise NotConstant(f"'{value}' is not constant; only its type is known")
            if value in seen or not value:
                return
            seen.add(value)
            idx = self.producer.get(value)
            node = None if idx is None else self.proto.node[idx]
            if node is None or node.op_type == "Constant":
                leaves[value] = self.constant(value).value
                return
            if node.domain not in ONNX_DOMAINS or node.op_type not in EVALUABLE_OPS:
                raise NotConstant(f"'{value}' is computed by {node.op_type}")
            if len(order) >= MAX_EVALUATED_NODES:
                raise NotConstant(f"'{name}' is computed by a subgraph too large to evaluate")
            for k, inp in enumerate(node.input):
                shape_needed = (node.op_type, k) in SHAPE_ONLY_INPUTS
                if not inp or not (shape_needed or (node.op_type, k) in TYPE_ONLY_INPUTS):
                    visit(inp)
                    continue
                if inp not in type_only:
                    try:
                        visit(inp)
                        continue  # a real constant
                    except NotConstant:
                        t = self.elem_type(inp)
                        if not t:
                            raise
                        type_only[inp] = t
                        seen.add(inp)
                if shape_needed and inp not in shape_only:
                    dims = self.static_shape(inp)
                    if dims is None:
                        raise NotConstant(f"'{inp}' has no fixed declared shape")
                    shape_only[inp] = dims
            assert idx is not None  # a node computes it (checked above)
            order.append(idx)

        visit(name)
        order.sort()
        return self._run_reference(name, order, leaves, type_only, shape_only)

    def _run_reference(
        self,
        name: str,
        order: list[int],
        leaves: dict[str, np.ndarray],
        type_only: dict[str, int],
        shape_only: dict[str, tuple[int, ...]],
    ) -> np.ndarray:
        from onnx.reference import ReferenceEvaluator

        feeds = dict(leaves)
        for inp, t in type_only.items():
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t)
            # a placeholder: right type, and the declared shape where only the shape is read
            # (zero strides: no memory); its values are never read (visit() refuses that)
            feeds[inp] = (
                np.broadcast_to(np.zeros((), dtype), shape_only[inp])
                if inp in shape_only
                else np.zeros((0,), dtype=dtype)
            )
        graph = onnx.helper.make_graph(
            [self.proto.node[i] for i in order],
            "bnfold_const",
            [
                onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None)
                for k, v in feeds.items()
            ],
            [onnx.helper.make_value_info(name, onnx.TypeProto())],
        )
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.opset.items()]
        model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=self.ir_version or 8)
        try:
            (result,) = ReferenceEvaluator(model).run(None, feeds)
        except Exception as exc:  # the reference evaluator raises many types  # noqa: BLE001 - reported, never raised
            raise NotConstant(f"'{name}' could not be evaluated: {exc}") from None
        result = np.asarray(result)
        if result.size > MAX_EVALUATED_ELEMENTS:
            raise NotConstant(f"'{name}' evaluates to a tensor too large to fold")
        return result
