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

    def conv_bn(
        self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True, with_bn: bool = True
    ) -> str:
        i = self.n
        self.n += 1
        w = self.rng.standard_normal((cout, cin, k, k)).astype(np.float32) * np.float32(
            np.sqrt(2.0 / (cin * k * k))
        )
        self.inits.append(numpy_helper.from_array(w, f"conv{i}.w"))
        pad = k // 2
        out = f"conv{i}.y"
        inputs = [x, f"conv{i}.w"]
        if not with_bn:
            self.inits.append(
                numpy_helper.from_array(self.rng.normal(0, 0.1, cout).astype(np.float32), f"conv{i}.b")
            )
            inputs.append(f"conv{i}.b")
        self.nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [out],
                name=f"conv{i}",
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        if with_bn:
            self.inits.extend(_bn_params(self.rng, f"bn{i}", cout))
            bn_out = f"bn{i}.y"
            self.nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [out, f"bn{i}.gamma", f"bn{i}.beta", f"bn{i}.mean", f"bn{i}.var"],
                    [bn_out],
                    name=f"bn{i}",
                    epsilon=1e-5,
                )
            )
            out = bn_out
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [f"relu{i}.y"], name=f"relu{i}"))
            out = f"relu{i}.y"
        return out

    def model(self, x_shape: list[int], out: str, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
            self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-bench"
        )
        # give the output its inferred shape (some peers require it), without keeping value_info
        inferred = onnx.shape_inference.infer_shapes(model)
        model.graph.output[0].CopyFrom(inferred.graph.output[0])
        return model


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


def mobilenet_like(with_bn: bool = True) -> onnx.ModelProto:
    """MobileNet-v2-shaped: inverted residual blocks with depthwise 3x3 convs."""
    b = _Builder(1)

    def dw_bn(x: str, c: int, stride: int) -> str:
        i = b.n
        b.n += 1
        w = (b.rng.standard_normal((c, 1, 3, 3)) * 0.3).astype(np.float32)
        b.inits.append(numpy_helper.from_array(w, f"dw{i}.w"))
        inputs = [x, f"dw{i}.w"]
        if not with_bn:
            b.inits.append(numpy_helper.from_array(b.rng.normal(0, 0.1, c).astype(np.float32), f"dw{i}.b"))
            inputs.append(f"dw{i}.b")
        b.nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [f"dw{i}.y"],
                group=c,
                kernel_shape=[3, 3],
                strides=[stride, stride],
                pads=[1, 1, 1, 1],
            )
        )
        out = f"dw{i}.y"
        if with_bn:
            b.inits.extend(_bn_params(b.rng, f"dwbn{i}", c))
            b.nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [out] + [f"dwbn{i}.{p}" for p in ("gamma", "beta", "mean", "var")],
                    [f"dwbn{i}.y"],
                )
            )
            out = f"dwbn{i}.y"
        b.nodes.append(helper.make_node("Relu", [out], [f"dwr{i}.y"]))
        return f"dwr{i}.y"

    x = b.conv_bn("x", 3, 32, 3, stride=2, with_bn=with_bn)
    cin = 32
    for t, c, n, s in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for j in range(n):
            stride = s if j == 0 else 1
            h = cin * t
            y = b.conv_bn(x, cin, h, 1, with_bn=with_bn) if t != 1 else x
            y = dw_bn(y, h, stride)
            y = b.conv_bn(y, h, c, 1, relu=False, with_bn=with_bn)
            if stride == 1 and cin == c:
                add = f"add{b.n}"
                b.n += 1
                b.nodes.append(helper.make_node("Add", [x, y], [add]))
                y = add
            x, cin = y, c
    x = b.conv_bn(x, cin, 1280, 1, with_bn=with_bn)
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    return b.model([1, 3, 224, 224], "pool", "mobilenet_like")


def big_external(folder, layers: int = 64, channels: int = 1024):
    """Write a model above 2 GB (``layers`` Conv 3x3 ``channels``x``channels`` + BN) with its weights
    in one external data file, streaming tensor by tensor; returns the model path."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data_name = "big.onnx.data"
    nodes, inits = [], []
    offset = 0
    x = "x"
    with open(folder / data_name, "wb") as data:
        for i in range(layers):
            w = rng.random((channels, channels, 3, 3), dtype=np.float32)
            w -= np.float32(0.5)
            w *= np.float32(0.02)
            raw = w.tobytes()
            t = onnx.TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=list(w.shape))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            data.write(raw)
            offset += len(raw)
            inits.append(t)
            inits.extend(_bn_params(rng, f"bn{i}", channels))
            nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [f"c{i}", f"bn{i}.gamma", f"bn{i}.beta", f"bn{i}.mean", f"bn{i}.var"],
                    [f"b{i}"],
                )
            )
            nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path
