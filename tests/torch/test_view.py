"""FxView: a torch.fx GraphModule as the fold rules see it (ONNX op types, constants, ranks, uses)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import fx, nn  # noqa: E402
from torch.fx.passes.shape_prop import ShapeProp  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.rules.view import NotConstant  # noqa: E402
from bnfold.torch.view import FxView  # noqa: E402


def _refs(view: FxView) -> dict[str, object]:
    return {n.name: view.ref(n) for n in view.gm.graph.nodes}


def test_modules_map_to_onnx_ops_with_their_parameters() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1), nn.BatchNorm2d(4, eps=1e-3), nn.Flatten()
    ).eval()
    gm = fx.symbolic_trace(model)
    view = FxView(gm)
    conv, bn, flat = (view.ref(n) for n in gm.graph.nodes if n.op == "call_module")
    assert (conv.op, bn.op, flat.op) == ("Conv", "BatchNormalization", "Flatten")
    assert view.attr(conv, "pads") == [1, 1, 1, 1] and view.attr(conv, "strides") == [2, 2]
    assert view.attr_int(conv, "group", 0) == 1 and view.attr_int(flat, "axis", 0) == 1
    np.testing.assert_array_equal(view.constant(conv.inputs[1]), model[0].weight.detach().numpy())
    np.testing.assert_array_equal(view.constant(bn.inputs[4]), model[1].running_var.numpy())
    assert view.attr_float(bn, "epsilon", 0.0) == pytest.approx(1e-3)
    assert bn.inputs[0] == conv.outputs[0] and view.producer(bn.inputs[0]) == conv
    assert view.consumer(conv.outputs[0]) == bn and view.is_graph_output(flat.outputs[0])


def test_bn_without_affine_reads_ones_and_zeros() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3, affine=False)).eval())
    view = FxView(gm)
    bn = next(view.ref(n) for n in gm.graph.nodes if n.target == "1")
    np.testing.assert_array_equal(view.constant(bn.inputs[1]), np.ones(3, np.float32))
    np.testing.assert_array_equal(view.constant(bn.inputs[2]), np.zeros(3, np.float32))


def test_training_or_statless_bn_is_not_a_batch_normalization() -> None:
    train = nn.BatchNorm2d(4)
    stateless = nn.BatchNorm2d(4, track_running_stats=False).eval()
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), train, stateless))
    ops = [r.op for name, r in _refs(FxView(gm)).items() if name in ("_1", "_2")]
    assert ops == ["BatchNorm2d", "BatchNorm2d"]


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2, 3, 3))
        self.fc = nn.Parameter(torch.randn(400, 5))
        self.b = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w, None, 1, 2, 1, 2) + self.b
        z = (y * 0.5).relu()
        return torch.flatten(z, 1) @ self.fc + torch.flatten(z, 0).sum()


def test_functions_map_with_their_arguments() -> None:
    gm = fx.symbolic_trace(_Functional())
    view = FxView(gm)
    refs = _refs(view)
    conv = refs["conv2d"]
    assert conv.op == "Conv" and conv.inputs[2] == ""  # no bias
    assert view.attr(conv, "pads") == [2, 2, 2, 2] and view.attr_int(conv, "group", 0) == 2
    assert refs["add"].op == "Add" and view.constant(refs["add"].inputs[1]).shape == (4, 1, 1)
    mul = refs["mul"]
    assert mul.op == "Mul" and view.constant(mul.inputs[1]) == np.float64(0.5)
    assert refs["relu"].op == "relu"  # unknown: refused by name
    assert refs["flatten"].op == "Flatten" and refs["flatten_1"].op == "flatten"  # start_dim 0
    assert refs["matmul"].op == "MatMul"
    with pytest.raises(NotConstant):
        view.constant(refs["mul"].inputs[0])


def test_ranks_and_dtypes_come_from_propagated_shapes() -> None:
    gm = fx.symbolic_trace(_Functional())
    x = torch.randn(1, 4, 8, 8)
    assert FxView(gm).rank("conv2d") is None
    ShapeProp(gm).propagate(x)
    view = FxView(gm)
    assert view.rank("conv2d") == 4 and view.rank("flatten") == 2 and view.rank("b") == 3
    assert view.dtype("conv2d") == np.float32


def test_uses_count_every_user() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * y + y

    gm = fx.symbolic_trace(Twice())
    view = FxView(gm)
    assert view.uses("conv") == 3 and view.consumer("conv") is None


def test_decomposed_batch_norm_is_one_node_with_the_getitem_as_output() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = torch.export.export(model, (x,)).run_decompositions().module()
    view = FxView(gm)
    bn_node = next(n for n in gm.graph.nodes if "batch_norm" in str(n.target))
    bn = view.ref(bn_node)
    assert bn.op == "BatchNormalization" and view.attr_int(bn, "training_mode", 1) == 0
    (out,) = bn.outputs
    assert view.producer(out) == bn and view.is_graph_output(out)
    conv = view.producer(bn.inputs[0])
    assert conv is not None and conv.op == "Conv" and view.rank(conv.outputs[0]) == 4
    assert view.constant(bn.inputs[3]).shape == (4,)


def test_a_module_the_view_does_not_map_is_never_read_as_the_onnx_op_of_its_class_name() -> None:
    """nn.Flatten(0, 1) is no ONNX Flatten(axis=1): read as one, the BN before it folded into the
    Linear's input features wrongly."""
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Flatten(0, 1), nn.Linear(4, 5), nn.Dropout(0.1)).eval()
    gm = fx.symbolic_trace(model)
    view = FxView(gm)
    ops = [view.ref(n).op for n in gm.graph.nodes if n.op == "call_module"]
    assert ops == ["BatchNormalization", "Flatten module", "Gemm", "Identity"]
    with torch.no_grad():
        model[0].running_mean.uniform_(-1.0, 1.0)
    result = bt.fold(model, (torch.randn(2, 4, 4),))
    assert result.report.folded == [] and result.verification is not None and result.verification.passed
