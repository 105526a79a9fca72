"""Registry of the bundled ONNX models and what bnfold must do with each.

``tests/test_models.py`` folds every file listed here and checks the exact number of folds and
the exact (sorted) reason codes of the BatchNormalization nodes that stay. ``models/generate.py``
writes the files. This module imports neither torch nor onnx.

``numerics`` says how the test compares original and folded model, independently of bnfold's own
verifier:

* ``"ort"``: both run in onnxruntime with all graph optimizations off;
* ``"ort_opset9"``: onnxruntime cannot run the model's opset (BN-6); both models are converted to
  opset 9 with ``onnx.version_converter`` first;
* ``"reference"``: onnxruntime's CPU provider has no kernel for the dtype (float64 Conv, bfloat16
  Conv); both run in ``onnx.reference.ReferenceEvaluator`` (usable because the BN is opset 15);
* ``"unchanged"``: nothing is folded; the output must be byte-identical to the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ONNX_DIR = Path(__file__).resolve().parent / "onnx"


@dataclass(frozen=True)
class Case:
    name: str
    file: str  # relative to models/onnx
    expected_folded: int
    expected_skip_codes: list[str]  # sorted reason codes of the BNs that stay
    runs_in_ort: bool
    description: str
    numerics: str = "ort"
    torch_model: str | None = None  # name in models.definitions.EXPORTED for torch-exported files
    tags: tuple[str, ...] = field(default=())

    @property
    def path(self) -> Path:
        return ONNX_DIR / self.file


def _case(
    name: str,
    folded: int,
    skips: list[str],
    description: str,
    *,
    ort: bool = True,
    numerics: str | None = None,
    tags: tuple[str, ...] = (),
) -> Case:
    if numerics is None:
        numerics = "unchanged" if folded == 0 else ("ort" if ort else "reference")
    return Case(name, f"{name}.onnx", folded, sorted(skips), ort, description, numerics, None, tags)


def _torch(name: str, model: str, folded: int, description: str, skips: list[str] | None = None) -> Case:
    return Case(
        name, f"{name}.onnx", folded, sorted(skips or []), True, description, "ort", model, ("torch",)
    )


# BN counts of the torch models (all directly after a Conv/ConvTranspose/Linear, all foldable):
#   resnet_small 6, mobilenet_small 10, unet_decoder 8, audio_cnn1d 4, conv3d_block 3, mlp_bn 2;
# issue 13's blocks (not all foldable): timm_conv_stack 3, yolo_csp 6, mixnet_block 3, levit_block 4 (all foldable),
#   fpn_neck 5.
TORCH_CASES: list[Case] = [
    _torch(
        "resnet_small",
        "resnet_small",
        6,
        "ResNetSmall, dynamo exporter (optimize=False): bias-less convs get a zero bias built by "
        "Shape->Expand->CastLike",
    ),
    _torch(
        "mobilenet_small",
        "mobilenet_small",
        10,
        "MobileNetSmall, dynamo: depthwise (group=C) and pointwise convs, inverted residuals",
    ),
    _torch(
        "unet_decoder",
        "unet_decoder",
        8,
        "UNetDecoder, dynamo: ConvTranspose2d+BN (plain, group=2, with bias), skip concats",
    ),
    _torch("audio_cnn1d", "audio_cnn1d", 4, "AudioCNN1d, dynamo: Conv1d+BN1d, dilated, strided, grouped"),
    _torch("conv3d_block", "conv3d_block", 3, "Conv3dBlock, dynamo: Conv3d+BN3d and ConvTranspose3d+BN3d"),
    _torch("mlp_bn", "mlp_bn", 2, "MLPBN, dynamo: Gemm(transB=1)+BN, one Gemm without C"),
    # issue 13's architectures (models/blocks.py)
    _torch(
        "timm_conv_stack",
        "timm_conv_stack",
        3,
        "TimmConvStack, dynamo: three convs, each -> timm-style BatchNormAct2d (F.batch_norm, drop, act)",
    ),
    _torch(
        "yolo_csp",
        "yolo_csp",
        6,
        "YoloCSP, dynamo: YOLOv5 BottleneckCSP; its BN after Concat of two bias-free convs folds (concat)",
    ),
    _torch(
        "mixnet_block",
        "mixnet_block",
        3,
        "MixNetBlock, dynamo: Split -> depthwise k3/k5/k7 -> Concat -> BN folds (concat)",
    ),
    _torch(
        "levit_block",
        "levit_block",
        4,
        "LeViTBlock, dynamo: MatMul -> Reshape to [B*N, C] with a shape Concat([B*N], [C]) computed "
        "from the dynamic batch -> BN: all four fold (matmul_reshaped)",
    ),
    _torch(
        "fpn_neck",
        "fpn_neck",
        4,
        "FPNNeck, dynamo: Conv -> Resize nearest -> BN and Conv -> AveragePool (padding not counted) -> BN "
        "fold (bn_after_spatial); Conv -> MaxPool -> BN with a negative scale: kept",
        ["negative_scale"],
    ),
    _torch(
        "resnet_small_legacy",
        "resnet_small",
        6,
        "ResNetSmall, legacy TorchScript exporter (TrainingMode.PRESERVE, no constant folding)",
    ),
    _torch("mobilenet_small_legacy", "mobilenet_small", 10, "MobileNetSmall, legacy exporter"),
    _torch("unet_decoder_legacy", "unet_decoder", 8, "UNetDecoder, legacy exporter"),
    _torch("audio_cnn1d_legacy", "audio_cnn1d", 4, "AudioCNN1d, legacy exporter"),
    _torch("conv3d_block_legacy", "conv3d_block", 3, "Conv3dBlock, legacy exporter"),
    # The legacy exporter turns the bias-less Linear (fc2) into MatMul, not Gemm: that BN folds
    # too (pattern "matmul": its input is provably 2-D, Gemm -> BN -> Relu).
    _torch(
        "mlp_bn_legacy",
        "mlp_bn",
        2,
        "MLPBN, legacy exporter: fc1 is Gemm+BN (folds); the bias-less fc2 exports as MatMul "
        "(2-D input) and its BN folds too (the MatMul becomes a Gemm)",
    ),
    _torch("timm_conv_stack_legacy", "timm_conv_stack", 3, "TimmConvStack, legacy exporter"),
    _torch("yolo_csp_legacy", "yolo_csp", 6, "YoloCSP, legacy exporter: the CSP BN folds (concat)"),
    _torch(
        "mixnet_block_legacy",
        "mixnet_block",
        3,
        "MixNetBlock, legacy exporter: the MixConv BN folds (concat)",
    ),
    _torch(
        "levit_block_legacy",
        "levit_block",
        4,
        "LeViTBlock, legacy exporter: MatMul -> Flatten(axis=2) -> BN, all four fold (matmul_reshaped); "
        "the ranks come through Reshapes whose shapes are Concats of Shape/Gather/Unsqueeze",
    ),
    _torch(
        "fpn_neck_legacy",
        "fpn_neck",
        4,
        "FPNNeck, legacy exporter: Resize and AveragePool BNs fold (bn_after_spatial); MaxPool BN with a "
        "negative scale: kept",
        ["negative_scale"],
    ),
]

HAND_CASES: list[Case] = [
    # --- BN operator versions --------------------------------------------------------------
    _case(
        "case_bn6_is_test",
        1,
        [],
        "opset 6 (IR 3), BN-6 is_test=1 after Conv: folds",
        ort=False,
        numerics="ort_opset9",
    ),
    _case(
        "case_bn6_training", 0, ["training_mode"], "opset 6, BN-6 is_test=0 (training mode): kept", ort=False
    ),
    _case("case_bn7_spatial1", 1, [], "opset 7 (IR 3), BN-7 spatial=1: folds"),
    _case("case_bn7_spatial0", 0, ["spatial_mode"], "opset 7, BN-7 spatial=0 with [C,H,W] statistics: kept"),
    _case("case_bn9", 1, [], "opset 9 (IR 4), BN-9: folds"),
    _case(
        "case_bn14_training",
        0,
        ["training_mode"],
        "opset 14, BN-14 training_mode=1 with running_mean/var outputs: kept",
    ),
    _case(
        "case_bn15_mixed_types",
        1,
        [],
        "opset 15, float16 X/Conv with float32 scale/bias/mean/var: folds into the fp16 weight",
    ),
    # --- dtypes ------------------------------------------------------------------------------
    _case("case_fp16", 1, [], "float16 Conv+BN (opset 15): folds, stays float16"),
    _case(
        "case_bf16",
        1,
        [],
        "bfloat16 Conv (opset 22) + BN: folds, stays bfloat16; ORT CPU has no bf16 Conv",
        ort=False,
    ),
    _case(
        "case_fp64_conv", 1, [], "float64 Conv+BN (opset 15): folds; ORT CPU has no float64 Conv", ort=False
    ),
    _case("case_fp64_gemm", 1, [], "float64 Gemm+BN (opset 15): folds"),
    # --- where constants live ---------------------------------------------------------------
    _case("case_constant_nodes", 1, [], "weight, bias and all BN params are Constant nodes: folds"),
    _case(
        "case_ir3_initializer_inputs",
        2,
        [],
        "IR 3 / opset 8: every initializer is also listed as a graph input (not overridable): "
        "both Conv+BN pairs fold",
    ),
    _case(
        "case_bn_param_graph_input",
        0,
        ["param_not_constant"],
        "IR 7: the BN mean is an initializer that is also a graph input (overridable): kept",
    ),
    _case(
        "case_shared_weight",
        2,
        [],
        "one weight initializer used by two Convs followed by different BNs: both fold (copy-on-write)",
    ),
    _case(
        "case_dequantize_weight",
        1,
        [],
        "Conv weight computed by DequantizeLinear (int8, per-tensor scale, opset 13): folds "
        "into a per-channel scale and the bias, the int8 weight untouched",
    ),
    # --- subgraphs and functions -------------------------------------------------------------
    _case(
        "case_if_branch",
        1,
        [],
        "If: then-branch Conv+BN whose weight is an outer-scope initializer, also used by the "
        "else-branch Conv without BN: folds with copy-on-write",
    ),
    _case(
        "case_if_producer_outside",
        0,
        ["producer_outside_scope"],
        "Conv in the main graph, BN inside an If branch: kept",
    ),
    _case("case_loop_body", 1, [], "Conv+BN inside a Loop body (weight from the outer scope): folds"),
    _case(
        "case_local_function", 1, [], "Conv+BN inside a model-local function with Constant-node params: folds"
    ),
    # --- graph structure -------------------------------------------------------------------
    _case("case_conv_two_consumers", 0, ["multiple_consumers"], "Conv output also feeds a Relu: kept"),
    _case("case_conv_graph_output", 0, ["graph_output"], "Conv output is also a graph output: kept"),
    _case("case_bn_after_relu", 0, ["unsupported_producer"], "BN after a Relu: kept"),
    _case("case_bn_on_input", 0, ["no_producer"], "BN directly on the graph input: kept"),
    # --- Gemm --------------------------------------------------------------------------------
    _case(
        "case_gemm_transb_alpha_beta_c", 1, [], "Gemm transB=1, alpha=0.7, beta=1.3, C of shape [N]: folds"
    ),
    _case("case_gemm_no_c", 1, [], "Gemm without C: folds (C created)"),
    _case("case_gemm_transa", 1, [], "Gemm transA=1 (C of shape [1,N]): folds"),
    # --- ConvTranspose / Conv variants -------------------------------------------------------
    _case(
        "case_conv_transpose1d_grouped",
        1,
        [],
        "ConvTranspose 1-D, group=3, strides=2, output_padding=1, with bias: folds",
    ),
    _case(
        "case_conv3d_same_upper",
        2,
        [],
        "two Conv 3-D + BN: dilations [1,2,1] with strides [2,1,2] and explicit pads; "
        "auto_pad=SAME_UPPER with strides [1,2,2] and an even kernel: both fold",
    ),
    # --- issue 13: what sits between a layer and its BN ----------------------------------------
    _case(
        "case_csp_concat",
        1,
        [],
        "two bias-free convs -> Concat -> BN eps 1e-3 (BottleneckCSP): folds (concat)",
    ),
    _case("case_mixconv", 1, [], "Split -> convs k3/k5/k7 -> Concat -> BN (MixConv): folds (concat)"),
    _case(
        "case_fpn_neck",
        1,
        ["negative_scale"],
        "Conv -> Resize nearest -> BN folds (bn_after_spatial); Conv -> MaxPool -> BN with a negative "
        "scale: kept",
    ),
    _case(
        "case_exporter_passthrough",
        3,
        [],
        "Conv -> Add -> Identity -> BN, Conv -> Transpose pair -> BN, Conv -> Dropout -> BN: all fold",
    ),
    _case(
        "case_sum_of_convs",
        1,
        ["identity_summand"],
        "Conv3x3 + Conv1x1 -> BN folds (sum_of_layers); Conv + X -> BN: kept",
    ),
    _case(
        "case_bn_flatten_matmul_bn",
        2,
        [],
        "BN -> Flatten -> MatMul -> BN: both fold in one call (bn_before_linear, then the Gemm's BN)",
    ),
    _case(
        "case_levit_linear_norm",
        1,
        ["channel_axis"],
        "LeViT LinearNorm: MatMul(3-D) -> Reshape([-1, C]) -> BN folds (matmul_reshaped); "
        "MatMul -> Flatten(axis=1) -> BN over tokens x features: kept",
    ),
    _case(
        "case_conv_shape_reader",
        1,
        [],
        "Conv -> BN, the conv output also read by Shape and CastLike (type): folds",
    ),
    _case(
        "case_repvgg_block",
        2,
        ["needs_merge_branches"],
        "RepVGG block (3x3+BN, 1x1+BN, identity BN): the branch BNs fold, the identity BN stays; "
        "with --merge-branches the block becomes one 3x3 Conv",
    ),
]

# RepNet (models/reparam.py): 15 BNs; by default the 11 branch BNs fold and the 4 identity BNs stay
# (needs_merge_branches); with --merge-branches all 15 go and 6 convs are merged away.
TORCH_CASES += [
    _torch(
        name,
        "rep_net",
        11,
        f"RepNet (RepVGG, MobileOne, RepGhost blocks), {how}: the identity BNs need --merge-branches",
        ["needs_merge_branches"] * 4,
    )
    for name, how in (("rep_net", "dynamo"), ("rep_net_legacy", "legacy exporter"))
]

CASES: list[Case] = TORCH_CASES + HAND_CASES
BY_NAME: dict[str, Case] = {c.name: c for c in CASES}

__all__ = ["Case", "CASES", "TORCH_CASES", "HAND_CASES", "BY_NAME", "ONNX_DIR"]
