"""Reading and writing node attributes, with the two ways an attribute can refuse."""

from __future__ import annotations

from typing import cast

import onnx

from ..rules.view import AttributeRef, BadAttribute


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of attribute ``name`` of ``node`` or ``default``; raises AttributeRef for refs."""
    for a in node.attribute:
        if a.name == name:
            if a.ref_attr_name:
                raise AttributeRef(f"attribute '{name}' refers to function attribute '{a.ref_attr_name}'")
            return onnx.helper.get_attribute_value(a)
    return default


def _typed_attr(node: onnx.NodeProto, name: str, kind: int) -> onnx.AttributeProto | None:
    for a in node.attribute:
        if a.name == name:
            if a.ref_attr_name:
                raise AttributeRef(f"attribute '{name}' refers to function attribute '{a.ref_attr_name}'")
            t = a.type
            if t == onnx.AttributeProto.UNDEFINED:  # very old models: infer from the field set
                t = (
                    onnx.AttributeProto.FLOAT
                    if a.HasField("f")
                    else onnx.AttributeProto.INT
                    if a.HasField("i")
                    else t
                )
            if t != kind:
                want = "float" if kind == onnx.AttributeProto.FLOAT else "int"
                raise BadAttribute(f"attribute '{name}' of {node.op_type} must be a single {want}")
            return cast(onnx.AttributeProto, a)
    return None


def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    """An INT attribute or ``default``; AttributeRef for refs, BadAttribute for another type."""
    a = _typed_attr(node, name, onnx.AttributeProto.INT)
    return default if a is None else int(a.i)


def attr_float(node: onnx.NodeProto, name: str, default: float) -> float:
    """A FLOAT attribute or ``default``; AttributeRef for refs, BadAttribute for another type."""
    a = _typed_attr(node, name, onnx.AttributeProto.FLOAT)
    return default if a is None else float(a.f)


def set_attr(node: onnx.NodeProto, name: str, value: float | int) -> None:
    """Set (or add) a scalar attribute."""
    for a in node.attribute:
        if a.name == name:
            if a.type == onnx.AttributeProto.FLOAT:
                a.f = float(value)
            else:
                a.i = int(value)
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))
