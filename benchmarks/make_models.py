"""Builders for benchmark models (written on the fly, never committed).

``chain(n)``: n Conv->BN->ReLU blocks with 8 channels; ``resnet50_like()``: a ResNet-50-shaped
network (bottleneck blocks 3-4-6-3, widths 64..2048) with bias-less convs and randomized BN.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _bn_params(rng: np.random.Generator, prefix: str, c: int) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(rng.normal(1, 0.3, c).astype(np.float32), f"{prefix}.gamma"),
        numpy_helper.from_array(rng.normal(0, 0.3, c).astype(np.float32), f"{prefix}.beta"),
        numpy_helper.from_array(rng.normal(0, 0.3, c).astype(np.float32), f"{prefix}.mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), f"{prefix}.var"),
    ]


class _Builder:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True,
                with_bn: bool = True) -> str:
        i = self.n
        self.n += 1
        w = self.rng.standard_normal((cout, cin, k, k)).astype(np.float32) * np.float32(np.sqrt(2.0 / (cin * k * k)))
        self.inits.append(numpy_helper.from_array(w, f"conv{i}.w"))
        pad = k // 2
        out = f"conv{i}.y"
        inputs = [x, f"conv{i}.w"]
        if not with_bn:
            self.inits.append(numpy_helper.from_array(self.rng.normal(0, 0.1, cout).astype(np.float32), f"conv{i}.b"))
            inputs.append(f"conv{i}.b")
        self.nodes.append(helper.make_node("Conv", inputs, [out], name=f"conv{i}", kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[pad] * 4))
        if with_bn:
            self.inits.extend(_bn_params(self.rng, f"bn{i}", cout))
            bn_out = f"bn{i}.y"
            self.nodes.append(helper.make_node(
                "BatchNormalization", [out, f"bn{i}.gamma", f"bn{i}.beta", f"bn{i}.mean", f"bn{i}.var"],
                [bn_out], name=f"bn{i}", epsilon=1e-5))
            out = bn_out
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [f"relu{i}.y"], name=f"relu{i}"))
            out = f"relu{i}.y"
        return out

    def model(self, x_shape: list[int], out: str, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-bench")


def chain(n: int, channels: int = 8, with_bn: bool = True) -> onnx.ModelProto:
    b = _Builder()
    x = b.conv_bn("x", 3, channels, 3, with_bn=with_bn)
    for _ in range(n - 1):
        x = b.conv_bn(x, channels, channels, 3, with_bn=with_bn)
    return b.model([1, 3, 16, 16], x, f"chain{n}")


def resnet50_like(with_bn: bool = True) -> onnx.ModelProto:
    b = _Builder()
    x = b.conv_bn("x", 3, 64, 7, stride=2, with_bn=with_bn)
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for j in range(blocks):
            stride = 2 if (j == 0 and stage > 0) else 1
            y = b.conv_bn(x, cin, width, 1, with_bn=with_bn)
            y = b.conv_bn(y, width, width, 3, stride=stride, with_bn=with_bn)
            y = b.conv_bn(y, width, width * 4, 1, relu=False, with_bn=with_bn)
            if j == 0:
                x = b.conv_bn(x, cin, width * 4, 1, stride=stride, relu=False, with_bn=with_bn)
            add = f"add{b.n}"
            b.n += 1
            b.nodes.append(helper.make_node("Add", [x, y], [add]))
            b.nodes.append(helper.make_node("Relu", [add], [add + ".r"]))
            x = add + ".r"
            cin = width * 4
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    return b.model([1, 3, 224, 224], "pool", "resnet50_like")
