"""Target ``qnn-htp``: Qualcomm's HTP NPU through ONNX Runtime's QNN execution provider.

The ``onnxruntime-qnn`` wheel (Linux x86-64, Windows ARM64) carries the QNN HTP backend
library; on x86-64 it runs the same graph compiler and integer kernels as the device,
emulated on the CPU (about 0.4 s per small image). Every session here is created with
``session.disable_cpu_ep_fallback=1``: the whole graph runs on HTP or the session fails, so
a silent CPU fallback can never inflate the accuracy figures.

What HTP needs (the data in :mod:`.rules`, read by ``check``, ``quantize`` and ``qnn-legalize``):

1. static shapes, tensors of rank <= 5, no float64, ops the QNN EP has builders for and the
   HTP library finalizes (not GRU, nor LSTM, which ``qnn-legalize`` unrolls: ``UNFINALIZED_OPS``);
2. activations ``uint8`` (W8A8) or ``uint16`` (W8A16) asymmetric, per tensor;
3. weights ``int8`` symmetric, per output channel: Conv (axis 0), ConvTranspose (axis 1),
   MatMul (the last axis) and Gemm (0 or 1 by ``transB``). The QNN EP builds a MatMul whose
   weight is a rank-2 initializer, and a Gemm with a constant weight, as QNN
   FullyConnected, transposing the per-channel axis with the weight; measured on this HTP
   backend at 8- and 16-bit activations (docs/design.md). Per tensor (``quantize {weights:
   int8-per-tensor}``) is the fallback for a device that refuses them; it is still what the
   EP needs for a 16-bit FullyConnected weight, and for input 1 of a MatMul of two dynamic
   16-bit inputs, neither of which is written here (weights stay int8, and an activation x
   activation MatMul's inputs get per-tensor activation encodings);
4. biases ``int32`` with ``scale = s_x * s_w`` (per channel where the weight is; a Gemm's
   ``C`` written ``[N]``), zero point 0;
   LayerNormalization's gamma ``uint8`` asymmetric (HTP refuses int8 or uint16 gamma with an
   int32 beta, measured);
5. fixed output encodings for 16-bit Sigmoid (``1/65536``, offset 0) and Tanh
   (``1/32768``, offset 32768), which the HTP kernels assume (8-bit: ``1/256`` and ``1/128``);
6. opset >= 21 whenever a 16-bit Q/DQ is present (``QuantizeLinear``-21 added 16-bit types;
   :mod:`compressor.quant.qdq` converts the model there when it writes one);
7. every op inside a Q/DQ node unit (``DQ -> op -> Q``): a float op left between quantized
   ones runs as an fp16 island or is refused on the device. The float constants the QNN EP
   reads as op parameters (Resize's roi and scales, ``QdqRules.float_params``) stay float:
   a DQ there fails to compose the QNN graph.

Lowering writes the QDQ model (``model.onnx``), compiles it into a QNN context binary
(ONNX Runtime EPContext model: ``model_ctx.onnx`` + ``model_ctx_qnn.bin``, the deployable
artifact, loaded without recompiling), and writes ``model.encodings``: the scale/offset of
every quantized tensor in AIMET's JSON format (version 0.6.1), so a device flow (qnn-onnx-
converter ``--quantization_overrides``) uses exactly the encodings that were evaluated.
A model with a CPU front end (``qnn-cpu-front-end``, :mod:`.front_end`: a log-power
spectrogram no integer grid holds) is split at the tensors that front end hands over:
``front_end.onnx`` runs in float32 on ONNX Runtime's CPU provider, ``model_htp.onnx`` is the
rest, compiled into the context, which still runs wholly on HTP with CPU fallback disabled.

The package: the rules as data (:mod:`.rules`), the legalization passes that make a
``quantize`` output wholly quantized (:mod:`.sentinels` ``qnn-clamp-sentinels``,
:mod:`.gathernd` ``qnn-gathernd-to-gather``, :mod:`.unroll_lstm` ``qnn-unroll-lstm``,
:mod:`.quantize_tensors` ``qnn-quantize-tensors``; recipes name them together as ``qnn-legalize``,
``passes/qnn_legalize.py``), session plumbing, context compilation and the runner
(:mod:`.runtime`), and the AIMET encodings (:mod:`.encodings`).

The baseline (fp32 model) runs on ONNX Runtime CPU: HTP has no fp32 path (it would run fp16).
The manifest gets the simulation-vs-device gap: the same QDQ model on ONNX Runtime CPU and
on HTP, on the samples the HTP runner saw.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from compressor.passes._graph import label
from compressor.targets.base import (
    Capabilities,
    Runner,
    Target,
    check_capabilities,
    RUNS_ON,
    cpu_has_vnni,
    on_cpu,
)
from compressor.targets.onnx import OrtRunner
from compressor.targets.qnn_htp.encodings import aimet_encodings
from compressor.targets.qnn_htp.front_end import FRONT_END, cut_values, split_front_end
from compressor.targets.qnn_htp.rules import (
    HTP_QDQ_RULES,
    QNN_HTP_CAPABILITIES,
    QNN_HTP_CONTRIB_OPS,
    QNN_HTP_OPS,
    UNFINALIZED_OPS,
    QdqRules,
)
from compressor.targets.qnn_htp.runtime import (
    QnnHtpRunner,
    compile_context,
    onnxruntime_qnn,
    per_output,
    require_qnn,
)
from compressor.targets.qnn_htp.unroll_lstm import unroll_problem

from compressor.errors import CompressorError
from compressor.model_io import save_model
from compressor.pass_manager import control_flow_bodies, node_bodies, outer_reads
from compressor.strict_json import write_json

__all__ = [
    "QnnHtpTarget",
    "QNN_HTP_CAPABILITIES",
    "QNN_HTP_OPS",
    "HTP_QDQ_RULES",
    "QdqRules",
    "float_compute_nodes",
    "lint",
]

logger = logging.getLogger(__name__)

#: Ops whose inputs the shape of a static tensor decides (folded away when shapes are static).
_SHAPE_OPS = frozenset({"Shape", "Size"})
#: Inputs that decide an op's output shape: HTP compiles static shapes only, so they must be
#: constants once folded (ONNX's ``test_expand_shape_model*``: "QNN doesn't support dynamic shape").
_SHAPE_OPERANDS: dict[str, tuple[int, ...]] = {"Expand": (1,), "Reshape": (1,), "Tile": (1,),
                                               "ConstantOfShape": (0,)}
#: Control flow that constant folding never removes (an ``If`` on a constant is inlined).
_BODY_OPS = frozenset({"Loop", "Scan"})
#: The lowered files the runner and :meth:`QnnHtpTarget.deployable` recognise by name: the
#: EPContext model (its binary is named after it) and the CPU front end (:mod:`.front_end`).
_CONTEXT_SUFFIX = "_ctx.onnx"
_FRONT_END_FILE = "front_end.onnx"


#: Calls of the final runner below which the simulation-vs-device gap is measured on
#: samples run again (a runner rebuilt after accuracy control ran only the latency batch)...
GAP_MIN_CALLS = 8
#: ...and how many.
GAP_RERUN = 16


def float_compute_nodes(model: ir.Model, rules: QdqRules = HTP_QDQ_RULES) -> list[str]:
    """Nodes that would run in floating point on HTP: a float input not read through a DQ.

    Q/DQ nodes themselves, and nodes whose float inputs are all DQ outputs, are quantized
    node units; anything else becomes an fp16 island on the device. A float constant in
    an input ``rules.float_params`` names (Resize's scales) is an op parameter, not data.
    """
    out = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant") or node.domain not in ("", "ai.onnx") \
                or on_cpu(node):  # a CPU front end's node runs in float32 on the CPU
            continue
        params = rules.float_params.get(node.op_type, frozenset())
        for index, value in enumerate(node.inputs):
            if value is None or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                continue
            if index in params and value.const_value is not None and not value.is_graph_input():
                continue
            producer = value.producer()
            if producer is None or producer.op_type != "DequantizeLinear":
                out.append(label(node))
                break
    return out


class QnnHtpTarget(Target):
    """Qualcomm HTP (NPU) through ONNX Runtime's QNN EP; the QNN context binary is the artifact.

    Raises:
        UsageError: ``onnxruntime-qnn`` is not installed or has no HTP library here.
    """

    name = "qnn-htp"
    capabilities = QNN_HTP_CAPABILITIES
    qdq_rules = HTP_QDQ_RULES

    def __init__(self) -> None:
        require_qnn()
        # No narrowing of the weights on a host without VNNI: the shipped model is the
        # device's 8-bit scheme whatever host built it, and the HTP emulator accumulates
        # 8-bit Conv sums without saturating on such a host too (measured, issue 12).

    def check(self, model: ir.Model) -> list[tuple[str, str]]:
        """Static lint before any work: see :func:`lint`."""
        return lint(model, self.capabilities)

    def lower(self, model: ir.Model, outdir: Path) -> list[Path]:
        """``model.onnx`` (QDQ), ``model_ctx.onnx`` + ``model_ctx_qnn.bin`` (QNN context), ``model.encodings``.

        A model with a CPU front end (``qnn-cpu-front-end``) is split at its cut:
        ``front_end.onnx`` (float, the CPU) and ``model_htp.onnx`` (the QDQ rest), which
        the context is compiled from; ``model.onnx`` stays the whole model.
        """
        outdir.mkdir(parents=True, exist_ok=True)
        qdq = save_model(model, outdir / "model.onnx")
        cut = [v.name for v in cut_values(model.graph)]
        if not cut and model.metadata_props.get(RUNS_ON) == FRONT_END:
            raise CompressorError("qnn-htp: the model was given a CPU front end (qnn-cpu-front-end) but no node "
                                  "carries its mark any more: a pass dropped node metadata")
        if cut:
            front, htp = split_front_end(model, qdq, outdir)
            files = [qdq, front, htp, *compile_context(htp, outdir / "model_ctx.onnx")]
        else:
            files = [qdq, *compile_context(qdq, outdir / "model_ctx.onnx")]
        enc = outdir / "model.encodings"
        write_json(enc, aimet_encodings(model), indent=1, sort_keys=False)
        floats = float_compute_nodes(model)
        if floats:
            logger.warning("qnn-htp: %d node(s) are not in a Q/DQ node unit and run in fp16 on HTP: %s%s",
                           len(floats), ", ".join(floats[:5]), " ..." if len(floats) > 5 else "")
        return files + [enc]

    def deployable(self, files: list[Path]) -> list[Path]:
        """The QNN context (``model_ctx.onnx`` and the binary it loads, ``model_ctx_qnn.bin``) and,
        with a CPU front end, ``front_end.onnx`` (it runs on the application's CPU).

        ``model.onnx`` (the QDQ model the encodings come from), ``model_htp.onnx`` (the QDQ
        part the context was compiled from) and ``model.encodings`` are companions. Files
        without a context (the fp32 baseline, which ONNX Runtime CPU runs) are all deployed.
        """
        ctx = [f for f in files if f.name.endswith(_CONTEXT_SUFFIX)]
        if not ctx:
            return list(files)
        binaries = tuple(c.name[:-len(".onnx")] + "_" for c in ctx)  # model_ctx_qnn.bin beside model_ctx.onnx
        return [f for f in files if f in ctx or f.name.startswith(binaries) or f.name == _FRONT_END_FILE]

    def runner(self, files: list[Path]) -> QnnHtpRunner:
        ctx = [f for f in files if f.name.endswith(_CONTEXT_SUFFIX)]
        front = [f for f in files if f.name == _FRONT_END_FILE]
        onnx_files = [f for f in files if f.suffix == ".onnx" and f not in ctx and f not in front]
        if not ctx and not onnx_files:
            raise CompressorError("qnn-htp: no .onnx file among the lowered files")
        return QnnHtpRunner((ctx or onnx_files[-1:])[0], qdq_path=onnx_files[0] if onnx_files else None,
                            front_end=front[0] if front else None)

    def reference_runner(self, model: ir.Model, workdir: Path) -> Runner:
        """The fp32 baseline on ONNX Runtime CPU (HTP has no fp32 path)."""
        workdir.mkdir(parents=True, exist_ok=True)
        return OrtRunner(save_model(model, workdir / "model.onnx"))

    def report(self, runner: QnnHtpRunner, samples: Iterable[Mapping[str, np.ndarray]] = ()) -> dict[str, Any]:
        """How the artifact ran on HTP, and the gap to the same QDQ model on ONNX Runtime CPU.

        The gap is measured on the calls ``runner`` made; a runner that made fewer than
        :data:`GAP_MIN_CALLS` (built after accuracy control, it ran only the latency batch)
        is run on the first :data:`GAP_RERUN` of ``samples`` instead.
        """
        out: dict[str, Any] = {"qnn_htp": {"cpu_fallback": "disabled", "ran_wholly_on_htp": runner.front is None,
                                           "artifact": runner.path.name}}
        if runner.front is not None:
            out["qnn_htp"]["cpu_front_end"] = {
                "file": runner.front_path.name, "runs_on": "ONNX Runtime CPU, float32",
                "nodes": runner.front_nodes, "hands_to_htp": runner.cut}
        if runner.qdq_path is None:
            return out
        from compressor.flow.evaluation import (
            fidelity,  # evaluation imports data; keep this module light
        )
        from compressor.model_io import load_onnx

        # Nodes outside a Q/DQ node unit run in fp16 on HTP: the list should be empty.
        out["qnn_htp"]["float_nodes"] = float_compute_nodes(load_onnx(runner.qdq_path))

        seen = list(runner.seen)
        if len(seen) < GAP_MIN_CALLS:
            feeds = [{k: v for k, v in feed.items() if k in runner.input_names}
                     for feed in itertools.islice(samples, GAP_RERUN)]
            seen = [(feed, runner(feed)) for feed in feeds] or seen
        if not seen:
            return out
        cpu = OrtRunner(runner.qdq_path, as_written=self.capabilities.simulate_as_written)
        htp_outs = per_output([outs for _, outs in seen])
        cpu_outs = per_output([cpu(feed) for feed, _ in seen])
        gap = fidelity(cpu_outs, htp_outs)
        gap["mean_abs_diff"] = float(np.mean([np.abs(c.astype(np.float64) - h).mean()
                                              for c, h in zip(cpu_outs, htp_outs)]))
        gap["calls"] = len(seen)
        out["qnn_htp"]["simulation_vs_device"] = {
            "reference": "the same QDQ model (model.onnx) on ONNX Runtime CPU, Q/DQ computed as written "
                         "(graph optimizations off)", **gap}
        return out

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "backend": "QNN HTP (onnxruntime-qnn)",
                                "onnxruntime_version": ort.__version__, "cpu_fallback": "disabled",
                                "baseline": "fp32 model on ONNX Runtime CPU", "host_int8_vnni": cpu_has_vnni(),
                                "simulation": "the Q/DQ model on ONNX Runtime CPU, graph optimizations off",
                                "weight_bits": {op: q.weights.bits or 8 for op, q in self.capabilities.quantizable.items()
                                                if q.weights is not None}}
        if onnxruntime_qnn is not None:
            info["onnxruntime_qnn_version"] = getattr(onnxruntime_qnn, "__version__", "?")
        return info


def lint(model: ir.Model, caps: Capabilities = QNN_HTP_CAPABILITIES) -> list[tuple[str, str]]:
    """``(node, reason)`` for everything HTP cannot run (module docstring, case 1).

    Dynamic input dimensions (with the ``--input`` that fixes them), ops without a QNN HTP
    builder, ops the HTP library fails to finalize (``UNFINALIZED_OPS``: GRU, and an LSTM
    ``qnn-legalize`` cannot unroll, :func:`~.unroll_lstm.unroll_problem`, or one inside an
    ``If``/``Loop``/``Scan`` body, which it does not rewrite, unless the body is an ``If``
    branch constant folding inlines), tensors of rank above ``caps.max_rank``, float64
    tensors. Nodes that constant folding removes once shapes are static (``Shape`` and what
    is computed only from shapes and constants; never a ``Loop``/``Scan``) are not held
    against the model. An ``If`` that would fold were some scalar or 1-D inputs constants
    (silero-vad's on its sample rate ``sr``) is one offender naming the ``--freeze`` that
    folds it; the nodes of its branches are not listed.
    """
    offenders = check_capabilities(model, dataclasses.replace(caps, supported_ops=None, max_rank=None))
    folded = _foldable(model)
    small = {id(v): v for v in model.graph.inputs if v.shape is not None and len(v.shape) <= 1}
    if_frozen = _foldable(model, assume=frozenset(small)) - folded
    hidden = {id(inner) for node in ir.traversal.RecursiveGraphIterator(model.graph)
              if node.op_type == "If" and id(node) in if_frozen
              for _, body in node_bodies(node) for inner in ir.traversal.RecursiveGraphIterator(body)}
    ops = caps.supported_ops if caps.supported_ops is not None else QNN_HTP_OPS
    owners = {id(body): (where, node) for where, node, _, body in control_flow_bodies(model.graph)}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if id(node) in folded or id(node) in hidden or on_cpu(node):  # a CPU front end's node is not HTP's
            continue
        where = label(node)
        if node.op_type == "If" and id(node) in if_frozen:
            names = _inputs_deciding(node, small)
            offenders.append((where, f"op If on input {', '.join(map(repr, names))}: HTP runs no If; "
                                     f"{' '.join(f'--freeze {n}=VALUE' for n in names)} makes it a constant and "
                                     "folds the If away"))
            continue
        domain = "" if node.domain == "ai.onnx" else node.domain
        frozen_shape = [node.inputs[i] for i in _SHAPE_OPERANDS.get(node.op_type, ()) if domain == ""
                        and i < len(node.inputs) and node.inputs[i] is not None
                        and _constant_if_frozen(node.inputs[i], small, folded, if_frozen)]
        if frozen_shape:
            names = _inputs_of(frozen_shape, small)
            offenders.append((where, f"op {node.op_type} takes its shape from input {', '.join(map(repr, names))}: "
                                     "HTP compiles static shapes only; "
                                     f"{' '.join(f'--freeze {n}=VALUE' for n in names)} makes it a constant"))
            continue
        known = ops if domain == "" else QNN_HTP_CONTRIB_OPS if domain == "com.microsoft" else frozenset()
        body = owners.get(id(node.graph))
        if node.op_type not in known:
            offenders.append((where, f"op {domain + '::' if domain else ''}{node.op_type} is not supported by QNN HTP"))
        elif domain == "" and node.op_type == "LSTM" and body is not None and not (
                body[1].op_type == "If" and id(body[1]) in folded):
            # qnn-unroll-lstm rewrites the main graph only; an If whose condition folds is
            # inlined by fold-constants first (its LSTM is then in the main graph)
            offenders.append((where, f"op LSTM in the body {body[0]}: HTP fails to finalize an LSTM op and "
                                     "qnn-legalize unrolls an LSTM of the main graph only (export the model with the "
                                     "LSTM outside the control flow: a static condition, or the loop unrolled)"))
        elif domain == "" and node.op_type in UNFINALIZED_OPS:
            # qnn-legalize unrolls an LSTM into ops HTP finalizes; one it cannot is refused
            problem = unroll_problem(node, folded=False) if node.op_type == "LSTM" else "not rewritten"
            if problem:
                offenders.append((where, f"op {node.op_type}: {UNFINALIZED_OPS[node.op_type]}; qnn-legalize does "
                                         f"not unroll it: {problem}"))
        for value in (*node.inputs, *node.outputs):
            if value is None:
                continue
            if value.dtype == ir.DataType.DOUBLE:
                offenders.append((where, f"tensor {value.name} is float64; HTP has no 64-bit floats "
                                         "(export the model in float32)"))
                break
            if caps.max_rank is not None and value.shape is not None and len(value.shape) > caps.max_rank:
                offenders.append((where, f"tensor {value.name} has rank {len(value.shape)} > {caps.max_rank}, "
                                         "the most HTP handles"))
                break
    return offenders


def _constant_if_frozen(value: ir.Value, small: Mapping[int, ir.Value], folded: set[int],
                        if_frozen: set[int]) -> bool:
    """Whether ``value`` is no constant now but would be were the small graph inputs frozen."""
    producer = value.producer()
    if value.const_value is not None or (producer is not None and id(producer) in folded):
        return False
    return id(value) in small or (producer is not None and id(producer) in if_frozen)


def _inputs_deciding(node: ir.Node, inputs: Mapping[int, ir.Value]) -> list[str]:
    """The names of the graph ``inputs`` that ``node``'s outer reads are computed from."""
    return _inputs_of(outer_reads(node), inputs)


def _inputs_of(values: Iterable[ir.Value], inputs: Mapping[int, ir.Value]) -> list[str]:
    """The names of the graph ``inputs`` that ``values`` are (or are computed from)."""
    names, seen, stack = [], set(), list(values)
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if id(value) in inputs:
            names.append(value.name)
        producer = value.producer()
        if producer is not None:
            stack.extend(outer_reads(producer))
    return sorted(names)


def _foldable(model: ir.Model, assume: frozenset[int] = frozenset()) -> set[int]:
    """ids of nodes computed only from constants and tensor shapes (constants once shapes are static).

    ``assume``: ids of graph inputs to take as constants too (what ``--freeze`` would fold).

    Inside the branches of an ``If`` whose condition folds, the same holds per branch:
    fold-constants inlines the branch the condition takes and folds it again, so a branch's
    own shape arithmetic and nested ``If``s on it fold away too (silero-vad's decoder: an
    ``If`` on the encoder's static shape around the LSTM wrapper's ``If``s on the state's).
    """
    const: set[int] = set()
    done: set[int] = set()

    def is_const(value: ir.Value | None) -> bool:
        if value is None:
            return True
        if value.const_value is not None and not value.is_graph_input():
            return True
        return id(value) in const or id(value) in assume

    def walk(graph: ir.Graph) -> None:
        for node in graph:  # topological order
            if node.op_type in _SHAPE_OPS:
                # Static once the inputs are (a dynamic input is reported on its own, with the
                # --input that fixes it); a data-dependent shape is refused at lowering.
                static = True
            elif node.op_type in _BODY_OPS:
                # Its body reads outer values its inputs do not show (a Loop over the graph's
                # input with a constant trip count): never folded away. An If whose condition
                # is constant is: fold-constants inlines the branch it takes.
                static = False
            else:
                static = node.op_type == "Constant" or (bool(node.inputs) and all(is_const(v) for v in node.inputs))
            if not static:
                continue
            done.add(id(node))
            if node.op_type == "If":
                for _, body in node_bodies(node):
                    walk(body)
                if not all(is_const(v) for v in outer_reads(node)):
                    continue  # the branch it inlines reads data: what it computes is not constant
            const.update(id(v) for v in node.outputs)

    walk(model.graph)
    return done

