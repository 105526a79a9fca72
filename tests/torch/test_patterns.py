"""The fold patterns the torch front end shares with the ONNX pass (bnfold.rules), checked against
the PyTorch module itself: in float32 within float32 rounding, and on a float64 copy of the module
to within float64 rounding (the fold is exact up to one rounding of the folded tensors)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import fx, nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from models.definitions import build, randomize_bn  # noqa: E402

CAPTURES = ("symbolic_trace", "torch.export", "decomposed")


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    got64, want64 = got.detach().double(), want.detach().double()
    scale = float(want64.abs().max()) or 1.0
    np.testing.assert_allclose(got64.numpy(), want64.numpy(), rtol=rtol, atol=rtol * scale)


def _bn_nodes(gm: nn.Module) -> list[str]:
    assert isinstance(gm, fx.GraphModule)
    names = [n.name for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    return names + [
        n.name
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
    ]


def _captured(model: nn.Module, x: torch.Tensor, capture: str) -> object:
    if capture == "symbolic_trace":
        return model
    program = torch.export.export(model, (x,))
    return program if capture == "torch.export" else program.run_decompositions()


def _fold(model: nn.Module, x: torch.Tensor, capture: str) -> bt.TorchFoldResult:
    return bt.fold(_captured(model, x, capture), (x,))


def _check_folds(model: nn.Module, x: torch.Tensor, capture: str, patterns: list[str]) -> bt.TorchFoldResult:
    """Fold in float32 and in float64: the patterns reported, no BN left, outputs as the module's."""
    model = randomize_bn(model, torch.Generator().manual_seed(0)).eval()
    result = _fold(model, x, capture)
    assert [str(f.pattern) for f in result.report.folded] == patterns, result.report
    assert result.report.skipped == [] and _bn_nodes(result.module) == []
    with torch.no_grad():
        _close(result.module(x), model(x), rtol=1e-5)
        model64, x64 = copy.deepcopy(model).double(), x.double()
        exact = _fold(model64, x64, capture)
        assert [str(f.pattern) for f in exact.report.folded] == patterns
        _close(exact.module(x64), model64(x64), rtol=1e-12)
    return result


class MatMulBN(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))
        self.b = nn.Parameter(torch.randn(5)) if bias else None
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w
        if self.b is not None:
            y = y + self.b
        return self.bn(y)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_then_bn_becomes_one_addmm(capture: str, bias: bool) -> None:
    result = _check_folds(MatMulBN(bias), torch.randn(4, 6), capture, ["matmul"])
    assert [f.kind for f in result.report.folded] == ["MatMul"]
    targets = {n.target for n in result.module.graph.nodes if n.op == "call_function"}
    assert targets & {torch.addmm, torch.ops.aten.addmm.default}


def test_matmul_of_3d_activations_or_unknown_rank_is_kept() -> None:
    model = randomize_bn(MatMulBN(False), torch.Generator().manual_seed(0)).eval()
    model.bn = nn.BatchNorm1d(3).eval()
    x = torch.randn(2, 3, 6)  # BN1d normalizes axis 1 (3), the matmul's features are the last axis
    result = bt.fold(model, (x,))
    assert [s.code for s in result.report.skipped] == ["channel_axis"]
    _close(result.module(x), model(x), rtol=1e-6)
    assert [s.code for s in bt.fold(model).report.skipped] == ["unknown_rank"]  # no shapes known


class ConvAddBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.shift = nn.Parameter(torch.randn(4, 1, 1))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.shift)


class ConvBNBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.bn1(self.conv(x)))


@pytest.mark.parametrize("capture", CAPTURES)
def test_chains_through_a_constant_add_and_bn_after_bn(capture: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    _check_folds(ConvAddBN(), x, capture, ["bn_after_chain"])
    _check_folds(ConvBNBN(), x, capture, ["bn_after", "bn_after_chain"])


class BNConv(nn.Module):
    def __init__(self, padding: int, groups: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 3, padding=padding, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class BNFlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.bn(self.conv(x).relu()), 1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_bn_before_an_unpadded_conv_or_flatten_linear(capture: str) -> None:
    result = _check_folds(BNConv(padding=0, groups=2), torch.randn(2, 4, 7, 7), capture, ["bn_before"])
    assert [f.kind for f in result.report.folded] == ["Conv"]
    result = _check_folds(BNFlattenLinear(), torch.randn(2, 3, 8, 8), capture, ["bn_before"])
    # decomposed: view(x, [N, -1]) then addmm(bias, x, permute(weight))
    assert [f.kind for f in result.report.folded] == ["Gemm" if capture == "decomposed" else "Linear"]


def test_bn_before_a_padded_conv_is_kept() -> None:
    model = randomize_bn(BNConv(padding=1), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 4, 6, 6)
    result = bt.fold(model, (x,))
    assert [s.code for s in result.report.skipped] == ["padding"] and result.report.folded == []
    _close(result.module(x), model(x), rtol=1e-6)


class ConvAffine(nn.Module):
    def __init__(self, scale_shape: tuple[int, ...], shift: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.m = nn.Parameter(torch.rand(scale_shape) + 0.5)
        self.a = nn.Parameter(torch.randn(4, 1, 1)) if shift else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * self.m
        return y + self.a if self.a is not None else y


@pytest.mark.parametrize("capture", CAPTURES)
def test_decomposed_affine_folds_the_mul_and_the_add(capture: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    result = _check_folds(ConvAffine((4, 1, 1), shift=True), x, capture, ["decomposed_affine"])
    assert [n for n in result.module.graph.nodes if "mul" in n.name or "add" in n.name] == []
    _check_folds(ConvAffine((1, 4, 1, 1), shift=False), x, capture, ["decomposed_affine"])


def test_scalar_mul_after_a_linear_folds() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.fc(x) * 0.25).relu()

    _check_folds(Scaled(), torch.randn(4, 5), "symbolic_trace", ["decomposed_affine"])


def test_mul_along_another_axis_is_reported_and_kept() -> None:
    model = ConvAffine((1, 1, 6), shift=False).eval()  # per column, not per channel
    x = torch.randn(1, 3, 8, 8)
    result = bt.fold(model, (x,))
    assert result.report.folded == [] and result.report.skipped == []
    assert [(s.code, s.op) for s in result.report.skipped_affine] == [("broadcast", "Mul")]
    _close(result.module(x), model(x), rtol=1e-6)


class SharedMatMul(nn.Module):
    def __init__(self, computed: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))
        self.bn = nn.BatchNorm1d(5)
        self.computed = computed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.computed:
            return self.bn(x @ (self.w * 2.0))
        y = x @ self.w
        return self.bn(y) + y


@pytest.mark.parametrize("computed, code", [(False, "multiple_consumers"), (True, "weight_not_constant")])
def test_matmul_with_a_second_consumer_or_a_computed_weight_is_kept(computed: bool, code: str) -> None:
    model = randomize_bn(SharedMatMul(computed), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(4, 6)
    result = bt.fold(model, (x,))
    assert [s.code for s in result.report.skipped] == [code] and result.report.folded == []
    _close(result.module(x), model(x), rtol=1e-6)


@pytest.mark.parametrize("capture", CAPTURES)
def test_linears_of_the_model_zoo_fold_in_every_dialect(capture: str) -> None:
    """Decomposed, ``nn.Linear`` is ``addmm(b, x, permute(W))`` (a Gemm) or, without bias,
    ``mm(x, permute(W))`` (a MatMul made a Gemm): the transposed weight is a constant too."""
    model, x = build("mlp_bn")
    second = "matmul" if capture == "decomposed" else "bn_after"
    _check_folds(model, x, capture, ["bn_after", second])
