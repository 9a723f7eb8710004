"""The pass contract: :class:`Pass`, :class:`PassContext`, :class:`PassResult`, the registry.

A pass is a class with a kebab-case ``name`` (the word recipes use), an ``Options``
dataclass validated on construction, and ``run(model, ctx) -> PassResult``. It declares
the properties it ``requires`` and ``provides`` (e.g. ``{"constants-folded"}``); the
:class:`~compressor.pass_manager.PassManager` refuses a pipeline whose needs are unmet.

Passes register themselves with :func:`register_pass`; :func:`get_pass` and
:func:`available_passes` read the registry after importing every module of
``compressor.passes``.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import importlib
import logging
import pkgutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_ir as ir

from compressor.errors import RecipeError
from compressor.options import NoOptions, options_to_dict, parse_options
from compressor.progress import Progress, no_progress

if TYPE_CHECKING:
    from compressor.data import Dataset
    from compressor.quant.learned import LearnedRanges
    from compressor.quant.revert import QuantizationRecord
    from compressor.targets.base import Target

__all__ = [
    "Pass",
    "PassContext",
    "PassResult",
    "register_pass",
    "get_pass",
    "available_passes",
    "build_pass",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PassResult:
    """What a pass returns.

    Attributes:
        model: The model after the pass (the same object when the pass works in place).
        modified: Whether the pass changed the model.
        stats: Counts a person reads in the report, e.g. ``{"bn_folded": 12}``.
        quantization: What a quantizing pass changed per layer, as typed data (accuracy
            control gives layers back by editing the graph with it:
            :mod:`compressor.quant.revert`); ``None`` for other passes.
    """

    model: ir.Model
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantization: QuantizationRecord | None = None


@dataclasses.dataclass
class PassContext:
    """Everything a pass may read besides the model; handed to each pass explicitly.

    Attributes:
        target: The target the model is lowered for (its ``capabilities`` drive lossy
            passes), or ``None`` for target-independent runs.
        calibration: Calibration samples, or ``None`` when none were given.
        seed: Seed for anything random, so runs are reproducible.
        options: Free-form run options (CLI overrides).
        properties: What the passes run so far have established (``provides``).
        cache: Expensive results a pass may reuse when it is run again on the same
            input (calibration statistics during accuracy control).
        progress: Factory of progress bars for long work inside a pass (calibration).
        learned_ranges: Activation ranges the recovery stage learned (``recover: {qat:
            true}``); ``quantize`` uses them instead of calibrated ones where they apply.
        statistics_model: The model calibration statistics are taken on when it is not
            the one being rewritten: a copy in which a control-flow body's tensors are
            main-graph tensors (:mod:`compressor.passes._control_flow`); ``None``: the model itself.
    """

    target: Target | None = None
    calibration: Dataset | None = None
    seed: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    properties: set[str] = dataclasses.field(default_factory=set)
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: Progress = no_progress
    learned_ranges: LearnedRanges | None = None
    statistics_model: ir.Model | None = None


class Pass(abc.ABC):
    """Base class of every graph pass.

    Subclasses set ``name``, ``Options`` (a dataclass; :class:`NoOptions` when the pass
    takes none), ``requires``/``provides`` and implement :meth:`run`. A pass that needs a
    newer opset than the model has sets ``min_opset``; the manager upgrades the model first. A pass
    that changes what the model computes sets ``lossy``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    min_opset: ClassVar[int | None] = None
    #: Whether the pass changes what the model computes (pruning, quantization); the flow
    #: measures the accuracy drop after each lossy pass so a report names the one that lost it.
    lossy: ClassVar[bool] = False
    #: Whether the pass also rewrites ``If``/``Loop``/``Scan`` bodies. The manager names,
    #: in the report of every pass that does not, each body the pass left as it was; a pass
    #: that rewrites only some (``quantize``) names the others itself, with the reason,
    #: in ``stats["subgraphs_left_as_is"]``.
    walks_subgraphs: ClassVar[bool] = False
    #: Whether the pass lowers the model and runs it on the target's device (a correction
    #: measured there, ``device-bias-correction``). Accuracy control's ranking on ONNX
    #: Runtime leaves such a pass out: what it measures is not what the ranking runs.
    runs_on_target: ClassVar[bool] = False

    def __init__(self, options: Any = None, *, where: str | None = None):
        where = where or f"pass {self.name!r}"
        if isinstance(options, self.Options):
            self.options = options
        else:
            self.options = parse_options(self.Options, options, where)

    @abc.abstractmethod
    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Transform ``model`` (in place is allowed) and say what changed."""

    def check_input(self, model: ir.Model) -> None:
        """Refuse a model this pass must never run on; called before any pass of the pipeline runs.

        Raises:
            CompressorError: what is wrong with the model and what to do (the manager
                lets it through unwrapped: it is about the model, not a failed pass).
        """

    def options_dict(self) -> dict[str, Any]:
        """The resolved options, as plain data for the manifest."""
        return options_to_dict(self.options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options_dict()})"


_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"two passes are registered as {name!r}: {_REGISTRY[name].__qualname__} and {cls.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _load_builtin_passes() -> None:
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module("compressor.passes")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"compressor.passes.{info.name}")
    _LOADED = True


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass, by recipe name."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str, where: str = "recipe") -> type[Pass]:
    """The pass class registered as ``name``.

    Raises:
        RecipeError: no such pass; the message lists the valid names.
    """
    passes = available_passes()
    if name not in passes:
        close = difflib.get_close_matches(name, passes, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{where}: unknown pass {name!r}{hint}; valid passes: {', '.join(passes)}")
    return passes[name]


def build_pass(name: str, options: Mapping[str, Any] | None, where: str = "recipe") -> Pass:
    """Instantiate the pass ``name`` with validated ``options``."""
    return get_pass(name, where)(options, where=f"{where} {name}")
