"""``qnn-quantize-tensors``: every tensor, bias and constant quantized, as QNN HTP runs them.

``quantize`` puts Q/DQ on the inputs of the compute layers only; HTP has no float path
(float ops become fp16 islands, or are refused on the device), so every tensor between
them must be quantized too. Run after ``quantize``; the target's :class:`QdqRules`
(``qnn-htp``: ``HTP_QDQ_RULES``) say what HTP expects. Node by node, in topological order:

1. every float activation tensor ``t`` (graph inputs and node outputs) gets one encoding,
   ``t -> Q -> DQ -> readers`` (graph outputs keep their name on the DQ), chosen as
   a. the fixed encoding HTP assumes for the op's output (Sigmoid ``1/65536``, Tanh
      ``1/32768`` offset 32768 at 16 bits; ``1/256``, ``1/128`` offset 128 at 8 bits);
   b. the encoding of the first input for data-movement ops (Reshape, Transpose,
      MaxPool, Gather...), which HTP requires to be the same on input and output;
   c. the encoding ``quantize`` already gave ``t`` for a compute layer, when of the same width;
   d. else the calibrated range ``[lo, hi]`` of ``t`` (on the model without activation
      Q/DQ): ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)`` (unsigned, asymmetric);
   e. where ``t`` is a SiLU's input (``Sigmoid(t)`` and ``Mul(t, Sigmoid(t))`` its only
      readers), with ``lo`` raised to where SiLU is within half a step of 0 on its output's
      grid (:func:`~compressor.passes._output_ranges.silu_floor`): a convolution's output
      spans far below that (YOLOv8's: -18), values that all come out as ~0;
   f. for a Concat feeding another Concat through data movement only (a detector's levels),
      one encoding for the whole tree over the union of their ranges, 16 bits when a leaf
      input spans under 1/16 of it (case 2h judged on the tree), its data movement at the
      tree's width (:mod:`.concat_trees`: HTP mishandled inner Concats of their own grid);
2. each node runs at one width ``b``: a compute layer keeps the width ``quantize`` gave it
   (accuracy control widens one to 16 bits); any other node runs at 16 bits when
   a. the recipe asks for 16-bit activations,
   b. a reader of its output is a 16-bit layer, or
   c. it carries ``rules.ACTIVATION_BITS`` ``"16"``, as ``qnn-unroll-lstm`` marks an
      LSTM's gate pre-activations and cell state,
   d. it is a square root ``QdqRules.root_inputs`` names (``Sqrt``) or computes its input
      through sums and squares, or
   e. it carries a state from one call to the next (a graph input and output joined by
      elementwise and data-movement ops only; the input is encoded at 16 bits too), or
   f. it is a normalization (``LayerNormalization``) or the residual ``Add`` it reads: all
      three in :mod:`.widen`, with why and what they cost at 8 bits;
   g. the model has attention blocks (:mod:`compressor.passes._attention`, found on the
      float model): every node but the compute layers (the bias and residual adds, GELU,
      the score scaling and mask, Softmax, LayerNorm, the head reshapes) runs at 16 bits,
      so at W8A8 only the inputs of the weight MatMuls (the FLOPs) are 8-bit. MiniLM on
      HTP: 8-bit glue cost 0.14 of token cosine (docs/design.md, "MiniLM on HTP");
      option ``attention: int8`` turns it off;
   h. it is a Concat with an input spanning under 1/16 of its output's range (a detector's
      scores beside its boxes; :mod:`.widen`, case 4); option ``concats: int8`` turns it off;
   else at 8. An input of another width is requantized (``DQ_a -> Q_b -> DQ_b`` over the
   same real range, which QNN runs as a Convert);
3. biases of Conv/ConvTranspose/Gemm (and LayerNormalization's beta) become int32:
   ``b_q = round(b / (s_x * s_w))`` with scale ``s_x * s_w`` (per channel where ``s_w``
   is: along the bias's last axis, the output channels; a Gemm's ``C`` of shape ``[1, N]``
   or broadcast from fewer is written ``[N]``, the shape the QNN EP's FullyConnected takes),
   zero point 0; LayerNormalization's gamma gets ``QdqRules.norm_weight``;
4. the constant weight (input 1) of a MatMul/Gemm that ``quantize`` did not quantize (an
   unrolled LSTM's, or a layer the recipe's scope left out: HTP has no float path, so it
   runs as the target's layers do) gets the target's weight spec for that op (``int8``
   symmetric on HTP), at any activation width, as ``quantize``'s layers: per output channel
   (the layer's own axis: a MatMul's last, a Gemm's by ``transB``) where the spec has an
   axis and option ``weights`` is ``int8-per-channel``, else per tensor;
   every other float constant a node reads (an Add's bias, a Mul's scale, an embedding
   table...) is quantized per tensor at the node's width over ``[min(c, 0), max(c, 0)]``,
   so scalars are exact; except the inputs ``QdqRules.float_params`` names (Resize's roi
   and scales), which the QNN EP reads as op parameters and which stay float;
5. 16-bit Q/DQ need opset 21: the Q/DQ writer (:mod:`compressor.quant.qdq`) converts the
   model when it writes one.

6. an input ``QdqRules.relative_inputs`` names (``Log``'s) whose encoding rounds at least
   ``underflow.FLOOR_WARN`` of its calibrated values to 0 is named in ``stats["rounded_to_floor"]``
   and a warning (:mod:`.underflow`): those values leave the op at its output's floor.
7. nodes of a CPU front end (``targets.base.RUNS_ON``, marked by ``qnn-cpu-front-end``,
   :mod:`.front_end`) stay float with float constants; each tensor they hand to an HTP node
   or the graph's outputs is encoded as in case 1 (quantize's own pair reused where its
   layer reads it), and a front-end node never reads through a Q/DQ pair.

Before the walk, ``Pow(x, 2)`` is written ``Mul(x, x)`` (the same float result; HTP's
16-bit power is far less exact than its ``Mul``: :mod:`.widen`).

Constants and activations are handled in one walk because they depend on each other: a
bias's scale needs its layer input's encoding (assigned earlier in the same walk when
``quantize`` left that input float, LayerNormalization's), and a Gather from a constant
table gives its output the table's encoding (case 1b). Tensors that cannot be quantized
(calibration saw NaN/inf) are listed in ``stats["kept_float"]``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common is not imported by onnx_ir itself)
from compressor.passes._graph import label
from compressor.passes._output_ranges import silu_floor, silu_output
from compressor.passes._transformer_preset import attention_blocks
from compressor.targets.base import on_cpu
from compressor.targets.qnn_htp.qdq_graph import (
    QDQ_OPS,
    Encoding,
    activation_q_readers,
    const_array,
    dq_encoding,
    dtype_of,
    is_float,
    qdq_params,
    runtime_floats,
    stripped_model,
)
from compressor.targets.qnn_htp.concat_trees import ConcatTree, concat_trees
from compressor.targets.qnn_htp.constants import ConstantEncoder
from compressor.targets.qnn_htp.front_end import handed_over
from compressor.targets.qnn_htp.equivalents import fold_gemm_coefficients, selu_as_elu
from compressor.targets.qnn_htp.rules import ACTIVATION_BITS, HTP_QDQ_RULES, QdqRules
from compressor.targets.qnn_htp.underflow import floor_reason
from compressor.targets.qnn_htp.widen import (
    carried_states,
    describe,
    mixed_concats,
    norm_chains,
    root_chains,
    squares_as_mul,
)

from compressor.errors import CompressorError
from compressor.pipeline import Pass, PassContext, PassResult, register_pass
from compressor.quant.math import quant_params
from compressor.quant.qdq import QdqWriter
from compressor.quant.spec import QuantSpec
from compressor.quant.statistics import TensorStats
from compressor.quant.taps import StatPoint, gather

__all__ = ["QuantizeTensors", "QuantizeTensorsOptions"]

logger = logging.getLogger(__name__)

_WIDE = {"uint8": "uint16", "int8": "int16"}


@dataclasses.dataclass(frozen=True)
class QuantizeTensorsOptions:
    """Options of ``qnn-quantize-tensors``.

    Attributes:
        activations: Width of the tensors ``quantize`` left float (``int16``: W8A16).
        calibrator: How their ranges are chosen (min/max keeps outliers, see docs/design.md).
        weights: How a MatMul/Gemm weight ``quantize`` left float is stored (case 4), as
            ``quantize``'s option of that name: per output channel where the target's
            spec has an axis, or per tensor.
        roots: Width of square roots and the powers they read (case 2d; ``int8``: the recipe's).
        carried_states: Width of a state carried between calls (case 2e; ``int8``: the recipe's).
        norms: Width of a normalization and the residual sum it reads (case 2f; ``int8``: the recipe's).
        attention: Width of every node but the compute layers in a model with attention
            blocks (case 2g; ``int8``: the recipe's).
        concats: Width of a Concat of ranges far apart (case 2h; ``int8``: the recipe's).
    """

    activations: Literal["int8", "int16"] = "int8"
    calibrator: Literal["minmax", "percentile", "mse"] = "minmax"
    weights: Literal["int8-per-channel", "int8-per-tensor"] = "int8-per-channel"
    roots: Literal["int16", "int8"] = "int16"
    carried_states: Literal["int16", "int8"] = "int16"
    norms: Literal["int16", "int8"] = "int16"
    attention: Literal["int16", "int8"] = "int16"
    concats: Literal["int16", "int8"] = "int16"


def _front_end_only(value: ir.Value, graph: ir.Graph) -> bool:
    """Whether only nodes of the CPU front end read ``value`` (case 7)."""
    return bool(list(value.uses())) and not handed_over(value, graph)


def _front_end_reads_float(graph: ir.Graph) -> None:
    """Case 7: a front-end node that reads a tensor through a Q/DQ pair (one written for its
    HTP readers) reads the float tensor again, so the front end never depends on HTP's part."""
    for node in graph:
        if not on_cpu(node):
            continue
        for index, value in enumerate(node.inputs):
            dq = value.producer() if value is not None else None
            q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and not on_cpu(q):
                node.replace_input_with(index, q.inputs[0])


class _Legalizer(ConstantEncoder):
    """One run of the pass over a graph: the writer, the encodings given so far, the counts."""

    def __init__(self, graph: ir.Graph, rules: QdqRules, stats: dict[str, TensorStats],
                 opts: QuantizeTensorsOptions, quantizable: Mapping[str, QuantSpec | None], attention_glue: bool,
                 concats: Collection[str] = (), trees: Collection[ConcatTree] = ()):
        self.graph, self.rules, self.stats, self.opts, self.quantizable = graph, rules, stats, opts, quantizable
        self.writer = QdqWriter(graph)
        self.default_bits = 16 if opts.activations == "int16" else 8
        self.enc: dict[int, Encoding] = {}
        self.converts: dict[tuple[int, int], Encoding] = {}
        self.const_cache: dict[tuple[int, str], ir.Value] = {}
        self.kept: dict[str, str] = {}
        self.floored: dict[str, str] = {}
        self.counts = {"qdq_added": 0, "requantized": 0, "constants_quantized": 0, "biases_int32": 0,
                       "fixed_encodings": 0, "shared_encodings": 0, "reused_encodings": 0, "params_kept_float": 0,
                       "nodes_marked_16bit": 0, "cpu_nodes": 0, "silu_floors": 0}
        self.roots = root_chains(graph, rules) if opts.roots == "int16" else {}
        self.norms = norm_chains(graph, rules) if opts.norms == "int16" else {}
        self.carried = carried_states(graph, rules) if opts.carried_states == "int16" else {}
        self.wide_nodes = ({id(n) for chains in (self.roots, self.norms) for chain in chains.values() for n in chain}
                           | {i for ids in self.carried.values() for i in ids}
                           | {id(n) for n in graph if n.outputs and n.outputs[0].name in concats})  # 2h, 1f
        self.wide_inputs = {id(x) for x, _ in self.carried}
        self.attention_glue = attention_glue  # case 2g: found by run() on the float model
        self.tree_of = {name: tree.names for tree in trees for name in tree.names}  # case 1f

    def spec(self, bits: int) -> QuantSpec:
        dtype = self.rules.activation.dtype
        return dataclasses.replace(self.rules.activation, dtype=_WIDE.get(dtype, dtype) if bits == 16 else dtype)

    def pair(self, value: ir.Value, dtype: str, scale: np.ndarray, zp: np.ndarray) -> Encoding:
        """``value -> Q -> DQ`` with per-tensor parameters."""
        scale = np.asarray(scale, np.float32).reshape(())
        zp = np.asarray(zp).astype(np.dtype(dtype)).reshape(())
        self.counts["qdq_added"] += 1
        return Encoding(dtype, scale, zp, self.writer.pair(value, scale, zp))

    def calibrated(self, value: ir.Value, bits: int) -> Encoding | None:
        """Case 1d; ``None`` (the tensor kept float, with the reason) when its range is unusable."""
        stats = self.stats.get(value.name)
        problem = stats.problem() if stats is not None else f"tensor {value.name!r} was not calibrated"
        if problem:
            self.kept[value.name] = problem
            return None
        kwargs = {"num_bits": bits} if self.opts.calibrator == "mse" else {}
        spec = self.spec(bits)
        lo, hi = stats.range(self.opts.calibrator, **kwargs)
        for name in self.tree_of.get(value.name, ()):  # case 1f: the union of the tree's ranges
            other = self.stats.get(name)
            if other is not None and not other.problem():
                lo, hi = min(lo, other.range(self.opts.calibrator, **kwargs)[0]), \
                    max(hi, other.range(self.opts.calibrator, **kwargs)[1])
        floored = self.silu_floored(value, lo, hi, bits)
        self.counts["silu_floors"] += floored > lo
        return self.pair(value, spec.dtype, *quant_params(floored, hi, spec))

    def silu_floored(self, value: ir.Value, lo: float, hi: float, bits: int) -> float:
        """Case 1e: ``lo`` raised to where SiLU is within half a step of 0 on a ``bits`` grid of its
        output, when ``value`` is a SiLU's input (not a Concat tree's member: its grid is the tree's)."""
        silu = silu_output(value) if value.name not in self.tree_of else None
        stats = self.stats.get(silu.name) if silu is not None else None
        if stats is None or stats.problem():
            return lo
        kwargs = {"num_bits": bits} if self.opts.calibrator == "mse" else {}
        floor = silu_floor(stats.range(self.opts.calibrator, **kwargs), 2 ** bits - 1)
        return floor if lo < floor < hi else lo

    def encode_output(self, value: ir.Value, node: ir.Node | None, bits: int, first_input: Encoding | None) -> None:
        """Give ``value`` its encoding (case 1) and route ``quantize``'s Q readers to it."""
        readers = activation_q_readers(value)
        dtype = self.spec(bits).dtype
        chosen: Encoding | None = None
        fixed = self.rules.fixed_outputs.get((node.op_type, dtype)) if node is not None else None
        if fixed is not None:  # case 1a
            chosen = self.pair(value, dtype, np.float32(fixed[0]), np.asarray(fixed[1]))
            self.counts["fixed_encodings"] += 1
        elif node is not None and node.op_type in self.rules.same_encoding and first_input is not None \
                and first_input.bits == bits:  # case 1b
            chosen = self.pair(value, first_input.dtype, first_input.scale, first_input.zero_point)
            self.counts["shared_encodings"] += 1
        elif value.name in self.tree_of:  # case 1f: one encoding for a tree of Concats
            chosen = self.calibrated(value, bits)
        else:
            for q, dq in readers:  # case 1c
                params = qdq_params(q)
                if params is not None and params[0] == dtype:
                    chosen = Encoding(*params, dq.outputs[0])
                    self.counts["reused_encodings"] += 1
                    break
            if chosen is None:  # case 1d
                chosen = self.calibrated(value, bits)
        if chosen is None:
            return
        self.enc[id(value)] = chosen
        for q, dq in readers:
            if dq.outputs[0] is chosen.value:
                continue
            if dtype_of(q) == chosen.dtype:  # one encoding per tensor and width
                dq.outputs[0].replace_all_uses_with(chosen.value, replace_graph_outputs=True)
            else:
                q.replace_input_with(0, chosen.value)  # a requantization (QNN Convert)
                self.counts["requantized"] += 1

    def read_as(self, value: ir.Value, bits: int) -> Encoding | None:
        """The encoding a reader at width ``bits`` reads ``value`` through (case 2)."""
        have = dq_encoding(value) or self.enc.get(id(value))
        if have is None or have.bits == bits:
            return have
        key = (id(have.value), bits)
        if key not in self.converts:  # DQ_a -> Q_b -> DQ_b over the same real range
            spec = self.spec(bits)
            lo, hi = have.range()
            if bits < have.bits:  # a SiLU reading its 16-bit input (a layer given back) at 8: floored for 8 bits
                lo = self.silu_floored(value, lo, hi, bits)
            self.converts[key] = self.pair(have.value, spec.dtype, *quant_params(lo, hi, spec))
            self.counts["requantized"] += 1
        return self.converts[key]

    def graph_input(self, value: ir.Value) -> None:
        """Case 1 for a float graph input, at 16 bits when a 16-bit layer reads it or it carries a state (case 2e)."""
        wide = any(dtype_of(q).endswith("16") for q, _ in activation_q_readers(value)) or id(value) in self.wide_inputs
        self.encode_output(value, None, 16 if wide else self.default_bits, None)

    def node(self, node: ir.Node) -> None:
        """Cases 1-4 for one node: its width, its inputs read at that width, its outputs encoded."""
        layer_input = node.inputs[0] if node.inputs else None
        layer_enc = dq_encoding(layer_input) if layer_input is not None else None
        is_layer = node.op_type in self.quantizable and layer_enc is not None
        if is_layer:  # case 2: a compute layer keeps quantize's width
            bits = layer_enc.bits
        else:
            wide = any(dtype_of(q).endswith("16") for out in node.outputs for q, _ in activation_q_readers(out))
            marked = node.metadata_props.get(ACTIVATION_BITS) == "16"
            self.counts["nodes_marked_16bit"] += marked
            bits = 16 if (self.default_bits == 16 or wide or marked or id(node) in self.wide_nodes
                          or self.attention_glue) else 8
        first_input: Encoding | None = None
        params = self.rules.float_params.get(node.op_type, frozenset())
        for index, value in enumerate(node.inputs):
            if value is None or not is_float(value):
                continue
            const = const_array(value)
            if const is not None and index in params:  # case 4: an op parameter, kept float
                self.counts["params_kept_float"] += 1
                continue
            if const is not None:  # cases 3-4
                new = self.constant_input(node, index, value, const, self.spec(bits))
                node.replace_input_with(index, new)
                if index == 0:
                    first_input = dq_encoding(new)
                continue
            if is_layer and dq_encoding(value) is not None:  # quantize's own
                if index == 0:
                    first_input = dq_encoding(value)
                continue
            got = self.read_as(value, bits)
            if got is None:  # kept float (listed in stats["kept_float"])
                continue
            if index in self.rules.relative_inputs.get(node.op_type, ()):
                self.floor(node, value, got)
            if got.value is not value:
                node.replace_input_with(index, got.value)
            if index == 0:
                first_input = got
        for out in node.outputs:
            if is_float(out):
                self.encode_output(out, node, bits, first_input)

    def front_end(self, node: ir.Node) -> None:
        """Case 7: a node of the CPU front end stays float; each output it hands to HTP is encoded."""
        self.counts["cpu_nodes"] += 1
        for out in node.outputs:
            if is_float(out) and handed_over(out, self.graph):
                wide = (self.default_bits == 16 or id(node) in self.wide_nodes or self.attention_glue
                        or any(dtype_of(q).endswith("16") for q, _ in activation_q_readers(out)))
                self.encode_output(out, node, 16 if wide else 8, None)

    def floor(self, node: ir.Node, value: ir.Value, enc: Encoding) -> None:
        """Case 6: how much of an input ``QdqRules.relative_inputs`` names ``enc`` rounds to 0."""
        why = floor_reason(node.op_type, value.name, self.stats.get(value.name), enc.bits, float(enc.scale),
                           enc.range())
        if why:
            self.floored[label(node)] = why

    def name_outputs(self) -> None:
        """Graph outputs: the DQ output takes the output's name (case 1)."""
        for i, out in enumerate(list(self.graph.outputs)):
            e = self.enc.get(id(out))
            if e is None or e.value is out:
                continue
            name = out.name
            out.name = self.writer.names(f"{name}_float")
            e.value.name = name
            self.graph.outputs[i] = e.value


@register_pass
class QuantizeTensors(Pass):
    """Quantize every tensor, bias and constant the way QNN HTP needs (module docstring)."""

    name = "qnn-quantize-tensors"
    lossy = True
    description = "Q/DQ on every tensor quantize left float, int32 biases, HTP's fixed encodings (QNN HTP)"
    Options = QuantizeTensorsOptions
    requires = frozenset({"quantized"})
    provides = frozenset({"qnn-legalized"})
    needs_calibration = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts: QuantizeTensorsOptions = self.options
        if ctx.calibration is None:
            raise CompressorError(f"{self.name} needs calibration data: pass --calib samples.npz")
        rules: QdqRules = getattr(ctx.target, "qdq_rules", None) or HTP_QDQ_RULES
        quantizable = ({op: q.weights for op, q in ctx.target.capabilities.quantizable.items()}
                       if ctx.target is not None else {"Conv": None, "MatMul": None})
        ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        # before the calibration (a tensor a rewrite adds is calibrated) and the int32 biases
        gemms, selus = fold_gemm_coefficients(model.graph), selu_as_elu(model.graph)
        # The ranges of the float model (activation Q/DQ bypassed): stable across accuracy
        # control's rebuilds, so they are calibrated once.
        float_model = stripped_model(model)
        wanted = sorted({v.name for v in runtime_floats(float_model.graph)})
        found = gather(float_model, ctx.calibration, [StatPoint(n) for n in wanted], ctx.cache, bar=ctx.progress)
        cache = {point.tensor: stats for point, stats in found.items()}
        squares = squares_as_mul(model.graph)
        # case 2g on the float model: the attention finder reads through no Q/DQ
        blocks = attention_blocks(float_model.graph) if opts.attention == "int16" and opts.activations == "int8" else 0
        # (already 16 bits everywhere at W8A16 or with the attention glue: nothing to widen)
        concats = mixed_concats(float_model.graph, {name: (st.min, st.max) for name, st in cache.items()
                                                    if not st.problem()}, rules.same_encoding) \
            if opts.concats == "int16" and opts.activations == "int8" and not blocks else {}
        trees = concat_trees(float_model.graph, rules.same_encoding)  # case 1f; 2h judged per tree
        moves = {n.outputs[0].name for tree in trees if tree.root.outputs[0].name in concats for n in tree.between}
        for name, why in concats.items():
            logger.info("%s: %s at 16 bits: %s", self.name, name, why)
        run = _Legalizer(model.graph, rules, cache, opts, quantizable, blocks > 0, {*concats, *moves}, trees)
        for value in list(model.graph.inputs):
            if is_float(value) and value.const_value is None and not _front_end_only(value, model.graph):
                run.graph_input(value)
        for node in list(model.graph):
            if node.op_type not in QDQ_OPS and node.domain in ("", "ai.onnx"):
                if on_cpu(node):
                    run.front_end(node)
                else:
                    run.node(node)
        run.writer.flush()
        _front_end_reads_float(model.graph)
        carried = describe(run.carried, model.graph)  # before outputs are renamed and the model converted
        run.name_outputs()
        model = run.writer.finish(model)  # case 5: 16-bit Q/DQ convert the model to opset 21
        for why in run.kept.values():
            logger.info("%s: kept float: %s", self.name, why)
        for where, why in run.floored.items():
            logger.warning("%s: %s: %s", self.name, where, why)
        changed = any(n for key, n in run.counts.items() if key != "params_kept_float")
        return PassResult(model, changed,
                          {**run.counts, "squares_as_mul": squares, "gemm_coefficients_folded": gemms,
                           "selu_as_elu": selus, "roots_16bit": {root: [label(n) for n in chain]
                                                          for root, chain in sorted(run.roots.items())},
                           "carried_states_16bit": carried, "norms_16bit": len(run.norms),
                           "attention_blocks_16bit_glue": blocks, "concats_16bit": dict(sorted(concats.items())),
                           "kept_float": dict(sorted(run.kept.items())),
                           "rounded_to_floor": dict(sorted(run.floored.items()))})
