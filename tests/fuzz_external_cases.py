"""The external-data fuzz cases of tests/test_fuzz.py: hostile locations, offsets and lengths,
damaged data files, and the property ``check_external_case``."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fuzz_cases import REASON_CODE, assert_rounding_noise, assert_same_outputs, overflows, pick
from hypothesis import strategies as st

import bnfold
from bnfold.errors import BadInput, VerificationFailed
from bnfold.testing import conv_bn_model

# ------------------------------------------------------------------------------------------------
# external data: hostile locations, offsets and lengths, damaged data files

LOCATIONS = [
    "w.bin",
    "other.bin",
    "",
    ".",
    "..",
    "../w.bin",
    "sub/../w.bin",
    "/etc/passwd",
    "\\\\server\\x",
    "C:\\w.bin",
    "link.bin",
    "loop.bin",
    "a\0b",
    "x" * 300,
    "w.bin/",
    "./w.bin",
    "~/w.bin",
    "sub/w.bin",
]
NUMBERS = st.one_of(
    st.integers(-3, 20000).map(str), st.sampled_from(["", " 1", "1e3", "0x10", "\u0663", "99" * 15])
)


def _external_case(data: Any, folder: Path) -> Path:
    """An external-data model in ``folder`` with its entries and data file mutated."""
    draw = data.draw
    src = folder / "m.onnx"
    onnx.save(
        conv_bn_model(blocks=2, channels=16, seed=draw(st.integers(0, 3))),
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.bin",
        size_threshold=0,
    )
    (folder / "sub").mkdir()
    (folder / "sub" / "w.bin").write_bytes((folder / "w.bin").read_bytes())
    (folder / "other.bin").write_bytes(b"\0" * 64)
    (folder / "link.bin").symlink_to(folder.parent / "outside.bin")
    (folder / "loop.bin").symlink_to(folder / "loop.bin")
    model = onnx.load(str(src), load_external_data=False)
    for _ in range(draw(st.integers(1, 3))):
        t = pick(draw, list(model.graph.initializer))
        what = draw(st.sampled_from(["location", "offset", "length", "drop", "inline", "dims", "file"]))
        entries = {e.key: e for e in t.external_data}
        if what in ("location", "offset", "length"):
            value = draw(st.sampled_from(LOCATIONS) if what == "location" else NUMBERS)
            if what in entries:
                entries[what].value = value
            else:
                e = t.external_data.add()
                e.key, e.value = what, value
        elif what == "drop" and t.external_data:
            del t.external_data[draw(st.integers(0, len(t.external_data) - 1))]
        elif what == "inline":
            t.data_location = onnx.TensorProto.DEFAULT  # says inline, has no data
        elif what == "dims":
            del t.dims[:]
            t.dims.extend(draw(st.lists(st.integers(0, 6), max_size=4)))
        else:
            data_file = folder / "w.bin"
            raw = data_file.read_bytes()
            cut = draw(st.integers(0, len(raw)))
            data_file.write_bytes(
                raw[:cut] if draw(st.booleans()) else raw[:cut] + b"\xff" * 8 + raw[cut + 8 :]
            )
    src.write_bytes(model.SerializeToString())
    return src


def check_external_case(data: Any) -> str:
    """The property for a model with mutated external data; returns the outcome's name."""
    with tempfile.TemporaryDirectory(prefix="bnfold-fuzz-ext-") as tmp:
        root = Path(tmp)
        (root / "outside.bin").write_bytes(b"secret" * 1000)
        folder = root / "model"
        folder.mkdir()
        src = _external_case(data, folder)
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}
        stream = data.draw(st.sampled_from([None, True]))
        try:
            result = bnfold.fold(src, stream_external=stream)
        except BadInput as exc:
            assert str(exc) and "\n" not in str(exc)
            return "refused"
        finally:
            after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}
            assert after == before  # nothing in the model's folder changed
        for s in result.report.skipped:
            assert REASON_CODE.match(s.code) and s.message, s
        if not result.passed:
            # Garbage read from a moved offset can make the original lose precision in float32
            # (bias and mean 1e20 that cancel exactly in the fold, not in the original): bnfold's
            # verification sees the difference and refuses to save. That protects the user.
            with pytest.raises(VerificationFailed):
                result.save(root / "refused.onnx")
            assert not (root / "refused.onnx").exists()
            return "folded, verification failed, not saved"
        out = root / "out.onnx"
        result.save(out)
        feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                ref = _run_path(src, feeds)
        except Exception:
            return "folded, original does not run"
        if overflows(ref):
            return "folded, original near the float range limit"
        assert result.verification is not None
        if "rounding noise" in result.verification.message:
            # bnfold says the original's outputs are its own rounding noise (garbage weights that
            # cancel in float32): check the claim here, with this test's own one-ulp nudges
            assert_rounding_noise(onnx.load(str(src)), feeds, ref)
            return "folded, original is rounding noise"
        assert_same_outputs(ref, _run_path(out, feeds))
        return "folded, outputs match"


def _run_path(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]
