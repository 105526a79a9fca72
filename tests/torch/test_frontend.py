"""The PyTorch front end: folds checked against the original PyTorch module itself."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import fx, nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BadInput, VerificationFailed  # noqa: E402
from models.definitions import build, randomize_bn  # noqa: E402


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    got64, want64 = got.detach().double(), want.detach().double()
    scale = float(want64.abs().max()) or 1.0
    np.testing.assert_allclose(got64.numpy(), want64.numpy(), rtol=rtol, atol=rtol * scale)


def _bn_modules(m: nn.Module) -> list[str]:
    return [n for n, x in m.named_modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]


def _bn_nodes(gm: fx.GraphModule) -> list[str]:
    names = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and "batch_norm" in str(n.target):
            names.append(n.name)
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm):
            names.append(n.name)
    return names


@pytest.mark.parametrize(
    "name, folds",
    [
        ("resnet_small", 6),
        ("mobilenet_small", 10),
        ("unet_decoder", 8),
        ("audio_cnn1d", 4),
        ("conv3d_block", 3),
        ("mlp_bn", 2),
        ("grouped_conv_transpose", 1),
        ("linear_bn", 1),
        ("functional_conv_bn", 1),
        ("conv_bn_with_activation", 1),
        ("reused_conv", 1),
    ],
)
def test_fold_matches_module(name: str, folds: int) -> None:
    model, x = build(name)
    state = copy.deepcopy(model.state_dict())
    want = model(x)
    result = bt.fold(model, (x,))
    assert len(result.report.folded) == folds, result.report
    assert result.report.skipped == []
    assert _bn_nodes(result.module) == []
    _close(result.module(x), want)
    assert result.verification is not None and result.verification.passed
    # the caller's model is untouched: same tensors, same values, BN still there
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert _bn_modules(model) or name == "functional_conv_bn"


def test_reused_conv_keeps_the_path_without_bn() -> None:
    """torch.fx fuse swaps the shared module and breaks the second call (pytorch#104593)."""
    model, x = build("reused_conv")
    result = bt.fold(model, (x,))
    gm = result.module
    plain = model.conv(x)
    # the BN-free call still runs the original conv with the original weights
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len({n.target for n in calls}) == 2
    originals = [n.target for n in calls if torch.equal(gm.get_submodule(n.target).weight, model.conv.weight)]
    assert len(originals) == 1
    _close(gm.get_submodule(originals[0])(x), plain)
    _close(gm(x), model(x))


def test_bn_subclass_with_activation_keeps_the_activation() -> None:
    model, x = build("conv_bn_with_activation")
    result = bt.fold(model, (x,))
    out = result.module(x)
    assert (out >= 0).all()  # the subclass's ReLU survived the fold
    assert model.bn.__class__.forward is not nn.BatchNorm2d.forward
    _close(out, model(x))


def test_grouped_conv_transpose_all_dims() -> None:
    torch.manual_seed(1)
    for conv, shape in (
        (nn.ConvTranspose1d(6, 9, 3, groups=3), (2, 6, 7)),
        (nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2, bias=False), (1, 4, 3, 3, 3)),
    ):
        bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[len(shape) - 2](conv.out_channels)
        model = randomize_bn(nn.Sequential(conv, bn), torch.Generator().manual_seed(3)).eval()
        x = torch.randn(shape)
        result = bt.fold(model, (x,))
        assert [f.kind for f in result.report.folded] == ["ConvTranspose"]
        _close(result.module(x), model(x))


def test_affine_false_and_conv1d_conv3d() -> None:
    model = randomize_bn(
        nn.Sequential(
            nn.Conv1d(3, 5, 3),
            nn.BatchNorm1d(5, affine=False),
            nn.ReLU(),
            nn.Conv1d(5, 4, 1),
            nn.BatchNorm1d(4),
        ),
        torch.Generator().manual_seed(0),
    ).eval()
    x = torch.randn(2, 3, 9)
    result = bt.fold(model, (x,))
    assert len(result.report.folded) == 2
    _close(result.module(x), model(x))


def test_kept_bns_have_reasons() -> None:
    class Kept(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.bn_a = nn.BatchNorm2d(4)  # conv output used twice
            self.b = nn.Conv2d(3, 4, 3)
            self.bn_b = nn.BatchNorm2d(4, track_running_stats=False)
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.bn_c = nn.BatchNorm2d(4)  # weight computed at run time

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ya = self.a(x)
            yc = F.conv2d(x, self.w * 2.0)
            return self.bn_a(ya) + ya + self.bn_b(self.b(x)) + self.bn_c(yc)

    model = randomize_bn(Kept(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 8, 8)
    result = bt.fold(model, (x,))
    codes = {s.bn: s.code for s in result.report.skipped}
    assert codes == {"bn_a": "multiple_consumers", "bn_b": "no_running_stats", "bn_c": "weight_not_constant"}
    assert result.report.folded == []
    _close(result.module(x), model(x))


def test_linear_with_3d_output_is_kept() -> None:
    model = randomize_bn(
        nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(3)), torch.Generator().manual_seed(0)
    ).eval()
    x = torch.randn(2, 3, 4)
    result = bt.fold(model, (x,))
    assert [s.code for s in result.report.skipped] == ["channel_axis"]
    _close(result.module(x), model(x))


def test_training_mode_refused_unless_eval() -> None:
    model, x = build("resnet_small")
    model.train()
    with pytest.raises(BadInput, match="training mode"):
        bt.fold(model, (x,))
    result = bt.fold(model, (x,), eval=True)
    assert len(result.report.folded) == 6
    assert model.training  # the caller's model stays in training mode
    reference = copy.deepcopy(model).eval()
    _close(result.module(x), reference(x))


def test_shape_dependent_control_flow_uses_torch_export() -> None:
    class ShapeBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y.relu() if x.shape[-1] > 4 else y

    model = randomize_bn(ShapeBranch(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 8, 8)
    result = bt.fold(model, (x,))
    assert result.capture == "torch.export"
    assert len(result.report.folded) == 1
    _close(result.module(x), model(x))


def test_data_dependent_control_flow_names_both_failures() -> None:
    model, x = build("control_flow_net")
    with pytest.raises(BadInput) as err:
        bt.fold(model, (x,))
    assert "symbolic_trace failed" in str(err.value) and "torch.export failed" in str(err.value)


def test_graph_module_and_exported_program_inputs() -> None:
    model, x = build("resnet_small")
    want = model(x)
    gm = fx.symbolic_trace(model)
    result = bt.fold(gm, (x,))
    assert result.capture == "graph_module" and len(result.report.folded) == 6
    _close(result.module(x), want)
    assert _bn_nodes(gm)  # the caller's GraphModule is untouched
    ep = torch.export.export(model, (x,))
    for program in (ep, ep.run_decompositions()):  # aten.batch_norm, and the decomposed dialect
        result = bt.fold(program, (x,))
        assert result.capture == "exported_program" and len(result.report.folded) == 6, result.report
        assert _bn_nodes(result.module) == []
        _close(result.module(x), want)


def test_mixed_bf16_conv_fp32_bn() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1).to(torch.bfloat16)
            self.bn = nn.BatchNorm2d(6)  # float32 parameters, bfloat16 input

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x))

    model = randomize_bn(Mixed(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 8, 8).to(torch.bfloat16)
    result = bt.fold(model, (x,))
    assert len(result.report.folded) == 1
    conv = [m for m in result.module.modules() if isinstance(m, nn.Conv2d)][0]
    assert conv.weight.dtype == torch.bfloat16 and conv.bias.dtype == torch.bfloat16
    # independent reference: the exact fold in float64, rounded once to bfloat16
    bn = model.bn
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    exact_w = (model.conv.weight.double() * s[:, None, None, None]).to(torch.bfloat16)
    assert torch.equal(conv.weight, exact_w)
    out = result.module(x)
    assert out.dtype == torch.bfloat16
    _close(out, model(x), rtol=2e-2)


def test_bn_behind_a_cast_is_kept() -> None:
    model, x = build("bf16_conv_fp32_bn")
    result = bt.fold(model, (x,))
    assert result.report.folded == []
    assert [s.code for s in result.report.skipped] == ["unsupported_producer"]
    _close(result.module(x), model(x))


def _ort_output(path: object, x: torch.Tensor) -> np.ndarray:
    """The single output of the ONNX file ``path`` on ``x`` (onnxruntime, optimizations off)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return np.asarray(got)


def test_export_folds_and_matches_torch(tmp_path) -> None:
    model, x = build("unet_decoder")
    path = tmp_path / "unet.onnx"
    result = bt.export(model, (x,), path)
    assert len([f for f in result.report.folded if f.pattern != "exporter"]) == 8
    assert result.verification.passed
    proto = onnx.load(path)
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    _close(torch.from_numpy(_ort_output(path, x)), model(x))


def test_export_with_merge_branches_merges_the_repvgg_blocks(tmp_path) -> None:
    """rep_net: 4 identity BNs stay without the flag (needs_merge_branches); with it every BN goes
    and the ONNX file matches the PyTorch module in onnxruntime, optimizations off."""
    model, x = build("rep_net")
    plain = bt.export(model, (x,), tmp_path / "plain.onnx")
    assert sorted(str(s.code) for s in plain.report.skipped) == ["needs_merge_branches"] * 4
    path = tmp_path / "merged.onnx"
    result = bt.export(model, (x,), path, merge_branches=True)
    assert result.verification.passed and not result.report.skipped and result.report.merged_convs == 6
    proto = onnx.load(path)
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    _close(torch.from_numpy(_ort_output(path, x)), model(x))


def test_export_with_exporter_optimizer_counts_its_folds(tmp_path) -> None:
    model, x = build("mlp_bn")
    result = bt.export(model, (x,), tmp_path / "mlp.onnx", exporter_optimize=True)
    # whichever of the exporter's optimizer and bnfold folds each of the two BNs, both are counted
    # once, by who folded them, and none is left in the file
    by_exporter = [p for p in result.report.folded if p.pattern == "exporter"]
    by_bnfold = [p for p in result.report.folded if p.pattern != "exporter"]
    assert len(by_exporter) + len(by_bnfold) == 2
    assert all(p.kind for p in by_bnfold)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(tmp_path / "mlp.onnx").graph.node}
    assert result.verification.passed


def test_export_refuses_to_write_a_wrong_model(tmp_path, monkeypatch) -> None:
    import bnfold.onnx.driver as driver

    real = driver.fold_model

    def corrupting(proto, store=None, **options):
        report = real(proto, store, **options)
        for t in proto.graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4:
                arr = onnx.numpy_helper.to_array(t).copy()
                arr[0] *= 1.5
                t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
                break
        return report

    monkeypatch.setattr(driver, "fold_model", corrupting)
    model, x = build("resnet_small")
    path = tmp_path / "bad.onnx"
    with pytest.raises(VerificationFailed):
        bt.export(model, (x,), path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_partial_fold_of_an_untraceable_model() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.backbone(x)
            return self.bn(self.conv(y)) if y.sum() > 0 else y

    model = randomize_bn(Untraceable(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(BadInput):
        bt.fold(model, (x,))
    result = bt.fold(model, (x,), partial=True)
    assert result.capture == "partial"
    assert [(f.bn, f.target) for f in result.report.folded] == [("backbone.1", "backbone.0")]
    assert [(s.bn, s.code) for s in result.report.skipped] == [("bn", "untraceable")]
    _close(result.module(x), model(x))
    assert isinstance(model.backbone, nn.Sequential)  # the caller's model is untouched


def test_exported_program_is_verified_without_example_inputs() -> None:
    """Shapes recorded by torch.export give seeded random inputs; the check is against the module."""
    model, x = build("mobilenet_small")
    ep = torch.export.export(model, (x,))
    result = bt.fold(ep)
    assert len(result.report.folded) == 10
    assert result.verification is not None and result.verification.passed
    assert result.verification.input_shapes == {"input_0": list(x.shape)}
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    _close(result.module(other), model(other))
    plain = bt.fold(model)  # an nn.Module without example inputs: nothing to run it on
    assert plain.verification is None and len(plain.report.folded) == 10
