"""Helpers shared by the command-line tests: models on disk, the final line, the JSON Schema
checker for the schemas in docs/cli.md, corrupted and foreign-tool candidates."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]

DOCS = REPO / "docs" / "cli.md"

FINAL_PASSED = re.compile(r"^PASSED \d+ folded, \d+ kept, max abs err \S+ = [0-9.e+-]+ noise floors$")


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def assert_usage_error(result: Any, stderr: str) -> None:
    assert result.exit_code == 2, (result.stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bnfold: error: "), stderr
    assert "Traceback" not in stderr and "Traceback" not in result.stdout


def doc_schemas() -> dict[str, dict[str, Any]]:
    text = DOCS.read_text()
    found = dict(re.findall(r"<!-- schema: (\w+) -->\s*```json\n(.*?)\n```", text, re.S))
    schemas = {k: json.loads(v) for k, v in found.items()}
    defs = schemas["fold"]["$defs"]
    for s in schemas.values():
        s.setdefault("$defs", defs)
    return schemas


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
    "integer": int,
    "number": (int, float),
}


def validate(value: Any, schema: dict[str, Any], defs: dict[str, Any], path: str = "$") -> None:
    if "$ref" in schema:
        validate(value, defs[schema["$ref"].split("/")[-1]], defs, path)
        return
    if "oneOf" in schema:
        errors = []
        for sub in schema["oneOf"]:
            try:
                validate(value, sub, defs, path)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{path}: matches no alternative: {errors}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(value, _TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
            for t in types
        )
        assert ok, f"{path}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing {key!r}"
        for key, v in value.items():
            if key in props:
                validate(v, props[key], defs, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                raise AssertionError(f"{path}: unexpected key {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                validate(v, schema["additionalProperties"], defs, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            validate(v, schema["items"], defs, f"{path}[{i}]")


def check_schema(doc: dict[str, Any]) -> None:
    schema = doc_schemas()[doc["command"]]
    validate(doc, schema, schema["$defs"])
    json.dumps(doc, allow_nan=False)  # strict JSON: no inf/nan


def corrupt(src: Path, dst: Path) -> Path:
    """Fold ``src`` with bnfold, then change one weight of the result."""
    import bnfold

    model = bnfold.fold(str(src), verify=False).model
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 4:
            a = a.copy()
            a.flat[0] += 1.0
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            break
    return save(model, dst)


def ort_fold(src: Path, dst: Path) -> Path:
    """The model as onnxruntime's optimizer rewrites it (saved with optimized_model_filepath): a
    candidate made by another tool. Whether that release fuses Conv+BN does not matter to the
    tests that use it: the candidate computes the same function either way."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return dst
