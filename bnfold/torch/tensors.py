"""Tensors between torch and numpy (bfloat16 included), and attribute edits on a GraphModule by
dotted path: the mechanics the fx front end applies folds with."""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(like.device)


def erased(node: fx.Node) -> bool:
    return bool(getattr(node, "_erased", False))


def get_attr(gm: nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def split(gm: nn.Module, target: str) -> tuple[nn.Module, str]:
    owner, _, leaf = target.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), leaf


def set_attr(gm: nn.Module, target: str, value: nn.Parameter) -> None:
    mod, leaf = split(gm, target)
    if leaf in mod._buffers:
        del mod._buffers[leaf]
    setattr(mod, leaf, value)


def del_attr(gm: nn.Module, target: str) -> None:
    mod, leaf = split(gm, target)
    if hasattr(mod, leaf):
        delattr(mod, leaf)


def set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    owner, leaf = split(gm, target)
    setattr(owner, leaf, module)
