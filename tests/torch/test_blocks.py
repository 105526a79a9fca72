"""Issue 13's architectures (models/blocks.py) folded by ``bnfold.torch.fold``: the exact folds
and the reason codes of the BNs kept, under symbolic_trace and torch.export, and the folded module
against the module itself in float32 and on a float64 copy. (Their ONNX exports are rows of
models/cases.py, checked by tests/test_models.py.)"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import fx, nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from models.blocks import BatchNormAct2d, BottleneckCSP  # noqa: E402
from models.definitions import EXPORTED, build, randomize_bn  # noqa: E402

# name: (folds by pattern, sorted reason codes of the BNs kept)
EXPECTED: dict[str, tuple[dict[str, int], list[str]]] = {
    "timm_conv_stack": ({"bn_after": 3}, []),
    "yolo_csp": ({"bn_after": 5, "concat": 1}, []),
    "mixnet_block": ({"bn_after": 2, "concat": 1}, []),
    # nn.Linear on [B, N, C] -> flatten(0, 1) -> BN1d: each BN into its Linear (a bias made)
    "levit_block": ({"matmul_reshaped": 4}, []),
    "fpn_neck": ({"bn_after": 2, "bn_after_spatial": 2}, ["negative_scale"]),
}
CAPTURES = ("symbolic_trace", "torch.export")


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    g, w = got.detach().double().numpy(), want.detach().double().numpy()
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * (float(np.abs(w).max()) or 1.0))


def _captured(model: nn.Module, x: torch.Tensor, capture: str) -> object:
    return model if capture == "symbolic_trace" else torch.export.export(model, (x,))


def _bns(gm: nn.Module) -> int:
    """BatchNorm calls left in a GraphModule (modules or functions)."""
    assert isinstance(gm, fx.GraphModule)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    modules = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
    ]
    return len(calls) + len(modules)


def test_every_block_is_registered_for_export() -> None:
    assert set(EXPECTED) <= set(EXPORTED)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("name", list(EXPECTED))
def test_block_folds_exactly_and_matches_the_module(name: str, capture: str) -> None:
    model, x = build(name)
    folds, kept = EXPECTED[name]
    result = bt.fold(_captured(model, x, capture), (x,))
    assert result.capture == ("symbolic_trace" if capture == "symbolic_trace" else "exported_program")
    assert Counter(str(p.pattern) for p in result.report.folded) == Counter(folds), result.report
    assert sorted(str(s.code) for s in result.report.skipped) == kept, result.report
    total = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert _bns(result.module) == total - sum(folds.values()) == len(kept)
    # another batch size, except for an exported module (its guards fix the batch size)
    probe = torch.randn((3, *x.shape[1:]), generator=torch.Generator().manual_seed(5))
    probe = probe if capture == "symbolic_trace" else x
    with torch.no_grad():
        _close(result.module(probe), model(probe), 1e-5)
        model64 = copy.deepcopy(model).double()
        exact = bt.fold(_captured(model64, x.double(), capture), (x.double(),))
        assert Counter(str(p.pattern) for p in exact.report.folded) == Counter(folds)
        _close(exact.module(x.double()), model64(x.double()), 1e-12)


def test_yolo_csp_bn_splits_over_both_bias_free_convs() -> None:
    model, x = build("yolo_csp")
    result = bt.fold(model, (x,))
    (concat,) = [p for p in result.report.folded if str(p.pattern) == "concat"]
    assert (concat.bn, concat.kind) == ("csp.bn", "Concat")
    convs = result.module.get_submodule("csp")
    # the bias-free convs took the BN's two channel ranges: each now has a bias
    assert convs.get_submodule("cv3").bias is not None and convs.get_submodule("cv2").bias is not None


def test_fpn_neck_folds_the_upsample_and_average_pool_bns_and_keeps_the_max_pool_one() -> None:
    model, x = build("fpn_neck")
    result = bt.fold(model, (x,))
    spatial = {p.bn: p.target for p in result.report.folded if str(p.pattern) == "bn_after_spatial"}
    assert spatial == {"bn_up": "smooth", "bn_avg": "head_avg"}
    (kept,) = result.report.skipped
    assert (kept.bn, str(kept.code)) == ("bn_max", "negative_scale")
    assert "MaxPool 'max_pool'" in kept.message


def test_batchnorm_act_with_positive_scales_also_folds_through_a_max_pool() -> None:
    """A BatchNormAct2d after a max pool of a conv: folds once every scale is positive."""

    class PoolThenBNAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.bn = BatchNormAct2d(4, drop=0.2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.pool(self.conv(x)))

    model = randomize_bn(PoolThenBNAct(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert [str(s.code) for s in bt.fold(model, (x,)).report.skipped] == ["negative_scale"]
    with torch.no_grad():
        model.bn.weight.abs_()
    result = bt.fold(model, (x,))
    assert [str(p.pattern) for p in result.report.folded] == ["bn_after_spatial"], result.report
    with torch.no_grad():
        _close(result.module(x), model(x), 1e-5)


def test_a_csp_part_that_is_no_layer_keeps_the_bn() -> None:
    class Mixed(BottleneckCSP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y1 = torch.relu(self.cv3(self.m(self.cv1(x))))
            return self.cv4(self.act(self.bn(torch.cat((y1, self.cv2(x)), 1))))

    model = randomize_bn(Mixed(4, 6, 3), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 4, 5, 5)
    result = bt.fold(model, (x,))
    assert [(s.bn, str(s.code)) for s in result.report.skipped] == [("bn", "unsupported_producer")]
    assert Counter(str(p.pattern) for p in result.report.folded) == {"bn_after": 4}
    with torch.no_grad():
        _close(result.module(x), model(x), 1e-5)
