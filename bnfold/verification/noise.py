"""The noise floor: how much a model's outputs move when its parameters move by one ulp.

Every float parameter chosen (the ones a fold read, or all of them) is moved, element by
element, by -1, 0 or +1 ulp in its own dtype (``np.nextafter``; seeded), and the original model
runs again on the same inputs. An output's floor is its largest change: an error of that size
is rounding, not breakage.

A model in memory (or a small file) is nudged as a copy: every constant, in every graph and
function, can move. A large file or one with external data is never copied: onnxruntime runs
the file with the nudged main-graph initializers given as overrides, read one by one (constants
in subgraphs, functions and Constant nodes then stay as they are).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..storage.external_data import has_external_data
from ..storage.load import load_model, open_model
from ..storage.policy import DEFAULT_POLICY
from ..storage.spill import FileStore
from .compare import max_change
from .runner import Feeds, run_all

FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)
NOISE_STREAM = 0x6E6F6973  # the random stream of the nudges ("nois"), beside the inputs' streams
MAX_PROTO_BYTES = 2**31 - 2**20  # a nudged copy must serialize (protobuf's 2 GiB, with headroom)
# inputs that set sizes or selections, not values: never nudged (op type -> first such input)
SIZE_INPUTS = {"Resize": 1, "Upsample": 1, "Range": 0, "NonMaxSuppression": 2}


def nudge(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``values`` with each finite element moved by -1, 0 or +1 ulp in its own dtype."""
    step = rng.integers(-1, 2, size=values.shape)
    up = np.nextafter(values, np.array(np.inf, dtype=values.dtype))
    down = np.nextafter(values, np.array(-np.inf, dtype=values.dtype))
    moved = np.where(step > 0, up, np.where(step < 0, down, values))
    return np.asarray(np.where(np.isfinite(values), moved, values), dtype=values.dtype)


def _graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph, every subgraph (If/Loop/Scan bodies) and every function body's nodes."""
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def _nodes(model: onnx.ModelProto) -> Iterator[tuple[onnx.GraphProto | onnx.FunctionProto, onnx.NodeProto]]:
    for graph in _graphs(model):
        for node in graph.node:
            yield graph, node
    for function in model.functions:
        for node in function.node:
            yield function, node


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every named constant tensor: initializers and ``Constant`` node values (all scopes)."""
    found: dict[str, onnx.TensorProto] = {}
    for graph in _graphs(model):
        for t in graph.initializer:
            found.setdefault(t.name, t)
    for _, node in _nodes(model):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    found.setdefault(node.output[0], attr.t)
    return found


def touched_tensors(model: onnx.ModelProto, nodes: Collection[str]) -> set[str]:
    """The constant tensors the nodes named ``nodes`` read: their constant inputs, and the
    constants behind an input computed from constants only (a DequantizeLinear weight)."""
    constants = _constants(model)
    producers: dict[str, onnx.NodeProto] = {}
    for _, node in _nodes(model):
        for out in node.output:
            producers.setdefault(out, node)
    wanted = set(nodes)
    found: set[str] = set()
    for _, node in _nodes(model):
        if (node.name or (node.output[0] if node.output else "")) in wanted:  # as the report names it
            for name in node.input:
                found |= _constant_leaves(name, constants, producers, depth=4)
    return found


def _constant_leaves(
    name: str, constants: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto], depth: int
) -> set[str]:
    """The constants ``name`` is computed from, or an empty set when it depends on anything else."""
    if name in constants:
        return {name}
    node = producers.get(name)
    if node is None or depth == 0 or not node.input:
        return set()
    leaves: set[str] = set()
    for i in node.input:
        if not i:
            continue
        found = _constant_leaves(i, constants, producers, depth - 1)
        if not found:
            return set()
        leaves |= found
    return leaves


def _size_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors read where they set a size or a selection (Resize scales, Range bounds, ...)."""
    names: set[str] = set()
    for _, node in _nodes(model):
        first = SIZE_INPUTS.get(node.op_type)
        if first is not None:
            names.update(node.input[first:])
    return names


def nudged_copy(model: onnx.ModelProto, names: Collection[str] | None, seed: int) -> onnx.ModelProto:
    """A copy of ``model`` with the float constants ``names`` (None: all of them, but those that
    set sizes) nudged by :func:`nudge`, seeded by ``seed``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    skip = _size_tensors(copy)
    rng = np.random.default_rng([seed, NOISE_STREAM])
    for name, tensor in sorted(_constants(copy).items()):
        if not _nudgeable(name, tensor, names, skip):
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # not in memory: left as it is
        values = numpy_helper.to_array(tensor)
        moved = nudge(values, rng)
        for field in ("float_data", "int32_data", "double_data"):
            tensor.ClearField(field)
        tensor.raw_data = np.ascontiguousarray(moved).tobytes()
    return copy


def _nudgeable(
    name: str, tensor: onnx.TensorProto, names: Collection[str] | None, skip: Collection[str]
) -> bool:
    """Whether the constant ``name`` moves: a float, not a size, and chosen (``names`` None: all)."""
    return tensor.data_type in FLOAT_TYPES and name not in skip and (names is None or name in names)


def file_overrides(path: Path, touched_nodes: Collection[str] | None, seed: int) -> dict[str, np.ndarray]:
    """The nudged main-graph initializers of the model file ``path`` (those the nodes
    ``touched_nodes`` read; None: every float one), read one at a time, never the whole model."""
    model, base_dir, _, embedded = open_model(path, stream_external=True, lazy=True)
    try:
        names = None if touched_nodes is None else touched_tensors(model, touched_nodes)
        skip = _size_tensors(model)
        store = FileStore(base_dir, embedded)
        rng = np.random.default_rng([seed, NOISE_STREAM])
        return {
            t.name: nudge(store.read(t), rng)
            for t in sorted(model.graph.initializer, key=lambda t: t.name)
            if _nudgeable(t.name, t, names, skip)
        }
    finally:
        if embedded is not None:
            embedded.close()


def file_noise_floors(
    path: Path,
    touched_nodes: Collection[str] | None,
    seed: int,
    provider: str,
    feeds: Sequence[Feeds],
    names: list[str],
    reference: Sequence[Sequence[np.ndarray]],
    threads: int | None = None,
) -> list[float | None]:
    """:func:`noise_floors` for a model file: a small one without external data is nudged as a
    copy, any other runs from the file with nudged initializers (see the module's docstring)."""
    unknown: list[float | None] = [None] * len(names)
    try:
        if path.stat().st_size < DEFAULT_POLICY.embedded_threshold:
            model, _, _ = load_model(path, stream_external=True)
            if not has_external_data(model):
                touched = None if touched_nodes is None else touched_tensors(model, touched_nodes)
                return noise_floors(model, touched, seed, provider, feeds, names, reference, threads)
            del model
        overrides = file_overrides(path, touched_nodes, seed)
        moved = run_all(path, provider, feeds, names, threads, overrides)
    except Exception:  # noqa: BLE001 - unreadable now, or onnxruntime's own types: the floor is unknown
        return unknown
    return _floors(reference, moved)


def _floors(
    reference: Sequence[Sequence[np.ndarray]], moved: Sequence[Sequence[np.ndarray]]
) -> list[float | None]:
    """Per output: the largest change over the runs (None where it is not finite)."""
    floors: list[float | None] = []
    for i in range(len(reference[0]) if reference else 0):
        change = max(max_change(ref[i], new[i]) for ref, new in zip(reference, moved, strict=True))
        floors.append(change if math.isfinite(change) else None)
    return floors


def noise_floors(
    model: onnx.ModelProto,
    touched: Collection[str] | None,
    seed: int,
    provider: str,
    feeds: Sequence[Feeds],
    names: list[str],
    reference: Sequence[Sequence[np.ndarray]],
    threads: int | None = None,
) -> list[float | None]:
    """Per output ``names``: the largest change over ``feeds`` when the constants ``touched``
    (None: every float constant) move by at most one ulp; None where it cannot be measured
    (the model is too large to copy, onnxruntime fails on the copy, or the change is not finite)."""
    unknown: list[float | None] = [None] * len(names)
    if model.ByteSize() > MAX_PROTO_BYTES:
        return unknown
    source = nudged_copy(model, touched, seed).SerializeToString()
    try:
        moved = run_all(source, provider, feeds, names, threads)
    except Exception:  # noqa: BLE001 - onnxruntime's own types; the floor is then unknown
        return unknown
    return _floors(reference, moved)
