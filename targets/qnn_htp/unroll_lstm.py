"""``qnn-unroll-lstm``: an ONNX ``LSTM`` as its time steps of MatMul, Sigmoid, Tanh, Mul and Add.

Why: the QNN EP builds an ONNX LSTM as HTP's float ``Lstm`` op (its inputs are dequantized
first, so no quantized one is ever built), and the HTP library of onnxruntime-qnn fails to
*finalize* that op at every size (``QNN_COMMON_ERROR_MEM_ALLOC``, ``rules.UNFINALIZED_OPS``).
The same computation written with the ops it is made of runs on HTP, each op a quantized
node unit that ``qnn-quantize-tensors`` then encodes like any other.

The rule (ONNX LSTM, gate order ``i, o, f, c``; per direction ``d``, weights ``W_d``
``[4H, I]``, ``R_d`` ``[4H, H]``, bias ``b_d = Wb_d + Rb_d``)::

    G   = X W_dᵀ + b_d                               # [T, B, 4H], one MatMul for every step
    g_t = G[t] + H_{t-1} R_dᵀ                         # [1, B, 4H]
    i, o, f, c = g_t[..., :H], [H:2H], [2H:3H], [3H:]
    C_t = σ(f) ⊙ C_{t-1} + σ(i) ⊙ tanh(c)
    H_t = σ(o) ⊙ tanh(C_t)

1. ``forward`` runs ``t = 0 .. T-1``, ``reverse`` ``t = T-1 .. 0`` (``H_t`` stays at its
   time index in ``Y``), ``bidirectional`` both (direction 0 forward, 1 reverse);
2. ``initial_h``/``initial_c`` absent or all zeros: the first step has no recurrent term
   (``g = G[t]``, ``C = σ(i) ⊙ tanh(c)``), so no all-zero tensor is quantized;
3. ``Y`` ``[T, dirs, B, H]`` is the ``H_t`` concatenated, ``Y_h``/``Y_c`` ``[dirs, B, H]``
   the last step of each direction;
4. the gate pre-activations (``X W_dᵀ + b_d``, its per-step slices, ``H_{t-1} R_dᵀ``,
   ``g_t`` and its four gate slices) and the Sigmoid/Tanh that read them are marked to run
   with 16-bit activations (node metadata ``rules.ACTIVATION_BITS``; option ``gates:
   int8`` leaves them at the recipe's width). Why (ddddocr_common, docs/design.md): a
   pre-activation spans the whole calibrated range of every gate of every step, ``±160``
   on ddddocr's reverse direction, so an 8-bit step (1.28) is wider than the region where
   a sigmoid moves (``|x| < 4``); one encoding per tensor cannot be narrower, since the
   gates that saturate set the range. The marked Sigmoid/Tanh compute and encode their
   outputs (in ``[0, 1]`` and ``[-1, 1]``) at 16 bits too, and the cell's and hidden
   state's Muls requantize them to the recipe's width (a Convert each); the cell and hidden
   states stay at the recipe's width: on ddddocr widening them bought nothing measurable.
   The MatMul weights stay 8-bit (``qnn-quantize-tensors`` quantizes a MatMul's constant
   weight as the target's layers: int8 symmetric per output column, one scale per gate
   unit of ``W_dᵀ``/``R_dᵀ``; per tensor with ``qnn-legalize {weights: int8-per-tensor}``);
5. the cell state runs with 16-bit activations too (option ``cell: int8`` leaves it at the
   recipe's width): every step's ``σ(f) ⊙ C_{t-1}``, ``σ(i) ⊙ tanh(c)``, ``C_t`` and
   ``tanh(C_t)``, the slices of ``initial_h``/``initial_c`` and ``Y_c``'s Concat. Why
   (silero-vad, docs/design.md): a cell state spans a wide range (``±64`` in silero-vad v4:
   saturated cells accumulate) where most cells are small, so its 8-bit step (0.5) erases
   them. A state carried from one call to the next (silero-vad's ``state`` ->
   ``stateN``) is widened by ``qnn-quantize-tensors`` whatever computes it (:mod:`.widen`).

Exact in real arithmetic (float rounding differs by the order of the sums only). Slices,
reshapes and concatenations use no opset-dependent attribute (``Slice`` with inputs,
``Reshape``), so the rewrite is valid at the model's opset. An LSTM it cannot rewrite keeps
its node, and :func:`unroll_problem` is the reason ``lint`` gives: sequence lengths,
peepholes, ``clip``, ``input_forget``, ``layout = 1``, other activations, weights that are not
constants, or shapes that are not static.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common is not imported by onnx_ir itself)
from compressor.passes._graph import NameAllocator, add_initializer, label
from compressor.targets.base import on_cpu
from compressor.targets.qnn_htp.rules import ACTIVATION_BITS

from compressor.pipeline import Pass, PassContext, PassResult, register_pass

__all__ = ["UnrollLstm", "UnrollLstmOptions", "unroll_lstms", "unroll_problem"]

logger = logging.getLogger(__name__)

_DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def unroll_problem(node: ir.Node, folded: bool = True) -> str | None:
    """Why ``node`` (an ONNX LSTM) cannot be unrolled; ``None`` when it can.

    Args:
        node: The LSTM.
        folded: The model's constants are folded and its shapes inferred, so ``W``/``R``/``B``
            must be constants and the input's shape static now; ``lint`` passes ``False``
            (it sees the model before ``fold-constants``; a dynamic graph input is reported
            on its own, with the ``--input`` that fixes it).
    """
    attrs = node.attributes
    if _input(node, 4) is not None:
        return "it has sequence_lens (the unrolled steps assume every sequence is full)"
    if _input(node, 7) is not None:
        return "it has peephole weights P"
    for name, default in (("clip", None), ("input_forget", 0), ("layout", 0)):
        attr = attrs.get(name)
        if attr is not None and (default is None or attr.value != default):
            return f"attribute {name}={attr.value} is not rewritten"
    acts = attrs.get("activations")
    if acts is not None and tuple(acts.value) not in (_DEFAULT_ACTIVATIONS, _DEFAULT_ACTIVATIONS * 2):
        return f"activations {list(acts.value)} are not the default Sigmoid/Tanh/Tanh"
    if not folded:
        return None
    x = node.inputs[0]
    if x is None or x.shape is None or not all(isinstance(d, int) for d in x.shape):
        return "its input's shape is not static (fix it with --input)"
    for index, what in ((1, "W"), (2, "R"), (3, "B")):
        value = _input(node, index)
        if value is not None and _const(value) is None:
            return f"its {what} is not a constant"
    return None


@dataclasses.dataclass(frozen=True)
class UnrollLstmOptions:
    """Options of ``qnn-unroll-lstm``.

    Attributes:
        gates: Activation width of the gate pre-activations (module docstring, case 4):
            ``int16`` whatever the recipe's width, or ``int8``: the recipe's.
        cell: The same for the cell state (case 5).
    """

    gates: Literal["int16", "int8"] = "int16"
    cell: Literal["int16", "int8"] = "int16"


class _Builder:
    """Appends float nodes before one LSTM, each output typed and shaped (the walk after reads them)."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, base: str, wide_gates: bool = True,
                 wide_cell: bool = True):
        self.graph, self.anchor, self.base = graph, anchor, base
        self.wide = {"gate": wide_gates, "cell": wide_cell}
        self.values = NameAllocator(graph)
        self.nodes = NameAllocator.for_nodes(graph)
        self.new: list[ir.Node] = []

    def const(self, what: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, self.values(f"{self.base}_{what}"), array)

    def op(self, op_type: str, inputs: Sequence[ir.Value], shape: Sequence[int], what: str, gate: bool = False,
           cell: bool = False, **attributes: int) -> ir.Value:
        """A node before the LSTM; ``gate``: on the gate pre-activations' path (module docstring, case 4);
        ``cell``: on the cell state's or the carried state's (case 5)."""
        node = ir.node(op_type, list(inputs), attributes=attributes or None, name=self.nodes(f"{self.base}_{what}"))
        if (gate and self.wide["gate"]) or (cell and self.wide["cell"]):
            node.metadata_props[ACTIVATION_BITS] = "16"
        out = node.outputs[0]
        out.name = self.values(f"{self.base}_{what}")
        out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(list(shape))
        self.new.append(node)
        return out

    def slice(self, x: ir.Value, start: int, stop: int, axis: int, shape: Sequence[int], what: str,
              gate: bool = False, cell: bool = False) -> ir.Value:
        bounds = [self.const(f"{what}_{k}", np.array([v], np.int64)) for k, v in
                  (("starts", start), ("ends", stop), ("axes", axis))]
        return self.op("Slice", [x, *bounds], shape, what, gate, cell)

    def finish(self) -> None:
        self.graph.insert_before(self.anchor, self.new)


def _unroll(graph: ir.Graph, node: ir.Node, wide_gates: bool = True, wide_cell: bool = True) -> None:
    """Replace ``node`` by its steps (module docstring, cases 1-5)."""
    x = node.inputs[0]
    steps, batch, _ = (int(d) for d in x.shape)
    hidden = int(node.attributes["hidden_size"].value)
    direction = node.attributes["direction"].value if "direction" in node.attributes else "forward"
    dirs = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    w, r = _const(node.inputs[1]), _const(node.inputs[2])
    b = _const(_input(node, 3))
    init_h, init_c = _input(node, 5), _input(node, 6)
    b_ = _Builder(graph, node, node.name or "lstm", wide_gates, wide_cell)
    ys, last_h, last_c = [], [], []
    zero_h = init_h is None or (_const(init_h) is not None and not _const(init_h).any())  # case 2
    zero_c = init_c is None or (_const(init_c) is not None and not _const(init_c).any())
    step_shape, gate_shape = [1, batch, hidden], [1, batch, 4 * hidden]
    for d, way in enumerate(dirs):
        wt = b_.const(f"d{d}_W_t", np.ascontiguousarray(w[d].T.astype(np.float32)))
        rt = b_.const(f"d{d}_R_t", np.ascontiguousarray(r[d].T.astype(np.float32)))
        g_all = b_.op("MatMul", [x, wt], [steps, batch, 4 * hidden], f"d{d}_xw", gate=True)  # case 4
        if b is not None:
            bias = (b[d, :4 * hidden] + b[d, 4 * hidden:]).astype(np.float32)
            g_all = b_.op("Add", [g_all, b_.const(f"d{d}_bias", bias)], [steps, batch, 4 * hidden], f"d{d}_xw_b",
                          gate=True)
        h = None if zero_h else b_.slice(init_h, d, d + 1, 0, step_shape, f"d{d}_h0", cell=True)
        c = None if zero_c else b_.slice(init_c, d, d + 1, 0, step_shape, f"d{d}_c0", cell=True)
        outs: dict[int, ir.Value] = {}
        order = range(steps) if way == "forward" else range(steps - 1, -1, -1)  # case 1
        for t in order:
            tag = f"d{d}_t{t}"
            g = b_.slice(g_all, t, t + 1, 0, gate_shape, f"{tag}_xw", gate=True)
            if h is not None:
                hr = b_.op("MatMul", [h, rt], gate_shape, f"{tag}_hr", gate=True)
                g = b_.op("Add", [g, hr], gate_shape, f"{tag}_gates", gate=True)
            i, o, f, cc = (b_.slice(g, k * hidden, (k + 1) * hidden, 2, step_shape, f"{tag}_{n}", gate=True)
                           for k, n in enumerate("iofc"))
            i = b_.op("Sigmoid", [i], step_shape, f"{tag}_i_sig", gate=True)
            o = b_.op("Sigmoid", [o], step_shape, f"{tag}_o_sig", gate=True)
            cc = b_.op("Tanh", [cc], step_shape, f"{tag}_c_tanh", gate=True)
            c_new = b_.op("Mul", [i, cc], step_shape, f"{tag}_ic", cell=True)
            if c is not None:
                f = b_.op("Sigmoid", [f], step_shape, f"{tag}_f_sig", gate=True)
                c_new = b_.op("Add", [b_.op("Mul", [f, c], step_shape, f"{tag}_fc", cell=True), c_new], step_shape,
                              f"{tag}_C", cell=True)
            c = c_new
            h = b_.op("Mul", [o, b_.op("Tanh", [c], step_shape, f"{tag}_C_tanh", cell=True)], step_shape, f"{tag}_H")
            outs[t] = h
        shape4 = b_.const(f"d{d}_y_shape", np.array([1, 1, batch, hidden], np.int64))
        per_t = [b_.op("Reshape", [outs[t], shape4], [1, 1, batch, hidden], f"d{d}_t{t}_y") for t in range(steps)]
        ys.append(per_t[0] if steps == 1 else b_.op("Concat", per_t, [steps, 1, batch, hidden], f"d{d}_y", axis=0))
        last_h.append(h)
        last_c.append(c)
    n = len(dirs)
    results = [  # case 3
        ys[0] if n == 1 else b_.op("Concat", ys, [steps, n, batch, hidden], "Y", axis=1),
        last_h[0] if n == 1 else b_.op("Concat", last_h, [n, batch, hidden], "Y_h", axis=0),
        last_c[0] if n == 1 else b_.op("Concat", last_c, [n, batch, hidden], "Y_c", axis=0, cell=True),
    ]
    b_.finish()
    for out, new in zip(node.outputs, results):
        if not out.uses() and out not in graph.outputs:
            continue
        name = out.name
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        new.name = name
    graph.remove(node, safe=True)


def unroll_lstms(graph: ir.Graph, wide_gates: bool = True, wide_cell: bool = True) -> tuple[int, dict[str, str]]:
    """Unroll every LSTM of ``graph`` that can be; returns the count and ``{node: why not}`` for the rest.

    ``wide_gates``: mark the gate pre-activations for 16-bit activations (module docstring, case 4);
    ``wide_cell``: the cell state and the carried state (case 5).
    """
    count, left = 0, {}
    for node in list(graph):
        if node.op_type != "LSTM" or node.domain not in ("", "ai.onnx") or on_cpu(node):
            continue
        problem = unroll_problem(node)
        if problem:
            left[label(node)] = problem
            continue
        _unroll(graph, node, wide_gates, wide_cell)
        count += 1
    return count, left


@register_pass
class UnrollLstm(Pass):
    """Every LSTM becomes its time steps of MatMul/Sigmoid/Tanh/Mul/Add (module docstring)."""

    name = "qnn-unroll-lstm"
    description = "rewrite LSTM as its unrolled steps (QNN HTP fails to finalize its LSTM op)"
    Options = UnrollLstmOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        count, left = unroll_lstms(model.graph, self.options.gates == "int16", self.options.cell == "int16")
        for node, why in left.items():
            logger.warning("%s: %s left as it is: %s", self.name, node, why)
        if count:
            ir.passes.common.RemoveUnusedNodesPass()(model)  # the LSTM's own weights
        return PassResult(model, count > 0, {"lstm_unrolled": count, "lstm_left": left})
