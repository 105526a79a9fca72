"""Re-parameterizable blocks (training-time branches that sum into one conv at inference), written
for bnfold: RepVGG, MobileOne and RepGhost-style blocks, and a small net of them.

Every branch reads the block's one input; a block's outputs are summed by ``+`` (an add tree).
Registered in ``models/definitions.py`` (``EXPORTED``: both ONNX exporters keep its BNs) and used
by the tests of ``merge_branches``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RepVGGBlock", "MobileOneBlock", "RepGhostBlock", "RepNet"]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class RepVGGBlock(nn.Module):
    """RepVGG: 3x3 conv+BN + 1x1 conv+BN (+ an identity BN when the shape stays), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.dense = _conv_bn(cin, cout, 3, stride)
        self.pointwise = _conv_bn(cin, cout, 1, stride)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return torch.relu(out)


class MobileOneBlock(nn.Module):
    """MobileOne: ``k`` over-parameterized conv+BN branches of one kernel, a 1x1 conv+BN scale
    branch (for kernels above 1) and an identity BN, then ReLU; depthwise with ``groups = C``."""

    def __init__(self, c: int, kernel: int, k: int = 3, groups: int = 1) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn(c, c, kernel, groups=groups) for _ in range(k)])
        self.scale = _conv_bn(c, c, 1, groups=groups) if kernel > 1 else None
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.identity(x)
        if self.scale is not None:
            out = out + self.scale(x)
        for branch in self.branches:
            out = out + branch(x)
        return torch.relu(out)


class RepGhostBlock(nn.Module):
    """RepGhost's re-parameterized part: a depthwise 3x3 conv+BN in parallel with an identity BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cheap = _conv_bn(c, c, 3, groups=c)
        self.fusion = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.cheap(x) + self.fusion(x))


class RepNet(nn.Module):
    """A small net of the blocks: RepVGG (strided without identity, then with), MobileOne depthwise
    and pointwise, RepGhost, pooled into a linear head."""

    input_shape = (2, 3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.stem = RepVGGBlock(3, 8, stride=2)
        self.stage = RepVGGBlock(8, 8)
        self.depthwise = MobileOneBlock(8, 3, k=3, groups=8)
        self.pointwise = MobileOneBlock(8, 1, k=2)
        self.ghost = RepGhostBlock(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ghost(self.pointwise(self.depthwise(self.stage(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))
