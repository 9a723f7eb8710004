"""How a tensor is quantized, and what a target runs fast for one op type.

Core records: passes read them from a target's :class:`~compressor.targets.base.Capabilities`
and from recipes, so they live here rather than in a target module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["QuantSpec", "OpQuant"]


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        dtype: ``int8``, ``uint8``, ``int16``, ``uint16`` or ``float8e4m3fn``.
        symmetric: Zero point fixed at 0 (int) / midpoint (uint).
        axis: Per-channel axis of the tensor, or ``None`` for per-tensor.
        bits: Narrower symmetric range than the dtype holds (7: ``|q| <= 63``, for int8
            kernels that would overflow with full-range weights), or ``None``.
        signed_by_range: An 8-bit activation whose dtype follows its range
            (:meth:`for_range`): ``int8`` symmetric when the range holds negative values,
            ``uint8`` from 0 (zero point 0) when it does not; no zero point either way (NNCF's
            "performance" activations; OpenVINO on AMX: docs/design.md).
    """

    dtype: str = "int8"
    symmetric: bool = True
    axis: int | None = None
    bits: int | None = None
    signed_by_range: bool = False

    def for_range(self, lo: float, hi: float) -> QuantSpec:
        """The spec a tensor of range ``[lo, hi]`` is stored with: itself, or for
        :attr:`signed_by_range` ``int8`` symmetric (``lo < 0``) or ``uint8`` from 0."""
        if not self.signed_by_range:
            return self
        return QuantSpec("int8", symmetric=True) if lo < 0 else QuantSpec("uint8", symmetric=False)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class OpQuant:
    """The quantization a target runs fast for one op type.

    Attributes:
        weights: Spec of the constant weight input (``None``: the op has none).
        activations: Spec of the activation inputs.
        weight_input: Index of the weight input.
        joins_after: For an op without weights (a residual ``Add``): quantize a node only
            when one of its inputs comes from one of these ops, straight or through
            elementwise activations (``Relu``, SiLU...), a feature map's data movement or
            another such join (``passes._placement.computed_by``; empty: any op).
        min_activations: For an op without weights: the fewest inputs a node needs, all of
            them activations, to be quantized (2: a join of activations; 1: also a unary
            op such as ``Sigmoid`` or a ``Concat`` of any arity).
        sole_reader: For an op without weights: quantize a node only where it is the one
            reader of its inputs, so that the backend folds the input pair into the op that
            wrote them (OpenVINO: a FakeQuantize as the convolution's post-op, u8 output);
            with another, float reader the pair is a FakeQuantize of its own (a
            squeeze-excite block's pool beside its ``Mul``) that only adds work.
        activation_only: The spec of the inputs of a node whose inputs are all
            activations (``Q·Kᵀ``) when it differs from ``activations`` (``None``: the
            same). OpenVINO runs such a MatMul in int8 only with symmetric operands; a zero
            point on either makes its CPU plugin dequantize both and compute in f32.
        output: The spec of the layer's output read through a Q/DQ pair of its own
            (``None``: only the inputs are quantized). A backend that fuses a node unit
            ``DQ(x), DQ(w) -> op -> Q`` into one integer kernel needs it (ONNX Runtime's
            QLinearConv/QGemm/QLinearMatMul); one that fuses FakeQuantize on inputs
            (OpenVINO) does not. Given to layers with a constant weight, and to ops without
            weights that the backend runs as an integer node unit (``DQ... -> op -> Q``:
            ONNX Runtime's QLinearSigmoid, QLinearMul, QLinearConcat...); such a node is
            quantized only where its output gets the pair (its input pairs alone would
            only round).
        output_after: Single-reader ops the output pair moves past, because the backend
            folds them into the kernel (``Relu``, ``Clip``; ``Add`` only with a constant
            operand, a bias). See :mod:`compressor.passes._output_qdq`.
        output_only_after: When not empty, the output pair is written only where the
            output moved past one of these ops (ONNX Runtime runs a MatMul without an
            output Q as MatMulIntegerToFloat, in int8, except a 2-D one with a bias Add,
            which it turns into a float Gemm first).
        output_required: The backend runs the op in int8 only with the output pair: a layer
            whose output gets none (it flows into a graph output, or a reader reads it in
            float) stays float, weight included (ONNX Runtime runs ``DQ(x), DQ(w) -> Conv``
            without a ``Q`` as a float Conv that dequantizes its weight at every call:
            slower than the float model, and less accurate).
        min_output_channels: Quantize a layer only with at least this many output channels
            (0: any). ONNX Runtime's int8 convolution is slower than its float one for
            very few output channels (8 on AVX2: 1.8x-6.8x slower in basic-pitch).
        float_weight_below: A layer whose weight has fewer than this many (output channel,
            input channel) pairs, ``O · I/g``, keeps its weight float and only its input
            pair (0: none): OpenVINO's int8 convolution vectorises over channels, and a
            single-channel filter (basic-pitch's decimation filters, ``W [1, 1, 1, 256]``)
            ran 2x slower in int8 than in f32 (12.3 vs 6.3 ms for the eight); the pair keeps
            its producer writing u8.
        shared_scale_inputs: Further constant inputs stored quantized with the weight's spec
            and the *same* per-channel scales, taken over all of them (an LSTM's recurrence
            weight ``R``, input 2, with its ``W``: OpenVINO's int8 LSTM reads one scale per
            gate row for both).
        constant_inputs: Inputs that must be absent or constant for the backend's integer
            kernel (an LSTM's initial states, inputs 5 and 6: OpenVINO's int8 LSTM does not
            compile with states that are activations, silero-vad's); a node with such an
            input computed at run time is left float.
        state_range: A range the activation grid must also hold, because the kernel
            quantizes a state of its own on that grid (an LSTM's hidden state, in
            ``(-1, 1)``, on the grid of its input ``X`` in OpenVINO): the calibrated range
            is widened to cover it.
    """

    activations: QuantSpec
    weights: QuantSpec | None = None
    weight_input: int = 1
    joins_after: frozenset[str] = frozenset()
    min_activations: int = 2
    sole_reader: bool = False
    output_required: bool = False
    min_output_channels: int = 0
    float_weight_below: int = 0
    shared_scale_inputs: tuple[int, ...] = ()
    constant_inputs: tuple[int, ...] = ()
    state_range: tuple[float, float] | None = None
    activation_only: QuantSpec | None = None
    output: QuantSpec | None = None
    output_after: frozenset[str] = frozenset()
    output_only_after: frozenset[str] = frozenset()
