"""The architectures of issue 13 as small PyTorch modules: what sits between a layer and its BN.

Each model is tiny (a few channels) and has an ``input_shape``; :func:`models.definitions.build`
constructs them with random BN statistics. Written for bnfold, after the published designs (no
timm or YOLOv5 code):

* :class:`BatchNormAct2d`: timm's BN + drop + activation in one BatchNorm2d subclass whose forward
  asserts the input rank (``x.ndim`` read from the conv output) and calls ``F.batch_norm``;
  :class:`TimmConvStack` uses it after three convs.
* :class:`BottleneckCSP`: YOLOv5's cross-stage-partial block: two bias-free convs concatenated,
  one BN (eps 1e-3, as YOLOv5 sets every BN) and SiLU over the concatenation;
  :class:`YoloCSP` is a stem conv and one such block.
* :class:`MixConv`: MixNet's mixed depthwise conv: split the channels, a depthwise conv of kernel
  3, 5 and 7 per part, concatenate, one BN; :class:`MixNetBlock` puts it between a pointwise
  expansion and a pointwise projection with a residual.
* :class:`LinearNorm`, :class:`LeViTBlock`: LeViT's Linear without bias and a BatchNorm1d over the
  flattened tokens (``bn(linear(x).flatten(0, 1)).reshape_as(x)``) in an attention and an MLP
  sub-block.
* :class:`FPNNeck`: lateral 1x1 convs, nearest upsampling and add; a conv -> upsample -> BN; a
  conv -> max pool -> BN and a conv -> average pool -> BN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BatchNormAct2d",
    "TimmConvStack",
    "ConvBNSiLU",
    "BottleneckCSP",
    "YoloCSP",
    "MixConv",
    "MixNetBlock",
    "LinearNorm",
    "LeViTBlock",
    "FPNNeck",
]


# ------------------------------------------------------------------------------------------------
# timm: BatchNormAct2d
# ------------------------------------------------------------------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm2d followed by a drop (Dropout, or Identity for ``drop=0``) and an activation
    (ReLU, or Identity), in one module. Its forward asserts a 4-D input and calls
    ``F.batch_norm`` itself (so ``symbolic_trace`` traces through it, as through timm's)."""

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, drop: float = 0.0, act: bool = True
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop: nn.Module = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act: nn.Module = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected a 4-D input (got a {x.ndim}-D input)")
        batch_stats = self.training or self.running_mean is None or self.running_var is None
        keep_stats = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if keep_stats else None,
            self.running_var if keep_stats else None,
            self.weight,
            self.bias,
            batch_stats,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )
        return self.act(self.drop(x))


class TimmConvStack(nn.Module):
    """Three convs, each followed by a BatchNormAct2d: ReLU, Dropout(0.1) + ReLU, no activation."""

    input_shape = (2, 3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.bn2 = BatchNormAct2d(6, drop=0.1)
        self.conv3 = nn.Conv2d(6, 4, 1)
        self.bn3 = BatchNormAct2d(4, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))


# ------------------------------------------------------------------------------------------------
# YOLOv5: BottleneckCSP
# ------------------------------------------------------------------------------------------------
_YOLO_EPS = 1e-3  # YOLOv5 sets eps = 1e-3 on every BatchNorm2d


class ConvBNSiLU(nn.Module):
    """YOLOv5's Conv: a bias-free conv, BN (eps 1e-3), SiLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=_YOLO_EPS)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _Bottleneck(nn.Module):
    """1x1 then 3x3 ConvBNSiLU with a residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = ConvBNSiLU(c, c, 1)
        self.cv2 = ConvBNSiLU(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class BottleneckCSP(nn.Module):
    """Cross-stage partial: ``cv3(m(cv1(x)))`` and ``cv2(x)`` (both bias-free convs) are
    concatenated, normalized by one BN over both (eps 1e-3), activated, and mixed by ``cv4``."""

    def __init__(self, cin: int, cout: int, hidden: int) -> None:
        super().__init__()
        self.cv1 = ConvBNSiLU(cin, hidden, 1)
        self.cv2 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.cv3 = nn.Conv2d(hidden, hidden, 1, bias=False)
        self.cv4 = ConvBNSiLU(2 * hidden, cout, 1)
        self.bn = nn.BatchNorm2d(2 * hidden, eps=_YOLO_EPS)
        self.act = nn.SiLU()
        self.m = nn.Sequential(_Bottleneck(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


class YoloCSP(nn.Module):
    """A strided stem ConvBNSiLU and one BottleneckCSP: six BNs, the CSP one after a Concat."""

    input_shape = (2, 3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNSiLU(3, 8, 3, 2)
        self.csp = BottleneckCSP(8, 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.csp(self.stem(x))


# ------------------------------------------------------------------------------------------------
# MixNet: MixConv
# ------------------------------------------------------------------------------------------------
class MixConv(nn.Module):
    """Channels split into parts (the first takes the remainder), one depthwise conv per part with
    kernels 3, 5, 7 (same padding), concatenated."""

    def __init__(self, channels: int, kernels: tuple[int, ...] = (3, 5, 7)) -> None:
        super().__init__()
        sizes = [channels // len(kernels)] * len(kernels)
        sizes[0] += channels - sum(sizes)
        self.splits = sizes
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False) for c, k in zip(sizes, kernels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)  # indexed, not iterated: symbolic_trace reads it
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1)


class MixNetBlock(nn.Module):
    """MixNet's inverted residual: 1x1 expansion + BN + SiLU, MixConv + BN + SiLU over the
    concatenation, 1x1 projection + BN, residual."""

    input_shape = (2, 6, 10, 10)

    def __init__(self, channels: int = 6, hidden: int = 14) -> None:
        super().__init__()
        self.conv_pw = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv_dw = MixConv(hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv_pwl = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv_pw(x)))
        y = self.act(self.bn2(self.conv_dw(y)))
        return x + self.bn3(self.conv_pwl(y))


# ------------------------------------------------------------------------------------------------
# LeViT: Linear + BN over flattened tokens
# ------------------------------------------------------------------------------------------------
class LinearNorm(nn.Module):
    """LeViT's Linear without bias and a BatchNorm1d over the tokens flattened into the batch."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTBlock(nn.Module):
    """LeViT's attention (qkv and projection are LinearNorms, a learned bias per head and token
    pair, Hardswish before the projection) and MLP (two LinearNorms), each with a residual; tokens
    ``[B, N, C]``."""

    input_shape = (2, 16, 8)

    def __init__(self, dim: int = 8, tokens: int = 16, key_dim: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, 2 * key_dim
        self.scale = key_dim**-0.5
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + self.value_dim))
        self.attention_bias = nn.Parameter(0.1 * torch.randn(heads, tokens, tokens))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * self.value_dim, dim))
        self.mlp = nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_bias
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.heads * self.value_dim)
        return self.proj(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(x)
        return x + self.mlp(x)


# ------------------------------------------------------------------------------------------------
# FPN neck
# ------------------------------------------------------------------------------------------------
class FPNNeck(nn.Module):
    """Two backbone stages (conv + BN + ReLU, the second strided), lateral 1x1 convs, the coarse
    level upsampled (nearest) and added to the fine one; a conv -> 2x nearest upsample -> BN on the
    coarse level; heads conv -> MaxPool -> BN and conv -> AvgPool (padded, not counting the
    padding) -> BN."""

    input_shape = (2, 3, 16, 16)

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.lateral1 = nn.Conv2d(8, c, 1)
        self.lateral2 = nn.Conv2d(8, c, 1)
        self.smooth = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.bn_up = nn.BatchNorm2d(c)
        self.head_max = nn.Conv2d(c, c, 1)
        self.max_pool = nn.MaxPool2d(2)
        self.bn_max = nn.BatchNorm2d(c)
        self.head_avg = nn.Conv2d(c, c, 1)
        self.avg_pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.bn_avg = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        p2 = self.lateral2(c2)
        p1 = self.lateral1(c1) + F.interpolate(p2, scale_factor=2.0, mode="nearest")
        p1 = p1 + self.bn_up(self.up(self.smooth(p2)))
        return self.bn_max(self.max_pool(self.head_max(p1))) + self.bn_avg(self.avg_pool(self.head_avg(p1)))
