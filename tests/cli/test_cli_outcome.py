"""The per-model records and the exit policy (``--strict`` included), as data."""

from __future__ import annotations

import pytest

from bnfold.cli.exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL, EXIT_OK
from bnfold.cli.outcome import (
    FoldJob,
    InspectOutcome,
    ModelOutcome,
    VerifyOutcome,
    fold_verdict,
    inspect_verdict,
    verification_status,
)
from bnfold.verification.options import VerifyOptions

MODEL_KEYS = [
    "input",
    "output",
    "written",
    "dry_run",
    "status",
    "exit_code",
    "message",
    "verification_status",
    "folded",
    "kept",
    "kept_after_linear",
    "nodes_before",
    "nodes_after",
    "size_before",
    "size_after",
    "seconds",
    "fold_seconds",
    "verify_seconds",
    "warnings",
    "report",
    "verification",
]


def test_model_outcome_json_keys_in_schema_order() -> None:
    out = ModelOutcome.empty(FoldJob("a.onnx", "a.folded.onnx", VerifyOptions(), dry_run=True))
    doc = out.to_dict()
    assert list(doc) == MODEL_KEYS
    assert (doc["status"], doc["exit_code"], doc["dry_run"], doc["written"]) == (
        "error",
        EXIT_INTERNAL,
        True,
        False,
    )
    out.traceback = "Traceback ..."
    assert list(out.to_dict()) == [*MODEL_KEYS, "traceback"]  # only with BNFOLD_DEBUG


def test_about_names_the_input_once() -> None:
    out = ModelOutcome("m.onnx", "o.onnx", message="no such file")
    assert out.about == "m.onnx: no such file"
    out.message = "m.onnx: not an ONNX model"
    assert out.about == "m.onnx: not an ONNX model"


def test_verify_and_inspect_records() -> None:
    assert list(VerifyOutcome("r", "c").to_dict()) == [
        "reference",
        "candidate",
        "status",
        "exit_code",
        "message",
        "verification_status",
        "verification",
        "seconds",
    ]
    doc = InspectOutcome("m.onnx").to_dict()
    assert doc["exit_code"] == EXIT_BAD_INPUT and doc["batchnorms"] == [] and doc["input"] == "m.onnx"


@pytest.mark.parametrize(
    "status, changed, expect",
    [
        (None, True, "skipped"),
        ("passed", True, "passed"),
        ("passed", False, "unchanged"),
        ("error", True, "unverifiable"),
        ("failed", True, "failed"),
    ],
)
def test_verification_status(status: str | None, changed: bool, expect: str) -> None:
    assert verification_status(status, changed) == expect


def test_fold_verdict_order_of_the_rules() -> None:
    # a failed verification wins over --strict
    assert fold_verdict("failed", "differs", ["bn"], True) == (
        EXIT_FAILED,
        "verification failed: differs",
        None,
    )
    code, message, warning = fold_verdict("passed", "", ["bn1", "bn2"], True)
    assert (code, warning) == (EXIT_FAILED, None)
    assert message == "--strict: 2 BatchNormalizations kept after Conv/ConvTranspose/Gemm/MatMul: bn1, bn2"
    names = [f"bn{i}" for i in range(7)]
    assert fold_verdict("passed", "", names, True)[1].endswith("bn0, bn1, bn2, bn3, bn4 and 2 more")
    assert fold_verdict("passed", "", ["bn"], False) == (
        EXIT_OK,
        "",
        None,
    )  # kept BNs are fine without --strict
    assert fold_verdict("unverifiable", "no kernel", [], True) == (
        EXIT_FAILED,
        "--strict: the fold could not be verified: no kernel",
        None,
    )
    code, message, warning = fold_verdict("unverifiable", "no kernel", [], False)
    assert (code, message) == (EXIT_OK, "not verified: no kernel")
    assert warning == "the fold could not be verified (no kernel); it was computed exactly but not checked"
    assert fold_verdict("skipped", "", [], False) == (EXIT_OK, "not verified: --no-verify", None)
    assert fold_verdict("unchanged", "", [], True) == (EXIT_OK, "", None)


def test_inspect_verdict() -> None:
    assert inspect_verdict(["bn"], False) == (EXIT_OK, "passed", "")
    assert inspect_verdict([], True) == (EXIT_OK, "passed", "")
    code, status, message = inspect_verdict(["bn_mm"], True)
    assert (code, status) == (EXIT_FAILED, "failed")
    assert (
        message
        == "--strict: 1 BatchNormalization(s) after Conv/ConvTranspose/Gemm/MatMul cannot be folded: bn_mm"
    )
