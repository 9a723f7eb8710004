"""``qnn-legalize``: turn a QDQ model into one QNN HTP runs wholly quantized.

The name recipes use (``w8a8-npu``, ``w8a16-npu``) for four single-concern passes of the
``qnn-htp`` target package, run in this order:

1. ``qnn-clamp-sentinels`` (:mod:`compressor.targets.qnn_htp.sentinels`): ``finfo.min``
   mask constants become ``mask_value``, so a quantized mask has a finite range;
2. ``qnn-gathernd-to-gather`` (:mod:`compressor.targets.qnn_htp.gathernd`): ``GatherND``
   with constant indices, which HTP refuses on boolean masks, becomes ``Reshape``/``Gather``;
3. ``qnn-unroll-lstm`` (:mod:`compressor.targets.qnn_htp.unroll_lstm`): ``LSTM``, which the
   HTP library fails to finalize, becomes its time steps of MatMul/Sigmoid/Tanh/Mul/Add;
4. ``qnn-quantize-tensors`` (:mod:`compressor.targets.qnn_htp.quantize_tensors`): Q/DQ on
   every tensor ``quantize`` left float, int32 biases, HTP's fixed encodings, opset 21
   with 16-bit Q/DQ.

Each is registered on its own (importing this module registers them, so
``available_passes()`` lists them), for a recipe that wants only some; the stats of the
four are merged into this pass's report. Importing it also registers ``qnn-cpu-front-end``
(:mod:`compressor.targets.qnn_htp.front_end`), which a recipe places before ``quantize`` to
run a float front end (a log-spectrogram) on the CPU and the rest on HTP.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import onnx_ir as ir
from compressor.targets.qnn_htp.front_end import CpuFrontEnd  # noqa: F401  (registers qnn-cpu-front-end)
from compressor.targets.qnn_htp.gathernd import GatherNdToGather
from compressor.targets.qnn_htp.quantize_tensors import QuantizeTensors, QuantizeTensorsOptions
from compressor.targets.qnn_htp.sentinels import ClampSentinels, ClampSentinelsOptions
from compressor.targets.qnn_htp.unroll_lstm import UnrollLstm, UnrollLstmOptions

from compressor.pipeline import Pass, PassContext, PassResult, register_pass

__all__ = ["QnnLegalize", "QnnLegalizeOptions"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QnnLegalizeOptions:
    """Options of ``qnn-legalize``.

    Attributes:
        activations: Width of the tensors ``quantize`` left float (``int16``: W8A16).
        calibrator: How their ranges are chosen (min/max keeps outliers, see docs/design.md).
        mask_value: What sentinel constants (``finfo.min`` masks) become.
        lstm_gates: Activation width of an unrolled LSTM's gate pre-activations
            (``qnn-unroll-lstm``'s ``gates``: ``int16`` whatever ``activations`` is).
        lstm_cell: The same for its cell state (``qnn-unroll-lstm``'s ``cell``).
        roots: Width of square roots and the powers they read (``qnn-quantize-tensors``'s).
        carried_states: Width of a state carried from one call to the next (``qnn-quantize-tensors``'s).
        norms: Width of a normalization and the residual sum it reads (``qnn-quantize-tensors``'s).
        attention: Width of every node but the compute layers in a model with attention
            blocks (``qnn-quantize-tensors``'s).
        weights: How a MatMul/Gemm weight ``quantize`` left float (an unrolled LSTM's) is
            stored, as ``quantize``'s option of that name (``qnn-quantize-tensors``' case 4).
        concats: Width of a Concat of ranges far apart (``qnn-quantize-tensors``').
    """

    activations: Literal["int8", "int16"] = "int8"
    calibrator: Literal["minmax", "percentile", "mse"] = "minmax"
    mask_value: float = -100.0
    lstm_gates: Literal["int16", "int8"] = "int16"
    lstm_cell: Literal["int16", "int8"] = "int16"
    roots: Literal["int16", "int8"] = "int16"
    carried_states: Literal["int16", "int8"] = "int16"
    norms: Literal["int16", "int8"] = "int16"
    attention: Literal["int16", "int8"] = "int16"
    weights: Literal["int8-per-channel", "int8-per-tensor"] = "int8-per-channel"
    concats: Literal["int16", "int8"] = "int16"

    def __post_init__(self) -> None:
        ClampSentinelsOptions(self.mask_value)  # one range check, the sub-pass's


@register_pass
class QnnLegalize(Pass):
    """``qnn-clamp-sentinels``, ``qnn-gathernd-to-gather``, ``qnn-unroll-lstm``, ``qnn-quantize-tensors`` (module docstring)."""

    name = "qnn-legalize"
    lossy = True
    description = "complete a QDQ model for QNN HTP: Q/DQ on every op, int32 biases, fixed encodings"
    Options = QnnLegalizeOptions
    requires = QuantizeTensors.requires
    provides = QuantizeTensors.provides
    needs_calibration = True

    def steps(self) -> list[Pass]:
        """The four passes, with this pass's options."""
        opts: QnnLegalizeOptions = self.options
        return [ClampSentinels(ClampSentinelsOptions(opts.mask_value)), GatherNdToGather(),
                UnrollLstm(UnrollLstmOptions(opts.lstm_gates, opts.lstm_cell)),
                QuantizeTensors(QuantizeTensorsOptions(opts.activations, opts.calibrator, opts.weights, opts.roots,
                                                       opts.carried_states, opts.norms, opts.attention,
                                                       opts.concats))]

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        modified, stats = False, {}
        for step in self.steps():
            result = step.run(model, ctx)
            model, modified = result.model, modified or result.modified
            stats.update(result.stats)
        return PassResult(model, modified, stats)
