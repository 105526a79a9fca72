"""``bn_to_affine`` (opt-in, ``fold_model(..., bn_to_affine=True)``): a BN that cannot be folded but
is inference-mode with constant parameters becomes ``Mul(s) + Add(t)`` with constants shaped
``[C, 1, ..., 1]`` for the input's rank (which must be provable)."""

from __future__ import annotations

from ..errors import FoldError
from ..folding import affine_constants
from ..report import Reason
from .common import BN, FLOAT_NP
from .plan import Skip, ToAffine
from .view import GraphView


def _rewrite(view: GraphView, bn: BN) -> ToAffine:
    x = bn.node.inputs[0]
    rank = view.rank(x)
    if rank is None:
        raise FoldError(Reason.UNKNOWN_RANK, f"the rank of '{x}' is unknown")
    dtype = view.dtype(x)
    if dtype is None:
        if bn.version >= 15:
            raise FoldError(Reason.UNSUPPORTED_DTYPE, f"the element type of '{x}' is unknown")
        dtype = bn.param_dtype  # BN < 15: X and the parameters share one type
    if dtype not in FLOAT_NP:
        raise FoldError(Reason.UNSUPPORTED_DTYPE, f"'{x}' has dtype {dtype.name}")
    legacy = view.opset < 7
    s, t = affine_constants(bn.affine, 2 if legacy else rank, dtype)
    return ToAffine(bn.node, s, t, legacy)


def plan(view: GraphView, bn: BN) -> ToAffine | Skip:
    """The BN as Mul + Add, or why not."""
    try:
        return _rewrite(view, bn)
    except FoldError as e:
        return Skip(e.code, e.message)
