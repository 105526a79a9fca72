"""The torch-only checks of a BatchNorm call, and how an fx call's arguments are read.

:func:`bn_call` refuses what the rules cannot see (``custom_forward``, ``no_running_stats``,
``training_mode`` of a module or a ``training=True`` call, the tuple outputs of aten's batch norm
in use); it runs before the rules are asked, and a BN it refuses is no ``BatchNormalization`` in
the fx view either.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..report import Reason

aten = torch.ops.aten

_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
BN_FUNCTIONS: dict[object, tuple[str, ...]] = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.batch_norm: _BN_ARGS + ("cudnn_enabled",),
    aten.batch_norm.default: _BN_ARGS + ("cudnn_enabled",),
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
BN_TRAINING_FUNCTIONS = {
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit_functional.default,
    aten.native_batch_norm.default,
}
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class TorchSkip(Exception):
    """A torch-only refusal of a BatchNorm, with its reason code."""

    def __init__(self, code: Reason, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def path_of(node: fx.Node) -> str:
    """The attribute path a ``call_module`` or ``get_attr`` node names (always a string there)."""
    target = node.target
    if not isinstance(target, str):
        raise TypeError(f"{node.op} node {node.name} has a non-string target")
    return target


def bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, object]:
    """The arguments of a call by parameter name."""
    bound: dict[str, object] = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def target_name(node: fx.Node) -> str:
    """A readable name of what ``node`` calls."""
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


# ----- the torch-only BN checks -----------------------------------------------------------------
def is_bn(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` calls a BatchNorm (module or function, inference or training)."""
    if node.op == "call_module":
        return isinstance(modules.get(path_of(node)), nn.modules.batchnorm._BatchNorm)
    return node.op == "call_function" and (
        node.target in BN_FUNCTIONS or node.target in BN_TRAINING_FUNCTIONS
    )


def _bn_module(node: fx.Node, mod: nn.Module) -> None:
    if not isinstance(mod, _BN_MODULES) or (
        type(mod).forward is not nn.modules.batchnorm._BatchNorm.forward
        and not isinstance(mod, nn.SyncBatchNorm)
    ):
        raise TorchSkip(
            Reason.CUSTOM_FORWARD,
            f"{type(mod).__name__} overrides forward; its extra behaviour would be lost",
        )
    if mod.training:
        raise TorchSkip(Reason.TRAINING_MODE, "the BN module is in training mode")
    if mod.running_mean is None or mod.running_var is None or not mod.track_running_stats:
        raise TorchSkip(
            Reason.NO_RUNNING_STATS, "track_running_stats=False: the BN normalizes with batch statistics"
        )
    if not node.args or not isinstance(node.args[0], fx.Node):
        raise TorchSkip(Reason.MALFORMED, "BN called without input")


def _tuple_outputs(node: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """The ``getitem(bn, 0)`` node of aten's tuple-valued batch norm, and its other getitems."""
    outs = list(node.users)
    if any(u.op != "call_function" or u.target is not operator.getitem for u in outs):
        raise TorchSkip(Reason.MALFORMED, "the BN's tuple output is used other than by indexing")
    if [u for u in outs if u.args[1] != 0 and u.users]:
        raise TorchSkip(Reason.TRAINING_MODE, "the BN's saved statistics are used")
    firsts = [u for u in outs if u.args[1] == 0]
    if len(firsts) != 1:
        raise TorchSkip(Reason.MULTIPLE_CONSUMERS, "the BN output is indexed more than once")
    return firsts[0], tuple(u for u in outs if u is not firsts[0])


def bn_call(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """The torch-only checks of a BatchNorm call: TorchSkip with the reason unless it normalizes
    with running statistics in inference mode. Returns its result node and the extra getitems."""
    if node.op == "call_module":
        _bn_module(node, modules[path_of(node)])
        return node, ()
    if node.target in BN_TRAINING_FUNCTIONS:
        raise TorchSkip(Reason.TRAINING_MODE, f"{node.target} normalizes with batch statistics")
    args = bind(node, BN_FUNCTIONS[node.target])
    if args.get("training", False) is not False:
        raise TorchSkip(Reason.TRAINING_MODE, "batch_norm called with training=True (or not a constant)")
    if args.get("running_mean") is None or args.get("running_var") is None:
        raise TorchSkip(
            Reason.NO_RUNNING_STATS, "batch_norm without running statistics uses batch statistics"
        )
    if not isinstance(args.get("eps", 1e-5), (int, float)):
        raise TorchSkip(Reason.PARAM_NOT_CONSTANT, "eps is not a constant")
    if not isinstance(args.get("input"), fx.Node):
        raise TorchSkip(Reason.NO_PRODUCER, "the BN input is not a graph value")
    if node.target is aten._native_batch_norm_legit_no_training.default:
        return _tuple_outputs(node)
    return node, ()
