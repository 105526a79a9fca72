"""Plain records of what a fold did and what a verification found; ``to_dict()`` is the JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class FoldedPair:
    """A BatchNormalization (or a decomposed BN's Mul) absorbed into a layer, or rewritten.

    ``pattern``: ``bn_after``, ``bn_after_chain``, ``matmul``, ``decomposed_affine``,
    ``bn_before``, ``dequantized_weight``, ``bn_to_affine`` (see :mod:`bnfold.onnx_pass`).
    """

    bn: str
    target: str
    kind: (
        str  # op type of the target before the fold: Conv, ConvTranspose, Gemm, MatMul (Mul for bn_to_affine)
    )
    graph: str  # "main", a subgraph path like "main/If_0.then_branch", or "function domain:name"
    pattern: str = "bn_after"  # the pattern kind that matched


@dataclass
class SkippedBN:
    """A BatchNormalization left in place, with a stable reason code and a one-line message."""

    bn: str
    code: str
    message: str
    graph: str
    producer: str | None = None
    producer_op: str | None = None
    op: str = "BatchNormalization"  # the node kept: a BN, or a Mul candidate (decomposed BN)


@dataclass
class FoldReport:
    """Everything the pass did to one model."""

    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    # decomposed-BN candidates (layer -> Mul(constant)) left in place, with the reason (op "Mul");
    # kept apart from ``skipped``, which lists BatchNormalization nodes only
    skipped_affine: list[SkippedBN] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    initializers_before: int = 0
    initializers_after: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.folded)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (every value is a str, int, finite float, None, list or dict)."""
        return {
            k: [dict(vars(item)) for item in v] if isinstance(v, list) else v for k, v in vars(self).items()
        }


@dataclass
class OutputCheck:
    """Comparison of one graph output between reference and candidate, worst over all runs."""

    name: str
    dtype: str
    shape: list[int]
    passed: bool
    max_abs_err: float
    max_rel_err: float
    atol: float
    rtol: float
    min_atol: float  # smallest atol that passes with the rtol used
    min_rtol: float  # smallest rtol that passes with the atol used
    mismatches: int = 0
    message: str = ""
    # the largest change of this output when the parameters move by one ulp (None: not measured)
    noise_floor: float | None = None
    err_over_noise: float | None = None  # max_abs_err / noise_floor (None when the floor is 0 or unknown)


@dataclass
class Divergence:
    """The first tensor (in the reference's topological order) at which a candidate diverges:
    the node producing it in each model and the error figures; ``compared``: the tensors both
    models compute, ``skipped``: those only one of them computes."""

    tensor: str
    ref_node: str
    cand_node: str
    max_abs_err: float
    max_rel_err: float
    compared: int = 0
    skipped: int = 0


@dataclass
class Verification:
    """Result of running reference and candidate in onnxruntime (optimizations off)."""

    passed: bool
    status: str  # "passed", "failed", or "error" (a model could not run)
    message: str = ""
    outputs: list[OutputCheck] = field(default_factory=list)
    runs: int = 1
    seed: int = 0
    provider: str = "CPUExecutionProvider"
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    assumed_dims: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    first_divergence: Divergence | None = None  # set when localization ran and found one

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_abs_err"] = self.max_abs_err
        return d
