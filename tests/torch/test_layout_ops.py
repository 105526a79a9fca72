"""The torch layout ops (:mod:`bnfold.torch.ops_layout`) under the ``slice`` and ``layout`` rules:
``x.transpose(1, 2)``, ``x.permute(...)``, ``x[:, a:b]``, ``x.narrow``, ``x.flatten(2)``,
``x.reshape(n, c, -1)``, ``x.unsqueeze(-1)`` between a layer and its BN; each fold checked against
the PyTorch module itself in float32 and on a float64 copy (to float64 rounding), under
symbolic_trace and torch.export; refusals with their reason codes."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from models.definitions import randomize_bn  # noqa: E402

CAPTURES = ("symbolic_trace", "torch.export")


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    g, w = got.detach().double().numpy(), want.detach().double().numpy()
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * (float(np.abs(w).max()) or 1.0))


def _outputs(out: object) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]  # type: ignore[list-item]


def _fold(model: nn.Module, x: torch.Tensor, capture: str) -> bt.TorchFoldResult:
    return bt.fold(torch.export.export(model, (x,)) if capture == "torch.export" else model, (x,))


def _checked(model: nn.Module, x: torch.Tensor, capture: str, patterns: list[str]) -> bt.TorchFoldResult:
    """Fold in float32 and in float64: the patterns, no BN left, the module's outputs."""
    model = randomize_bn(model, torch.Generator().manual_seed(0)).eval()
    result = _fold(model, x, capture)
    assert [str(p.pattern) for p in result.report.folded] == patterns, result.report
    assert result.report.skipped == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.module.modules())
    assert "batch_norm" not in result.module.code
    with torch.no_grad():
        for got, want in zip(_outputs(result.module(x)), _outputs(model(x))):
            _close(got, want, 1e-5)
        model64, x64 = copy.deepcopy(model).double(), x.double()
        exact = _fold(model64, x64, capture)
        assert [str(p.pattern) for p in exact.report.folded] == patterns
        for got, want in zip(_outputs(exact.module(x64)), _outputs(model64(x64))):
            _close(got, want, 1e-12)
    return result


def _kept(model: nn.Module, x: torch.Tensor, capture: str, code: str) -> bt.TorchFoldResult:
    model = randomize_bn(model, torch.Generator().manual_seed(0)).eval()
    result = _fold(model, x, capture)
    assert result.report.folded == [] and [str(s.code) for s in result.report.skipped] == [code], (
        result.report
    )
    return result


class Conformer(nn.Module):
    """A conformer / TDNN block: Linear on tokens, BN1d over the features, transposed back."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4, bias=bias)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x).transpose(1, 2)).transpose(1, 2)


class MatMulPermute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(5, 4))
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn((x @ self.w + self.b).permute(0, 2, 1))


class ConvThen(nn.Module):
    def __init__(self, how: str, dims: int = 2, bn: type[nn.Module] = nn.BatchNorm1d) -> None:
        super().__init__()
        self.conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(3, 4, 3, padding=1)
        self.bn = bn(4)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.how == "flatten":
            return self.bn(y.flatten(2))
        if self.how == "reshape":
            n, c, h, w = y.shape
            return self.bn(y.reshape(n, c, -1))
        if self.how == "reshape_literal":
            return self.bn(y.reshape(2, 4, -1))
        if self.how == "size":
            return self.bn(y.view(y.size(0), y.size(1), -1))
        if self.how == "unsqueeze":
            return self.bn(y.unsqueeze(-1))
        if self.how == "permute_hw":
            return self.bn(y.permute(0, 1, 3, 2))
        return self.bn(y.permute(0, 2, 3, 1))  # "permute_nhwc": moves the channels


class Parts(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0, self.bn1 = nn.BatchNorm2d(3), nn.BatchNorm2d(5)
        self.how = how

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.conv(x)
        if self.how == "getitem":
            return self.bn0(y[:, :3]), self.bn1(y[:, 3:, ...])
        if self.how == "narrow":
            return self.bn0(y.narrow(1, 0, 3)), self.bn1(y.narrow(1, 3, 5))
        return self.bn0(y[:, :3]), torch.relu(y[:, 2:7])  # "overlap"


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_transpose_bn_folds_into_the_linear(capture: str, bias: bool) -> None:
    result = _checked(Conformer(bias), torch.randn(2, 5, 6), capture, ["layout"])
    assert "transpose" in result.module.code or "permute" in result.module.code


@pytest.mark.parametrize("capture", CAPTURES)
def test_matmul_add_permute_bn_shift_into_the_add(capture: str) -> None:
    result = _checked(MatMulPermute(), torch.randn(2, 5, 6), capture, ["layout"])
    assert "permute" in result.module.code


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("how", ["flatten", "reshape", "size", "permute_hw"])
def test_conv_layout_bn_folds_into_the_conv(capture: str, how: str) -> None:
    bn = nn.BatchNorm2d if how == "permute_hw" else nn.BatchNorm1d
    _checked(ConvThen(how, bn=bn), torch.randn(2, 3, 4, 5), capture, ["layout"])


@pytest.mark.parametrize("capture", CAPTURES)
def test_conv1d_unsqueeze_bn2d(capture: str) -> None:
    _checked(ConvThen("unsqueeze", dims=1, bn=nn.BatchNorm2d), torch.randn(2, 3, 7), capture, ["layout"])


def test_a_literal_reshape_folds_only_under_torch_export() -> None:
    """``y.reshape(2, 4, -1)``: torch.export fixes the batch (its guards refuse another), so the
    reshape keeps the channels; after symbolic_trace the batch could be any, and mix them."""
    x = torch.randn(2, 3, 4, 4)
    _checked(ConvThen("reshape_literal"), x, "torch.export", ["layout"])
    _kept(ConvThen("reshape_literal"), x, "symbolic_trace", "unknown_shape")


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("how", ["getitem", "narrow"])
def test_channel_slices_each_fold_into_their_range(capture: str, how: str) -> None:
    _checked(Parts(how), torch.randn(2, 3, 5, 5), capture, ["slice", "slice"])


@pytest.mark.parametrize("capture", CAPTURES)
def test_skip_overlapping_slices(capture: str) -> None:
    _kept(Parts("overlap"), torch.randn(1, 3, 4, 4), capture, "overlapping_slices")


@pytest.mark.parametrize("capture", CAPTURES)
def test_skip_a_permute_that_moves_the_channels(capture: str) -> None:
    result = _kept(
        ConvThen("permute_nhwc", bn=nn.BatchNorm2d), torch.randn(1, 3, 4, 4), capture, "channel_axis"
    )
    assert "Transpose" in result.report.skipped[0].message


class TransposedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x @ self.w.t())


def test_a_transposed_parameter_is_still_a_constant_weight() -> None:
    _checked(TransposedWeight(), torch.randn(3, 6), "torch.export", ["matmul"])
