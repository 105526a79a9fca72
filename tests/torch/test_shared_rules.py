"""Rules of issue 13 in the torch front end: readers of a layer output's metadata (``x.ndim``,
``x.shape``, ``x.size()``) are not consumers, a BN after the sum of two layers folds into both, and
a BN after a flattened matmul takes the scale into the weight and becomes an add; checked against
the PyTorch module (float32, and a float64 copy to float64 rounding). YOLOv5's BottleneckCSP (a BN
after the concat of two convs) is models/blocks.py's, tested in test_blocks.py."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from models.definitions import randomize_bn  # noqa: E402


class BatchNormAct(nn.Module):
    """A timm-style BatchNormAct2d: the ndim assert gives the conv output two getattr readers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, f"expected 4-D input (got {y.ndim}D input)")
        channels = y.size(1)
        return torch.relu(self.bn(y)) * channels


class SumOfConvs(nn.Module):
    def __init__(self, identity: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1, bias=False)
        self.identity = identity
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = x if self.identity else self.b(x)
        return self.bn(self.a(x) + other)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    g, w = got.detach().double().numpy(), want.detach().double().numpy()
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * (float(np.abs(w).max()) or 1.0))


def _checked(model: nn.Module, x: torch.Tensor, export: bool = False) -> bt.TorchFoldResult:
    """Fold ``model`` (captured by torch.export when ``export``), in float32 and in float64."""
    model = randomize_bn(model, torch.Generator().manual_seed(0)).eval()

    def captured(m: nn.Module, inputs: torch.Tensor) -> object:
        return torch.export.export(m, (inputs,)) if export else m

    result = bt.fold(captured(model, x), (x,))
    with torch.no_grad():
        _close(result.module(x), model(x), 1e-5)
        model64 = copy.deepcopy(model).double()
        exact = bt.fold(captured(model64, x.double()), (x.double(),))
        assert [str(p.pattern) for p in exact.report.folded] == [str(p.pattern) for p in result.report.folded]
        _close(exact.module(x.double()), model64(x.double()), 1e-12)
    return result


def test_batchnorm_act_with_an_ndim_assert_folds() -> None:
    result = _checked(BatchNormAct(5), torch.randn(2, 3, 8, 8))
    assert [str(p.pattern) for p in result.report.folded] == ["bn_after"] and result.report.skipped == []


def test_a_real_second_reader_still_keeps_the_bn() -> None:
    class Leak(BatchNormAct):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y.sum() * 0 + y.shape[0]

    result = _checked(Leak(3), torch.randn(1, 3, 6, 6))
    assert [str(s.code) for s in result.report.skipped] == ["multiple_consumers"]


def test_bn_after_a_sum_of_two_convs_folds_into_both() -> None:
    result = _checked(SumOfConvs(), torch.randn(2, 4, 7, 7))
    assert [str(p.pattern) for p in result.report.folded] == ["sum_of_layers"], result.report
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.module.modules())


def test_an_identity_summand_keeps_the_bn() -> None:
    result = _checked(SumOfConvs(identity=True), torch.randn(1, 4, 5, 5))
    assert [str(s.code) for s in result.report.skipped] == ["identity_summand"], result.report


class FlattenedMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.flatten(x @ self.w, 1))


def test_bn_after_a_flattened_matmul_becomes_a_scaled_weight_and_an_add() -> None:
    result = _checked(FlattenedMatmul(), torch.randn(4, 8))
    assert [str(p.pattern) for p in result.report.folded] == ["matmul_reshaped"], result.report
    assert not any(isinstance(m, nn.BatchNorm1d) for m in result.module.modules())
    assert "torch.add" in result.module.code


class ConvDropBN(nn.Module):
    """Dropout between the layer and the BN, as a module and as a function (inference: identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.nn.functional.dropout(self.drop(self.conv(x)), 0.1, training=self.training))


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
def test_bn_folds_through_inference_dropout(export: bool) -> None:
    model, x = ConvDropBN(), torch.randn(1, 3, 7, 7)
    result = _checked(model, x, export)
    assert [str(p.pattern) for p in result.report.folded] == ["bn_after_passthrough"], result.report


class LeViTNorm(nn.Module):
    """LeViT's Linear_BN: ``bn(linear(x).flatten(0, 1)).reshape_as(x)`` on tokens [B, N, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w
        return self.bn(y.reshape(-1, 6)).reshape_as(y)


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
def test_levit_token_bn_folds_into_the_matmul(export: bool) -> None:
    result = _checked(LeViTNorm(), torch.randn(2, 5, 8), export)
    assert [str(p.pattern) for p in result.report.folded] == ["matmul_reshaped"], result.report


class LinearTokensNorm(nn.Module):
    """timm LeViT's ``LinearNorm`` with a real ``nn.Linear`` on tokens [B, N, C]: ``flatten``
    (``(0, 1)``: the tokens into the batch; ``(1)``: into the features, which is not a fold) or
    ``reshape(-1, C)``, BN1d, ``reshape_as``; ``leak`` also returns the Linear's output."""

    def __init__(self, bias: bool, how: str = "flatten01", leak: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 6, bias=bias)
        self.bn = nn.BatchNorm1d(6 if how != "flatten1" else 30)
        self.how, self.leak = how, leak

    def forward(self, x: torch.Tensor) -> Any:
        y = self.linear(x)
        flat = (
            y.flatten(0, 1)
            if self.how == "flatten01"
            else y.reshape(-1, 6)
            if self.how == "reshape"
            else y.flatten(1)
        )
        out = self.bn(flat).reshape_as(y)
        return (out, y.relu()) if self.leak else out


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
@pytest.mark.parametrize("how", ["flatten01", "reshape"])
@pytest.mark.parametrize("bias", [False, True])
def test_levit_token_bn_folds_into_a_linear(bias: bool, how: str, export: bool) -> None:
    model = LinearTokensNorm(bias, how)
    result = _checked(model, torch.randn(2, 5, 8), export)
    assert [str(p.pattern) for p in result.report.folded] == ["matmul_reshaped"], result.report
    state = result.module.state_dict()
    weights = [v for k, v in state.items() if v.shape == (6, 8)]
    assert len(weights) == 1 and any(
        v.shape == (6,) and not k.startswith("bn.") for k, v in state.items()
    )  # a bias
    assert not any("running" in k for k in state)  # the BN is gone
    # the weight by hand in float64: row c scaled by gamma_c / sqrt(var_c + eps)
    bn = model.bn
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    want = (model.linear.weight.double() * scale[:, None]).float()
    assert torch.equal(weights[0].detach(), want.detach())


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
def test_linear_tokens_flattened_into_the_features_keep_the_bn(export: bool) -> None:
    result = _checked(LinearTokensNorm(True, "flatten1"), torch.randn(2, 5, 8), export)
    assert [str(s.code) for s in result.report.skipped] == ["channel_axis"], result.report


def test_linear_tokens_read_elsewhere_keep_the_bn() -> None:
    model = randomize_bn(LinearTokensNorm(False, leak=True), torch.Generator().manual_seed(0)).eval()
    result = bt.fold(model, (torch.randn(2, 5, 8),))
    assert [str(s.code) for s in result.report.skipped] == ["multiple_consumers"], result.report


class MatMulFullAdd(nn.Module):
    """``bn(x @ W + C)`` with a full ``[M, N]`` constant ``C`` (a learned per-position offset)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.c = nn.Parameter(torch.randn(4, 6))
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x @ self.w + self.c)


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
def test_matmul_plus_a_full_constant_folds(export: bool) -> None:
    model = MatMulFullAdd()
    result = _checked(model, torch.randn(4, 8), export)
    assert [str(p.pattern) for p in result.report.folded] == ["matmul_add"], result.report
    bn = model.bn
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    want = (model.c.double() * scale + shift).float()  # the constant takes s * C + t, rounded once
    assert any(torch.equal(v.detach(), want.detach()) for v in result.module.state_dict().values())
