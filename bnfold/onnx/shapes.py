"""Element types, ranks and declared shapes of the values of an indexed scope, found without a
shape inference pass over the model."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from ..rules.view import AttributeRef, BadAttribute, NotConstant
from .attributes import attr_int
from .constants import ConstantIndex, _constant_node_value, _np_to_tensor_type
from .ops import BROADCAST_OPS, MAX_EVALUATED_NODES, ONNX_DOMAINS, RANK_PRESERVING_OPS, SAME_TYPE_OPS


class ShapeIndex(ConstantIndex):
    """The index with constants, element types and ranks."""

    def elem_type(self, name: str) -> int:
        """The ONNX element type of ``name``, else 0.

        Declared types (inputs, outputs, value_info of this or an enclosing scope) first; then a
        cheap local inference through the producer for ops whose output type is fixed by an input
        or an attribute (no shape inference pass over the model).
        """
        for _ in range(MAX_EVALUATED_NODES):
            t = self._declared_type(name)
            if t:
                return t
            owner = self.owner(name)
            if owner is None:
                return 0
            if name in owner.initializers:
                return int(owner.proto.initializer[owner.initializers[name]].data_type)
            node = owner.node_of(name)
            if node is None or node.domain not in ONNX_DOMAINS:
                return 0
            op = node.op_type
            try:
                if op == "Constant":
                    return _np_to_tensor_type(_constant_node_value(node).dtype)
                if op == "Cast":
                    return attr_int(node, "to", 0)
            except (NotConstant, AttributeRef, BadAttribute):
                return 0
            if op in ("Shape", "Size"):
                return onnx.TensorProto.INT64
            if op == "CastLike" and len(node.input) > 1:
                name = node.input[1]
            elif op in SAME_TYPE_OPS and node.input and (node.output[0] == name or op == "Split"):
                name = node.input[0]
            else:
                return 0
        return 0

    def rank(self, name: str) -> int | None:
        """The rank of ``name`` if it is provable, else None.

        Declared shapes (inputs, outputs, value_info of this or an enclosing scope) first, then a
        short walk up the producers (at most MAX_EVALUATED_NODES steps; rank-preserving ops,
        broadcasting elementwise ops, Gemm/Flatten (2), Shape (1), Size (0), Gather, Unsqueeze and
        Squeeze with known axes, Reshape and ConstantOfShape with a shape of provable length (:meth:`_length`), MatMul of
        known ranks >= 2, constants). No shape inference pass over the model.
        """
        steps = [0]

        def walk(n: str) -> int | None:
            if n in self._ranks:
                return self._ranks[n]
            steps[0] += 1
            if steps[0] > MAX_EVALUATED_NODES:
                return None
            r = self._rank_step(n, walk)
            if r is not None:
                self._ranks[n] = r
            return r

        return walk(name)

    def _rank_step(self, name: str, walk: Callable[[str], int | None]) -> int | None:
        r = self._declared_rank(name)
        if r is not None:
            return r
        owner = self.owner(name)
        if owner is None:
            return None
        if name in owner.initializers:
            return len(owner.proto.initializer[owner.initializers[name]].dims)
        node = owner.node_of(name)
        if node is None or node.domain not in ONNX_DOMAINS or not node.output or node.output[0] != name:
            return None
        op = node.op_type
        try:
            if op == "Constant":
                return int(owner.constant(name).value.ndim)
            if op in ("Gemm", "Flatten", "Shape", "Size"):
                return {"Shape": 1, "Size": 0}.get(op, 2)
        except NotConstant:
            return None
        look = walk if owner is self else owner.rank
        if op == "Reshape" and len(node.input) > 1:  # the length of its shape, constant or computed
            return owner._length(node.input[1], look, 0)
        if op == "ConstantOfShape" and node.input:
            return owner._length(node.input[0], look, 0)
        ins = [i for i in node.input if i]
        if op == "Gather" and len(ins) == 2:
            data, indices = look(ins[0]), look(ins[1])
            return None if data is None or indices is None or data < 1 else data + indices - 1
        if op in ("Unsqueeze", "Squeeze") and ins:
            axes, r = owner._axes(node), look(ins[0])
            if axes is None or r is None:
                return None
            return r + len(axes) if op == "Unsqueeze" else r - len(axes)
        if op in RANK_PRESERVING_OPS and ins:
            return walk(ins[0]) if owner is self else owner.rank(ins[0])
        if op in BROADCAST_OPS and ins:
            ranks = [look(i) for i in ins]
            return None if any(x is None for x in ranks) else max(ranks)  # type: ignore[type-var]
        if op == "MatMul" and len(ins) == 2:
            ra, rb = look(ins[0]), look(ins[1])
            if ra is not None and rb is not None and ra >= 2 and rb >= 2:
                return max(ra, rb)
        return None

    def _axes(self, node: onnx.NodeProto) -> list[int] | None:
        """The ``axes`` of an Unsqueeze / Squeeze (an attribute before opset 13, a constant input
        from 13), None when absent or computed."""
        for a in node.attribute:
            if a.name == "axes" and a.type == onnx.AttributeProto.INTS:
                return list(a.ints)
        if len(node.input) > 1 and node.input[1]:
            try:
                return [int(v) for v in self.constant(node.input[1]).value.reshape(-1)]
            except NotConstant:
                return None
        return None

    def _length(self, name: str, rank: Callable[[str], int | None], depth: int) -> int | None:
        """The number of elements of the 1-D value ``name`` (a shape that a Reshape reads) when
        provable: a constant; ``Shape(y)`` with its start/end from ``y``'s rank; a Concat of such
        parts; Cast / Identity of one; a scalar Unsqueezed or Reshaped to ``[-1]``. Else None."""
        owner = self.owner(name)
        if owner is None or depth > MAX_EVALUATED_NODES:
            return None
        try:
            value = owner.constant(name).value
            return int(value.size) if value.ndim == 1 else None
        except NotConstant:
            pass
        node = owner.node_of(name)
        if node is None or node.domain not in ONNX_DOMAINS or not node.input or node.output[0] != name:
            return None
        op, x = node.op_type, node.input[0]
        if op == "Shape":
            r = rank(x)
            if r is None:
                return None
            start, end = attr_int(node, "start", 0), attr_int(node, "end", r)
            start, end = (min(max(v + r if v < 0 else v, 0), r) for v in (start, end))
            return max(end - start, 0)
        if op == "Concat" and attr_int(node, "axis", 0) in (0, -1):
            parts = [owner._length(i, rank, depth + 1) for i in node.input]
            return None if any(n is None for n in parts) else sum(n for n in parts if n is not None)
        if op in ("Cast", "Identity"):
            return owner._length(x, rank, depth + 1)
        if op == "Unsqueeze" and rank(x) == 0:
            axes = owner._axes(node)
            return 1 if axes is not None and len(axes) == 1 else None
        if op == "Reshape" and len(node.input) > 1 and rank(x) == 0:
            try:
                shape = owner.constant(node.input[1]).value.reshape(-1).tolist()
            except NotConstant:
                return None
            return 1 if shape in ([-1], [1]) else None
        return None

    def _declared(self, name: str, stop_at_definer: bool) -> onnx.TypeProto.Tensor | None:
        """The tensor type declared for ``name`` (graph inputs/outputs, value_info) in this scope or
        an enclosing one; with ``stop_at_definer`` only up to the scope that defines ``name``."""
        s: ShapeIndex | None = self
        while s is not None:
            if s._declared_types is None:
                proto = s.proto
                if isinstance(proto, onnx.GraphProto):
                    infos = (*proto.input, *proto.value_info, *proto.output)
                else:
                    infos = tuple(getattr(proto, "value_info", ()))
                s._declared_types = {
                    v.name: v.type.tensor_type for v in infos if v.type.HasField("tensor_type")
                }
            found = s._declared_types.get(name)
            if found is not None:
                return found
            if stop_at_definer and s.defines(name):
                return None
            s = s.parent
        return None

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        """The declared shape of ``name`` if every dimension is a fixed number, else None."""
        tt = self._declared(name, stop_at_definer=False)
        if tt is None or not tt.HasField("shape"):
            return None
        dims = []
        for d in tt.shape.dim:
            if not d.HasField("dim_value") or d.dim_value < 0:
                return None
            dims.append(int(d.dim_value))
        return tuple(dims)

    def _declared_rank(self, name: str) -> int | None:
        tt = self._declared(name, stop_at_definer=True)
        return len(tt.shape.dim) if tt is not None and tt.HasField("shape") else None

    def _declared_type(self, name: str) -> int:
        tt = self._declared(name, stop_at_definer=False)
        return tt.elem_type if tt is not None else 0
