"""Target ``onnx``: portable (QDQ) ONNX run by ONNX Runtime on the CPU; the reference.

Lowering writes ``model.onnx`` with an IR version ONNX Runtime reads. The check asks
ONNX Runtime itself whether it has a kernel for every node, so an op it cannot run is
reported (exit 4) with the node's name before anything is written. ONNX Runtime stops at
the first such node; the check then looks up every node in ONNX Runtime's CPU kernel
registry so that the report names all of them. Old models (ONNX Runtime has no kernels
for some ops' oldest versions: ``Add``-6, ``AveragePool``-1...) are upgraded on import
(:mod:`compressor.capture.onnx_import`); one the version converter could not upgrade reaches this
check at its own opset, and the message says which opset the op's kernels start at.
"""

from __future__ import annotations

import dataclasses

import functools
import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from compressor.passes._graph import label
from compressor.targets.base import (
    VNNI_CPUS,
    Capabilities,
    Runner,
    Target,
    check_capabilities,
    cpu_has_vnni,
    deployment_vnni,
    narrow_weights,
)

from compressor.model_io import clone_model, model_bytes, save_model
from compressor.quant.spec import OpQuant, QuantSpec

__all__ = ["OnnxTarget", "OrtRunner", "SharedInitializers", "bias_apart", "ort_session"]

logger = logging.getLogger(__name__)

_INT8_ACT = QuantSpec("uint8", symmetric=False)
_INT8_W = QuantSpec("int8", symmetric=True, axis=0)

#: Ops ONNX Runtime's CPU kernels run in int8 when wrapped in Q/DQ. Its QDQ fusion makes a
#: node unit an integer kernel (QLinearConv, QGemm, QLinearMatMul) only when the output is
#: quantized too, after a Relu/Clip it folds (and, for a 2-D MatMul, the bias Add it turns
#: into a Gemm): ``output``/``output_after`` (see :mod:`compressor.passes._output_qdq`). A
#: MatMul without a bias Add runs as MatMulIntegerToFloat without one: no output pair.
#: ConvTranspose has no fused per-channel kernel: an output pair would only add rounding.
#: Conv and Gemm get the pair after a Relu/Clip ORT folds into the kernel, or where every
#: reader reads their output in 8 bits already (``output_only_after``, case 7 of
#: :mod:`~compressor.passes._output_qdq`): before a float activation it would only add a
#: rounding (ddddocr's detector: fidelity drop 0.007 -> 0.029 with SiLU kept float). A Conv
#: whose output gets no pair stays float, weight included (``output_required``): ORT would
#: run it as a float kernel dequantizing the weight at every call. A Gemm in that place keeps
#: inputs-only Q/DQ and lowering moves its bias after it (:func:`bias_apart`: QGemm with a
#: float output). A Conv with fewer than 16 output channels stays float
#: (``min_output_channels``): MLAS's int8 convolution is slower there than its float NCHWc
#: one (basic-pitch's 8-channel convs: 93 vs 53 ms and 61 vs 9 ms on AVX2).
_AFTER = frozenset({"Relu", "Clip"})
#: Node units without weights that ORT's QDQ selectors (``qdq_selector_action_transformer.cc``)
#: fuse on the CPU, ``DQ(x)... -> op -> Q``: QLinearSigmoid, QLinearLeakyRelu,
#: QLinearAveragePool, QLinearGlobalAveragePool (unary); QLinearAdd, QLinearMul of two
#: activations (SiLU's ``x * Sigmoid(x)``, a residual ``Add``); QLinearConcat. Each gets its
#: inputs and its output quantized, and only where the output's readers read it in 8 bits
#: (``OpQuant.min_activations``, :func:`~compressor.passes._output_qdq.open_units`). Softmax
#: (QLinearSoftmax) is left float: attention scores are what the transformer preset keeps
#: float. Data movement (MaxPool, Reshape, Transpose, Resize, Split, Slice, Gather...) needs
#: no entry: it carries its input's range and ORT runs it on uint8 (``carry_ranges``).
_UNARY = OpQuant(activations=_INT8_ACT, output=_INT8_ACT, min_activations=1)
_JOIN = OpQuant(activations=_INT8_ACT, output=_INT8_ACT)
ONNX_CAPABILITIES = Capabilities(
    quantizable={
        "Conv": OpQuant(activations=_INT8_ACT, weights=_INT8_W, output=_INT8_ACT, output_after=_AFTER,
                        output_only_after=_AFTER, output_required=True, min_output_channels=16),
        "ConvTranspose": OpQuant(activations=_INT8_ACT, weights=QuantSpec("int8", True, axis=1)),
        "Gemm": OpQuant(activations=_INT8_ACT, weights=QuantSpec("int8", True, axis=0), output=_INT8_ACT,
                        output_after=_AFTER, output_only_after=_AFTER),
        "MatMul": OpQuant(activations=_INT8_ACT, weights=QuantSpec("int8", True, axis=1), output=_INT8_ACT,
                          output_after=_AFTER | {"Add"}, output_only_after=frozenset({"Add"})),
        **{op: _UNARY for op in ("Sigmoid", "LeakyRelu", "AveragePool", "GlobalAveragePool")},
        "Add": _JOIN,
        "Mul": _JOIN,
        "Concat": OpQuant(activations=_INT8_ACT, output=_INT8_ACT, min_activations=1),
    },
    nm_patterns=(),
    static_shapes=False,
)

_NOT_IMPLEMENTED = re.compile(r"Could not find an implementation for (\S+) node with name '([^']*)'")
_NOT_REGISTERED = re.compile(r"(?:^|\s)([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op")
_ONNX_DOMAINS = ("", "ai.onnx.ml")
_CPU = "CPUExecutionProvider"


@functools.lru_cache(maxsize=1)
def _cpu_kernels() -> dict[tuple[str, str], list[tuple[int, int]]] | None:
    """``(domain, op) -> [(first, last) version]`` of ONNX Runtime's CPU kernels, or None."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        defs = ort_c.get_all_opkernel_def()
    except Exception:  # not every build exposes the registry
        logger.debug("ONNX Runtime's kernel registry is not readable", exc_info=True)
        return None
    table: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for d in defs:
        if d.provider == _CPU:
            table[(d.domain, d.op_name)].append(tuple(d.version_range))
    return dict(table)


def _nodes_without_kernel(model: ir.Model, reported: str) -> list[tuple[str, str]]:
    """One ``(nodes, reason)`` per op version of a standard domain that has no CPU kernel.

    Counted: ops with CPU kernels for other versions only, and ``reported`` (the op ONNX
    Runtime named). Ops with no kernel at all are otherwise left out (ONNX Runtime runs
    ``Constant`` without one), and so are ops ONNX defines as a function (it expands them).
    """
    kernels = _cpu_kernels()
    if kernels is None:
        return []
    groups: dict[tuple[str, str, int], list[str]] = defaultdict(list)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = "" if node.domain == "ai.onnx" else node.domain
        opset = model.opset_imports.get(domain, model.opset_imports.get("ai.onnx") if domain == "" else None)
        if domain not in _ONNX_DOMAINS or opset is None:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, domain)
        except Exception:  # not a standard op: the checker or ONNX Runtime says so
            continue
        if schema.has_function or schema.has_context_dependent_function:
            continue
        version = schema.since_version
        ranges = kernels.get((domain, node.op_type), [])
        if (ranges or node.op_type == reported) and not any(lo <= version <= hi for lo, hi in ranges):
            groups[(domain, node.op_type, version)].append(label(node))
    offenders, old = [], {}
    for (domain, op, version), labels in groups.items():
        name = f"{domain + ':' if domain else ''}{op}"
        ranges = sorted(kernels.get((domain, op), []))
        reason = f"ONNX Runtime has no CPU kernel for {name}-{version}"
        if ranges and ranges[0][0] > version:
            reason += f" (its kernels start at {name}-{ranges[0][0]})"
            if not domain:  # the hint below names the ai.onnx opset
                old[name] = ranges[0][0]
        offenders.append((", ".join(labels), reason))
    if old:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        offenders.insert(0, ("model", f"opset {opset} is older than ONNX Runtime's CPU kernels for "
                                      f"{', '.join(old)}: convert the model to opset >= {max(old.values())} (e.g. "
                                      "onnx.version_converter.convert_version(model, 17)) and check its outputs"))
    return offenders


def _explain_load_error(model: ir.Model, text: str) -> list[tuple[str, str]]:
    """``(node, reason)`` pairs from an error ONNX Runtime raised while loading ``model``."""
    match = _NOT_IMPLEMENTED.search(text)
    if match:
        reported = match.group(1).split("(")[0]
        offenders = _nodes_without_kernel(model, reported)
        if any(f" {reported}-" in why or f":{reported}-" in why for _, why in offenders):
            return offenders
        return [(match.group(2) or match.group(1), f"ONNX Runtime has no CPU kernel for {match.group(1)}")]
    match = _NOT_REGISTERED.search(text)
    if match:
        domain, op = match.group(1), match.group(2)
        labels = [label(n) for n in ir.traversal.RecursiveGraphIterator(model.graph)
                  if n.op_type == op and n.domain == domain]
        training = " (a training-only op)" if domain.startswith("ai.onnx.preview.training") else ""
        return [(", ".join(labels) or op, f"ONNX Runtime does not implement {domain}:{op}{training}")]
    first = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return [("model", f"ONNX Runtime cannot load it: {first[:300]}")]


def _session_options(threads: int | None, spinning: bool = True, as_written: bool = False) -> ort.SessionOptions:
    ort.set_default_logger_severity(3)  # model-load warnings go to the default logger, not the session's
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if as_written:  # Q/DQ computed in float as the graph says, no fused integer kernel (see ort_session)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:  # idle intra-op threads sleep instead of burning a core another session could use
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def ort_session(model_or_path: ir.Model | bytes | str | Path, *, threads: int | None = None,
                shared: SharedInitializers | None = None, as_written: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime CPU session, quiet and deterministic in its graph optimizations.

    ``model_or_path``: an in-memory model, its :func:`~compressor.model_io.model_bytes`, or a file.
    ``shared``: initializers an in-memory model shares with the model they were taken from
    (:class:`SharedInitializers`), handed to the session instead of serialized (its own
    ``as_written`` holds). ``as_written``: graph optimizations off, so a Q/DQ model computes
    what its graph says (dequantize, float op, quantize) instead of running ONNX Runtime's
    fused integer kernels, which on an x86 host without VNNI sum u8*s8 pairs in int16 and
    saturate: the simulation of a backend that is not ONNX Runtime CPU
    (``Capabilities.simulate_as_written``).
    """
    if shared is not None and isinstance(model_or_path, ir.Model):
        if as_written and not shared.as_written:
            raise ValueError("ort_session: as_written with shared initializers built without it")
        return shared.session(model_or_path, threads=threads)
    source = model_bytes(model_or_path) if isinstance(model_or_path, ir.Model) else (
        model_or_path if isinstance(model_or_path, bytes) else str(model_or_path))
    return ort.InferenceSession(source, _session_options(threads, as_written=as_written), providers=[_CPU])


class SharedInitializers:
    """The large initializers of a model, held once as ONNX Runtime values for sessions of its edited copies.

    Accuracy control builds one session per ranking candidate, each a copy of the same
    quantized model with one layer given back (:func:`compressor.model_io.clone_model`
    shares the tensors; the edit replaces inputs, never a tensor's data). :meth:`session`
    serializes a copy without the initializers that are still this model's tensor objects
    (each written as an external-data reference, a few MB instead of the whole model) and
    passes them to ONNX Runtime from here (``SessionOptions.add_external_initializers``).
    Same graph, same values: the session computes what one built from the full bytes does.
    """

    def __init__(self, model: ir.Model, min_elements: int = 1024, *, as_written: bool = False) -> None:
        self.as_written = as_written  # every session's graph optimizations off (see ort_session)
        self._held: dict[str, tuple[ir.TensorProtocol, np.ndarray, ort.OrtValue]] = {}
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if tensor is not None and tensor.size >= min_elements:
                array = np.ascontiguousarray(tensor.numpy())
                self._held[name] = (tensor, array, ort.OrtValue.ortvalue_from_numpy(array))

    def session(self, model: ir.Model, *, threads: int | None = None, spinning: bool = True,
                disabled: Sequence[str] = ()) -> ort.InferenceSession:
        """A session of ``model``, a copy of the model given to the constructor (edited or not),
        or of several side by side (:mod:`compressor.flow.side_by_side`); ``threads``: its
        intra-op threads (default: ONNX Runtime's); ``spinning``: whether idle ones spin;
        ``disabled``: ONNX Runtime optimizers to leave out."""
        copy = clone_model(model)
        names = []
        for name, value in copy.graph.initializers.items():
            held = self._held.get(name)
            if held is not None and value.const_value is held[0]:
                value.const_value = ir.ExternalTensor("shared-initializer", 0, held[1].nbytes, held[0].dtype,
                                                      shape=held[0].shape, name=name)
                names.append(name)
        opts = _session_options(threads, spinning, self.as_written)
        if names:
            opts.add_external_initializers(names, [self._held[name][2] for name in names])
        extra = {"disabled_optimizers": list(disabled)} if disabled else {}
        return ort.InferenceSession(model_bytes(copy), opts, providers=[_CPU], **extra)


#: How an artifact for a VNNI CPU is measured on a host without VNNI (:class:`OnnxTarget`).
AS_WRITTEN = "ONNX Runtime's graph optimizations off: DequantizeLinear, the op in float, QuantizeLinear"


class OrtRunner(Runner):
    """Runs an ``.onnx`` file (or an in-memory model) on ONNX Runtime CPU."""

    def __init__(self, path: Path | ir.Model, threads: int | None = None, *,
                 shared: SharedInitializers | None = None, as_written: bool = False):
        self.session = ort_session(path, threads=threads, shared=shared, as_written=as_written)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})


def bias_apart(model: ir.Model) -> int:
    """Move the bias of each ``DQ(a), DQ(b), c -> Gemm`` without an output ``Q`` into an ``Add`` after it.

    ONNX Runtime fuses such a Gemm into QGemm only with an output ``Q``; without a bias it
    is QGemm with a float output (checked on its optimized graph), so
    ``Gemm(a, b) + c`` runs the product in int8 and adds the float bias, where ``Gemm(a, b, c)``
    runs in float with ``b`` dequantized at every call. The same sum in float (``beta`` 1
    only; ``alpha`` stays on the Gemm). The graph output keeps its name.

    Returns:
        How many biases were moved.
    """
    moved = 0
    for node in list(model.graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            continue
        a, b, c = node.inputs[:3]
        beta = node.attributes.get("beta")
        if c is None or (beta is not None and beta.as_float() != 1.0) or not all(
                v is not None and (p := v.producer()) is not None and p.op_type == "DequantizeLinear" for v in (a, b)):
            continue
        out = node.outputs[0]
        uses = list(out.uses())
        if any(user.op_type == "QuantizeLinear" for user, _ in uses):
            continue
        name = out.name
        out.name = f"{name}_without_bias"
        add = ir.node("Add", [out, c], name=f"{node.name or name}_bias")
        add.outputs[0].name, add.outputs[0].type, add.outputs[0].shape = name, out.type, out.shape
        node.resize_inputs(2)
        model.graph.insert_after(node, add)
        for user, index in uses:
            user.replace_input_with(index, add.outputs[0])
        for i, value in enumerate(model.graph.outputs):
            if value is out:
                model.graph.outputs[i] = add.outputs[0]
        moved += 1
    return moved


class OnnxTarget(Target):
    """ONNX Runtime CPU: the portable reference target.

    Args:
        target_cpu: The CPU the artifact will run on (:data:`~compressor.targets.TARGET_CPUS`):
            without VNNI (``avx2``) every weighted op gets 7-bit weights; ``host``: as this CPU.
            Built for a VNNI CPU on a host without VNNI, the artifact is measured as written
            (graph optimizations off: each ``DQ -> op -> Q`` in float, which is what exact
            VNNI sums compute) rather than on this host's saturating int8 kernels, in the
            evaluation and in accuracy control's ranking (``simulate_as_written``); its
            latency is then not the named CPU's, and the runner says so (``latency_note``).
    """

    name = "onnx"
    capabilities = ONNX_CAPABILITIES

    def __init__(self, target_cpu: str = "host") -> None:
        #: ``(model, bytes)`` of the last :meth:`check`, written as is when the next
        #: :meth:`reference_runner` gets that same (unchanged) model: the baseline is
        #: serialised once per run.
        self._checked: tuple[ir.Model, bytes] | None = None
        self.target_cpu = target_cpu
        if deployment_vnni(target_cpu, cpu_has_vnni()) is False:  # MLAS's AVX2 u8s8 kernels saturate: 7-bit
            self.capabilities = narrow_weights(ONNX_CAPABILITIES, set(ONNX_CAPABILITIES.quantizable))  # reduce_range
        elif self._as_written():
            self.capabilities = dataclasses.replace(ONNX_CAPABILITIES, simulate_as_written=True)

    def _as_written(self) -> bool:
        """Built for a VNNI CPU (``--target-cpu vnni``) on a host whose int8 kernels saturate."""
        return self.target_cpu in VNNI_CPUS and cpu_has_vnni() is False

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "onnxruntime_version": ort.__version__, "int8_vnni": cpu_has_vnni(),
                "deployment_cpu": self.target_cpu}

    def check(self, model: ir.Model) -> list[tuple[str, str]]:
        offenders = check_capabilities(model, self.capabilities)
        if offenders:
            return offenders
        self._checked = None
        data = model_bytes(model)
        try:
            ort_session(data)
        except Exception as err:  # ORT raises its own exception types; read the message
            return _explain_load_error(model, str(err) or type(err).__name__)
        self._checked = (model, data)
        return []

    def lower(self, model: ir.Model, outdir: Path) -> list[Path]:
        outdir.mkdir(parents=True, exist_ok=True)
        if self._as_written() and not getattr(self, "_said_as_written", False):
            self._said_as_written = True
            logger.warning("onnx: built for a CPU with VNNI (--target-cpu vnni) on this CPU, which has none: the "
                           "artifact is measured as written (%s), not on this CPU's int8 kernels, which saturate on "
                           "8-bit weights; its accuracy is the named CPU's, its latency is not", AS_WRITTEN)
        moved = bias_apart(model := clone_model(model))
        if moved:
            logger.info("onnx: %d Gemm bias(es) added after the int8 Gemm (QGemm with a float output)", moved)
        return [save_model(model, outdir / "model.onnx")]

    def reference_runner(self, model: ir.Model, workdir: Path) -> OrtRunner:
        """The fp32 baseline; the bytes :meth:`check` serialised when ``model`` is the model it checked."""
        checked, self._checked = self._checked, None
        if checked is None or checked[0] is not model:
            return super().reference_runner(model, workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "model.onnx"
        path.write_bytes(checked[1])
        return OrtRunner(path)

    def runner(self, files: list[Path]) -> Runner:
        onnx_files = [f for f in files if f.suffix == ".onnx"]
        if self._as_written():
            runner = OrtRunner(onnx_files[0], as_written=True)
            runner.latency_note = f"measured as written ({AS_WRITTEN}): not the named VNNI CPU's time"
            return runner
        return OrtRunner(onnx_files[0])
