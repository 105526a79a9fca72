"""The GitHub Action: action.yml's wiring, and scripts/action_run.sh run as the action runs it.

The script is run with the environment action.yml gives it (its inputs mapped onto BNFOLD_*
variables, GITHUB_STEP_SUMMARY and GITHUB_OUTPUT pointing at temp files); the reports it leaves
are parsed (JSON, JUnit XML) and checked against what bnfold did.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models" / "onnx"
SCRIPT = ROOT / "scripts" / "action_run.sh"
ACTION = (ROOT / "action.yml").read_text()

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the action's script needs bash")


def _top_level_block(name: str) -> list[str]:
    """The lines of the top-level mapping ``name:`` of action.yml."""
    lines = ACTION.splitlines()
    start = lines.index(f"{name}:") + 1
    block = []
    for line in lines[start:]:
        if line and not line.startswith((" ", "#")):
            break
        block.append(line)
    return block


def _declared_inputs() -> dict[str, dict[str, str]]:
    inputs: dict[str, dict[str, str]] = {}
    for line in _top_level_block("inputs"):
        if m := re.fullmatch(r"  ([\w-]+):", line):
            inputs[m.group(1)] = {}
        elif m := re.fullmatch(r"    (\w+): (.*)", line):
            inputs[list(inputs)[-1]][m.group(1)] = m.group(2)
    return inputs


def _step_env(step_name: str) -> dict[str, str]:
    """The ``env:`` of the step named ``step_name``, variable -> expression."""
    steps = "\n".join(_top_level_block("runs")).split("    - name: ")
    (step,) = [s for s in steps if s.startswith(step_name + "\n")]
    return dict(re.findall(r"^        (\w+): (.*)$", step, flags=re.M))


def test_every_input_used_is_declared_and_every_declared_input_is_used() -> None:
    declared = _declared_inputs()
    assert set(declared) == {
        "models",
        "options",
        "python-version",
        "bnfold-version",
        "json-report",
        "junit-report",
    }
    assert declared["models"]["required"] == "true"
    assert all("description" in spec for spec in declared.values())
    used = set(re.findall(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}|inputs\.([\w-]+) !=", ACTION))
    used_names = {a or b for a, b in used}
    assert used_names == set(declared)


def test_every_variable_the_script_reads_is_set_by_the_action() -> None:
    read = set(re.findall(r"\$\{?(BNFOLD_\w+)", SCRIPT.read_text()))
    env = _step_env("Fold and verify")
    assert read == {k for k in env if k.startswith("BNFOLD_")}
    inputs = {m.group(1) for v in env.values() if (m := re.fullmatch(r"\$\{\{ inputs\.([\w-]+) \}\}", v))}
    assert inputs <= set(_declared_inputs())
    # inputs reach the shell only through env: never pasted into a run: script (template injection)
    for line in ACTION.splitlines():
        if "${{ inputs." in line:
            assert re.match(r"\s+([\w-]+): \$\{\{ inputs\.[\w-]+ \}\}$", line), line
    assert 'bash "$GITHUB_ACTION_PATH/scripts/action_run.sh"' in ACTION
    install = _step_env("Install bnfold")
    assert install["BNFOLD_ACTION_PATH"] == "${{ github.action_path }}"


def _run_action(tmp_path: Path, **inputs: str) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """Run the script with the environment action.yml's step gives it, from ``tmp_path``."""
    summary, outputs = tmp_path / "summary.md", tmp_path / "github_output.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BNFOLD_", "GITHUB_"))}
    defaults = {name: spec.get("default", "").strip('"') for name, spec in _declared_inputs().items()}
    values = {**defaults, **{k.replace("_", "-"): v for k, v in inputs.items()}}
    for variable, expression in _step_env("Fold and verify").items():
        if m := re.fullmatch(r"\$\{\{ inputs\.([\w-]+) \}\}", expression):
            env[variable] = values[m.group(1)]
    env.update(
        BNFOLD_PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        GITHUB_STEP_SUMMARY=str(summary),
        GITHUB_OUTPUT=str(outputs),
        CI="true",
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    return proc, summary, outputs


def _outputs(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    (tmp_path / "exported" / "more").mkdir(parents=True)
    shutil.copy(MODELS / "mlp_bn.onnx", tmp_path / "exported" / "mlp_bn.onnx")
    shutil.copy(MODELS / "resnet_small.onnx", tmp_path / "exported" / "more" / "resnet small.onnx")
    (tmp_path / "folded").mkdir()
    return tmp_path


def test_action_folds_and_writes_reports_and_summary(exported: Path) -> None:
    proc, summary, outputs = _run_action(
        exported,
        models="exported/**/*.onnx\n",
        options="--output-dir folded --strict --runs 2 --dim 'batch=2'",
        json_report="reports/bnfold.json",
        junit_report="reports/junit/bnfold.xml",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("PASSED 2 models: 8 folded, 0 kept")

    report = json.loads((exported / "reports" / "bnfold.json").read_text())
    assert report["schema_version"] == 1 and report["exit_code"] == 0
    models = {Path(m["input"]).name: m for m in report["models"]}
    assert set(models) == {"mlp_bn.onnx", "resnet small.onnx"}
    assert all(m["status"] == "passed" and m["written"] for m in models.values())
    assert (exported / "folded" / "resnet small.folded.onnx").is_file()
    assert (exported / "folded" / "mlp_bn.folded.onnx").is_file()

    suite = ET.parse(exported / "reports" / "junit" / "bnfold.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and suite.get("errors") == "0"
    assert {c.get("classname") for c in suite.iter("testcase")} == {
        "exported/mlp_bn.onnx",
        "exported/more/resnet small.onnx",
    }

    text = summary.read_text()
    assert "PASSED" in text and "exported/mlp_bn.onnx" in text and "resnet small.onnx" in text
    assert _outputs(outputs) == {
        "json-report": "reports/bnfold.json",
        "junit-report": "reports/junit/bnfold.xml",
        "exit-code": "0",
    }


def test_action_fails_with_bnfold_exit_code_and_still_reports(exported: Path) -> None:
    # zero tolerances: the once-rounded folded weights move the outputs by about 1e-7
    proc, summary, outputs = _run_action(
        exported, models="exported/mlp_bn.onnx", options="--output-dir folded --atol 0 --rtol 0"
    )
    assert proc.returncode == 1
    report = json.loads((exported / "bnfold-report.json").read_text())  # the default path
    assert report["exit_code"] == 1 and report["models"][0]["status"] == "failed"
    suite = ET.parse(exported / "bnfold-junit.xml").getroot().find("testsuite")
    assert suite is not None and int(suite.get("failures", "0")) >= 1
    assert "FAILED" in summary.read_text()
    assert _outputs(outputs)["exit-code"] == "1"
    assert not (exported / "folded" / "mlp_bn.folded.onnx").exists()  # a failed fold is not written


def test_action_bad_input_exit_2(exported: Path) -> None:
    proc, _, outputs = _run_action(exported, models="exported/nothing*.onnx", json_report="")
    assert proc.returncode == 2
    assert proc.stderr == "bnfold: error: exported/nothing*.onnx: no such file\n"  # unmatched: passed as is
    assert _outputs(outputs) == {"json-report": "", "junit-report": "bnfold-junit.xml", "exit-code": "2"}


def test_action_without_models_or_with_bad_options(exported: Path) -> None:
    proc, _, _ = _run_action(exported, models="  \n")
    assert (proc.returncode, proc.stderr) == (2, "bnfold action: error: the 'models' input names no model\n")
    proc, _, _ = _run_action(exported, models="exported/mlp_bn.onnx", options="--dim 'batch=2")
    assert proc.returncode == 2 and "the 'options' input is not a valid command line" in proc.stderr


def test_options_are_not_evaluated(exported: Path) -> None:
    marker = exported / "pwned"
    proc, _, _ = _run_action(
        exported,
        models="exported/mlp_bn.onnx",
        options=f"--output-dir folded $(touch {marker}) `touch {marker}`",
    )
    assert not marker.exists()
    assert proc.returncode == 2  # the words reach bnfold as (unknown) arguments
