"""Small PyTorch models with BatchNorm, used to generate the bundled ONNX files and, later, to
exercise a PyTorch front end.

Every model here is deliberately tiny (a few channels) so its ONNX export is kilobytes.
All of them are built by :func:`build`, which seeds torch, constructs the module, randomizes every
BatchNorm (fresh BN layers are the identity map and hide axis mistakes) and returns it in eval
mode with an example input. The same name and seed always give the same weights.

Two groups:

* :data:`EXPORTED` -- exported to ONNX by ``models/generate.py``;
* :data:`TORCH_ONLY` -- cases only a torch front end can see (module reuse, functional calls,
  BN subclasses, data-dependent control flow, mixed precision). No ONNX is generated for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import FPNNeck, LeViTBlock, MixNetBlock, TimmConvStack, YoloCSP
from .reparam import RepNet

__all__ = [
    "ResNetSmall",
    "MobileNetSmall",
    "UNetDecoder",
    "AudioCNN1d",
    "Conv3dBlock",
    "MLPBN",
    "ReusedConv",
    "GroupedConvTranspose",
    "LinearBN",
    "FunctionalConvBN",
    "BNWithActivation",
    "ConvBNWithActivation",
    "ControlFlowNet",
    "BF16ConvFP32BN",
    "randomize_bn",
    "ModelSpec",
    "EXPORTED",
    "TORCH_ONLY",
    "build",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


# ------------------------------------------------------------------------------------------------
# Models exported to ONNX
# ------------------------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    """Two 3x3 convs with BN; a 1x1 strided conv + BN on the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNetSmall(nn.Module):
    """Stem, one identity block, one strided block with a conv+BN downsample, pool, Linear.

    6 BatchNorm2d, all directly after a bias-less Conv2d.
    """

    input_shape = (2, 3, 16, 16)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = _BasicBlock(8, 8)
        self.layer2 = _BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class _InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 project + BN, residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNetSmall(nn.Module):
    """Stem, a depthwise-separable block, two inverted residual blocks (one with residual), head.

    10 BatchNorm2d: stem 1, separable 2, inverted residual 3 + 3, head 1.
    """

    input_shape = (2, 3, 16, 16)

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()
        )
        # depthwise-separable: depthwise 3x3 (groups = channels) + BN + ReLU6, pointwise 1x1 + BN
        self.separable = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.block1 = _InvertedResidual(8, 8, stride=1, expand=2)
        self.block2 = _InvertedResidual(8, 12, stride=2, expand=2)
        self.head = nn.Sequential(nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.separable(self.stem(x))
        x = self.head(self.block2(self.block1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class UNetDecoder(nn.Module):
    """A tiny U-Net: conv+BN encoder, ConvTranspose2d+BN upsampling, skip concatenations.

    ConvTranspose2d layers: ``up1`` plain (no bias), ``up2`` grouped (groups=2, no bias), ``up3``
    with a bias. 8 BatchNorm2d: encoder 3, three after ConvTranspose2d, two after the fuse convs.
    """

    input_shape = (2, 3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = _conv_bn_relu(3, 8)  # 16x16
        self.enc2 = _conv_bn_relu(8, 8, stride=2)  # 8x8
        self.bottleneck = _conv_bn_relu(8, 16, stride=2)  # 4x4
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False)  # -> 8x8
        self.up1_bn = nn.BatchNorm2d(8)
        self.fuse1 = _conv_bn_relu(16, 8)
        self.up2 = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2, bias=False)  # -> 16x16
        self.up2_bn = nn.BatchNorm2d(8)
        self.fuse2 = _conv_bn_relu(16, 6)
        self.up3 = nn.ConvTranspose2d(6, 4, 3, stride=1, padding=1, bias=True)  # 16x16
        self.up3_bn = nn.BatchNorm2d(4)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottleneck(e2)
        d1 = F.relu(self.up1_bn(self.up1(b)))
        d1 = self.fuse1(torch.cat([d1, e2], dim=1))
        d2 = F.relu(self.up2_bn(self.up2(d1)))
        d2 = self.fuse2(torch.cat([d2, e1], dim=1))
        d3 = F.relu(self.up3_bn(self.up3(d2)))
        return self.out(d3)


class AudioCNN1d(nn.Module):
    """Conv1d + BatchNorm1d stack over a waveform-like input: plain, dilated, strided, grouped+dilated.

    4 BatchNorm1d, all foldable.
    """

    input_shape = (2, 2, 64)

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 8, 5, padding=2, bias=False),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 8, 3, padding=2, dilation=2),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Conv1d(8, 12, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm1d(12),
            nn.ReLU(),
            nn.Conv1d(12, 12, 3, padding=4, dilation=4, groups=4, bias=False),
            nn.BatchNorm1d(12),
            nn.ReLU(),
        )
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=2))


class Conv3dBlock(nn.Module):
    """Conv3d + BatchNorm3d twice (the second strided), then ConvTranspose3d + BatchNorm3d.

    3 BatchNorm3d, all foldable. The Conv3d layers keep their bias: torch 2.13's dynamo exporter
    (optimize=False) builds the zero bias of a bias-less Conv3d with shape [Cout, 2], which
    onnxruntime rejects, so a bias-less Conv3d cannot be exported to a runnable model.
    """

    input_shape = (2, 2, 4, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(4)
        self.conv2 = nn.Conv3d(4, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm3d(8)
        self.up = nn.ConvTranspose3d(8, 4, 2, stride=2, bias=False)
        self.bn3 = nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.up(x))


class MLPBN(nn.Module):
    """Linear + BatchNorm1d + ReLU twice, then a Linear head (exports as Gemm + BN).

    2 BatchNorm1d, both foldable into Gemm.
    """

    input_shape = (4, 12)

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.bn2 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.head(x)


# ------------------------------------------------------------------------------------------------
# Torch-only cases (for a PyTorch front end; no ONNX is generated)
# ------------------------------------------------------------------------------------------------
class ReusedConv(nn.Module):
    """One conv module called twice: once followed by BN, once not.

    Swapping the conv module for a fused one (torch.fx ``fuse``) silently breaks the BN-free path.
    """

    input_shape = (1, 4, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class GroupedConvTranspose(nn.Module):
    """ConvTranspose2d with groups=4 followed by BN (output channel axis is 1, per group)."""

    input_shape = (1, 8, 5, 5)

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1, groups=4, bias=True)
        self.bn = nn.BatchNorm2d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.up(x))


class LinearBN(nn.Module):
    """A single Linear followed by BatchNorm1d."""

    input_shape = (3, 6)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class FunctionalConvBN(nn.Module):
    """``F.conv2d`` with parameter weights, then ``F.batch_norm(training=False)`` with buffers.

    No nn.Conv2d / nn.BatchNorm2d modules: a module-level pass sees nothing to fuse.
    """

    input_shape = (1, 3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)
        self.bn_weight = nn.Parameter(torch.ones(6))
        self.bn_bias = nn.Parameter(torch.zeros(6))
        self.register_buffer("running_mean", torch.zeros(6))
        self.register_buffer("running_var", torch.ones(6))
        self.eps = 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, padding=1)
        return F.batch_norm(
            y,
            self.running_mean,
            self.running_var,
            self.bn_weight,
            self.bn_bias,
            training=False,
            eps=self.eps,
        )


class BNWithActivation(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward also applies ReLU: not a plain BN, folding must keep the ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class ConvBNWithActivation(nn.Module):
    """Conv2d followed by :class:`BNWithActivation`."""

    input_shape = (1, 3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = BNWithActivation(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ControlFlowNet(nn.Module):
    """Data-dependent ``if x.sum() > 0``: ``torch.fx.symbolic_trace`` fails on it."""

    input_shape = (1, 3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.bn_a(self.conv_a(x))
        return F.relu(self.bn_b(self.conv_b(x)))


class BF16ConvFP32BN(nn.Module):
    """Conv in bfloat16; the BN is kept in float32 with casts around it.

    A fold must round the folded weight into bfloat16 once (from float64), not keep float32.
    """

    input_shape = (1, 3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1).to(torch.bfloat16)
        self.bn = nn.BatchNorm2d(6)  # float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.to(torch.bfloat16))
        return self.bn(y.to(torch.float32))


# ------------------------------------------------------------------------------------------------
# Randomization and construction
# ------------------------------------------------------------------------------------------------
def _uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)


def _set(t: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        t.copy_(values.to(t.dtype))


def _randomize_stats(
    mean: torch.Tensor | None,
    var: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    g: torch.Generator,
) -> None:
    if mean is not None:
        _set(mean, 0.5 * torch.randn(mean.shape, generator=g, dtype=torch.float64))
    if var is not None:
        _set(var, _uniform(tuple(var.shape), 0.5, 2.0, g))
    if gamma is not None:
        # magnitudes around 1 with spread; about a quarter negative, and channel 0 always negative
        mag = _uniform(tuple(gamma.shape), 0.5, 1.5, g)
        sign = torch.where(torch.rand(gamma.shape, generator=g) < 0.25, -1.0, 1.0).to(torch.float64)
        if sign.numel():
            sign[0] = -1.0
        _set(gamma, mag * sign)
    if beta is not None:
        _set(beta, 0.3 * torch.randn(beta.shape, generator=g, dtype=torch.float64))


def randomize_bn(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters; randomize conv biases.

    * ``running_mean`` ~ N(0, 0.5^2), ``running_var`` ~ U(0.5, 2) (always positive),
    * ``weight`` (gamma): |gamma| ~ U(0.5, 1.5) with about a quarter of the signs negative (channel 0
      always negative), ``bias`` (beta) ~ N(0, 0.3^2);
    * the bias of every Conv/ConvTranspose/Linear that has one ~ N(0, 0.2^2).

    Modules with ``running_mean``/``running_var`` buffers that are not BN modules (the functional
    case) are randomized the same way, using ``bn_weight``/``bn_bias`` as gamma/beta if present.
    Values are drawn in float64 from ``generator`` and cast to each tensor's dtype. Returns ``module``.
    """
    for sub in module.modules():
        if isinstance(sub, _BN_TYPES):
            _randomize_stats(sub.running_mean, sub.running_var, sub.weight, sub.bias, generator)
        elif isinstance(getattr(sub, "running_mean", None), torch.Tensor) and isinstance(
            getattr(sub, "running_var", None), torch.Tensor
        ):
            _randomize_stats(
                sub.running_mean,
                sub.running_var,
                getattr(sub, "bn_weight", None),
                getattr(sub, "bn_bias", None),
                generator,
            )
        if isinstance(sub, _CONV_TYPES) and sub.bias is not None:
            _set(sub.bias, 0.2 * torch.randn(sub.bias.shape, generator=generator, dtype=torch.float64))
    return module


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model: its class, example input shape and input dtype."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str
    input_dtype: torch.dtype = torch.float32


def _spec(name: str, cls: type[nn.Module], description: str) -> ModelSpec:
    return ModelSpec(name, cls, tuple(cls.input_shape), description)  # type: ignore[attr-defined]


EXPORTED: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec(
            "resnet_small", ResNetSmall, "residual blocks, bias-less convs + BN, strided conv+BN downsample"
        ),
        _spec("mobilenet_small", MobileNetSmall, "depthwise-separable and inverted residual blocks, ReLU6"),
        _spec(
            "unet_decoder",
            UNetDecoder,
            "ConvTranspose2d+BN upsampling (plain, groups=2, with bias), skip concat",
        ),
        _spec("audio_cnn1d", AudioCNN1d, "Conv1d+BatchNorm1d: plain, dilated, strided, grouped+dilated"),
        _spec(
            "conv3d_block", Conv3dBlock, "Conv3d+BatchNorm3d (plain, strided) and ConvTranspose3d+BatchNorm3d"
        ),
        _spec("mlp_bn", MLPBN, "Linear+BatchNorm1d+ReLU (Gemm+BN), with and without Linear bias"),
        _spec("rep_net", RepNet, "RepVGG, MobileOne and RepGhost blocks (models/reparam.py)"),
        _spec(
            "timm_conv_stack", TimmConvStack, "timm BatchNormAct2d (ndim assert, drop, act) after three convs"
        ),
        _spec("yolo_csp", YoloCSP, "YOLOv5 BottleneckCSP: two bias-free convs -> cat -> BN eps 1e-3 -> SiLU"),
        _spec("mixnet_block", MixNetBlock, "MixNet MixConv: split -> depthwise k3/k5/k7 -> cat -> BN"),
        _spec(
            "levit_block", LeViTBlock, "LeViT attention + MLP: bias-free Linear -> BN1d on flattened tokens"
        ),
        _spec(
            "fpn_neck",
            FPNNeck,
            "FPN neck: lateral convs, upsample + add, conv -> upsample -> BN, pools -> BN",
        ),
    )
}

TORCH_ONLY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec("reused_conv", ReusedConv, "one conv module called twice, once followed by BN"),
        _spec("grouped_conv_transpose", GroupedConvTranspose, "ConvTranspose2d groups=4 + BN"),
        _spec("linear_bn", LinearBN, "Linear + BatchNorm1d"),
        _spec("functional_conv_bn", FunctionalConvBN, "F.conv2d + F.batch_norm(training=False), no modules"),
        _spec(
            "conv_bn_with_activation",
            ConvBNWithActivation,
            "Conv2d + a BatchNorm2d subclass that applies ReLU",
        ),
        _spec("control_flow_net", ControlFlowNet, "data-dependent if: symbolic_trace fails"),
        _spec("bf16_conv_fp32_bn", BF16ConvFP32BN, "bfloat16 conv, float32 BN with casts around it"),
    )
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model ``name`` (from :data:`EXPORTED` or :data:`TORCH_ONLY`) in eval mode, and an input.

    Deterministic: torch's global RNG is seeded with ``seed`` for construction, BN statistics come
    from a generator seeded with ``seed + 1`` and the example input from one seeded with ``seed + 2``.
    """
    spec = EXPORTED.get(name) or TORCH_ONLY.get(name)
    if spec is None:
        raise KeyError(f"unknown model {name!r}; known: {sorted(EXPORTED) + sorted(TORCH_ONLY)}")
    torch.manual_seed(seed)
    module = spec.factory()
    randomize_bn(module, torch.Generator().manual_seed(seed + 1))
    module.eval()
    x = torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(seed + 2))
    return module, x.to(spec.input_dtype)
