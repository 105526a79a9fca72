"""Tables of ONNX operators the pass reasons about, and the limits of its small evaluators."""

from __future__ import annotations

ONNX_DOMAINS = ("", "ai.onnx")

# Standard ops whose attributes are never tensors or graphs (a scan of the model's tensors and
# subgraphs skips their attributes); with Constant, those that never carry a graph.
NO_TENSOR_ATTRIBUTE_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "Gemm",
        "MatMul",
        "Relu",
        "Clip",
        "Add",
        "Mul",
        "Sub",
        "Div",
        "Identity",
        "Reshape",
        "Flatten",
        "Concat",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Sigmoid",
        "Softmax",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
    }
)
NO_GRAPH_ATTRIBUTE_OPS = NO_TENSOR_ATTRIBUTE_OPS | {"Constant"}

# Ops whose outputs are computed from constants when all their inputs are constant: small helper
# subgraphs that exporters emit for weights and biases (torch's dynamo exporter builds a bias-less
# conv's zero bias with Shape -> Expand -> CastLike). Deterministic, no subgraphs, no randomness.
EVALUABLE_OPS = frozenset(
    {
        "Identity",
        "Cast",
        "CastLike",
        "Shape",
        "Size",
        "Expand",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Gather",
        "Slice",
        "ConstantOfShape",
        "Transpose",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Sqrt",
        "Reciprocal",
        "Flatten",
        "Tile",
        "Range",
        "Abs",
    }
)
# Inputs of which only the type matters (CastLike's ``target_type``).
TYPE_ONLY_INPUTS = {("CastLike", 1)}
# Inputs of which only the shape matters: evaluated from a fully static declared shape.
SHAPE_ONLY_INPUTS = {("Shape", 0), ("Size", 0)}
MAX_EVALUATED_NODES = 64
# Ops that keep input 0's element type and rank in output 0 (activations, normalizations, pools,
# the layers themselves): the start of both tables below.
_SAME_TYPE_AND_RANK = frozenset(
    {
        "Abs",
        "AveragePool",
        "BatchNormalization",
        "Celu",
        "Clip",
        "Conv",
        "ConvTranspose",
        "Dropout",
        "Elu",
        "Erf",
        "Exp",
        "Gelu",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "InstanceNormalization",
        "LayerNormalization",
        "LeakyRelu",
        "Log",
        "LogSoftmax",
        "LpPool",
        "MaxPool",
        "Mish",
        "Neg",
        "Reciprocal",
        "Relu",
        "Resize",
        "Selu",
        "Sigmoid",
        "Softmax",
        "Softplus",
        "Softsign",
        "Sqrt",
        "Tanh",
        "Upsample",
    }
)
# Ops whose output 0 has the element type of input 0 (used to find CastLike's target type).
SAME_TYPE_OPS = _SAME_TYPE_AND_RANK | frozenset(
    {
        "Add",
        "Concat",
        "DepthToSpace",
        "Div",
        "Expand",
        "Flatten",
        "Gather",
        "Gemm",
        "GroupNormalization",
        "MatMul",
        "Max",
        "Mean",
        "Min",
        "Mul",
        "PRelu",
        "Pad",
        "Pow",
        "ReduceL2",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceSum",
        "Reshape",
        "Resize",
        "Slice",
        "SpaceToDepth",
        "Split",
        "Squeeze",
        "Sub",
        "Sum",
        "Tile",
        "Transpose",
        "Unsqueeze",
        "Upsample",
    }
)
MAX_EVALUATED_ELEMENTS = 1 << 26
# Ops whose output 0 has the rank of input 0 (used to prove a MatMul's activations are 2-D).
RANK_PRESERVING_OPS = _SAME_TYPE_AND_RANK | frozenset({"Cast", "CastLike"})
# Elementwise ops with multidirectional broadcasting: the output rank is the largest input rank.
BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean"})
