"""``merge_branches`` in the torch front end: RepVGG, MobileOne and RepGhost blocks
(models/reparam.py) merge into one conv per block under symbolic_trace and torch.export, checked
against the PyTorch module itself in float32 and in float64 (a float64 copy, to float64 rounding);
without the flag the identity BNs say they need it."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from models.definitions import randomize_bn  # noqa: E402
from models.reparam import MobileOneBlock, RepGhostBlock, RepNet, RepVGGBlock  # noqa: E402


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    g, w = got.detach().double().numpy(), want.detach().double().numpy()
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * (float(np.abs(w).max()) or 1.0))


def _convs(gm: nn.Module) -> int:
    """Conv calls in a folded GraphModule (modules and functions)."""
    count = 0
    for n in gm.graph.nodes:  # type: ignore[union-attr]
        if n.op == "call_module":
            count += isinstance(gm.get_submodule(n.target), nn.Conv2d)
        elif n.op == "call_function":
            count += "conv" in str(n.target)
    return count


def _bns(gm: nn.Module) -> int:
    return sum(
        (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d))
        or (n.op == "call_function" and "batch_norm" in str(n.target))
        for n in gm.graph.nodes  # type: ignore[union-attr]
    )


def _checked(model: nn.Module, x: torch.Tensor, export: bool, **kw: object) -> bt.TorchFoldResult:
    """Fold ``model`` (captured by torch.export when ``export``) in float32 and in float64."""
    model = randomize_bn(model, torch.Generator().manual_seed(0)).eval()

    def captured(m: nn.Module, inputs: torch.Tensor) -> object:
        return torch.export.export(m, (inputs,)) if export else m

    result = bt.fold(captured(model, x), (x,), **kw)
    with torch.no_grad():
        _close(result.module(x), model(x), 1e-5)
        model64 = copy.deepcopy(model).double()
        exact = bt.fold(captured(model64, x.double()), (x.double(),), **kw)
        assert [str(p.pattern) for p in exact.report.folded] == [str(p.pattern) for p in result.report.folded]
        assert exact.report.merged_convs == result.report.merged_convs
        _close(exact.module(x.double()), model64(x.double()), 1e-12)
    return result


BLOCKS = {
    "repvgg": (lambda: RepVGGBlock(4, 4), 3, 1),
    "repvgg_strided": (lambda: RepVGGBlock(3, 4, stride=2), 2, 1),
    "mobileone_depthwise": (lambda: MobileOneBlock(4, 3, k=3, groups=4), 5, 3),
    "mobileone_pointwise": (lambda: MobileOneBlock(4, 1, k=3), 4, 2),
    "repghost": (lambda: RepGhostBlock(4), 2, 0),
}


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_a_block_merges_into_one_conv(name: str, export: bool) -> None:
    make, bns, removed = BLOCKS[name]
    block = make()
    cin = next(m for m in block.modules() if isinstance(m, nn.Conv2d)).in_channels
    result = _checked(block, torch.randn(2, cin, 7, 7), export, merge_branches=True)
    report = result.report
    assert [str(p.pattern) for p in report.folded] == ["merged_branches"] * bns, report
    assert report.merged_convs == removed and not report.skipped
    assert _convs(result.module) == 1 and _bns(result.module) == 0, result.module.code


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
def test_rep_net_merges_every_block(export: bool) -> None:
    result = _checked(RepNet(), torch.randn(2, 3, 16, 16), export, merge_branches=True)
    assert [str(p.pattern) for p in result.report.folded] == ["merged_branches"] * 15
    assert result.report.merged_convs == 6 and not result.report.skipped
    assert _convs(result.module) == 5 and _bns(result.module) == 0
    if not export:  # the convs merged away are no longer submodules
        names = {n for n, m in result.module.named_modules() if isinstance(m, nn.Conv2d)}
        assert names == {"stem.dense.0", "stage.dense.0", "depthwise.branches.0.0"} | {
            "pointwise.branches.0.0",
            "ghost.cheap.0",
        }


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
def test_without_the_flag_the_identity_bns_need_it(export: bool) -> None:
    result = _checked(RepNet(), torch.randn(2, 3, 16, 16), export)
    report = result.report
    assert len(report.folded) == 11 and report.merged_convs == 0
    assert [str(s.code) for s in report.skipped] == ["needs_merge_branches"] * 4
    assert all("--merge-branches" in s.message for s in report.skipped)


class FunctionalRepVGG(nn.Module):
    """The block written with F.conv2d / F.batch_norm on parameters and buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.3)
        self.w1 = nn.Parameter(torch.randn(4, 4, 1, 1) * 0.3)
        self.b1 = nn.Parameter(torch.randn(4))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w3, padding=1) + F.conv2d(x, self.w1, self.b1) + self.bn(x)


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
def test_functional_convs_merge(export: bool) -> None:
    result = _checked(FunctionalRepVGG(), torch.randn(1, 4, 5, 5), export, merge_branches=True)
    assert [str(p.pattern) for p in result.report.folded] == ["merged_branches"]
    assert result.report.merged_convs == 1 and _convs(result.module) == 1


class SharedDense(nn.Module):
    """The block's 3x3 conv module is called again outside the block: that call keeps the original."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.block.dense[0](x)


def test_a_kept_conv_called_elsewhere_gets_a_merged_copy() -> None:
    model = SharedDense()
    result = _checked(model, torch.randn(1, 4, 6, 6), False, merge_branches=True)
    assert result.report.merged_convs == 1
    gm = result.module
    calls = [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
    ]
    assert len(calls) == 2 and len(set(calls)) == 2  # the merged copy and the original
    assert "block.dense.0" in calls


class MismatchedIdentity(nn.Module):
    """A 3x3 conv from 1 to 4 channels plus a BN of the 1-channel input: the sum broadcasts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bn(x)


def test_an_identity_of_other_channels_is_refused() -> None:
    result = _checked(MismatchedIdentity(), torch.randn(1, 1, 5, 5), False, merge_branches=True)
    assert [str(s.code) for s in result.report.skipped] == ["identity_branch"]
    assert result.report.merged_convs == 0 and not result.report.folded


class RepBlock1d(nn.Module):
    """Kernels 5, 3 and 1 (each padded to keep the length) and an identity BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(3, 3, k, padding=k // 2) for k in (5, 3, 1)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(3) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bns[3](x)
        for conv, bn in zip(self.convs, self.bns):
            out = out + bn(conv(x))
        return out


@pytest.mark.parametrize("export", [False, True], ids=["symbolic_trace", "torch.export"])
def test_a_1d_block_with_three_kernel_sizes_merges(export: bool) -> None:
    result = _checked(RepBlock1d(), torch.randn(2, 3, 9), export, merge_branches=True)
    assert [str(p.pattern) for p in result.report.folded] == ["merged_branches"] * 4
    assert result.report.merged_convs == 2
