"""Plain records of what a fold did and what a verification found; ``to_dict()`` is the JSON.

The vocabularies (:class:`Reason`, :class:`Pattern`, :class:`Status`) are string-valued enums:
a member *is* its string, so the JSON and the report text show the plain value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Why a BatchNormalization (or a decomposed BN's Mul) was left in place: a stable code.

    :data:`REASON_MEANINGS` gives each code's one-line meaning; :data:`ONNX_REASONS` lists the codes
    the ONNX pass reports (the torch front end adds the last three).
    """

    TRAINING_MODE = "training_mode"
    SPATIAL_MODE = "spatial_mode"
    ATTRIBUTE_REF = "attribute_ref"
    MALFORMED = "malformed"
    NO_PRODUCER = "no_producer"
    PRODUCER_OUTSIDE_SCOPE = "producer_outside_scope"
    UNSUPPORTED_PRODUCER = "unsupported_producer"
    GRAPH_OUTPUT = "graph_output"
    MULTIPLE_CONSUMERS = "multiple_consumers"
    PARAM_NOT_CONSTANT = "param_not_constant"
    WEIGHT_NOT_CONSTANT = "weight_not_constant"
    BIAS_NOT_CONSTANT = "bias_not_constant"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    PARAM_SHAPE = "param_shape"
    NON_FINITE = "non_finite"
    INVALID_VARIANCE = "invalid_variance"
    CHANNEL_MISMATCH = "channel_mismatch"
    INVALID_GROUP = "invalid_group"
    WEIGHT_SHAPE = "weight_shape"
    BIAS_SHAPE = "bias_shape"
    OVERFLOW = "overflow"
    CHANNEL_AXIS = "channel_axis"
    UNKNOWN_RANK = "unknown_rank"
    BROADCAST = "broadcast"
    PADDING = "padding"
    DEQUANTIZE_AXIS = "dequantize_axis"
    DROPOUT_MASK = "dropout_mask"
    IDENTITY_SUMMAND = "identity_summand"
    NEGATIVE_SCALE = "negative_scale"
    NEEDS_MERGE_BRANCHES = "needs_merge_branches"
    BRANCH_MISMATCH = "branch_mismatch"
    BRANCH_PADDING = "branch_padding"
    IDENTITY_BRANCH = "identity_branch"
    OVERLAPPING_SLICES = "overlapping_slices"
    SLICE_STEP = "slice_step"
    COMPUTED_SLICE = "computed_slice"
    UNKNOWN_SHAPE = "unknown_shape"
    # torch front end only
    NO_RUNNING_STATS = "no_running_stats"
    CUSTOM_FORWARD = "custom_forward"
    UNTRACEABLE = "untraceable"


REASON_MEANINGS: dict[Reason, str] = {
    Reason.TRAINING_MODE: (
        "the BN, or a Dropout between it and its layer, runs in training mode "
        "(is_test=0, training_mode=1, or training outputs)"
    ),
    Reason.SPATIAL_MODE: "spatial=0 (BN before opset 9): statistics per activation, not per channel",
    Reason.ATTRIBUTE_REF: "an attribute refers to a function attribute, whose value is unknown",
    Reason.MALFORMED: "the nodes or tensors are not valid (missing inputs, unreadable data, bad attributes)",
    Reason.NO_PRODUCER: "the BN's input is a graph input or an initializer: no layer to fold into",
    Reason.PRODUCER_OUTSIDE_SCOPE: "the BN's input is produced in an enclosing graph",
    Reason.UNSUPPORTED_PRODUCER: "the BN follows an op that is not Conv, ConvTranspose, Gemm or MatMul",
    Reason.GRAPH_OUTPUT: "the layer's output is also a graph output, which must keep its value",
    Reason.MULTIPLE_CONSUMERS: "the layer's output (or its weight) has other consumers besides the BN",
    Reason.PARAM_NOT_CONSTANT: "a BN parameter (scale, bias, mean, var) is not a constant",
    Reason.WEIGHT_NOT_CONSTANT: "the layer's weight is not a constant",
    Reason.BIAS_NOT_CONSTANT: "the layer's bias is not a constant",
    Reason.UNSUPPORTED_DTYPE: "a tensor is not float16/bfloat16/float32/float64, or dtypes differ",
    Reason.PARAM_SHAPE: "the BN parameters are not 1-D of one length",
    Reason.NON_FINITE: "a parameter or a folded value is NaN or Inf",
    Reason.INVALID_VARIANCE: "var + epsilon is not positive",
    Reason.CHANNEL_MISMATCH: "the BN's channel count differs from the layer's output channels",
    Reason.INVALID_GROUP: "the layer's group is not positive or does not divide its channels",
    Reason.WEIGHT_SHAPE: "the layer's weight has the wrong rank or shape",
    Reason.BIAS_SHAPE: "the layer's bias does not have the shape of its output channels",
    Reason.OVERFLOW: "a folded value does not fit in the tensor's dtype",
    Reason.CHANNEL_AXIS: "the BN's channel axis is not the layer's feature axis",
    Reason.UNKNOWN_RANK: "a rank the fold depends on cannot be proven",
    Reason.BROADCAST: "a Mul/Add constant does not broadcast along the output channels only",
    Reason.PADDING: (
        "the Conv after the BN pads its input, or an AveragePool before it counts padded zeros: "
        "the padded zeros would not get the shift"
    ),
    Reason.DEQUANTIZE_AXIS: "the weight's dequantize scale is not per output channel",
    Reason.DROPOUT_MASK: "a Dropout between the layer and the BN returns a mask that is read",
    Reason.NEGATIVE_SCALE: "a MaxPool sits between the layer and the BN, whose scale is negative somewhere",
    Reason.IDENTITY_SUMMAND: "the BN follows an Add of a layer and a path without a weight to absorb the scale",
    Reason.NEEDS_MERGE_BRANCHES: (
        "the BN is a branch of an Add of convolutions of one input (a RepVGG-style block): it folds "
        "with --merge-branches (merge_branches=True)"
    ),
    Reason.BRANCH_MISMATCH: (
        "the branches of an Add to merge differ: input, strides, group, dilation, kernel rank or channels"
    ),
    Reason.BRANCH_PADDING: (
        "a branch's padding is not centred on the largest kernel's, or cannot be resolved (auto_pad SAME "
        "with a stride)"
    ),
    Reason.IDENTITY_BRANCH: (
        "an identity branch cannot become a kernel: the convs stride, change the channel count or the size"
    ),
    Reason.OVERLAPPING_SLICES: "another Slice of the layer output reads channels of the BN's part",
    Reason.SLICE_STEP: "a Slice of the layer output along the channels has a step other than 1",
    Reason.COMPUTED_SLICE: "a Slice of the layer output has starts, ends, axes or steps that are not constant",
    Reason.UNKNOWN_SHAPE: (
        "a shape the fold depends on (a Reshape target, a dimension) cannot be proven, so the BN's "
        "channel axis may not be the layer's"
    ),
    Reason.NO_RUNNING_STATS: "the BatchNorm module tracks no running statistics",
    Reason.CUSTOM_FORWARD: "the module's forward is not the standard one",
    Reason.UNTRACEABLE: "the module is called from a forward that cannot be traced",
}

ONNX_REASONS = tuple(
    r for r in Reason if r not in (Reason.NO_RUNNING_STATS, Reason.CUSTOM_FORWARD, Reason.UNTRACEABLE)
)


class Pattern(StrEnum):
    """The kind of fold that matched (``FoldedPair.pattern``)."""

    BN_AFTER = "bn_after"  # Conv / ConvTranspose / Gemm -> BN
    BN_AFTER_CHAIN = "bn_after_chain"  # through a constant Add, or into a layer already folded into
    BN_AFTER_PASSTHROUGH = "bn_after_passthrough"  # through Identity, Dropout, cancelling Transposes
    CONCAT = "concat"  # Concat of layers along channels -> BN, split by channel ranges
    SUM_OF_LAYERS = "sum_of_layers"  # Add(layer, layer) -> BN: scale into both, shift into one
    BN_AFTER_SPATIAL = "bn_after_spatial"  # through Resize, pools, ReduceMean (they stay)
    SPLIT = "split"  # layer -> Split along channels -> BN on a part: into that channel range
    SLICE = "slice"  # layer -> Slices along channels (disjoint) -> BN on a part: into that range
    LAYOUT = "layout"  # layer [-> Add] -> one channel-keeping Transpose/Reshape/Flatten/(Un)squeeze -> BN
    MATMUL_ADD = "matmul_add"  # MatMul -> Add(constant [M, N] or [M, 1]) -> BN: the Add takes s * C + t
    MATMUL_RESHAPED = "matmul_reshaped"  # MatMul -> Flatten/Reshape to [M, C] -> BN: scale + an Add
    MATMUL = "matmul"  # MatMul (+ Add) -> BN, rewritten as one Gemm
    DECOMPOSED_AFFINE = "decomposed_affine"  # layer -> Mul(m) [-> Add(a)]
    BN_BEFORE = "bn_before"  # BN -> unpadded Conv, or BN -> Flatten -> Gemm
    BN_BEFORE_LINEAR = "bn_before_linear"  # BN (2-D) -> Gemm / MatMul, BN -> Flatten -> MatMul
    DEQUANTIZED_WEIGHT = "dequantized_weight"  # Conv with a DequantizeLinear weight
    BN_TO_AFFINE = "bn_to_affine"  # an unfoldable BN rewritten as Mul + Add (opt-in)
    MERGED_BRANCHES = "merged_branches"  # parallel conv / identity branches of an Add -> one conv (opt-in)
    EXPORTER = "exporter"  # torch front end: a fold the ONNX exporter did


class Status(StrEnum):
    """The outcome of a verification."""

    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"  # a model could not run


@dataclass
class FoldedPair:
    """A BatchNormalization (or a decomposed BN's Mul) absorbed into a layer, or rewritten.

    ``pattern``: a :class:`Pattern` (see :mod:`bnfold.rules`).
    """

    bn: str
    target: str
    # op type of the target before the fold: Conv, ConvTranspose, Gemm, MatMul; Mul for
    # bn_to_affine; the joining Concat or Add for concat and sum_of_layers
    kind: str
    graph: str  # "main", a subgraph path like "main/If_0.then_branch", or "function domain:name"
    pattern: Pattern = Pattern.BN_AFTER  # the pattern kind that matched

    def __post_init__(self) -> None:
        self.pattern = Pattern(self.pattern)


@dataclass
class SkippedBN:
    """A BatchNormalization left in place, with a stable reason code and a one-line message."""

    bn: str
    code: Reason
    message: str
    graph: str
    producer: str | None = None
    producer_op: str | None = None
    op: str = "BatchNormalization"  # the node kept: a BN, or a Mul candidate (decomposed BN)

    def __post_init__(self) -> None:
        self.code = Reason(self.code)


@dataclass
class FoldReport:
    """Everything the pass did to one model."""

    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    # decomposed-BN candidates (layer -> Mul(constant)) left in place, with the reason (op "Mul");
    # kept apart from ``skipped``, which lists BatchNormalization nodes only
    skipped_affine: list[SkippedBN] = field(default_factory=list)
    # convolutions removed by merging parallel branches into one (``merge_branches``)
    merged_convs: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    initializers_before: int = 0
    initializers_after: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.folded) or self.merged_convs > 0

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
    status: Status
    message: str = ""
    outputs: list[OutputCheck] = field(default_factory=list)
    runs: int = 1
    seed: int = 0
    provider: str = "CPUExecutionProvider"
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    assumed_dims: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    first_divergence: Divergence | None = None  # set when localization ran and found one

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_abs_err"] = self.max_abs_err
        return d
