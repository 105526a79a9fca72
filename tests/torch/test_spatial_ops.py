"""Split and the spatial ops in the torch front end (bnfold/torch/ops_spatial.py): a BN after a
layer's split part, or after a resize, pool or mean of a layer, folds into the layer (the split,
pool or resize stays), checked against the PyTorch module itself in float32 and on a float64 copy;
what the rules refuse is kept with its reason code."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import fx, nn  # noqa: E402
from torch.fx.passes.shape_prop import ShapeProp  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.rules.view import NodeRef  # noqa: E402
from bnfold.torch.view import FxView  # noqa: E402
from models.definitions import randomize_bn  # noqa: E402

Tail = Callable[[nn.Module, torch.Tensor], torch.Tensor]
BOTH = ("symbolic_trace", "torch.export")
ALL = (*BOTH, "decomposed")
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INPUTS = {1: (2, 3, 16), 2: (2, 3, 8, 8), 3: (1, 3, 4, 4, 4)}


class ConvThen(nn.Module):
    """A conv (3 -> ``channels``, spatial rank ``dims``, padded) then ``tail(self, y)``; the BNs
    the tail uses are ``self.bns`` (their sizes ``bns``, of rank ``bn_dims``), other modules
    ``self.extra``."""

    def __init__(
        self,
        tail: Tail,
        channels: int = 5,
        bns: tuple[int, ...] = (5,),
        dims: int = 2,
        bn_dims: int | None = None,
        extra: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.tail = tail
        self.conv = _CONV[dims](3, channels, 3, padding=1)
        self.bns = nn.ModuleList(_BN[bn_dims or dims](c) for c in bns)
        self.extra = extra if extra is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self, self.conv(x))


def _close(got: object, want: object, rtol: float) -> None:
    gots = got if isinstance(got, tuple) else (got,)
    wants = want if isinstance(want, tuple) else (want,)
    for g, w in zip(gots, wants, strict=True):
        g64, w64 = g.detach().double().numpy(), w.detach().double().numpy()
        np.testing.assert_allclose(g64, w64, rtol=rtol, atol=rtol * (float(np.abs(w64).max()) or 1.0))


def _captured(model: nn.Module, x: torch.Tensor, capture: str) -> object:
    if capture == "symbolic_trace":
        return model
    program = torch.export.export(model, (x,))
    return program if capture == "torch.export" else program.run_decompositions()


def _prepared(model: nn.Module, positive: bool) -> nn.Module:
    model = randomize_bn(model, torch.Generator().manual_seed(0)).eval()
    if positive:  # every BN scale > 0 (randomize_bn makes channel 0's negative)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight.abs_()
    return model


def _ops(gm: nn.Module) -> list[str]:
    """The ONNX op types the fx view reads in ``gm``."""
    assert isinstance(gm, fx.GraphModule)
    view = FxView(gm)
    return [
        view.mapped(n).op for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")
    ]


def _fold_checked(
    model: nn.Module, x: torch.Tensor, capture: str, positive: bool = False
) -> tuple[nn.Module, bt.TorchFoldResult]:
    """Fold in float32 and a float64 copy; both match the module and report the same."""
    model = _prepared(model, positive)
    result = bt.fold(_captured(model, x, capture), (x,))
    assert result.capture == ("symbolic_trace" if capture == "symbolic_trace" else "exported_program")
    with torch.no_grad():
        _close(result.module(x), model(x), 1e-5)
        model64, x64 = copy.deepcopy(model).double(), x.double()
        exact = bt.fold(_captured(model64, x64, capture), (x64,))
        _close(exact.module(x64), model64(x64), 1e-12)
    assert [str(p.pattern) for p in exact.report.folded] == [str(p.pattern) for p in result.report.folded]
    assert [str(s.code) for s in exact.report.skipped] == [str(s.code) for s in result.report.skipped]
    return model, result


def _codes(result: bt.TorchFoldResult) -> list[str]:
    return [str(s.code) for s in result.report.skipped]


# ----- Split --------------------------------------------------------------------------------------
def _split_sizes(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    a, b = torch.split(y, [2, 3], 1)
    return torch.cat([m.bns[0](a), m.bns[1](b)], 1)


def _split_method_one_size(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    a, b, c = y.split(2, dim=1)  # parts of 2, 2, 1 channels
    return torch.cat([m.bns[0](a), b, m.bns[1](c)], 1)


def _chunk(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    a, b = torch.chunk(y, 2, 1)  # 3 and 2 channels
    return m.bns[0](a).sum((1, 2, 3)) + m.bns[1](b).sum((1, 2, 3))


def _chunk_method(m: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    a, b, c = y.chunk(3, 1)  # 2, 2, 1 channels
    return a, m.bns[0](b), c


def _split_negative_dim(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return m.bns[0](torch.split(y, [1, 4], dim=-3)[1])


SPLITS = {
    "torch.split(sizes)": (_split_sizes, (2, 3)),
    "x.split(one size)": (_split_method_one_size, (2, 1)),
    "torch.chunk": (_chunk, (3, 2)),
    "x.chunk": (_chunk_method, (2,)),
    "negative dim": (_split_negative_dim, (4,)),
}


@pytest.mark.parametrize("capture", ALL)
@pytest.mark.parametrize("name", list(SPLITS))
def test_a_bn_on_a_split_part_folds_into_its_channel_range(name: str, capture: str) -> None:
    tail, bns = SPLITS[name]
    _, result = _fold_checked(ConvThen(tail, bns=bns), torch.randn(2, 3, 6, 6), capture)
    assert [str(p.pattern) for p in result.report.folded] == ["split"] * len(bns), result.report
    assert result.report.skipped == []
    assert {p.kind for p in result.report.folded} == {"Conv"}
    ops = _ops(result.module)
    assert "Split" in ops and "BatchNormalization" not in ops  # the split stays, the BNs go


def test_the_channels_of_other_parts_are_untouched_and_the_part_is_scaled_by_hand() -> None:
    model = _prepared(ConvThen(lambda m, y: torch.cat(_pair(m, y), 1), bns=(3,)), False)
    x = torch.randn(1, 3, 5, 5)
    result = bt.fold(model, (x,))
    assert [str(p.pattern) for p in result.report.folded] == ["split"]
    conv = result.module.get_submodule("conv")
    w, b = model.conv.weight.detach().double(), model.conv.bias.detach().double()
    assert torch.equal(conv.weight[:2], model.conv.weight[:2]) and torch.equal(
        conv.bias[:2], model.conv.bias[:2]
    )
    bn = model.bns[0]
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)  # by hand, float64
    shift = bn.bias.detach().double() - bn.running_mean.double() * scale
    want_w, want_b = (w[2:] * scale.view(-1, 1, 1, 1)).numpy(), (b[2:] * scale + shift).numpy()
    np.testing.assert_allclose(conv.weight[2:].detach().double(), want_w, rtol=2**-23, atol=1e-7)
    np.testing.assert_allclose(conv.bias[2:].detach().double(), want_b, rtol=2**-23, atol=1e-7)


def _pair(m: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.split(y, [2, 3], 1)
    return a, m.bns[0](b)


def test_a_split_without_recorded_shapes() -> None:
    """Sizes given fold without example inputs; one size needs the axis' length: kept."""
    sizes = _prepared(ConvThen(_split_sizes, bns=(2, 3)), False)
    assert [str(p.pattern) for p in bt.fold(sizes).report.folded] == ["split", "split"]
    one = bt.fold(_prepared(ConvThen(_split_method_one_size, bns=(2, 1)), False))
    assert one.report.folded == [] and _codes(one) == ["unsupported_producer"] * 2
    assert "has computed sizes" in one.report.skipped[0].message


def _second_reader(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    a, b = torch.split(y, [2, 3], 1)
    return m.bns[0](b) + b


def _along_height(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return m.bns[0](torch.split(y, 4, 2)[0])


def _tuple_read_whole(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    parts = torch.split(y, [2, 3], 1)
    return torch.cat([m.bns[0](parts[0]), torch.cat(parts, 1)], 1)


@pytest.mark.parametrize("capture", BOTH)
@pytest.mark.parametrize(
    "tail, bns, code",
    [
        (_second_reader, (3,), "multiple_consumers"),
        (_along_height, (5,), "channel_axis"),
        # symbolic_trace: cat reads the split's tuple whole (no Split: the BN follows a getitem);
        # torch.export: cat reads each part, so part 0 has a second consumer
        (_tuple_read_whole, (2,), ("unsupported_producer", "multiple_consumers")),
    ],
    ids=["part with a second consumer", "split along the height", "split read whole"],
)
def test_split_refusals(tail: Tail, bns: tuple[int, ...], code: str | tuple[str, str], capture: str) -> None:
    _, result = _fold_checked(ConvThen(tail, bns=bns), torch.randn(1, 3, 8, 8), capture)
    want = code if isinstance(code, str) else code[BOTH.index(capture)]
    assert result.report.folded == [] and _codes(result) == [want], result.report


# ----- spatial ops: positives ------------------------------------------------------------------
def _bn_on_values(m: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A BN on the values of a max pool that returns indices, the indices returned too."""
    out = m.extra(y)
    return m.bns[0](out[0]), out[1]


def _bn_of(op: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Tail:
    return lambda m, y: m.bns[0](op(m, y))


aten = torch.ops.aten
# name: (tail, conv rank, BN rank, extra module, every BN scale positive, captures)
SPATIAL: dict[str, tuple[Tail, int, int, nn.Module | None, bool, tuple[str, ...]]] = {
    "nn.Upsample nearest": (_bn_of(lambda m, y: m.extra(y)), 2, 2, nn.Upsample(scale_factor=2), False, ALL),
    "nn.Upsample bilinear size": (
        _bn_of(lambda m, y: m.extra(y)),
        2,
        2,
        nn.Upsample(size=(11, 13), mode="bilinear"),
        False,
        BOTH,
    ),
    "interpolate bilinear align_corners": (
        _bn_of(lambda m, y: F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)),
        2,
        2,
        None,
        False,
        ALL,
    ),
    "interpolate bicubic size": (
        _bn_of(lambda m, y: F.interpolate(y, size=(5, 7), mode="bicubic")),
        2,
        2,
        None,
        False,
        BOTH,
    ),
    "interpolate nearest-exact": (
        _bn_of(lambda m, y: F.interpolate(y, scale_factor=1.5, mode="nearest-exact")),
        2,
        2,
        None,
        False,
        BOTH,
    ),
    "interpolate bilinear antialias": (
        _bn_of(lambda m, y: F.interpolate(y, size=(5, 5), mode="bilinear", antialias=True)),
        2,
        2,
        None,
        False,
        ALL,
    ),
    "interpolate linear 1-D": (
        _bn_of(lambda m, y: F.interpolate(y, scale_factor=2, mode="linear")),
        1,
        1,
        None,
        False,
        BOTH,
    ),
    "interpolate trilinear": (
        _bn_of(lambda m, y: F.interpolate(y, scale_factor=2, mode="trilinear")),
        3,
        3,
        None,
        False,
        BOTH,
    ),
    "aten upsample_nearest2d.default": (
        _bn_of(lambda m, y: aten.upsample_nearest2d.default(y, [10, 12])),
        2,
        2,
        None,
        False,
        ALL,
    ),
    "aten upsample_bilinear2d.default": (
        _bn_of(lambda m, y: aten.upsample_bilinear2d.default(y, [10, 12], False)),
        2,
        2,
        None,
        False,
        BOTH,
    ),
    "nn.MaxPool2d": (_bn_of(lambda m, y: m.extra(y)), 2, 2, nn.MaxPool2d(2), True, ALL),
    "max_pool2d padded ceil_mode": (
        _bn_of(lambda m, y: F.max_pool2d(y, 3, 2, 1, ceil_mode=True)),
        2,
        2,
        None,
        True,
        ALL,
    ),
    "nn.MaxPool1d": (_bn_of(lambda m, y: m.extra(y)), 1, 1, nn.MaxPool1d(3, 2), True, BOTH),
    "max_pool3d": (_bn_of(lambda m, y: F.max_pool3d(y, 2)), 3, 3, None, True, ALL),
    "nn.MaxPool2d return_indices": (
        _bn_on_values,
        2,
        2,
        nn.MaxPool2d(2, return_indices=True),
        True,
        ALL,
    ),
    "nn.AvgPool2d unpadded": (_bn_of(lambda m, y: m.extra(y)), 2, 2, nn.AvgPool2d(2), False, ALL),
    "avg_pool2d padded, padding not counted": (
        _bn_of(lambda m, y: F.avg_pool2d(y, 3, 1, 1, count_include_pad=False)),
        2,
        2,
        None,
        False,
        ALL,
    ),
    "nn.AvgPool1d ceil_mode, padding not counted": (
        _bn_of(lambda m, y: m.extra(y)),
        1,
        1,
        nn.AvgPool1d(3, 2, 1, ceil_mode=True, count_include_pad=False),
        False,
        BOTH,
    ),
    "avg_pool3d": (_bn_of(lambda m, y: F.avg_pool3d(y, 2)), 3, 3, None, False, ALL),
    "nn.AdaptiveAvgPool2d(1)": (_bn_of(lambda m, y: m.extra(y)), 2, 2, nn.AdaptiveAvgPool2d(1), False, ALL),
    "adaptive_avg_pool2d (1, 1)": (
        _bn_of(lambda m, y: F.adaptive_avg_pool2d(y, (1, 1))),
        2,
        2,
        None,
        False,
        ALL,
    ),
    "nn.AdaptiveAvgPool1d(1)": (_bn_of(lambda m, y: m.extra(y)), 1, 1, nn.AdaptiveAvgPool1d(1), False, BOTH),
    "x.mean spatial keepdim": (_bn_of(lambda m, y: y.mean((2, 3), keepdim=True)), 2, 2, None, False, ALL),
    "torch.mean negative axes": (_bn_of(lambda m, y: torch.mean(y, dim=[-1, -2])), 2, 1, None, False, ALL),
    "x.mean over the batch, keepdim": (_bn_of(lambda m, y: y.mean(0, keepdim=True)), 2, 2, None, False, ALL),
    "dropout, max pool, upsample": (
        _bn_of(lambda m, y: F.interpolate(F.max_pool2d(m.extra(y), 2), scale_factor=2)),
        2,
        2,
        nn.Dropout(0.3),
        True,
        BOTH,
    ),
}


# the decomposed dialect turns some of these into primitives (index arithmetic, squeeze) the view
# does not read: those cases run under symbolic_trace and torch.export only
@pytest.mark.parametrize(
    "name, capture", [(name, capture) for name, case in SPATIAL.items() for capture in case[-1]]
)
def test_a_bn_after_a_spatial_op_folds_into_the_layer(name: str, capture: str) -> None:
    tail, dims, bn_dims, extra, positive, _ = SPATIAL[name]
    model = ConvThen(tail, dims=dims, bn_dims=bn_dims, extra=copy.deepcopy(extra))
    _, result = _fold_checked(model, torch.randn(_INPUTS[dims]), capture, positive)
    assert [str(p.pattern) for p in result.report.folded] == ["bn_after_spatial"], result.report
    assert result.report.skipped == [] and result.report.folded[0].kind == "Conv"
    ops = _ops(result.module)
    assert "BatchNormalization" not in ops
    assert {"Resize", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean"} & set(ops)  # it stays


def test_max_pool_indices_read_fold_with_positive_scales_and_stay_the_same() -> None:
    model = ConvThen(_bn_on_values, extra=nn.MaxPool2d(2, return_indices=True))
    model, result = _fold_checked(model, torch.randn(2, 3, 8, 8), "symbolic_trace", positive=True)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(result.module(x)[1], model(x)[1])


# ----- spatial ops: refusals ---------------------------------------------------------------------
REFUSED: dict[str, tuple[Tail, int, nn.Module | None, str]] = {
    "max pool, a negative scale": (_bn_of(lambda m, y: F.max_pool2d(y, 2)), 5, None, "negative_scale"),
    "max pool with indices, a negative scale": (
        _bn_on_values,
        5,
        nn.MaxPool2d(2, return_indices=True),
        "negative_scale",
    ),
    "avg pool padded, padding counted (torch's default)": (
        _bn_of(lambda m, y: m.extra(y)),
        5,
        nn.AvgPool2d(3, 1, 1),
        "padding",
    ),
    "avg pool ceil_mode, padding counted": (
        _bn_of(lambda m, y: F.avg_pool2d(y, 3, 2, ceil_mode=True)),
        5,
        None,
        "padding",
    ),
    "avg pool with divisor_override": (
        _bn_of(lambda m, y: F.avg_pool2d(y, 2, divisor_override=3)),
        5,
        None,
        "unsupported_producer",
    ),
    "mean over the channels": (_bn_of(lambda m, y: y.mean(1, keepdim=True)), 1, None, "channel_axis"),
    "adaptive pool to 2x2": (
        _bn_of(lambda m, y: m.extra(y)),
        5,
        nn.AdaptiveAvgPool2d(2),
        "unsupported_producer",
    ),
    "adaptive pool to (1, None)": (
        _bn_of(lambda m, y: F.adaptive_avg_pool2d(y, (1, None))),
        5,
        None,
        "unsupported_producer",
    ),
    "interpolate area": (
        _bn_of(lambda m, y: F.interpolate(y, size=(4, 4), mode="area")),
        5,
        None,
        "unsupported_producer",
    ),
    "pool read twice": (
        lambda m, y: (lambda p: m.bns[0](p) + p)(F.avg_pool2d(y, 2)),
        5,
        None,
        "multiple_consumers",
    ),
}


@pytest.mark.parametrize("capture", BOTH)
@pytest.mark.parametrize("name", list(REFUSED))
def test_spatial_refusals(name: str, capture: str) -> None:
    tail, channels, extra, code = REFUSED[name]
    model = ConvThen(tail, bns=(channels,), extra=copy.deepcopy(extra))
    _, result = _fold_checked(model, torch.randn(2, 3, 8, 8), capture)
    assert result.report.folded == [] and _codes(result) == [code], result.report


def test_a_mean_over_the_batch_without_keepdim_is_kept() -> None:
    model = ConvThen(lambda m, y: m.bns[0](y.mean(0)), bns=(8,), bn_dims=1)  # [C, H, W]: H as channels
    _, result = _fold_checked(model, torch.randn(2, 3, 8, 8), "symbolic_trace")
    assert _codes(result) == ["channel_axis"], result.report


# ----- what the rules read ------------------------------------------------------------------------
def _mapped(
    tail: Tail, extra: nn.Module | None = None, shapes: bool = True, bns: tuple[int, ...] = (5,)
) -> tuple[FxView, NodeRef]:
    """The view of ``ConvThen(tail)`` and the node before its first BN as the rules see it."""
    model = _prepared(ConvThen(tail, bns=bns, extra=extra), False)
    gm = fx.symbolic_trace(model)
    if shapes:
        ShapeProp(gm).propagate(torch.randn(2, 3, 8, 8))
    view = FxView(gm)
    bn = next(n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("bns"))
    producer = view.producer(bn.args[0].name)
    assert producer is not None
    return view, producer


def _attrs(tail: Tail, extra: nn.Module | None = None, shapes: bool = True) -> dict[str, object]:
    view, producer = _mapped(tail, extra, shapes)
    return {"op": producer.op, **view.info(producer).attrs}


def test_the_attributes_the_rules_read() -> None:
    up = _attrs(_bn_of(lambda m, y: F.interpolate(y, scale_factor=2, mode="bicubic", align_corners=True)))
    assert up["op"] == "Resize" and up["mode"] == "cubic" and up["axes"] == [2, 3]
    assert up["coordinate_transformation_mode"] == "align_corners"
    nearest = _attrs(_bn_of(lambda m, y: m.extra(y)), nn.Upsample(scale_factor=2), shapes=False)
    assert nearest["mode"] == "nearest" and nearest["coordinate_transformation_mode"] == "asymmetric"
    assert nearest["axes"] == [-1]  # no recorded rank: the rule cannot prove the axes
    avg = _attrs(_bn_of(lambda m, y: m.extra(y)), nn.AvgPool2d(3, 2, 1, ceil_mode=True))
    assert avg["op"] == "AveragePool" and avg["count_include_pad"] == 1 and avg["ceil_mode"] == 1
    assert avg["pads"] == [1, 1, 1, 1] and avg["kernel_shape"] == [3, 3] and avg["strides"] == [2, 2]
    assert _attrs(_bn_of(lambda m, y: m.extra(y)), nn.AdaptiveAvgPool2d((1, 1))) == {
        "op": "GlobalAveragePool"
    }
    view, mean = _mapped(_bn_of(lambda m, y: y.mean((-1, 2), keepdim=True)))
    assert mean.op == "ReduceMean" and view.info(mean).attrs == {"keepdims": 1}
    assert view.constant(mean.inputs[1]).tolist() == [-1, 2]
    view, split = _mapped(_chunk, bns=(3, 2))
    assert split.op == "Split" and view.info(split).attrs == {"axis": 1} and len(split.outputs) == 2
    assert view.constant(split.inputs[1]).tolist() == [3, 2]  # torch.chunk(5 channels, 2)


def test_an_upsample_without_recorded_shapes_is_kept_for_its_unknown_rank() -> None:
    model = _prepared(ConvThen(_bn_of(lambda m, y: m.extra(y)), extra=nn.Upsample(scale_factor=2)), False)
    result = bt.fold(model)
    assert _codes(result) == ["unknown_rank"], result.report


class SplitAndPool(nn.Module):
    """A BN on a split part of one conv, one after a max pool of another."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn_part = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn_pool = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b = torch.split(self.conv(x), [2, 3], 1)
        return self.bn_part(a), b, self.bn_pool(F.max_pool2d(self.conv2(x), 2))


def test_the_split_part_and_the_pool_stay_and_take_the_bns_readers() -> None:
    model, result = _fold_checked(SplitAndPool(), torch.randn(2, 3, 6, 6), "symbolic_trace", positive=True)
    folded = [(p.bn, p.target, p.kind, str(p.pattern)) for p in result.report.folded]
    assert folded == [("bn_part", "conv", "Conv", "split"), ("bn_pool", "conv2", "Conv", "bn_after_spatial")]
    gm = result.module
    assert isinstance(gm, fx.GraphModule)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    part, other, pooled = out.args[0]
    assert part.target is operator.getitem and part.args[1] == 0 and part.args[0].target is torch.split
    assert other.args[0] is part.args[0] and pooled.target is F.max_pool2d
    assert not [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
