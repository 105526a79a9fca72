"""PyTorch front end: ``bnfold.torch.fold`` (a folded ``torch.fx.GraphModule``) and
``bnfold.torch.export`` (a folded ONNX file checked against the module). The only layer that
imports torch; see :mod:`bnfold.torch.frontend`."""

from .frontend import TorchFoldResult, capture, export, fold

__all__ = ["fold", "export", "TorchFoldResult", "capture"]
