"""Applying plans to a GraphModule: shared tensors and modules are copied, never changed for the
other readers; what the folds leave unused is dropped. Checked against the PyTorch module."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import fx, nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from models.definitions import randomize_bn  # noqa: E402


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max()) or 1.0
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-5 * scale)


class SharedWeight(nn.Module):
    """One weight read by two convolutions, each followed by its own BN, and by a third one."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(F.conv2d(x, self.w)) + self.bn2(F.conv2d(x, self.w)) + F.conv2d(x, self.w)


def test_a_shared_weight_gets_a_folded_copy_per_call() -> None:
    model = randomize_bn(SharedWeight(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 6, 6)
    result = bt.fold(model, (x,))
    assert len(result.report.folded) == 2
    gm = result.module
    assert isinstance(gm, fx.GraphModule)
    weights = [n.args[1] for n in gm.graph.nodes if n.target is F.conv2d]
    assert len({w.target for w in weights}) == 3  # the plain call still reads the original
    assert torch.equal(gm.get_parameter("w"), model.w)
    _close(gm(x), model(x))
    assert not [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]  # unused BNs dropped


class BNBeforeSharedConv(nn.Module):
    """A BN before one call of a conv module that is also called without it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x)) + self.conv(x)


def test_bn_before_a_module_called_twice_folds_into_a_copy() -> None:
    model = randomize_bn(BNBeforeSharedConv(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 3, 4, 4)
    result = bt.fold(model, (x,))
    assert [(f.bn, f.target, str(f.pattern)) for f in result.report.folded] == [("bn", "conv", "bn_before")]
    gm = result.module
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(set(calls)) == 2 and "conv" in calls
    assert torch.equal(gm.get_submodule("conv").weight, model.conv.weight)
    _close(gm(x), model(x))
