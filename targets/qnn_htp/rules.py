"""What QNN HTP runs, as data: its ops, how it quantizes compute layers, and the Q/DQ rules
of the rest of the graph (read by ``check``, ``quantize`` and the legalization passes).

The numbered cases are those of :mod:`compressor.targets.qnn_htp`'s docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from compressor.targets.base import Capabilities, TargetPass

from compressor.quant.spec import OpQuant, QuantSpec

__all__ = ["QNN_HTP_OPS", "QNN_HTP_CONTRIB_OPS", "QNN_HTP_CAPABILITIES", "QdqRules", "HTP_QDQ_RULES",
           "UNFINALIZED_OPS", "ACTIVATION_BITS"]

#: Node metadata key a legalization pass sets (value ``"16"``) on a node that must run with
#: 16-bit activations whatever the recipe's width (``qnn-unroll-lstm``'s gate pre-activations);
#: ``qnn-quantize-tensors`` reads it (its case 2).
ACTIVATION_BITS = "compressor.activation_bits"

#: ONNX ops the QNN EP has HTP builders for (onnxruntime-qnn ``op_builder_factory.cc``),
#: plus ``Constant`` (ONNX Runtime folds it). ``Shape``/``Range``... are absent: with static
#: shapes, constant folding removes them before lowering (``check`` allows such nodes).
QNN_HTP_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "Asin", "Atan", "AveragePool", "BatchNormalization", "Cast", "Ceil",
    "Clip", "Concat", "Constant", "Conv", "ConvTranspose", "Cos", "CumSum", "DepthToSpace", "DequantizeLinear",
    "Div", "Einsum", "Elu", "Equal", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND",
    "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "IsNaN",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "LpNormalization", "LRN",
    "LSTM", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "PRelu",
    "QuantizeLinear", "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "Relu", "Reshape", "Resize", "RMSNormalization", "RoiAlign", "Round", "ScatterElements", "ScatterND", "Selu",
    "Sigmoid", "Sign", "Sin", "Slice", "Softmax", "Softplus", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub",
    "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Unsqueeze", "Upsample", "Where", "Xor",
})

_RNN_REASON = ("the QNN EP builds it as HTP's float {op} op (a quantized one is never built: its inputs are "
               "dequantized first), which the HTP backend of onnxruntime-qnn fails to finalize "
               "(QNN_COMMON_ERROR_MEM_ALLOC) at every size, float or quantized; ONNX Runtime's own QNN flow "
               "fails the same way")

#: Ops the QNN EP has HTP builders for (so they are in :data:`QNN_HTP_OPS`) that the HTP
#: backend library then fails to *finalize*, whatever their size: ``op -> reason``, read by
#: ``lint`` so the refusal (exit 4) names the node before any work instead of a bare
#: ``QNN_COMMON_ERROR_MEM_ALLOC`` after calibration. An LSTM is refused only where
#: ``qnn-unroll-lstm`` (part of ``qnn-legalize``) cannot write it as its steps. Measured with onnxruntime-qnn 2.7.0
#: (``tests/targets/test_qnn_htp.py`` checks that the library still refuses them): a
#: one-direction LSTM of hidden size 8 over 2 steps fails like ddddocr's bidirectional
#: 512 x 24, with float or uint8/int8 weights, with or without bias and initial states, with
#: ``enable_htp_monolithic_lstm``; GRU the same.
UNFINALIZED_OPS: Mapping[str, str] = {op: _RNN_REASON.format(op=name) for op, name in (("LSTM", "Lstm"),
                                                                                     ("GRU", "Gru"))}

#: Contrib ops (``com.microsoft``) the QNN EP builds for HTP.
QNN_HTP_CONTRIB_OPS = frozenset({"FusedMatMul", "QuickGelu", "SimplifiedLayerNormalization", "RotaryEmbedding",
                                 "MatMulNBits", "EPContext"})

_ACT = QuantSpec("uint8", symmetric=False)  # widened to uint16 by quantize's ``activations: int16``

#: What HTP runs quantized, and how (see the module docstring, cases 2-3).
QNN_HTP_CAPABILITIES = Capabilities(
    quantizable={
        "Conv": OpQuant(activations=_ACT, weights=QuantSpec("int8", True, axis=0)),
        "ConvTranspose": OpQuant(activations=_ACT, weights=QuantSpec("int8", True, axis=1)),
        # Per output channel (``quantize`` takes the layer's own axis: Gemm 0 or 1 by
        # ``transB``, MatMul the last); ``quantize {weights: int8-per-tensor}`` is the fallback.
        "Gemm": OpQuant(activations=_ACT, weights=QuantSpec("int8", True, axis=0)),
        "MatMul": OpQuant(activations=_ACT, weights=QuantSpec("int8", True, axis=1)),
    },
    nm_patterns=(),
    static_shapes=True,
    supported_ops=QNN_HTP_OPS,
    max_rank=5,
    fallback="int16",  # no float path on the NPU: accuracy control widens activations instead
    # Any recipe that quantizes (plain ``int8`` too) is completed with HTP's legalization
    # (case 7), at the quantize step's activation width: int8 -> W8A8, int16 -> W8A16; and
    # with its weight granularity for the MatMul weights legalization writes (an LSTM's).
    after_quantize=(TargetPass("qnn-legalize", from_quantize=("activations", "weights")),),
    # HTP computes what the Q/DQ graph says; ONNX Runtime's fused int8 kernels do not (no VNNI)
    simulate_as_written=True,
)


@dataclasses.dataclass(frozen=True)
class QdqRules:
    """How a QDQ graph must look for HTP beyond the compute layers (cases 4, 5 and 7); read by ``qnn-quantize-tensors``.

    Attributes:
        activation: 8-bit activation spec of every other tensor (widened to 16 bits by the recipe).
        bias: Spec of Conv/ConvTranspose/Gemm/LayerNormalization biases (``scale = s_x * s_w``).
        norm_weight: Spec of normalization scales (LayerNormalization's gamma).
        fixed_outputs: ``(op, dtype) -> (scale, zero point)`` of outputs HTP fixes.
        same_encoding: Ops whose output must carry their first input's encoding (data movement).
        float_params: ``op -> input indices`` the QNN EP reads as op parameters, not tensors:
            float constants that stay float (no Q/DQ) and make no fp16 island.
        root_inputs: ``op -> input indices`` of a square root (``Sqrt``): its output spans half
            the dynamic range (in dB) of that input, so the input needs twice the output's bits.
            ``qnn-quantize-tensors`` runs the op, and the squares and sums computing that input,
            at 16 bits (silero-vad's STFT magnitude ``sqrt(re^2 + im^2)``).
        norm_inputs: ``op -> input indices`` of a normalization (``LayerNormalization``) that run,
            with the op and the ``Add`` (a transformer's residual sum) computing them, at 16 bits:
            the residual stream carries a few outlier channels, so one 8-bit encoding of it
            erases the rest, which the normalization then scales back up.
        relative_inputs: ``op -> input indices`` whose values an encoding must not round to
            0 (``Log``: ``log(0)`` is the floor): ``qnn-quantize-tensors`` reports how many do.
    """

    activation: QuantSpec = _ACT
    bias: QuantSpec = QuantSpec("int32", True)
    norm_weight: QuantSpec = QuantSpec("uint8", False)
    fixed_outputs: Mapping[tuple[str, str], tuple[float, int]] = dataclasses.field(default_factory=dict)
    same_encoding: frozenset[str] = frozenset()
    float_params: Mapping[str, frozenset[int]] = dataclasses.field(default_factory=dict)
    root_inputs: Mapping[str, frozenset[int]] = dataclasses.field(default_factory=dict)
    norm_inputs: Mapping[str, frozenset[int]] = dataclasses.field(default_factory=dict)
    relative_inputs: Mapping[str, frozenset[int]] = dataclasses.field(default_factory=dict)


HTP_QDQ_RULES = QdqRules(
    fixed_outputs={
        ("Sigmoid", "uint16"): (1.0 / 65536.0, 0),
        ("Sigmoid", "uint8"): (1.0 / 256.0, 0),
        ("Tanh", "uint16"): (1.0 / 32768.0, 32768),
        ("Tanh", "uint8"): (1.0 / 128.0, 128),
    },
    same_encoding=frozenset({
        "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "GlobalMaxPool", "Gather",
        "GatherElements", "GatherND", "Slice", "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Identity",
        "ReduceMax", "ReduceMin", "Pad",
        # Resize (nearest moves values, linear interpolates within the input's range): with
        # another output encoding HTP fails to finalize a Resize read by a Conv
        # (QNN_COMMON_ERROR_MEM_ALLOC, measured); ONNX Runtime's QNN quantizer shares it too.
        "Resize",
    }),
    # Resize's roi and scales become the QNN op's attributes (ONNX Runtime's QNN quantizer
    # leaves them float too); a DequantizeLinear there, above all of an empty roi, fails
    # to compose the QNN graph ("Failed to create tensor for node: roi_DequantizeLinear").
    float_params={"Resize": frozenset({1, 2})},
    # An 8-bit power |X|^2 keeps 24 dB, its square root then 24 dB of magnitude where an
    # 8-bit magnitude keeps 48: silero-vad's STFT magnitude lost 0.04 of output cosine.
    root_inputs={"Sqrt": frozenset({0})},
    # MiniLM W8A8 on HTP: the residual Add and the LayerNorm reading it at 16 bits took the
    # token cosine from 0.70 to 0.86 (either alone: no gain), docs/design.md.
    norm_inputs={"LayerNormalization": frozenset({0})},
    relative_inputs={"Log": frozenset({0})},
)
