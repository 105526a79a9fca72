"""Inputs for a verification: the user's arrays (a mapping or an ``.npz``), checked against the
model's declared interface, and seeded random feeds for the rest (shapes from ``shapes``,
symbolic dimensions from ``dims``, else assumed and recorded)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import BadInput, Param
from .runner import one_line

# user inputs: arrays by input name, or the path of an .npz archive of them
Inputs = Mapping[str, np.ndarray] | str | Path | None
Shapes = Mapping[str, Sequence[int]]
Dims = Mapping[str, int]
ValueTypes = list[tuple[str, onnx.TypeProto]]

DEFAULT_BATCH = 1
DEFAULT_DIM = 32
INT_HIGH = 4  # integers are drawn from [0, INT_HIGH)
MAX_INPUT_ELEMENTS = 2**30  # a generated input larger than this is refused (a declared shape gone wrong)

SHAPES = Param("shapes")
DIMS = Param("dims")
INPUTS = Param("inputs")


@dataclass
class Interface:
    """A model's graph inputs and outputs, as verification sees them."""

    inputs: ValueTypes  # inputs the caller must feed
    outputs: list[tuple[str, int]]  # (name, elem type)
    optional: ValueTypes = field(default_factory=list)  # inputs with a default (an initializer)


def interface(model: onnx.ModelProto) -> Interface:
    """The inputs to feed, the optional ones and the outputs of ``model``'s main graph."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [(v.name, v.type) for v in model.graph.input if v.name not in inits]
    optional = [(v.name, v.type) for v in model.graph.input if v.name in inits]
    outputs = []
    for v in model.graph.output:
        t = v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else 0
        outputs.append((v.name, t))
    return Interface(inputs, outputs, optional)


def check_same_interface(a: Interface, b: Interface) -> None:
    """BadInput unless ``a`` and ``b`` have the same input and output names, in order."""
    names_a = [n for n, _ in a.inputs]
    names_b = [n for n, _ in b.inputs]
    if names_a != names_b:
        raise BadInput(f"the models have different inputs: {names_a} vs {names_b}")
    out_a = [n for n, _ in a.outputs]
    out_b = [n for n, _ in b.outputs]
    if out_a != out_b:
        raise BadInput(f"the models have different outputs: {out_a} vs {out_b}")


def np_dtype(elem_type: int, what: str = "a tensor") -> np.dtype:
    """The numpy dtype of an ONNX element type (BadInput for one onnx does not know)."""
    if elem_type == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        bfloat16: np.dtype = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        raise BadInput(
            f"{what} has element type {elem_type}, which onnx {onnx.__version__} does not know"
        ) from None


def load_inputs(inputs: Inputs) -> dict[str, np.ndarray]:
    """User inputs from a mapping or an ``.npz`` file (BadInput when unreadable)."""
    if inputs is None:
        return {}
    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if not path.is_file():
            raise BadInput(f"{path}: no such inputs file")
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any failure to parse the user's file is bad input
            raise BadInput(f"{path}: cannot read inputs ({one_line(exc)})") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise BadInput(f"{path}: not an .npz archive of named arrays (write it with numpy.savez)")
        try:
            with data:
                return {k: data[k] for k in data.files}
        except Exception as exc:  # noqa: BLE001 - corrupt members, pickled objects, bad headers
            raise BadInput(f"{path}: cannot read inputs ({one_line(exc)})") from None
    if not isinstance(inputs, Mapping):
        raise BadInput(
            f"inputs must be a mapping of name to array or an .npz path, not {type(inputs).__name__}"
        )
    out = {}
    for k, v in inputs.items():
        try:
            out[str(k)] = np.asarray(v)
        except Exception as exc:  # noqa: BLE001 - anything numpy rejects is the caller's input
            raise BadInput(f"input '{k}': not an array ({one_line(exc)})") from None
    return out


Declared = list[onnx.TensorShapeProto.Dimension]


def _declared(type_proto: onnx.TypeProto) -> Declared | None:
    tt = type_proto.tensor_type
    return list(tt.shape.dim) if tt.HasField("shape") else None


def _dim_key(name: str, axis: int, d: onnx.TensorShapeProto.Dimension) -> str | None:
    """The name a dynamic dimension is set by (a key of ``dims``), None for a static one."""
    if d.HasField("dim_value") and d.dim_value > 0:
        return None
    return d.dim_param or f"{name}[{axis}]"


def symbolic_dims(inputs: ValueTypes) -> list[str]:
    """Every key ``dims`` accepts for these inputs, in order of appearance."""
    keys: list[str] = []
    for name, tp in inputs:
        dims = _declared(tp) if tp.HasField("tensor_type") else None
        for axis, d in enumerate(dims or []):
            key = _dim_key(name, axis, d)
            if key is not None and key not in keys:
                keys.append(key)
    return keys


def _check_shape(name: str, shape: list[int], declared: Declared | None, what: Param | str) -> None:
    """BadInput unless ``shape`` (``what``: the parameter that gave it, or a description)
    fits the declared rank and static dimensions."""
    if declared is None:
        return
    if len(shape) != len(declared):
        raise BadInput(
            "input '{name}': {what} has rank {rank} ({shape}), the model declares rank {declared_rank} ({declared})",
            name=name,
            what=what,
            rank=len(shape),
            shape=_fmt_shape(shape),
            declared_rank=len(declared),
            declared=_fmt_declared(declared),
        )
    for axis, (got, d) in enumerate(zip(shape, declared, strict=True)):
        if d.HasField("dim_value") and d.dim_value > 0 and got != d.dim_value:
            raise BadInput(
                "input '{name}': {what} {shape} does not match the declared shape {declared} at axis {axis}",
                name=name,
                what=what,
                shape=_fmt_shape(shape),
                declared=_fmt_declared(declared),
                axis=axis,
            )


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


def _fmt_declared(dims: Declared) -> str:
    if not dims:
        return "scalar"
    return "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


def validate_request(
    inputs: ValueTypes,
    optional: ValueTypes,
    shapes: Shapes,
    dims: Dims,
    given: Mapping[str, np.ndarray],
) -> None:
    """Reject names that match nothing and values that cannot fit (BadInput, one line)."""
    names = [n for n, _ in inputs]
    known = set(names) | {n for n, _ in optional}
    extra = [k for k in given if k not in known]
    if extra:
        raise BadInput(
            f"inputs given for unknown names: {', '.join(sorted(extra))} (model inputs: {', '.join(names) or 'none'})"
        )
    unknown_shapes = [k for k in shapes if k not in set(names)]
    if unknown_shapes:
        raise BadInput(
            "{shapes} for unknown input(s): {unknown} (model inputs: {names})",
            shapes=SHAPES,
            unknown=", ".join(sorted(unknown_shapes)),
            names=", ".join(names) or "none",
        )
    for k, v in shapes.items():
        if any(int(d) < 0 for d in v):
            raise BadInput("{shape}: dimensions must not be negative", shape=Param("shapes", k))
    both = sorted(set(shapes) & set(given))
    if both:
        raise BadInput(
            "input(s) {both} given both as {shapes} and in {inputs}",
            both=", ".join(both),
            shapes=SHAPES,
            inputs=INPUTS,
        )
    keys = symbolic_dims(inputs)
    unknown_dims = [k for k in dims if k not in keys]
    if unknown_dims:
        raise BadInput(
            "{dims} for unknown dimension(s): {unknown} (dynamic dimensions: {keys})",
            dims=DIMS,
            unknown=", ".join(sorted(unknown_dims)),
            keys=", ".join(keys) or "none",
        )
    for k, n in dims.items():
        if int(n) < 0:
            raise BadInput("{dim}: value must not be negative", dim=Param("dims", k))


def _bind_given(
    types: Mapping[str, onnx.TypeProto], given: Mapping[str, np.ndarray], dims: Dims, bound: dict[str, int]
) -> dict[str, np.ndarray]:
    """The given arrays, checked against their declared types; their sizes bind ``bound``."""
    feeds: dict[str, np.ndarray] = {}
    for name, arr in given.items():
        type_proto = types.get(name)
        if type_proto is None:
            raise BadInput(f"inputs given for unknown names: {name}")
        if not type_proto.HasField("tensor_type"):
            feeds[name] = arr
            continue
        dtype = np_dtype(type_proto.tensor_type.elem_type, f"input '{name}'")
        if arr.dtype != dtype:
            raise BadInput(f"input '{name}' must have dtype {dtype.name}, got {arr.dtype.name}")
        declared = _declared(type_proto)
        _check_shape(name, list(arr.shape), declared, "the given array")
        for axis, d in enumerate(declared or []):
            key = _dim_key(name, axis, d)
            if key is None:
                continue
            if key in bound and bound[key] != arr.shape[axis] and key in dims:
                raise BadInput(
                    "input '{name}': axis {axis} ({key}) has size {size}, but {dim}",
                    name=name,
                    axis=axis,
                    key=key,
                    size=arr.shape[axis],
                    dim=Param("dims", key, str(dims[key])),
                )
            bound.setdefault(key, int(arr.shape[axis]))
        feeds[name] = arr
    return feeds


def _shape_of(
    name: str, type_proto: onnx.TypeProto, shapes: Shapes, bound: Mapping[str, int], assumed: dict[str, int]
) -> list[int]:
    """The shape to generate for input ``name``: from ``shapes``, else declared (dynamic dims
    from ``bound``, else assumed and recorded in ``assumed``)."""
    declared = _declared(type_proto)
    if name in shapes:
        shape = [int(d) for d in shapes[name]]
        _check_shape(name, shape, declared, SHAPES)
        return shape
    if declared is None:
        raise BadInput(
            "input '{name}' has unknown rank; give its shape ({shape})",
            name=name,
            shape=Param("shapes", name, "..."),
        )
    shape = []
    for axis, d in enumerate(declared):
        key = _dim_key(name, axis, d)
        if key is None:
            shape.append(d.dim_value)
            continue
        if key in bound:
            value = bound[key]
        else:
            value = assumed.get(key, DEFAULT_BATCH if axis == 0 else DEFAULT_DIM)
            assumed[key] = value
        shape.append(value)
    return shape


def make_inputs(
    inputs: ValueTypes,
    rng: np.random.Generator,
    shapes: Shapes,
    dims: Dims,
    given: Mapping[str, np.ndarray],
    assumed: dict[str, int],
    optional: ValueTypes | None = None,
    run: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random feeds for every input not in ``given``; record assumed dims in ``assumed``.

    A single-element boolean input (typically an ``If`` condition) is True on even runs and
    False on odd ones, so ``runs=2`` exercises both branches.

    Given arrays are checked against the declared dtype, rank and static dimensions; their sizes
    bind the symbolic dimensions they carry, so generated inputs sharing a dimension name agree.
    """
    types = dict(inputs)
    types.update(optional or [])
    bound: dict[str, int] = {k: int(v) for k, v in dims.items()}
    feeds = _bind_given(types, given, dims, bound)
    for name, type_proto in inputs:
        if name in feeds:
            continue
        if not type_proto.HasField("tensor_type"):
            raise BadInput("input '{name}' is not a tensor; pass it with {inputs}", name=name, inputs=INPUTS)
        tt = type_proto.tensor_type
        if tt.elem_type == onnx.TensorProto.UNDEFINED:
            raise BadInput(
                "input '{name}' has no element type; pass it with {inputs}", name=name, inputs=INPUTS
            )
        dtype = np_dtype(tt.elem_type, f"input '{name}'")
        shape = _shape_of(name, type_proto, shapes, bound, assumed)
        elements = math.prod(shape)
        if elements > MAX_INPUT_ELEMENTS:
            raise BadInput(
                "input '{name}' would have shape {shape} ({elements:.3g} elements); give a smaller one with "
                "{shape_param} or {dims}",
                name=name,
                shape=_fmt_shape(shape),
                elements=elements,
                shape_param=Param("shapes", name, "..."),
                dims=DIMS,
            )
        if dtype.kind == "b" and elements == 1:
            feeds[name] = np.full(shape, run % 2 == 0, dtype=bool)
        else:
            feeds[name] = _random(rng, dtype, shape, name)
    return feeds


def _random(rng: np.random.Generator, dtype: np.dtype, shape: list[int], name: str) -> np.ndarray:
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    raise BadInput(
        "input '{name}' has dtype {dtype}; pass it with {inputs}", name=name, dtype=dtype.name, inputs=INPUTS
    )


def check_request(
    model: onnx.ModelProto, inputs: Inputs = None, shapes: Shapes | None = None, dims: Dims | None = None
) -> None:
    """Validate user inputs/shapes/dims against ``model`` without running anything (BadInput)."""
    found = interface(model)
    given = load_inputs(inputs)
    validate_request(found.inputs, found.optional, shapes or {}, dims or {}, given)
    make_inputs(found.inputs, np.random.default_rng(0), shapes or {}, dims or {}, given, {}, found.optional)
