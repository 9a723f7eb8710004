"""``qnn-legalize``: turn a QDQ model into one QNN HTP runs wholly quantized.

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
2. each node runs at one width ``b`` (16 when the recipe asks for 16-bit activations or a
   reader of its output is a 16-bit layer; a compute layer keeps the width ``quantize``
   gave it); an input of another width is requantized (``DQ_a -> Q_b -> DQ_b``, which
   QNN runs as a Convert);
3. biases of Conv/ConvTranspose/Gemm (and LayerNormalization's beta) become int32:
   ``b_q = round(b / (s_x * s_w))`` with scale ``s_x * s_w`` (per channel where ``s_w``
   is), zero point 0; LayerNormalization's gamma gets ``QdqRules.norm_weight``;
4. every other float constant a node reads (an Add's bias, a Mul's scale, an embedding
   table...) is quantized per tensor at the node's width over ``[min(c, 0), max(c, 0)]``,
   so scalars are exact;
5. sentinel constants (``|c| >= 1e30``, additive attention masks filled with
   ``finfo.min``) are replaced by ``mask_value``: quantized, a mask must have a finite
   range, and ``exp(mask_value)`` is 0 in float32 already at -100;
6. ``GatherND`` with constant indices (``batch_dims = 0``, static data shape), which HTP
   refuses on boolean masks, becomes ``Reshape`` (indices that enumerate the data in
   order) or ``Reshape -> Gather`` with the flattened indices
   ``sum_i idx_i * stride_i``: the same elements in the same order;
7. the opset is raised to ``QdqRules.wide_opset`` (21) when a 16-bit Q/DQ is present.

Tensors that cannot be quantized (calibration saw NaN/inf) are listed in ``stats["kept_float"]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common is not imported by onnx_ir itself)
from compressor.passes._graph import NameAllocator, add_initializer

from compressor.errors import CompressorError
from compressor.model_io import model_bytes
from compressor.pipeline import Pass, PassContext, PassResult, register_pass
from compressor.quant.math import quant_params, quantize_array
from compressor.quant.spec import QuantSpec
from compressor.quant.statistics import SENTINEL
from compressor.quant.taps import collect_statistics

__all__ = ["QnnLegalize", "QnnLegalizeOptions"]

logger = logging.getLogger(__name__)

_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
_BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
_NORMS = frozenset({"LayerNormalization", "InstanceNormalization", "BatchNormalization", "GroupNormalization"})
_WIDE = {"uint8": "uint16", "int8": "int16"}
_INT_DTYPES = {ir.DataType.UINT8: "uint8", ir.DataType.INT8: "int8", ir.DataType.UINT16: "uint16",
               ir.DataType.INT16: "int16", ir.DataType.INT32: "int32"}


@dataclasses.dataclass(frozen=True)
class QnnLegalizeOptions:
    """Options of ``qnn-legalize``.

    Attributes:
        activations: Width of the tensors ``quantize`` left float (``int16``: W8A16).
        calibrator: How their ranges are chosen (min/max keeps outliers, see docs/design.md).
        mask_value: What sentinel constants (``finfo.min`` masks) become (case 5).
    """

    activations: Literal["int8", "int16"] = "int8"
    calibrator: Literal["minmax", "percentile", "mse"] = "minmax"
    mask_value: float = -100.0

    def __post_init__(self) -> None:
        if not -1e4 <= self.mask_value <= -10.0:
            raise ValueError(f"option 'mask_value' must be in [-1e4, -10], got {self.mask_value}")


@dataclasses.dataclass
class _Encoding:
    """One quantized view of a tensor: its parameters and the DQ output readers use."""

    dtype: str
    scale: np.ndarray
    zero_point: np.ndarray
    value: ir.Value

    @property
    def bits(self) -> int:
        return 16 if "16" in self.dtype else 8

    def same(self, other: _Encoding) -> bool:
        return (self.dtype == other.dtype and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.zero_point, other.zero_point))

    def range(self) -> tuple[float, float]:
        info = np.iinfo(np.dtype(self.dtype))
        s, z = float(self.scale), float(self.zero_point)
        return (info.min - z) * s, (info.max - z) * s


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in _FLOATS


def _const_array(value: ir.Value) -> np.ndarray | None:
    """The value of a constant (a non-input initializer), else ``None``."""
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    return None


def _dq_encoding(value: ir.Value) -> _Encoding | None:
    """The encoding of ``value`` when it is the output of an activation DequantizeLinear."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 3:
        return None
    scale, zp = dq.inputs[1], dq.inputs[2]
    if scale is None or zp is None or scale.const_value is None or zp.const_value is None:
        return None
    if scale.const_value.numpy().size != 1 or zp.const_value.dtype not in _INT_DTYPES:
        return None
    return _Encoding(_INT_DTYPES[zp.const_value.dtype], scale.const_value.numpy(), zp.const_value.numpy(), value)


def _q_params(q: ir.Node) -> tuple[str, np.ndarray, np.ndarray] | None:
    scale, zp = q.inputs[1], q.inputs[2] if len(q.inputs) > 2 else None
    if scale is None or zp is None or scale.const_value is None or zp.const_value is None:
        return None
    if zp.const_value.dtype not in _INT_DTYPES or scale.const_value.numpy().size != 1:
        return None
    return _INT_DTYPES[zp.const_value.dtype], scale.const_value.numpy(), zp.const_value.numpy()


def _activation_q_readers(value: ir.Value) -> list[tuple[ir.Node, ir.Node]]:
    """``(Q, DQ)`` pairs reading ``value`` (what ``quantize`` inserted)."""
    pairs = []
    for user, _ in value.uses():
        if user.op_type != "QuantizeLinear" or user.inputs[0] is not value:
            continue
        dqs = [u for u, _ in user.outputs[0].uses() if u.op_type == "DequantizeLinear"]
        if len(dqs) == 1 and len(user.outputs[0].uses()) == 1:
            pairs.append((user, dqs[0]))
    return pairs


def _stripped(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every activation Q -> DQ pair bypassed (weights stay dequantized)."""
    clone = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for node in list(clone.graph):
        if node.op_type != "QuantizeLinear":
            continue
        for dq, _ in list(node.outputs[0].uses()):
            if dq.op_type == "DequantizeLinear":
                dq.outputs[0].replace_all_uses_with(node.inputs[0], replace_graph_outputs=False)
    ir.passes.common.RemoveUnusedNodesPass()(clone)
    return clone


class _Writer:
    """Adds Q/DQ nodes and quantized constants to the graph."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.names = NameAllocator(graph)
        taken = {n.name for n in graph if n.name}
        self.node_names = lambda base: self._fresh_node_name(base, taken)
        self.nodes: list[ir.Node] = []  # added to the graph by flush()
        self.const_cache: dict[tuple[int, str], ir.Value] = {}
        self.counts = {"qdq_added": 0, "requantized": 0, "constants_quantized": 0, "biases_int32": 0,
                       "fixed_encodings": 0, "shared_encodings": 0, "reused_encodings": 0}

    @staticmethod
    def _fresh_node_name(base: str, taken: set[str]) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def _init(self, name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, self.names(name), array)

    def qdq(self, value: ir.Value, dtype: str, scale: np.ndarray, zp: np.ndarray) -> _Encoding:
        """``value -> Q -> DQ``; the DQ output is what readers use."""
        base = value.name or "t"
        s = self._init(f"{base}_scale", np.asarray(scale, np.float32).reshape(()))
        z = self._init(f"{base}_zero_point", np.asarray(zp).astype(np.dtype(dtype)).reshape(()))
        q = ir.node("QuantizeLinear", [value, s, z], name=self.node_names(f"{base}_QuantizeLinear"))
        q.outputs[0].name = self.names(f"{base}_quantized")
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=self.node_names(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = self.names(f"{base}_dequantized")
        dq.outputs[0].type, dq.outputs[0].shape = value.type, value.shape
        self.nodes += [q, dq]
        self.counts["qdq_added"] += 1
        return _Encoding(dtype, s.const_value.numpy(), z.const_value.numpy(), dq.outputs[0])

    def constant(self, value: ir.Value, array: np.ndarray, spec: QuantSpec, axis: int | None = None,
                 scale: np.ndarray | None = None) -> ir.Value:
        """``DQ(quantized constant)``; ``scale`` given: int32 with that scale and zero point 0 (a bias)."""
        key = (id(value), f"{spec.dtype}:{axis}:{None if scale is None else scale.tobytes().hex()}")
        if key in self.const_cache:
            return self.const_cache[key]
        array = np.asarray(array, np.float32)
        base = value.name or "const"
        if scale is not None:
            scale = np.asarray(scale, np.float32)
            limit = np.iinfo(np.int32).max
            q = np.clip(np.rint(array.astype(np.float64) / (scale if axis is None else scale.reshape(
                [-1] + [1] * (array.ndim - 1)))), -limit, limit).astype(np.int32)
            zp = np.zeros(scale.shape, np.int32)
            self.counts["biases_int32"] += 1
        else:
            flat = array.reshape(-1)
            lo, hi = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 0.0)
            if lo == hi == 0.0:  # an all-zero constant: any scale is exact; keep it a sane one
                hi = 1.0
            scale, zp = quant_params(lo, hi, spec)
            q = quantize_array(array, scale, zp, spec)
            self.counts["constants_quantized"] += 1
        q_value = self._init(f"{base}_quantized", q)
        s = self._init(f"{base}_scale", scale)
        z = self._init(f"{base}_zero_point", zp)
        attrs = {"axis": axis} if axis is not None and np.asarray(scale).ndim == 1 else {}
        dq = ir.node("DequantizeLinear", [q_value, s, z], attributes=attrs, name=self.node_names(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = self.names(f"{base}_dequantized")
        dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(array.shape)
        self.nodes.append(dq)
        self.const_cache[key] = dq.outputs[0]
        return dq.outputs[0]

    def flush(self) -> None:
        """Add the new nodes to the graph (the caller sorts it topologically)."""
        self.graph.extend(self.nodes)
        self.nodes.clear()


@register_pass
class QnnLegalize(Pass):
    """Quantize every tensor, bias and constant the way QNN HTP needs (module docstring)."""

    name = "qnn-legalize"
    lossy = True
    description = "complete a QDQ model for QNN HTP: Q/DQ on every op, int32 biases, fixed encodings"
    Options = QnnLegalizeOptions
    requires = frozenset({"quantized"})
    provides = frozenset({"qnn-legalized"})
    needs_calibration = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts: QnnLegalizeOptions = self.options
        if ctx.calibration is None:
            raise CompressorError("qnn-legalize needs calibration data: pass --calib samples.npz")
        from compressor.targets.qnn_htp import (
            HTP_QDQ_RULES,  # the pass serves QNN; rules may come from the target
        )

        rules = getattr(ctx.target, "qdq_rules", None) or HTP_QDQ_RULES
        quantizable = set(ctx.target.capabilities.quantizable) if ctx.target is not None else {"Conv", "MatMul"}
        ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        graph = model.graph
        clamped = self._clamp_sentinels(graph, opts.mask_value)
        gathers = self._gathernd_to_gather(graph)
        default_bits = 16 if opts.activations == "int16" else 8
        # The ranges of the float model (activation Q/DQ bypassed): stable across accuracy
        # control's rebuilds, so they are calibrated once.
        float_model = _stripped(model)
        wanted = sorted({v.name for v in self._activations(float_model.graph)})
        cache = ctx.cache.setdefault("qnn-legalize.stats:" + hashlib.sha256(model_bytes(float_model)).hexdigest(), {})
        missing = [n for n in wanted if n not in cache]
        if missing:
            cache.update(collect_statistics(float_model, missing, ctx.calibration, bar=ctx.progress))
        writer = _Writer(graph)
        enc: dict[int, _Encoding] = {}
        kept: dict[str, str] = {}

        def spec_for(bits: int) -> QuantSpec:
            dtype = rules.activation.dtype
            return dataclasses.replace(rules.activation, dtype=_WIDE.get(dtype, dtype) if bits == 16 else dtype)

        def calibrated(value: ir.Value, bits: int) -> _Encoding | None:
            stats = cache.get(value.name)
            problem = stats.problem() if stats is not None else f"tensor {value.name!r} was not calibrated"
            if problem:
                kept[value.name] = problem
                return None
            kwargs = {"num_bits": bits} if opts.calibrator == "mse" else {}
            lo, hi = stats.range(opts.calibrator, **kwargs)
            spec = spec_for(bits)
            scale, zp = quant_params(lo, hi, spec)
            return writer.qdq(value, spec.dtype, scale, zp)

        def encode_output(value: ir.Value, node: ir.Node | None, bits: int, first_input: _Encoding | None) -> None:
            """Give ``value`` its encoding (case 1) and route the quantize pass's Q readers to it."""
            readers = _activation_q_readers(value)
            dtype = spec_for(bits).dtype
            chosen: _Encoding | None = None
            fixed = rules.fixed_outputs.get((node.op_type, dtype)) if node is not None else None
            if fixed is not None:  # case 1a
                chosen = writer.qdq(value, dtype, np.float32(fixed[0]), np.asarray(fixed[1]))
                writer.counts["fixed_encodings"] += 1
            elif node is not None and node.op_type in rules.same_encoding and first_input is not None \
                    and first_input.bits == bits:  # case 1b
                chosen = writer.qdq(value, first_input.dtype, first_input.scale, first_input.zero_point)
                writer.counts["shared_encodings"] += 1
            else:
                for q, dq in readers:  # case 1c
                    params = _q_params(q)
                    if params is not None and params[0] == dtype:
                        chosen = _Encoding(params[0], params[1], params[2], dq.outputs[0])
                        writer.counts["reused_encodings"] += 1
                        break
                if chosen is None:  # case 1d
                    chosen = calibrated(value, bits)
            if chosen is None:
                return
            enc[id(value)] = chosen
            for q, dq in readers:
                if dq.outputs[0] is chosen.value:
                    continue
                params = _q_params(q)
                if params is not None and params[0] == chosen.dtype:  # one encoding per tensor and width
                    dq.outputs[0].replace_all_uses_with(chosen.value, replace_graph_outputs=True)
                else:
                    q.replace_input_with(0, chosen.value)  # a requantization (QNN Convert)
                    writer.counts["requantized"] += 1

        converts: dict[tuple[int, int], _Encoding] = {}

        def read_as(value: ir.Value, bits: int) -> _Encoding | None:
            """The encoding a reader at width ``bits`` reads ``value`` through (case 2)."""
            have = _dq_encoding(value) or enc.get(id(value))
            if have is None or have.bits == bits:
                return have
            key = (id(have.value), bits)
            if key not in converts:  # DQ_a -> Q_b -> DQ_b over the same real range
                spec = spec_for(bits)
                scale, zp = quant_params(*have.range(), spec)
                converts[key] = writer.qdq(have.value, spec.dtype, scale, zp)
                writer.counts["requantized"] += 1
            return converts[key]

        for value in graph.inputs:
            if _is_float(value) and value.const_value is None:
                bits = max([default_bits] + [16 for q, _ in _activation_q_readers(value)
                                             if (_q_params(q) or ("",))[0].endswith("16")])
                encode_output(value, None, bits, None)

        for node in list(graph):
            if node.op_type in _QDQ or node.domain not in ("", "ai.onnx"):
                continue
            layer_input = node.inputs[0] if node.inputs else None
            layer_enc = _dq_encoding(layer_input) if layer_input is not None else None
            is_layer = node.op_type in quantizable and layer_enc is not None
            if is_layer:
                bits = layer_enc.bits
            else:
                out_q = [(_q_params(q) or ("",))[0] for out in node.outputs for q, _ in _activation_q_readers(out)]
                bits = 16 if default_bits == 16 or any(d.endswith("16") for d in out_q) else 8
            first_input: _Encoding | None = None
            for index, value in enumerate(node.inputs):
                if value is None or not _is_float(value):
                    continue
                const = _const_array(value)
                if const is not None:
                    new = self._constant_input(writer, node, index, value, const, spec_for(bits), rules)
                    if new is not None:
                        node.replace_input_with(index, new)
                        if index == 0:
                            first_input = _dq_encoding(new)
                    continue
                if is_layer and _dq_encoding(value) is not None:
                    if index == 0:
                        first_input = _dq_encoding(value)
                    continue
                got = read_as(value, bits)
                if got is None:  # kept float (listed in stats["kept_float"])
                    continue
                if got.value is not value:
                    node.replace_input_with(index, got.value)
                if index == 0:
                    first_input = got
            for out in node.outputs:
                if _is_float(out):
                    encode_output(out, node, bits, first_input)

        writer.flush()
        # Graph outputs: the DQ output takes the output's name (case 1).
        for i, out in enumerate(list(graph.outputs)):
            e = enc.get(id(out))
            if e is None or e.value is out:
                continue
            name = out.name
            out.name = writer.names(f"{name}_float")
            e.value.name = name
            graph.outputs[i] = e.value
        ir.passes.common.RemoveUnusedNodesPass()(model)
        ir.passes.common.TopologicalSortPass()(model)
        wide = any(n.op_type in _QDQ and any(v is not None and v.dtype in (ir.DataType.UINT16, ir.DataType.INT16)
                                             for v in (*n.inputs, *n.outputs)) for n in graph)
        if wide:
            model.opset_imports[""] = max(model.opset_imports.get("", 13), rules.wide_opset)  # case 7
        for name, why in sorted(kept.items()):
            logger.info("qnn-legalize: kept float: %s", why)
        modified = bool(clamped or gathers or any(writer.counts.values()))
        return PassResult(model, modified, {**writer.counts, "sentinels_clamped": clamped,
                                            "gathernd_rewritten": gathers,
                                            "kept_float": dict(sorted(kept.items()))})

    @staticmethod
    def _activations(graph: ir.Graph) -> list[ir.Value]:
        """Float tensors computed at run time: float graph inputs and outputs of non-Q/DQ nodes."""
        out = [v for v in graph.inputs if _is_float(v) and v.const_value is None]
        for node in graph:
            if node.op_type in _QDQ:
                continue
            out.extend(v for v in node.outputs if _is_float(v))
        return out

    @staticmethod
    def _gathernd_to_gather(graph: ir.Graph) -> int:
        """Case 6: ``GatherND(data, constant indices)`` -> ``Reshape`` or ``Reshape -> Gather``."""
        names = NameAllocator(graph)
        count = 0
        for node in list(graph):
            if node.op_type != "GatherND" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            batch_dims = node.attributes.get("batch_dims")
            data, indices = node.inputs[0], node.inputs[1]
            idx = _const_array(indices) if indices is not None else None
            if (batch_dims is not None and batch_dims.as_int() != 0) or idx is None or data is None \
                    or data.shape is None or not all(isinstance(d, int) for d in data.shape):
                continue
            dims = [int(d) for d in data.shape]
            k = idx.shape[-1]
            lead, rest = dims[:k], dims[k:]
            coords = np.mod(idx.reshape(-1, k).astype(np.int64), np.asarray(lead, np.int64))
            flat = np.ravel_multi_index(tuple(coords.T), lead) if k else np.zeros(len(coords), np.int64)
            out_shape = [*idx.shape[:-1], *rest]
            out = node.outputs[0]
            total = int(np.prod(lead)) if lead else 1
            base = node.name or "gathernd"
            if flat.size == total and np.array_equal(flat, np.arange(total)):
                shape = add_initializer(graph, names(f"{base}_shape"), np.asarray(out_shape, np.int64))
                new = [ir.node("Reshape", [data, shape], name=names(f"{base}_as_reshape"))]
            else:
                shape = add_initializer(graph, names(f"{base}_flat_shape"), np.asarray([total, *rest], np.int64))
                where = add_initializer(graph, names(f"{base}_flat_indices"), flat.reshape(idx.shape[:-1]))
                reshape = ir.node("Reshape", [data, shape], name=names(f"{base}_flatten"))
                reshape.outputs[0].name = names(f"{base}_flat")
                new = [reshape, ir.node("Gather", [reshape.outputs[0], where], attributes={"axis": 0},
                                        name=names(f"{base}_as_gather"))]
            graph.insert_after(node, new)
            result = new[-1].outputs[0]
            result.type, result.shape = out.type, ir.Shape(out_shape)
            name = out.name
            out.replace_all_uses_with(result, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            result.name = name
            count += 1
        return count

    @staticmethod
    def _clamp_sentinels(graph: ir.Graph, mask_value: float) -> int:
        """Case 5: float constants holding ``|c| >= 1e30`` get ``sign(c) * |mask_value|`` there."""
        count = 0
        for name, value in list(graph.initializers.items()):
            array = _const_array(value)
            if array is None or array.dtype.kind != "f":
                continue
            mask = np.abs(array.astype(np.float64)) >= SENTINEL
            if not mask.any():
                continue
            fixed = np.where(mask, np.sign(array) * abs(mask_value), array).astype(array.dtype)
            value.const_value = ir.tensor(fixed, name=name)
            count += 1
        return count

    @staticmethod
    def _constant_input(writer: _Writer, node: ir.Node, index: int, value: ir.Value, array: np.ndarray,
                        act: QuantSpec, rules: object) -> ir.Value | None:
        """The DQ a node reads instead of float constant input ``index`` (cases 3 and 4)."""
        if node.op_type in _BIAS_OPS and index == 2 or node.op_type in _NORMS and index == 2:
            x = _dq_encoding(node.inputs[0]) if node.inputs[0] is not None else None
            w = node.inputs[1]
            w_dq = w.producer() if w is not None else None
            if x is None or w_dq is None or w_dq.op_type != "DequantizeLinear":
                return writer.constant(value, array, act)
            s_w = w_dq.inputs[1].const_value.numpy().astype(np.float64)
            scale = (float(x.scale) * s_w).astype(np.float32)
            axis = 0 if scale.ndim == 1 and scale.size > 1 else None
            return writer.constant(value, array, rules.bias, axis=axis, scale=scale.reshape(-1) if axis == 0
                                   else scale.reshape(()))
        if node.op_type in _NORMS and index == 1:
            return writer.constant(value, array, rules.norm_weight)
        return writer.constant(value, array, act)
