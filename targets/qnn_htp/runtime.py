"""Running on Qualcomm's HTP through ONNX Runtime's QNN execution provider (``qnn-htp``'s runtime half).

The provider library is registered once per process; every session is created with
``session.disable_cpu_ep_fallback=1`` so the whole graph runs on HTP or the session
fails (:func:`refused_nodes` says which nodes HTP refused). :func:`compile_context`
writes the EPContext model (``*_ctx.onnx`` + ``*_ctx_qnn.bin``); :class:`QnnHtpRunner`
runs it and keeps the samples it saw (and its outputs) for the simulation-vs-device comparison.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from compressor.targets.base import Runner

from compressor.errors import CompressorError, UnsupportedByTarget, UsageError
from compressor.flow.evaluation import (
    per_output,  # the gap's rows: one per call, as the evaluation's
)

try:
    import onnxruntime_qnn
except ImportError:  # optional backend: the target refuses to start, the package still imports
    onnxruntime_qnn = None

__all__ = ["QnnHtpRunner", "compile_context", "compile_here", "htp_available", "per_output", "refused_nodes",
           "require_qnn", "EP_NAME", "GAP_SAMPLES"]

logger = logging.getLogger(__name__)

EP_NAME = "QNNExecutionProvider"

#: Samples of the simulation-vs-device comparison kept by a runner.
GAP_SAMPLES = 64

_REGISTERED = False


def htp_available() -> tuple[bool, str]:
    """Whether the QNN HTP backend can be used here, and why not."""
    if onnxruntime_qnn is None:
        return False, "the onnxruntime-qnn package is not installed (pip install onnxruntime-qnn; Linux x86-64 or Windows ARM64)"
    if not hasattr(ort, "register_execution_provider_library"):
        return False, f"onnxruntime {ort.__version__} cannot load plugin execution providers (needs >= 1.22)"
    if not Path(onnxruntime_qnn.get_qnn_htp_path()).exists():
        return False, f"onnxruntime-qnn has no HTP backend library for this platform ({onnxruntime_qnn.get_qnn_htp_path()})"
    return True, ""


def require_qnn() -> None:
    ok, why = htp_available()
    if not ok:
        raise UsageError(f"target 'qnn-htp' cannot start: {why}")


def _register() -> None:
    """Load the QNN EP plugin library into ONNX Runtime (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
    _REGISTERED = True


def _provider_options() -> dict[str, str]:
    return {
        "backend_path": onnxruntime_qnn.get_qnn_htp_path(),
        # Q on graph inputs / DQ on graph outputs run on HTP too (by default the EP leaves
        # them to the CPU EP, which fallback-disabled sessions refuse).
        "offload_graph_io_quantization": "0",
    }


def _session_options(*, fallback: bool = False, record: bool = False, severity: int = 4) -> ort.SessionOptions:
    """Options of an HTP session; ``severity`` 4 (fatal only) by default: a compile or session
    that fails raises, and the exit 4 names the nodes from a recorded probe (:func:`_fail`),
    so ONNX Runtime's own coloured ERROR lines would only repeat it on the user's terminal."""
    _register()
    ort.set_default_logger_severity(3)  # process-wide: left as ONNX Runtime's other users expect it
    opts = ort.SessionOptions()
    opts.log_severity_level = severity
    if not fallback:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if record:
        opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    opts.add_provider_for_devices(devices, _provider_options())
    return opts


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Capture what native code writes to fd 2 (ONNX Runtime's log): the list it yields holds
    the text once the block is left, also when the block raises.

    The log goes to an unnamed temporary file, so nothing is left in the temporary folder
    (a named one stayed there whenever the session in the block failed).
    """
    captured: list[str] = []
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield captured
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                captured.append(sink.read().decode(errors="replace"))
    finally:
        os.close(saved)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence native writes to fd 1 (the HTP library prints a banner when it first loads)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                os.dup2(saved, 1)
    finally:
        os.close(saved)


#: What the QNN EP logs when it cannot build one node's tensor while composing the graph.
_COMPOSE = re.compile(r"Failed to create tensor for node: (\S+) tensor_name: (\S+) error code: (\d+)")
_REASON = re.compile(r"Validation FAILED for \d+ nodes in OrtNodeUnit \((\w+)\) :\n(.*?)\tREASON : ([^\n]*)", re.S)
_NODE_LINE = re.compile(r"Operator type: (\w+) Node name: (\S*) Node index")


_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


def refused_nodes(source: str | bytes) -> list[tuple[str, str]]:
    """The nodes HTP refuses in a model, with the QNN EP's reason; ``[]`` when it takes all.

    Builds a session with CPU fallback allowed and the graph assignment recorded, and reads
    the EP's verbose validation log for the reasons.
    """
    with _native_stderr() as log, _quiet_stdout():
        session = ort.InferenceSession(source, _session_options(fallback=True, record=True, severity=0))
    text = log[0]
    reasons: dict[str, str] = {}
    for unit, block, reason in _REASON.findall(text):
        for op, name in _NODE_LINE.findall(block):
            reasons.setdefault(name, f"{unit} node unit: {reason.strip()}")
    refused = [(node.op_type, node.name or node.op_type, reasons.get(node.name))
               for sub in session.get_provider_graph_assignment_info() if sub.ep_name != EP_NAME
               for node in sub.get_nodes()]
    # The Q/DQ nodes around a refused op are refused with its node unit: name the op, not them
    # ("MaxPool: MaxPool node unit: QNN NPU does not support PoolMax3d!", not its input's Q and DQ).
    explained = {why for op, _, why in refused if why and op not in _QDQ}
    return [(name, why or f"op {op}: refused by the QNN EP for HTP (no reason logged)") for op, name, why in refused
            if op not in _QDQ or not explained or (why is not None and why not in explained)]


def _fail(source: str | bytes, err: Exception) -> CompressorError:
    """Explain a failed HTP session: the refused nodes, or the backend's own message.

    A model ONNX Runtime cannot even load is a bug upstream (exit 1), not a target limit.
    """
    text = str(err)
    if "INVALID_GRAPH" in text or "INVALID_ARGUMENT" in text or "Load model" in text:
        return CompressorError(f"qnn-htp: ONNX Runtime cannot load the lowered model: {text.strip()[:400]}")
    try:
        offenders = refused_nodes(source)
    except Exception as again:  # the graph cannot even be partitioned: report the first error
        logger.debug("qnn-htp: partitioning failed too: %s", again)
        offenders = []
    if not offenders:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        offenders = [("model", f"QNN HTP backend failed: {first[:300]}")]
    return UnsupportedByTarget("qnn-htp", offenders)


#: What a fresh interpreter runs to compile one context (``compile_context``).
_COMPILE_CHILD = ("import sys; from pathlib import Path; "
                  "from compressor.targets.qnn_htp.runtime import compile_here; "
                  "compile_here(Path(sys.argv[1]), Path(sys.argv[2]), severity=3)")


def compile_context(model_path: Path, ctx_path: Path) -> list[Path]:
    """Compile ``model_path`` into an EPContext model ``ctx_path`` and its QNN context binary.

    The compilation runs in a fresh Python process: the QNN HTP library numbers what it
    serialises (``PICKLE/<n>``, tensor ids) with counters global to the process, so a binary
    compiled after others in the same process (a second run, accuracy control's candidates,
    ``compress search``) differed from the same model's compiled first. A fresh process
    gives every artifact the binary a plain ``compress`` run writes. Where the child fails,
    the compilation is repeated here for the error (each refused node named).

    Returns:
        ``[ctx_path, binary]`` (the binary is written beside ``ctx_path``).

    Raises:
        UnsupportedByTarget: HTP refuses part of the graph (each node named).
    """
    before = set(ctx_path.parent.iterdir())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, str(model_path), str(ctx_path)],
                           capture_output=True, text=True, env=env, check=False)
    if child.returncode != 0:
        logger.debug("qnn-htp: compiling in a fresh process failed (%d): %s", child.returncode, child.stderr[-2000:])
        for made in set(ctx_path.parent.iterdir()) - before:
            made.unlink()
        try:
            compile_here(model_path, ctx_path)  # raises the error, naming the refused nodes
        except UnsupportedByTarget as err:
            raise _named_from_log(err, child.stderr) from None
        logger.warning("qnn-htp: compiling the QNN context in a fresh process failed (%s); compiled in this "
                       "process instead, so the binary's internal ids depend on what this process compiled "
                       "before", (child.stderr.strip().splitlines() or ["no message"])[-1][:200])
    new = sorted(p for p in set(ctx_path.parent.iterdir()) - before if p != ctx_path)
    return [ctx_path, *new]


def _named_from_log(err: UnsupportedByTarget, log: str) -> UnsupportedByTarget:
    """``err`` with the nodes the QNN EP's log names where ``err`` names only the model.

    A graph HTP cannot compose ("Failed to compose Qnn graph") is no partitioning refusal,
    so :func:`refused_nodes` finds none; the EP logs the node whose tensor it could not build.
    """
    found = _COMPOSE.findall(log)
    if not found or any(where != "model" for where, _ in err.offenders):
        return err
    offenders = [(node, f"QNN HTP cannot build its tensor {tensor} (QNN error {code}) while composing the "
                        "graph") for node, tensor, code in dict.fromkeys(found)]
    return UnsupportedByTarget("qnn-htp", offenders)


def compile_here(model_path: Path, ctx_path: Path, severity: int = 4) -> None:
    """Compile ``model_path`` into ``ctx_path`` (+ its binary) in this process.

    The model is handed over as bytes (it is self-contained, :func:`~compressor.model_io.save_model`):
    from a path, ONNX Runtime names the EPContext partition after a hash of that path, and the
    artifact is built in a temporary folder of random name, so two identical runs gave
    different ``*_ctx.onnx`` and binaries. From bytes the name hashes the graph's own names.

    ``severity``: ONNX Runtime's log level; the fresh process of :func:`compile_context` logs
    errors (3) to its captured stderr, which names a node HTP cannot compose.

    Raises:
        UnsupportedByTarget: HTP refuses part of the graph (each node named).
    """
    try:
        with _quiet_stdout():
            compiler = ort.ModelCompiler(_session_options(severity=severity), Path(model_path).read_bytes(),
                                         embed_compiled_data_into_model=False)
            compiler.compile_to_file(str(ctx_path))
    except Exception as err:  # ONNX Runtime's own exception types
        raise _fail(str(model_path), err) from None


#: The latency note of a runner on the x86 HTP emulator (``QnnHtpRunner.latency_note``).
EMULATED = "HTP emulated on this x86 CPU: not the device's latency"


class QnnHtpRunner(Runner):
    """Runs a lowered model on the QNN HTP backend, CPU fallback disabled.

    Args:
        path: The EPContext model (``*_ctx.onnx``) or a QDQ ``.onnx`` (compiled on load).
        qdq_path: The whole QDQ model (for the simulation gap).
        front_end: A float front end (``qnn-cpu-front-end``) run first on ONNX Runtime's
            CPU provider; its outputs are inputs of ``path``.

    Raises:
        UnsupportedByTarget: HTP refuses part of the graph.
    """

    def __init__(self, path: Path, qdq_path: Path | None = None, front_end: Path | None = None):
        require_qnn()
        self.path = Path(path)
        self.qdq_path = qdq_path
        try:
            with _quiet_stdout():
                self.session = ort.InferenceSession(str(self.path), _session_options())
        except Exception as err:  # ONNX Runtime's own exception types
            raise _fail(str(self.path), err) from None
        self.front_path, self.front, self.front_inputs, self.cut, self.front_nodes = front_end, None, [], [], 0
        self._htp_inputs = htp_inputs = [i.name for i in self.session.get_inputs()]
        if front_end is not None:
            self.front = ort.InferenceSession(str(front_end), providers=["CPUExecutionProvider"])
            self.front_inputs = [i.name for i in self.front.get_inputs()]
            self.cut = [o.name for o in self.front.get_outputs()]
            self.front_nodes = len(onnx.load(str(front_end), load_external_data=False).graph.node)
        self.input_names = list(dict.fromkeys([*self.front_inputs, *(n for n in htp_inputs if n not in self.cut)]))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.seen: list[tuple[dict[str, np.ndarray], list[np.ndarray]]] = []
        #: What its wall time is: on x86 the HTP backend library emulates the NPU on the CPU.
        self.latency_note = EMULATED if platform.machine().lower() in ("x86_64", "amd64", "i686") else None

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        feed = {k: np.asarray(v, order="C") for k, v in feeds.items() if k in self.input_names}
        if self.front is None:
            outs = self.session.run(None, feed)
        else:
            handed = dict(zip(self.cut, self.front.run(None, {k: feed[k] for k in self.front_inputs})))
            outs = self.session.run(None, {k: handed[k] if k in handed else feed[k] for k in self._htp_inputs})
        if len(self.seen) < GAP_SAMPLES and not any(_same(feed, f) for f, _ in self.seen[-1:]):
            self.seen.append((feed, outs))
        return outs


def _same(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)
