"""Human text: plain tables and lines off a terminal (what the golden outputs are), rich tables
and colour on one; names from a model never drive the terminal."""

from __future__ import annotations

import io
import sys

import pytest

from bnfold.cli.console import Console, progress
from bnfold.cli.outcome import InspectOutcome, ModelOutcome, VerifyOutcome
from bnfold.cli.render.text import (
    Table,
    fmt_bytes,
    fmt_err,
    fmt_seconds,
    inspect_blocks,
    inspect_final_line,
    model_blocks,
    model_final_line,
    overall_final_line,
    plain,
    verification_blocks,
    verify_final_line,
)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _output(name: str, err: float | None, passed: bool) -> dict[str, object]:
    return {
        "name": name,
        "dtype": "float32",
        "shape": [1, 4],
        "max_abs_err": err,
        "max_rel_err": err,
        "atol": 1e-4,
        "rtol": 1e-4,
        "min_atol": err,
        "min_rtol": err,
        "passed": passed,
        "mismatches": 0 if passed else 3,
    }


def _folded(err: float = 1.5e-7) -> ModelOutcome:
    report = {
        "folded": [{"bn": "bn0", "target": "conv0", "kind": "Conv", "pattern": "bn_after", "graph": "main"}],
        "skipped": [],
        "nodes_before": 3,
        "nodes_after": 2,
        "initializers_before": 7,
        "initializers_after": 2,
    }
    verification = {"provider": "CPUExecutionProvider", "seed": 0, "runs": 1, "input_shapes": {"x": [1, 4]}}
    verification |= {"outputs": [_output("y", err, True)], "max_abs_err": err, "message": ""}
    return ModelOutcome(
        "m.onnx",
        "m.folded.onnx",
        written=True,
        status="passed",
        exit_code=0,
        verification_status="passed",
        folded=1,
        report=report,
        verification=verification,
        size_before=2048,
        size_after=1024,
        seconds=0.25,
        fold_seconds=0.1,
        verify_seconds=0.05,
    )


def test_formats() -> None:
    assert (fmt_err(None), fmt_err(0), fmt_err(1.23456e-5)) == ("inf", "0", "1.23e-05")
    assert (fmt_bytes(None), fmt_bytes(999), fmt_bytes(2048), fmt_bytes(3 * 1024**3)) == (
        "?",
        "999 B",
        "2.0 KiB",
        "3.0 GiB",
    )
    assert (fmt_seconds(None), fmt_seconds(0.25), fmt_seconds(2.5)) == ("-", "250 ms", "2.50 s")


def test_table_columns_are_aligned_with_two_spaces() -> None:
    assert Table([["a", "bb"], ["ccc", "d"]], "  ").lines() == ["  a    bb", "  ccc  d"]
    assert plain(["x", Table([["h"], ["v"]], ""), "y"]) == ["x", "h", "v", "y"]


def test_model_text_and_final_lines() -> None:
    out = _folded()
    text = plain(model_blocks(out))
    assert text[0] == "m.onnx -> m.folded.onnx"
    assert "    bn0  ->  conv0   Conv  bn_after  main" in text
    assert "  nodes: 3 -> 2, initializers: 7 -> 2" in text and "  size: 2.0 KiB -> 1.0 KiB" in text
    assert text[-2:] == ["  time: 250 ms (fold 100 ms, verify 50 ms)", "  wrote m.folded.onnx"]
    assert model_final_line(out) == "PASSED 1 folded, 0 kept, max abs err 1.50e-07"
    worse = _folded(float("inf"))
    worse.verification["max_abs_err"] = None  # type: ignore[index]
    assert overall_final_line([out, worse]) == "PASSED 2 models: 2 folded, 0 kept, max abs err inf"
    bad = ModelOutcome("x.onnx", "y.onnx", exit_code=2, message="no such file")
    assert model_final_line(bad) == "FAILED bad input: no such file"
    assert overall_final_line([out, bad]) == "FAILED 1 of 2 models: 1 folded, 0 kept, max abs err 1.50e-07"


def test_verify_and_inspect_lines() -> None:
    v = {"outputs": [_output("a", 1e-6, True), _output("b", 0.5, False)], "max_abs_err": 0.5}
    out = VerifyOutcome(
        "r.onnx", "c.onnx", status="failed", exit_code=1, verification_status="failed", verification=v
    )
    assert verify_final_line(out) == (
        "FAILED 1/2 outputs differ, max abs err 5.00e-01 > tolerance 1.00e-04 + 1.00e-04*|ref| (output b)"
    )
    bns = [{"bn": "bn", "graph": "main", "follows_op": None, "follows": None, "foldable": False}]
    bns[0] |= {"code": "graph_input", "message": "follows a graph input", "pattern": None}
    ins = InspectOutcome("m.onnx", status="passed", exit_code=0, batchnorms=bns, kept=1)
    assert plain(inspect_blocks(ins)) == [
        "m.onnx: 1 BatchNormalization, 0 foldable, 1 kept",
        "  BN  graph  follows  foldable  pattern / reason",
        "  bn  main   -        no        graph_input: follows a graph input",
    ]
    assert inspect_final_line(ins) == "PASSED 0 foldable, 1 kept"


def _printed(stream: io.StringIO, blocks: list[object], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys, "stdout", stream)
    Console().lines(blocks)  # type: ignore[arg-type]
    return stream.getvalue()


def test_plain_text_off_a_terminal_is_exactly_the_rendered_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = model_blocks(_folded())
    assert _printed(io.StringIO(), blocks, monkeypatch) == "\n".join(plain(blocks)) + "\n"


def test_rich_tables_on_a_terminal_keep_names_inert(monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = "[bold red]x\x1b[31m"
    blocks = ["head", Table([["BN", "target"], [hostile, "conv"]], "  ")]
    text = _printed(Tty(), blocks, monkeypatch)
    assert "head" in text and "[bold red]x\\x1b[31m" in text  # no markup, the escape is escaped
    assert "\x1b[31m" not in text.replace("\x1b[1m", "")
    assert text.count("\n") == 3  # one line per row, nothing wrapped


def test_progress_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress(Console(), 2, "m.onnx") as bar:
        assert bar is None
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    with progress(Console(quiet=True), 2, "m.onnx") as bar:
        assert bar is None
    monkeypatch.setenv("CI", "true")
    with progress(Console(), 2, "m.onnx") as bar:
        assert bar is None
    monkeypatch.delenv("CI")
    with progress(Console(), 2, "m.onnx") as bar:
        assert bar is not None
        bar.set_label("a.onnx")
        bar.step("folding")
        bar.advance(failed=True)
        assert (bar.done, bar.failed) == (1, 1)
    assert "1/2 models, 1 failed" in tty.getvalue()


def test_errors_are_stated_in_noise_floors() -> None:
    a = _output("a", 2e-7, True) | {"noise_floor": 1e-7, "err_over_noise": 2.0}
    b = _output("b", 1e-7, True) | {"noise_floor": 1e-8, "err_over_noise": 10.0}
    out = _folded()
    out.verification = {"outputs": [a], "max_abs_err": 2e-7, "message": ""}
    assert model_final_line(out) == "PASSED 1 folded, 0 kept, max abs err 2.00e-07 = 2 noise floors"
    # the largest error is a's, but b is further from its own noise: both are said
    out.verification = {"outputs": [a, b], "max_abs_err": 2e-7, "message": ""}
    assert model_final_line(out) == (
        "PASSED 1 folded, 0 kept, max abs err 2.00e-07 = 2 noise floors (output b: 10 noise floors)"
    )
    table = plain(verification_blocks(out.verification))
    assert "noise floor" in table[1] and "err/noise" in table[1]
    assert table[2].split()[-3:] == ["1.00e-07", "2", "PASSED"]
    # no floor measured (e.g. a zero floor): no ratio, a dash in the table
    c = _output("c", 1e-7, True) | {"noise_floor": 0.0, "err_over_noise": None}
    out.verification = {"outputs": [c], "max_abs_err": 1e-7, "message": ""}
    assert model_final_line(out) == "PASSED 1 folded, 0 kept, max abs err 1.00e-07"
    assert plain(verification_blocks(out.verification))[2].split()[-3:] == ["0", "-", "PASSED"]
