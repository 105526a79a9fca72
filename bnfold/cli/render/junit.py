"""JUnit XML: one testcase per model (or comparison) and one per compared output."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from ..exits import EXIT_BAD_INPUT
from ..outcome import ModelOutcome, VerifyOutcome
from .text import fmt_err, fmt_shape


def _case(parent: ET.Element, classname: str, name: str, seconds: float) -> ET.Element:
    return ET.SubElement(parent, "testcase", classname=classname, name=name, time=f"{seconds:.3f}")


def output_failure_text(o: dict[str, Any]) -> str:
    return (
        f"output {o['name']} ({o['dtype']}, {fmt_shape(o['shape'])}): max abs err {fmt_err(o['max_abs_err'])}, "
        f"max rel err {fmt_err(o['max_rel_err'])}, tolerance atol {fmt_err(o['atol'])} + rtol "
        f"{fmt_err(o['rtol'])}*|ref|, {o['mismatches']} elements outside; passes with atol >= "
        f"{fmt_err(o['min_atol'])} or rtol >= {fmt_err(o['min_rtol'])}"
    )


def _outputs(suite: ET.Element, classname: str, v: dict[str, Any] | None) -> None:
    if v is None or not v.get("outputs"):
        return
    for o in v["outputs"]:
        case = _case(suite, classname, f"output {o['name']}", 0.0)
        if not o["passed"]:
            text = output_failure_text(o)
            ET.SubElement(case, "failure", message=text, type="VerificationFailed").text = text


def junit_xml(suite_name: str, cases: list[tuple[str, ModelOutcome | VerifyOutcome]], kind: str) -> str:
    """The document: ``kind`` names each model's own testcase (``fold``/``verify``)."""
    root = ET.Element("testsuites")
    suite = ET.SubElement(root, "testsuite", name=suite_name)
    for classname, out in cases:
        case = _case(suite, classname, kind, out.seconds or 0.0)
        msg = out.message or ""
        if out.status == "error":
            kind_of_error = "BadInput" if out.exit_code == EXIT_BAD_INPUT else "Error"
            ET.SubElement(case, "error", message=msg, type=kind_of_error).text = msg
        elif out.status == "failed":
            ET.SubElement(case, "failure", message=msg, type="Failed").text = msg
        elif out.verification_status in ("unverifiable", "skipped"):
            ET.SubElement(case, "skipped", message=msg)
        _outputs(suite, classname, out.verification)
    cases_el = suite.findall("testcase")
    suite.set("tests", str(len(cases_el)))
    for tag, attr in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
        suite.set(attr, str(sum(1 for c in cases_el if c.find(tag) is not None)))
    suite.set("time", f"{sum(float(c.get('time', 0)) for c in cases_el):.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
