"""What every target states and does: capabilities as data, check, lower, runner.

A target says what it supports as data (:class:`Capabilities`: which ops it quantizes
and with which :class:`QuantSpec`, N:M patterns, static shapes, op set, rank limit), and
generic code reads it: passes never branch on a target's name.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from compressor.passes._graph import label

from compressor.quant.spec import OpQuant

__all__ = ["Capabilities", "Runner", "Target", "TargetPass", "check_capabilities", "cpu_has_vnni",
           "narrow_weights", "RUNS_ON", "on_cpu",
           "deployment_vnni", "weights_beyond", "warn_pessimistic_once"]

logger = logging.getLogger(__name__)

#: Node metadata key naming where a node runs, when not on the target's device: value
#: ``"cpu"`` for a float front end the application CPU runs (``qnn-cpu-front-end``);
#: ``quantize`` and the target's legalization leave such nodes float.
RUNS_ON = "compressor.runs_on"


def on_cpu(node: ir.Node) -> bool:
    """Whether ``node`` is marked to run on the CPU, in float (:data:`RUNS_ON`)."""
    return node.metadata_props.get(RUNS_ON) == "cpu"


@dataclasses.dataclass(frozen=True)
class TargetPass:
    """A pass a target needs after a recipe's quantizing pass (its legalization), as data.

    The recipe resolution (:meth:`compressor.recipe.Recipe.for_target`) appends it to a
    recipe that quantizes and does not run it (or a pass providing what it provides) already.

    Attributes:
        name: The pass's recipe name (e.g. ``qnn-legalize``).
        options: Options it always gets.
        from_quantize: Options it takes from the recipe's (last) quantizing step, same key
            on both, with that step's defaults filled in (``activations``: ``int8`` there
            gives ``{activations: int8}`` here).
    """

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    from_quantize: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a target can run, as data.

    Attributes:
        quantizable: Op type -> its :class:`OpQuant`.
        nm_patterns: Supported N:M sparsity patterns, e.g. ``((2, 4),)``.
        static_shapes: Every input dimension must be fixed before lowering.
        supported_ops: The op types it runs (``None``: whatever its runtime accepts).
        max_rank: Largest tensor rank it handles (``None``: no limit).
        fallback: What accuracy control does with a sensitive layer: ``float`` (revert
            it) or ``int16`` (promote its activations; for targets with no float path).
        after_quantize: Passes the target needs after a quantizing pass (:class:`TargetPass`),
            so that any recipe that quantizes gives a model it runs (``qnn-htp``: ``qnn-legalize``).
        input_pair_moves_through: Ops that only move, select or zero-pad values, up through
            which a layer's input Q/DQ pair is moved towards the producer of the data
            (:mod:`compressor.passes._pair_site`; exact), for a backend that fuses the
            quantization into the producer and runs the data movement in int8 (OpenVINO).
        quantize_in_bodies: ``None`` when ``quantize`` may write Q/DQ inside the ``If``
            branches the calibration data takes; else why not (the backend runs them there
            slower than float), which the report names for each body left float.
        preset_float_roles: The attention roles whose activations the transformer preset
            keeps float on this target (``None``: the preset's own, the key projections' input
            and ``probs · V``; :mod:`compressor.passes._transformer_preset`). OpenVINO on a CPU
            with VNNI keeps ``probs · V`` only: its int8 key projections lose nothing there.
        simulate_as_written: Whether the CPU simulation of the Q/DQ model (accuracy
            control's ONNX Runtime ranking, a report's simulation-vs-device gap) must run it
            with ONNX Runtime's graph optimizations off: for a backend that is not ONNX
            Runtime CPU's own integer kernels (``qnn-htp``: on a host without VNNI those
            saturate where HTP does not; ddddocr's recogniser scored cosine 0.77 fused
            against 0.991 on HTP and 0.99 as written).
        narrow_first_layers: Op types whose weights are 7-bit (``|q| <= 63``) in the graph's
            first layers (:func:`compressor.passes._placement.first_layers`) even where the
            others are 8-bit: NNCF's and POT's default ``overflow_fix: first_layer_only``.
            A first layer reads the raw input (an image in 0..255, on the full uint8 grid),
            where u8*s8 pairs saturate on CPUs without VNNI; so an artifact built on a VNNI
            host stays exact there on the most exposed layer (docs/design.md).
    """

    quantizable: Mapping[str, OpQuant] = dataclasses.field(default_factory=dict)
    nm_patterns: tuple[tuple[int, int], ...] = ()
    static_shapes: bool = False
    supported_ops: frozenset[str] | None = None
    max_rank: int | None = None
    fallback: str = "float"
    after_quantize: tuple[TargetPass, ...] = ()
    input_pair_moves_through: frozenset[str] = frozenset()
    quantize_in_bodies: str | None = None
    preset_float_roles: tuple[str, ...] | None = None
    simulate_as_written: bool = False
    narrow_first_layers: frozenset[str] = frozenset()


_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI/AMX int8 dot products (``None``: unknown, not Linux x86).

    Without them, x86 int8 kernels (ONNX Runtime's MLAS, OpenVINO's jit convolutions) sum
    pairs of u8*s8 products in int16 with saturation (vpmaddubsw), so full-range int8
    weights overflow; 7-bit weights (ONNX Runtime's ``reduce_range``, NNCF's
    ``overflow_fix``) are exact.
    """
    flags = cpu_flags()
    return None if flags is None else bool(_VNNI_FLAGS.intersection(flags))


#: The ``--target-cpu`` names of CPUs with VNNI (an AMX CPU has it too).
VNNI_CPUS = frozenset({"vnni", "amx"})


def cpu_has_amx() -> bool | None:
    """Whether this x86 CPU has AMX int8 tiles (``amx_int8``; ``None``: unknown, not Linux x86)."""
    flags = cpu_flags()
    return None if flags is None else "amx_int8" in flags


def deployment_vnni(target_cpu: str, host_vnni: bool | None) -> bool | None:
    """Whether the CPU named by ``target_cpu`` (``--target-cpu``, :data:`compressor.targets.TARGET_CPUS`)
    has VNNI: ``avx2`` none, ``vnni`` (AVX-512 VNNI, AVX-VNNI or AMX) and ``amx`` yes, ``host``
    ``host_vnni`` (:func:`cpu_has_vnni` as the target's module sees it)."""
    return host_vnni if target_cpu == "host" else target_cpu in VNNI_CPUS


def deployment_amx(target_cpu: str, host_amx: bool | None) -> bool | None:
    """Whether the CPU named by ``target_cpu`` has AMX int8 tiles: ``amx`` yes, ``avx2`` and
    ``vnni`` no, ``host`` ``host_amx`` (:func:`cpu_has_amx`)."""
    return host_amx if target_cpu == "host" else target_cpu == "amx"


def weights_beyond(model: ir.Model, ops: frozenset[str] | set[str], qmax: int) -> list[str]:
    """The ``ops`` nodes whose weight (input 1) is an int8 constant through a DequantizeLinear with
    a value beyond ``+-qmax`` and whose input 0 is quantized too (an integer kernel runs: a
    weight-only layer computes in float): where a CPU without VNNI saturates (``qmax`` 63,
    :func:`cpu_has_vnni`)."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in ops or len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[0] is None:
            continue
        x = node.inputs[0].producer()
        if x is None or x.op_type != "DequantizeLinear":
            continue
        dq = node.inputs[1].producer()
        if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
            continue
        weight = dq.inputs[0].const_value
        if weight is not None and weight.dtype == ir.DataType.INT8:
            if np.abs(weight.numpy().astype(np.int16)).max(initial=0) > qmax:
                found.append(label(node))
    return found


def warn_pessimistic_once(target: Target, host_vnni: bool | None, model: ir.Model, ops: frozenset[str] | set[str],
                          qmax: int = 63) -> bool:
    """Whether ``target`` builds for a VNNI CPU (``--target-cpu vnni`` or ``amx``) on this host without VNNI
    (``host_vnni`` False), where its int8 kernels saturate on the ``ops`` whose weights pass
    ``+-qmax`` (:func:`weights_beyond`). Then warns, once per target, that the accuracy
    measured here is pessimistic for the named CPU.
    """
    if target.target_cpu not in VNNI_CPUS or host_vnni is not False:
        return False
    if not getattr(target, "_warned_pessimistic", False) and (saturating := weights_beyond(model, ops, qmax)):
        target._warned_pessimistic = True  # type: ignore[attr-defined]
        logger.warning(
            "%s: the artifact is built for a CPU with VNNI (--target-cpu %s) but measured on this CPU, which has "
            "none: its int8 kernels sum u8*s8 pairs in int16 and saturate on %d layer(s) with weights beyond +-%d "
            "(%s), so the accuracy drop measured here is pessimistic for the named CPU, and accuracy control may give "
            "back more layers than it needs; measure on a VNNI CPU for its own figure", target.name, target.target_cpu,
            len(saturating), qmax, ", ".join(saturating[:5]))
    return True


def cpu_flags() -> frozenset[str] | None:
    """The first CPU's feature flags from ``/proc/cpuinfo`` (``None``: not Linux x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return None if flags is None else frozenset(flags)


def narrow_weights(caps: Capabilities, ops: frozenset[str] | set[str]) -> Capabilities:
    """``caps`` with 7-bit symmetric weights for ``ops`` (see :func:`cpu_has_vnni`)."""
    narrow = {op: dataclasses.replace(q, weights=dataclasses.replace(q.weights, bits=7))
              for op, q in caps.quantizable.items() if op in ops and q.weights is not None}
    return dataclasses.replace(caps, quantizable={**caps.quantizable, **narrow})


class Runner(abc.ABC):
    """Executes a lowered artifact in its real backend."""

    input_names: list[str]
    output_names: list[str]

    @abc.abstractmethod
    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; outputs in ``output_names`` order."""


def check_capabilities(model: ir.Model, caps: Capabilities) -> list[tuple[str, str]]:
    """Generic lint of ``model`` against ``caps``: one ``(node, reason)`` per offence."""
    offenders: list[tuple[str, str]] = []
    if caps.static_shapes:
        for value in model.graph.inputs:
            if value.const_value is not None or value.shape is None:
                continue
            dyn = [i for i, d in enumerate(value.shape) if not isinstance(d, int)]
            if dyn:
                offenders.append((f"input {value.name}", f"dynamic dimension(s) at axis {', '.join(map(str, dyn))}; "
                                  f"fix them with --input {value.name}=" + "x".join(
                                      str(d) if isinstance(d, int) else "N" for d in value.shape)))
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        where = label(node)
        if caps.supported_ops is not None and node.domain in ("", "ai.onnx") and node.op_type not in caps.supported_ops:
            offenders.append((where, f"op {node.op_type} is not supported by this target"))
        if caps.max_rank is not None:
            for value in node.outputs:
                if value.shape is not None and len(value.shape) > caps.max_rank:
                    offenders.append((where, f"output {value.name} has rank {len(value.shape)} > {caps.max_rank}"))
                    break
    return offenders


class Target(abc.ABC):
    """A backend: capabilities, constraint check, lowering and a runner.

    ``target_cpu``: the CPU the artifact will run on (:data:`compressor.targets.TARGET_CPUS`), for the targets
    that run int8 on an x86 CPU (:data:`compressor.targets.CPU_TARGETS`); ``host`` for the others.
    """

    name: str
    capabilities: Capabilities = Capabilities()
    target_cpu: str = "host"

    def check(self, model: ir.Model) -> list[tuple[str, str]]:
        """Constraint lint before any work: ``(node, reason)`` per offending node."""
        return check_capabilities(model, self.capabilities)

    @abc.abstractmethod
    def lower(self, model: ir.Model, outdir: Path) -> list[Path]:
        """Write the deployable files into ``outdir``; return their paths."""

    @abc.abstractmethod
    def runner(self, files: list[Path]) -> Runner:
        """A callable that runs the lowered files in the real backend."""

    def deployable(self, files: list[Path]) -> list[Path]:
        """The files among ``files`` (what :meth:`lower` wrote) that are deployed: what a device
        or an application loads, as opposed to companions kept for inspection or for another
        tool (a QDQ source, encodings, a build log).

        The artifact's size (the summary's ``size`` row, the manifest's ``deploy`` flags, a
        search candidate's bytes) counts these. Default: all of them; a target that writes
        companions overrides it.
        """
        return list(files)

    def reference_runner(self, model: ir.Model, workdir: Path) -> Runner:
        """Runs the uncompressed model in this backend (the baseline of evaluation)."""
        workdir.mkdir(parents=True, exist_ok=True)
        return self.runner(self.lower(model, workdir))

    def device_reference_runner(self, model: ir.Model, workdir: Path, baseline: Runner | None = None) -> Runner | None:
        """The uncompressed model in the device's default float precision where that differs
        from the baseline's (bf16 on some CPUs); ``None`` where it is the same. ``baseline``
        is :meth:`reference_runner`'s runner of ``model``, whose lowered files a target may
        run again rather than lower ``model`` a second time."""
        return None

    def scheme_fallback(self) -> Target | None:
        """The same target with a finer (slower) activation scheme, tried where this one's
        artifact breaks the accuracy budget (``None``: nothing to try)."""
        return None

    def precision_fallback(self) -> str | None:
        """A float precision to pin in the artifact when the one it is evaluated in breaks the
        accuracy budget (``None``: nothing to try)."""
        return None

    def lower_pinned(self, model: ir.Model, outdir: Path, precision: str | None) -> list[Path]:
        """:meth:`lower` with ``precision`` (from :meth:`precision_fallback`) pinned in the artifact.

        The pin is data on the artifact, never state on the target: :meth:`runner` reads it
        from the files, so any copy of the target runs a pinned artifact alike. ``None``:
        :meth:`lower`.
        """
        if precision is None:
            return self.lower(model, outdir)
        raise NotImplementedError(f"target {self.name!r} has no float precision to pin")

    def report(self, runner: Runner, samples: Iterable[Mapping[str, np.ndarray]] = ()) -> dict[str, Any]:
        """Extra manifest entries about how the artifact really ran (e.g. int8 layers).

        Args:
            runner: The artifact's runner (:meth:`runner` of the lowered files).
            samples: Feeds the report may run ``runner`` on (the evaluation batches), for
                measurements the runner's own calls do not cover; read lazily, as far as needed.
        """
        return {}

    def describe(self) -> dict[str, Any]:
        """What the manifest records of the target."""
        return {"name": self.name}


RunnerFactory = Callable[[list[Path]], Runner]
