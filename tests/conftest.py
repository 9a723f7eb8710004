"""Fixtures for every test: take either branch of the targets' CPU-dependent choices on any CPU.

The targets pick their int8 weight grid by the CPU they run on
(:func:`compressor.targets.base.cpu_has_vnni`): 7-bit weights without VNNI, where x86
int8 kernels sum u8*s8 pairs in int16 with saturation, and the full 8-bit grid with
VNNI. A CI machine takes only one of those branches; :func:`force_vnni` makes a test
take the one it names, whatever the CPU. It patches the name in every module of
``compressor.targets`` that imported it (not in ``targets.base``, so
``compressor.targets.base.cpu_has_vnni()`` still says what the hardware has). Likewise
OpenVINO's activations, signed on AMX CPUs: uint8 in every test unless it names the AMX
branch (:func:`uint8_activations_on_any_cpu`).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


@pytest.fixture(autouse=True)
def cli_logging():
    """Undo what a CLI test's ``setup_logging`` did: its handler writes to the ``sys.stderr`` of
    that test (pytest's capture, closed afterwards), and later tests' log records then printed
    "--- Logging error --- ValueError: I/O operation on closed file" into the suite's output."""
    import logging

    root, ours = logging.getLogger(), logging.getLogger("compressor")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


@pytest.fixture(autouse=True, scope="session")
def ranking_cache(tmp_path_factory: pytest.TempPathFactory):
    """Accuracy control caches its rankings in a folder of this test session, never in ``~/.cache``."""
    old = os.environ.get("COMPRESSOR_CACHE")
    os.environ["COMPRESSOR_CACHE"] = str(tmp_path_factory.mktemp("compressor-cache"))
    yield Path(os.environ["COMPRESSOR_CACHE"])
    if old is None:
        os.environ.pop("COMPRESSOR_CACHE", None)
    else:
        os.environ["COMPRESSOR_CACHE"] = old


def vnni_users() -> list[ModuleType]:
    """The importable modules of ``compressor.targets`` that call ``cpu_has_vnni`` by their own name."""
    import compressor.targets
    from compressor.targets import base

    modules = []
    for info in pkgutil.walk_packages(compressor.targets.__path__, "compressor.targets."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional backend's module that needs its package
            continue
        if module is not base and getattr(module, "cpu_has_vnni", None) is base.cpu_has_vnni:
            modules.append(module)
    return modules


@pytest.fixture
def force_vnni(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool | None], None]:
    """``force_vnni(True)``: targets built afterwards in the test behave as on a VNNI CPU
    (``False``: as on AVX2 without VNNI; ``None``: as on a CPU they cannot identify)."""

    users = vnni_users()  # before any patch: found by the name being base's function

    def force(value: bool | None) -> None:
        for module in users:
            monkeypatch.setattr(module, "cpu_has_vnni", lambda: value)

    return force


@pytest.fixture(autouse=True)
def uint8_activations_on_any_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The openvino target as on a CPU without AMX, whatever this one has: uint8 activations
    with their zero points, which the suite's openvino tests state. On AMX the target makes
    them signed (``OpenVinoTarget.signed_activations``); the tests of that branch ask for it
    by name (``target_cpu="amx"`` or ``signed_activations=True``), which no CPU changes."""
    try:
        import compressor.targets.openvino as openvino
    except ImportError:  # the openvino package is not installed: no such target
        return
    monkeypatch.setattr(openvino, "cpu_has_amx", lambda: False)


@pytest.fixture(params=[False, True], ids=["no-vnni", "vnni"])
def vnni(request: pytest.FixtureRequest, force_vnni: Callable[[bool | None], None]) -> bool:
    """Runs the test twice, the targets forced to each branch; the value is the branch."""
    force_vnni(request.param)
    return request.param


def to_bf16(x: np.ndarray) -> np.ndarray:
    """``x`` (float32) rounded to the nearest bfloat16 (ties to even), kept as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


@pytest.fixture
def force_precision(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``force_precision("bf16")``: the openvino target behaves as on a CPU whose default float
    precision is bf16 (AVX512-BF16, AMX), whatever the CPU; ``"f32"``: as on one whose default is f32.

    The device's default is what :func:`compressor.targets.openvino.device_precision` says. A
    runner left to the device's default (``precision=None``) runs in f32 and, on the bf16
    branch, rounds each float output to bf16: bf16's rounding where an AVX2 CPU has no bf16
    to run. A runner given a precision, or of an artifact with a pinned one, runs in that one.
    """
    openvino = pytest.importorskip("compressor.targets.openvino")
    if openvino.ov is None:
        pytest.skip("the openvino package is not installed")
    runner = openvino.OpenVinoRunner
    init, call, used = runner.__init__, runner.__call__, runner.inference_precision

    def force(value: str) -> None:
        monkeypatch.setattr(openvino, "device_precision", lambda core=None: value)

        def forced_init(self, xml, core=None, config=None, precision="f32"):
            init(self, xml, core=core, config=config, precision="f32" if precision is None else precision)
            self.precision = self.pinned or precision  # an artifact's pin wins, as in the runner itself
            self._forced = value if self.precision is None else None

        def forced_call(self, feeds):
            outputs = call(self, feeds)
            if self._forced != "bf16":
                return outputs
            return [to_bf16(o) if o.dtype == np.float32 else o for o in outputs]

        monkeypatch.setattr(runner, "__init__", forced_init)
        monkeypatch.setattr(runner, "__call__", forced_call)
        monkeypatch.setattr(runner, "inference_precision",
                            property(lambda self: self._forced or used.fget(self)))

    return force
