"""BatchNorm folding as an onnx_ir pass, for onnxscript and ``torch.onnx`` pass pipelines.

::

    import onnx_ir as ir
    from bnfold.ir import FoldBatchNormPass

    result = FoldBatchNormPass(runs=2)(model)          # PassResult(model, modified)
    result = ir.passes.PassManager([FoldBatchNormPass(), ...])(model)

``FoldBatchNormPass(**options)`` takes the keyword options of :func:`bnfold.fold` (``verify``,
``inputs``, ``shapes``, ``dims``, ``seed``, ``runs``, ``atol``, ``rtol``, ``provider``,
``threads``, ``progress``, ``bn_to_affine``, ``merge_branches``; not the file options ``output``, ``lazy`` and
``stream_external``) and checks them when it is built.

Contract: a functional pass (``onnx_ir.passes.FunctionalPass``): the input model is never
modified and a new ``ir.Model`` is returned. The model is serialized to a ModelProto (external
initializers read into it), folded by :func:`bnfold.fold`, and the folded proto deserialized, so
``ir.to_proto(result.model)`` is byte for byte ``ir.to_proto(ir.from_proto(bnfold.fold(proto).model))``.
``modified`` is True when at least one BatchNormalization was folded (or, with ``bn_to_affine``,
rewritten; or, with ``merge_branches``, a Conv merged away); when nothing was, the result is ``model.clone()``. A fold that fails its verification
raises :class:`bnfold.VerificationFailed` (a PassManager wraps it in ``PassError``); bad options or
an unusable model raise :class:`bnfold.BadInput`. ``last_result`` holds the :class:`bnfold.FoldResult`
of the latest call (its report and verification). Non-serialized IR data (``meta``) is not carried
over to a folded model.
"""

from __future__ import annotations

import inspect
from typing import Any

import onnx
import onnx_ir

from . import BadInput, FoldResult, VerificationFailed, fold

__all__ = ["FoldBatchNormPass"]

# options of bnfold.fold that concern files, not a model in memory
_FILE_OPTIONS = frozenset({"output", "lazy", "stream_external"})


def _pass_options() -> frozenset[str]:
    """The keyword options of :func:`bnfold.fold` the pass forwards."""
    params = inspect.signature(fold).parameters
    return frozenset(
        name for name, p in params.items() if p.kind is p.KEYWORD_ONLY and name not in _FILE_OPTIONS
    )


class FoldBatchNormPass(onnx_ir.passes.FunctionalPass):
    """Fold every foldable BatchNormalization with :func:`bnfold.fold` (verified by default)."""

    def __init__(self, **options: Any) -> None:
        allowed = _pass_options()
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(
                f"FoldBatchNormPass got unknown option(s) {', '.join(unknown)}; "
                f"the options of bnfold.fold it takes are {', '.join(sorted(allowed))}"
            )
        self.options: dict[str, Any] = dict(options)
        self.last_result: FoldResult | None = None

    def call(self, model: onnx_ir.Model) -> onnx_ir.passes.PassResult:
        """Fold ``model`` into a new model; raises VerificationFailed rather than return a bad fold."""
        result = fold(_model_proto(model), **self.options)
        self.last_result = result
        if not result.passed:
            message = result.verification.message if result.verification else ""
            raise VerificationFailed(f"the folded model failed verification ({message})")
        if not result.report.changed:
            return onnx_ir.passes.PassResult(model.clone(), modified=False)
        return onnx_ir.passes.PassResult(onnx_ir.serde.deserialize_model(result.model), modified=True)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
        return f"FoldBatchNormPass({options})"


def _model_proto(model: onnx_ir.Model) -> onnx.ModelProto:
    """``model`` as a self-contained ModelProto: initializers kept in external data files are read
    into it (bnfold would otherwise look for those files relative to the working directory);
    ``model`` itself is left as it is."""
    if not isinstance(model, onnx_ir.Model):
        raise BadInput(f"FoldBatchNormPass runs on an onnx_ir.Model, not a {type(model).__name__}")
    if any(_external_initializers(model)):
        model = model.clone()
        for value in _external_initializers(model):
            tensor = value.const_value
            assert tensor is not None  # (an external initializer has data)
            value.const_value = onnx_ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
    return onnx_ir.serde.serialize_model(model)


def _external_initializers(model: onnx_ir.Model) -> list[onnx_ir.Value]:
    """The initializers of every graph of ``model`` whose data is in an external file."""
    return [
        value
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, onnx_ir.ExternalTensor)
    ]
