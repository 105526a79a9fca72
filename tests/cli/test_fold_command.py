"""``bnfold [fold] MODEL...``: what is written, exit codes 0 and 1, --bn-to-affine, --merge-branches,
atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import FINAL_PASSED, assert_usage_error, files, last_line, ops, save
from cli_runner import invoke
from onnx import numpy_helper

from bnfold.testing import assert_models_close, conv_bn_model


def test_fold_writes_next_to_input_and_keeps_input(folder: Path) -> None:
    src = folder / "a.onnx"
    before = src.read_bytes()
    result = invoke(src)
    assert result.exit_code == 0, result.output
    assert FINAL_PASSED.match(last_line(result.stdout)), result.stdout
    assert last_line(result.stdout).startswith("PASSED 1 folded, 0 kept")
    out = folder / "a.folded.onnx"
    assert src.read_bytes() == before
    assert "BatchNormalization" not in ops(out)
    onnx.checker.check_model(onnx.load(str(out)))
    assert_models_close(src, out)
    # the summary has the pieces the issue asks for
    text = result.stdout
    for piece in (
        "bn0",
        "conv0",
        "Conv",
        "nodes: 3 -> 2",
        "size:",
        "max abs err",
        "PASSED",
        "time:",
        "wrote",
    ):
        assert piece in text, piece
    assert not [n for n in files(folder) if n.endswith(".tmp")]


def test_fold_with_output_option_and_fold_subcommand(folder: Path) -> None:
    out = folder / "x.onnx"
    result = invoke("fold", folder / "b.onnx", "-o", out)
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout).startswith("PASSED 2 folded, 0 kept, max abs err ")
    assert ops(out).count("BatchNormalization") == 0


def test_in_place_overwrites_only_with_flag(folder: Path) -> None:
    src = folder / "a.onnx"
    before = src.read_bytes()
    result = invoke(src, "-o", src)
    assert_usage_error(result, result.stderr)
    assert "--in-place" in result.stderr
    assert src.read_bytes() == before
    result = invoke(src, "--in-place")
    assert result.exit_code == 0, result.output
    assert "BatchNormalization" not in ops(src)
    assert files(folder) == {"a.onnx", "b.onnx"}


def test_dry_run_writes_nothing(folder: Path) -> None:
    result = invoke(folder / "a.onnx", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: nothing written" in result.stdout
    assert files(folder) == {"a.onnx", "b.onnx"}


def test_nothing_to_fold_is_success(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    src = save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "r.onnx"
    )
    result = invoke(src)
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout) == "PASSED 0 folded, 0 kept, nothing to fold, model unchanged"
    result = invoke(src, "--in-place")
    assert result.exit_code == 0
    assert "left untouched" in result.stderr


def test_no_verify(folder: Path) -> None:
    result = invoke(folder / "a.onnx", "--no-verify")
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout) == "PASSED 1 folded, 0 kept, not verified: --no-verify"
    assert (folder / "a.folded.onnx").exists()


def test_quiet_prints_only_the_final_line(folder: Path) -> None:
    result = invoke(folder / "a.onnx", "-q")
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) == 1
    assert FINAL_PASSED.match(result.stdout.strip())


def test_verification_options_reach_onnxruntime(folder: Path) -> None:
    out = folder / "r.json"
    result = invoke(folder / "a.onnx", "--dim", "N=3", "--runs", "2", "--seed", "7", "--json", out)
    assert result.exit_code == 0, result.output
    v = json.loads(out.read_text())["models"][0]["verification"]
    assert v["input_shapes"] == {"x": [3, 3, 8, 8]}
    assert (v["runs"], v["seed"], v["assumed_dims"]) == (2, 7, {})
    result = invoke(folder / "a.onnx", "--shape", "x=2x3x8x8", "--atol", "0.5", "--rtol", "0", "--json", out)
    assert result.exit_code == 0, result.output
    v = json.loads(out.read_text())["models"][0]["verification"]
    assert v["input_shapes"] == {"x": [2, 3, 8, 8]}
    assert v["outputs"][0]["atol"] == 0.5 and v["outputs"][0]["rtol"] == 0
    arrays = folder / "in.npz"
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(arrays, x=x)
    result = invoke(folder / "a.onnx", "--inputs", arrays, "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["models"][0]["verification"]["input_shapes"] == {"x": [5, 3, 8, 8]}


def test_provider_short_name(folder: Path) -> None:
    result = invoke(folder / "a.onnx", "--provider", "cpu", "--dry-run", "-q")
    assert result.exit_code == 0, result.output


def test_failed_verification_is_not_written(folder: Path) -> None:
    # zero tolerance: the exact fold still differs from the unfolded network by float32 rounding
    result = invoke(folder / "a.onnx", "--atol", "0", "--rtol", "0")
    assert result.exit_code == 1, result.output
    line = last_line(result.stdout)
    assert line.startswith("FAILED 1 folded, 0 kept, max abs err ") and "not written" in line, line
    assert files(folder) == {"a.onnx", "b.onnx"}
    result = invoke(folder / "a.onnx", "--atol", "0", "--rtol", "0", "--force")
    assert result.exit_code == 1
    assert "written anyway (--force)" in last_line(result.stdout)
    assert (folder / "a.folded.onnx").exists()


def test_strict_fails_on_kept_bn_after_matmul(tmp_path: Path) -> None:
    src = save(conv_bn_model(matmul_bn=True), tmp_path / "mm.onnx")
    result = invoke(src)
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout).startswith("PASSED 1 folded, 1 kept")
    assert "bn_mm" in result.stdout and "channel_axis" in result.stdout
    (tmp_path / "mm.folded.onnx").unlink()
    result = invoke(src, "--strict")
    assert result.exit_code == 1, result.output
    assert last_line(result.stdout).startswith("FAILED 1 folded, 1 kept, --strict:")
    assert "bn_mm" in last_line(result.stdout)
    assert files(tmp_path) == {"mm.onnx"}


def test_unverifiable_model_is_written_with_warning(tmp_path: Path) -> None:
    # onnxruntime's CPU provider has no bfloat16 Conv: the original cannot run
    src = save(conv_bn_model(dtype="bfloat16"), tmp_path / "bf.onnx")
    result = invoke(src, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    line = last_line(result.stdout)
    assert line.startswith(
        "PASSED 1 folded, 0 kept, not verified: onnxruntime cannot run the reference model"
    ), line
    assert "warning" in result.stderr and "could not be verified" in result.stderr
    assert (tmp_path / "bf.folded.onnx").exists()
    rec = json.loads((tmp_path / "r.json").read_text())["models"][0]
    assert rec["verification_status"] == "unverifiable" and rec["status"] == "passed"
    (tmp_path / "bf.folded.onnx").unlink()
    result = invoke(src, "--strict")
    assert result.exit_code == 1
    assert last_line(result.stdout).startswith(
        "FAILED 1 folded, 0 kept, --strict: the fold could not be verified"
    )
    assert not (tmp_path / "bf.folded.onnx").exists()


def test_bn_to_affine_flag(tmp_path: Path) -> None:
    """--bn-to-affine turns a BN that cannot fold (after a Relu) into Mul + Add, checked in ORT."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    params = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in (
            ("g", rng.normal(1, 0.5, 3)),
            ("b", rng.normal(0, 1, 3)),
            ("m", rng.normal(0, 1, 3)),
            ("v", rng.uniform(0.5, 2, 3)),
        )
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        params,
    )
    src = tmp_path / "relu_bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    result = invoke(src, "-o", tmp_path / "out.onnx", "--bn-to-affine")
    assert result.exit_code == 0, result.output
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.op_type for n in out.graph.node] == ["Relu", "Mul", "Add"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}
    want = ort.InferenceSession(str(src), opts).run(None, feed)[0]
    got = ort.InferenceSession(str(tmp_path / "out.onnx"), opts).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    plain = invoke(src, "-o", tmp_path / "plain.onnx")
    assert plain.exit_code == 0 and "unsupported_producer" in plain.output


def test_failed_write_leaves_no_temp_file_and_input_untouched(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnfold.storage.atomic

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bnfold.storage.atomic.os, "replace", broken_replace)
    src = folder / "a.onnx"
    before = src.read_bytes()
    for extra in ([], ["--in-place"]):
        result = invoke(src, *extra)
        assert result.exit_code == 2, result.output
        assert "No space left on device" in result.stderr
        assert src.read_bytes() == before
        assert files(folder) == {"a.onnx", "b.onnx"}, files(folder)


def test_interrupted_write_leaves_no_temp_file(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfold.storage.atomic

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bnfold.storage.atomic.os, "fsync", interrupted)
    result = invoke(folder / "a.onnx")
    assert result.exit_code == 130
    assert result.stderr.strip() == "bnfold: interrupted"
    assert files(folder) == {"a.onnx", "b.onnx"}


def test_existing_output_is_replaced_atomically_keeping_mode(folder: Path) -> None:
    out = folder / "a.folded.onnx"
    out.write_bytes(b"old")
    out.chmod(0o640)
    result = invoke(folder / "a.onnx")
    assert result.exit_code == 0
    assert out.read_bytes() != b"old" and (out.stat().st_mode & 0o777) == 0o640


def test_merge_branches_flag(tmp_path: Path) -> None:
    """--merge-branches makes the bundled RepVGG block one Conv: the report line counts the convs
    removed, the JSON report carries merged_convs; without it the identity BN says it needs the flag.
    The written model is checked in onnxruntime against the input."""
    import onnxruntime as ort

    from models.cases import BY_NAME

    src = BY_NAME["case_repvgg_block"].path
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = invoke(src, "-o", out, "--merge-branches", "--json", report)
    assert result.exit_code == 0, result.output
    assert "merged branches: 1 conv removed" in result.stdout
    assert last_line(result.stdout).startswith("PASSED 3 folded, 0 kept")
    doc = json.loads(report.read_text())["models"][0]["report"]
    assert doc["merged_convs"] == 1 and {p["pattern"] for p in doc["folded"]} == {"merged_branches"}
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Relu", "Conv", "Relu"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {"X": np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)}
    want = ort.InferenceSession(str(src), opts).run(None, feed)[0]
    got = ort.InferenceSession(str(out), opts).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))

    plain = invoke(src, "-o", tmp_path / "plain.onnx", "--json", report)
    assert plain.exit_code == 0 and "merged branches" not in plain.stdout
    doc = json.loads(report.read_text())["models"][0]["report"]
    assert doc["merged_convs"] == 0 and [s["code"] for s in doc["skipped"]] == ["needs_merge_branches"]
    assert "--merge-branches" in doc["skipped"][0]["message"]
