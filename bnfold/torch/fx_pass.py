"""The torch.fx folding pass: BatchNorm folded into the Conv/ConvTranspose/Linear node before it.

Works on the three graph dialects torch produces for Conv+BN:

* ``symbolic_trace``: ``call_module`` Conv/BN nodes, or ``F.conv*``/``F.linear`` + ``F.batch_norm``
  calls on ``get_attr`` parameters (user subclasses of ``nn.Conv*``/``nn.BatchNorm*`` are traced
  through to these functional calls, so extra behaviour in their ``forward`` stays in the graph);
* ``torch.export`` / ``ExportedProgram.module()``: ``aten.conv*`` + ``aten.batch_norm``;
* decomposed: ``aten.convolution`` + ``aten._native_batch_norm_legit_no_training`` + ``getitem``.

Folding happens per graph node, never by mutating a shared module or tensor: a conv module called
at several places gets a folded copy for the one call followed by BN; a parameter read by several
nodes is copied. The math is :mod:`bnfold.folding` (float64, rounded once into the layer's dtype).
"""

from __future__ import annotations

import copy
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import FoldError
from ..folding import BNAffine, bn_affine, fold_conv, fold_conv_transpose, fold_gemm
from ..report import FoldedPair, FoldReport, Reason, SkippedBN
from .tensors import del_attr, erased, get_attr, set_attr, set_submodule, to_numpy, to_torch

aten = torch.ops.aten

# Functional/aten signatures: target -> (kind, parameter names in positional order, defaults).
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_LAYER_FUNCTIONS: dict[object, tuple[str, tuple[str, ...]]] = {
    F.conv1d: ("conv", _CONV_ARGS),
    F.conv2d: ("conv", _CONV_ARGS),
    F.conv3d: ("conv", _CONV_ARGS),
    F.conv_transpose1d: ("conv_transpose", _CONVT_ARGS),
    F.conv_transpose2d: ("conv_transpose", _CONVT_ARGS),
    F.conv_transpose3d: ("conv_transpose", _CONVT_ARGS),
    F.linear: ("linear", ("input", "weight", "bias")),
    aten.conv1d.default: ("conv", _CONV_ARGS),
    aten.conv2d.default: ("conv", _CONV_ARGS),
    aten.conv3d.default: ("conv", _CONV_ARGS),
    aten.conv_transpose1d.default: ("conv_transpose", _CONVT_ARGS),
    aten.conv_transpose2d.input: ("conv_transpose", _CONVT_ARGS),
    aten.conv_transpose3d.input: ("conv_transpose", _CONVT_ARGS),
    aten.linear.default: ("linear", ("input", "weight", "bias")),
    aten.convolution.default: (
        "convolution",
        (
            "input",
            "weight",
            "bias",
            "stride",
            "padding",
            "dilation",
            "transposed",
            "output_padding",
            "groups",
        ),
    ),
}
_BN_FUNCTIONS: dict[object, tuple[str, ...]] = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.batch_norm: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
    aten.batch_norm.default: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
    aten._native_batch_norm_legit_no_training.default: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "momentum",
        "eps",
    ),
}
_BN_TRAINING_FUNCTIONS = {
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit_functional.default,
    aten.native_batch_norm.default,
}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_DEFAULTS = {"bias": None, "groups": 1, "weight": None, "training": False, "eps": 1e-5}


def _path(node: fx.Node) -> str:
    """The attribute path a ``call_module`` or ``get_attr`` node names (always a string there)."""
    target = node.target
    if not isinstance(target, str):
        raise TypeError(f"{node.op} node {node.name} has a non-string target")
    return target


def _bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, object]:
    bound: dict[str, object] = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


@dataclass
class _BN:
    node: fx.Node
    input: fx.Node
    out: fx.Node  # the node whose users read the normalized tensor
    extra: list[fx.Node]  # getitem nodes to erase with the BN
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    label: str


@dataclass
class _Layer:
    node: fx.Node
    kind: str  # conv, conv_transpose, linear
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    install: Callable[[torch.Tensor, torch.Tensor], None]
    label: str


class _Skip(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class FxFolder:
    """Fold every foldable BN of a GraphModule in place (the caller passes a private copy)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.report = FoldReport()
        self.modules = dict(gm.named_modules())
        self.call_counts: dict[str, int] = {}
        self.attr_counts: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.call_counts[n.target] = self.call_counts.get(n.target, 0) + 1
            elif n.op == "get_attr":
                self.attr_counts[n.target] = self.attr_counts.get(n.target, 0) + len(n.users)
        self._fresh = 0
        self.touched: list[fx.Node] = []  # get_attr nodes a fold may have left unused

    # ----- helpers ---------------------------------------------------------------------------
    def _attr(self, node: object, what: str, code: str) -> torch.Tensor:
        if isinstance(node, fx.Node) and node.op == "get_attr":
            value = get_attr(self.gm, _path(node))
            if isinstance(value, torch.Tensor):
                return value
        desc = (node.format_node() or node.name) if isinstance(node, fx.Node) else repr(node)
        raise _Skip(code, f"{what} is not a constant parameter or buffer ({desc.split('=')[0].strip()})")

    def _fresh_name(self, base: str) -> str:
        base = base.replace(".", "_")
        while True:
            self._fresh += 1
            name = f"{base}_bnfold{self._fresh}"
            if not hasattr(self.gm, name):
                return name

    # ----- matching --------------------------------------------------------------------------
    def match_bn(self, node: fx.Node) -> _BN | None:
        """Describe a BN node, None if ``node`` is not a BN; raise _Skip if it cannot be folded."""
        if node.op == "call_module":
            mod = self.modules.get(node.target)
            if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
                return None
            if not isinstance(mod, _BN_MODULES) or (
                type(mod).forward is not nn.modules.batchnorm._BatchNorm.forward
                and not isinstance(mod, nn.SyncBatchNorm)
            ):
                raise _Skip(
                    "custom_forward",
                    f"{type(mod).__name__} overrides forward; its extra behaviour would be lost",
                )
            if mod.training:
                raise _Skip("training_mode", "the BN module is in training mode")
            if mod.running_mean is None or mod.running_var is None or not mod.track_running_stats:
                raise _Skip(
                    "no_running_stats", "track_running_stats=False: the BN normalizes with batch statistics"
                )
            source = node.args[0] if node.args else None
            if not isinstance(source, fx.Node):
                raise _Skip("malformed", "BN called without input")
            return _BN(
                node,
                source,
                node,
                [],
                mod.weight,
                mod.bias,
                mod.running_mean,
                mod.running_var,
                float(mod.eps),
                _path(node),
            )
        if node.op != "call_function":
            return None
        if node.target in _BN_TRAINING_FUNCTIONS:
            raise _Skip("training_mode", f"{node.target} normalizes with batch statistics")
        names = _BN_FUNCTIONS.get(node.target)
        if names is None:
            return None
        args = _bind(node, names)
        if args.get("training", False) is not False:
            raise _Skip("training_mode", "batch_norm called with training=True (or not a constant)")
        if args.get("running_mean") is None or args.get("running_var") is None:
            raise _Skip("no_running_stats", "batch_norm without running statistics uses batch statistics")
        mean = self._attr(args["running_mean"], "running_mean", "param_not_constant")
        var = self._attr(args["running_var"], "running_var", "param_not_constant")
        gamma = (
            None
            if args.get("weight") is None
            else self._attr(args["weight"], "BN weight", "param_not_constant")
        )
        beta = None if args.get("bias") is None else self._attr(args["bias"], "BN bias", "param_not_constant")
        eps = args.get("eps", 1e-5)
        if not isinstance(eps, (int, float)):
            raise _Skip("param_not_constant", "eps is not a constant")
        out, extra = node, []
        if node.target is aten._native_batch_norm_legit_no_training.default:
            outs = [u for u in node.users]
            if any(u.op != "call_function" or u.target is not operator.getitem for u in outs):
                raise _Skip("malformed", "the BN's tuple output is used other than by indexing")
            used = [u for u in outs if u.args[1] != 0 and u.users]
            if used:
                raise _Skip("training_mode", "the BN's saved statistics are used")
            firsts = [u for u in outs if u.args[1] == 0]
            if len(firsts) != 1:
                raise _Skip("multiple_consumers", "the BN output is indexed more than once")
            out, extra = firsts[0], [u for u in outs if u is not firsts[0]]
        inp = args.get("input")
        if not isinstance(inp, fx.Node):
            raise _Skip("no_producer", "the BN input is not a graph value")
        return _BN(node, inp, out, extra, gamma, beta, mean, var, float(eps), node.name)

    def match_layer(self, node: fx.Node) -> _Layer:
        if node.op == "call_module":
            mod = self.modules.get(node.target)
            if isinstance(mod, _CONV_MODULES + _CONVT_MODULES + (nn.Linear,)):
                if type(mod).forward not in {
                    c.forward for c in _CONV_MODULES + _CONVT_MODULES + (nn.Linear,)
                }:
                    raise _Skip("custom_forward", f"{type(mod).__name__} overrides forward")
                kind = (
                    "conv"
                    if isinstance(mod, _CONV_MODULES)
                    else "conv_transpose"
                    if isinstance(mod, _CONVT_MODULES)
                    else "linear"
                )
                return _Layer(
                    node,
                    kind,
                    mod.weight,
                    mod.bias,
                    getattr(mod, "groups", 1),
                    self._module_installer(node, mod),
                    _path(node),
                )
            what = type(mod).__name__ if mod is not None else node.target
            raise _Skip("unsupported_producer", f"follows {what}, not Conv/ConvTranspose/Linear")
        if node.op == "call_function" and node.target in _LAYER_FUNCTIONS:
            kind, names = _LAYER_FUNCTIONS[node.target]
            args = _bind(node, names)
            if kind == "convolution":
                transposed = args.get("transposed")
                if not isinstance(transposed, bool):
                    raise _Skip("malformed", "convolution 'transposed' is not a constant")
                kind = "conv_transpose" if transposed else "conv"
            weight = self._attr(args.get("weight"), "weight", "weight_not_constant")
            bias_arg = args.get("bias")
            bias = None if bias_arg is None else self._attr(bias_arg, "bias", "bias_not_constant")
            groups = args.get("groups", 1)
            if not isinstance(groups, int):
                raise _Skip("malformed", "groups is not a constant")
            return _Layer(node, kind, weight, bias, groups, self._function_installer(node, names), node.name)
        what = (
            node.target if node.op != "call_function" else getattr(node.target, "__name__", str(node.target))
        )
        raise _Skip("unsupported_producer", f"follows {node.op} {what}, not Conv/ConvTranspose/Linear")

    # ----- installing folded parameters ----------------------------------------------------------
    def _module_installer(
        self, node: fx.Node, mod: nn.Module
    ) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def install(weight: torch.Tensor, bias: torch.Tensor) -> None:
            clone = copy.deepcopy(mod)
            trainable = bool(mod.weight.requires_grad)
            clone.weight = nn.Parameter(weight, requires_grad=trainable)
            clone.bias = nn.Parameter(bias, requires_grad=trainable)
            path = _path(node)
            if self.call_counts.get(path, 0) == 1:
                target = path  # the only call: replace the module under its own name
            else:
                target = self._fresh_name(path)
                self.call_counts[path] -= 1
            self.gm.add_submodule(target, clone) if "." not in target else set_submodule(
                self.gm, target, clone
            )
            node.target = target
            self.modules[target] = clone

        return install

    def _function_installer(
        self, node: fx.Node, names: tuple[str, ...]
    ) -> Callable[[torch.Tensor, torch.Tensor], None]:
        def install(weight: torch.Tensor, bias: torch.Tensor) -> None:
            args = list(node.args)
            kwargs = dict(node.kwargs)
            for key, value in (("weight", weight), ("bias", bias)):
                old = _bind(node, names).get(key)
                if (
                    isinstance(old, fx.Node)
                    and old.op == "get_attr"
                    and self.attr_counts.get(_path(old), 0) == 1
                ):
                    set_attr(self.gm, _path(old), nn.Parameter(value, requires_grad=False))
                    continue
                name = self._fresh_name(f"{node.name}_{key}")
                set_attr(self.gm, name, nn.Parameter(value, requires_grad=False))
                with self.gm.graph.inserting_before(node):
                    getter = self.gm.graph.get_attr(name)
                if isinstance(old, fx.Node) and old.op == "get_attr":
                    self.attr_counts[_path(old)] -= 1
                    self.touched.append(old)
                pos = names.index(key)
                if key in kwargs or pos >= len(args):
                    if key not in kwargs and pos == len(args):
                        args.append(getter)
                    else:
                        kwargs[key] = getter
                else:
                    args[pos] = getter
            node.args = tuple(args)
            node.kwargs = kwargs

        return install

    # ----- the pass -----------------------------------------------------------------------------
    def run(self) -> FoldReport:
        start = time.perf_counter()
        graph = self.gm.graph
        self.report.nodes_before = len(graph.nodes)
        for node in list(graph.nodes):
            try:
                bn = self.match_bn(node)
                if bn is None:
                    continue
                layer = self.match_layer(bn.input)
                if len(layer.node.users) != 1:
                    raise _Skip(
                        "multiple_consumers", f"'{layer.node.name}' has other consumers besides the BN"
                    )
                new_w, new_b = self.compute(layer, bn)
            except _Skip as e:
                self._skip(node, e.code, e.message)
                continue
            except FoldError as e:
                self._skip(node, e.code, e.message)
                continue
            layer.install(new_w, new_b)
            self.touched.extend(a for a in bn.node.all_input_nodes if a.op == "get_attr")
            bn.out.replace_all_uses_with(layer.node)
            for n in [*bn.extra, bn.out, bn.node]:
                if not erased(n) and not n.users:
                    graph.erase_node(n)
            kind = {"conv": "Conv", "conv_transpose": "ConvTranspose", "linear": "Linear"}[layer.kind]
            self.report.folded.append(FoldedPair(bn.label, layer.label, kind, "fx"))
        _drop_unused(self.gm, self.touched)
        self.report.nodes_after = len(graph.nodes)
        self.report.seconds = time.perf_counter() - start
        return self.report

    def _skip(self, node: fx.Node, code: str, message: str) -> None:
        inp = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        label = node.target if node.op == "call_module" else node.name
        self.report.skipped.append(
            SkippedBN(
                str(label),
                Reason(code),
                message,
                "fx",
                inp.name if inp is not None else None,
                (inp.op if inp is not None else None),
            )
        )

    def compute(self, layer: _Layer, bn: _BN) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.kind == "linear":
            meta = layer.node.meta.get("val", layer.node.meta.get("tensor_meta"))
            shape = getattr(meta, "shape", None)
            if shape is None:
                raise _Skip("unknown_rank", "cannot tell the Linear output's rank: pass example_inputs")
            if len(shape) != 2:
                raise _Skip(
                    "channel_axis",
                    f"Linear output has rank {len(shape)}; BatchNorm1d normalizes axis 1, not the feature axis",
                )
        channels = bn.mean.shape[0] if bn.mean.ndim == 1 else -1
        ones = np.ones(max(channels, 0))
        gamma = to_numpy(bn.gamma) if bn.gamma is not None else ones
        beta = to_numpy(bn.beta) if bn.beta is not None else np.zeros_like(ones)
        affine: BNAffine = bn_affine(gamma, beta, to_numpy(bn.mean), to_numpy(bn.var), bn.eps)
        w = to_numpy(layer.weight)
        b = None if layer.bias is None else to_numpy(layer.bias)
        if layer.kind == "conv":
            nw, nb = fold_conv(w, b, affine, layer.groups)
        elif layer.kind == "conv_transpose":
            nw, nb = fold_conv_transpose(w, b, affine, layer.groups)
        else:
            nw, nb = fold_gemm(w, b, affine, trans_b=True, beta=1.0)
        return to_torch(nw, layer.weight), to_torch(nb, layer.weight)


def _drop_unused(gm: fx.GraphModule, touched: list[fx.Node]) -> None:
    """Drop what the folds left unused: getters, their tensors, modules no longer called."""
    graph = gm.graph
    dropped: set[str] = set()
    for node in touched:
        if not erased(node) and not node.users:
            dropped.add(_path(node))
            graph.erase_node(node)
    still_read = {n.target for n in graph.nodes if n.op == "get_attr"}
    for target in sorted(dropped - still_read):
        del_attr(gm, target)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def fold_graph_module(gm: fx.GraphModule) -> FoldReport:
    """Fold every foldable BN of ``gm`` in place and return the report."""
    return FxFolder(gm).run()
