"""Recipes: YAML files naming the passes to run, calibration and the accuracy budget.

```yaml
name: int8
description: INT8 static quantization
passes:
  - fold-constants
  - fold-batchnorm
  - quantize: {weights: int8-per-channel, activations: int8, calibrator: percentile}
calibration: {samples: 256}
accuracy: {metric: auto, max_drop: 0.01}
```

Validated on load: an error names the file, the key and the valid choices. Pass options
are validated by each pass's ``Options`` record. The resolved recipe (after CLI
overrides) is written into the artifact's manifest.

One recipe serves every target: a target that needs passes after quantization declares
them in its ``Capabilities.after_quantize`` (``qnn-htp``: ``qnn-legalize``), and
:meth:`Recipe.for_target` appends them to a recipe that quantizes and does not run them
already; the resolved recipe names them in ``target_passes``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from compressor.errors import RecipeError, UsageError
from compressor.options import options_to_dict, parse_options
from compressor.pipeline import Pass, build_pass, get_pass
from compressor.recover.config import RecoverConfig

if TYPE_CHECKING:
    from compressor.targets.base import Target, TargetPass

__all__ = ["check_budget", "Recipe", "PassStep", "CalibrationConfig", "AccuracyConfig", "load_recipe", "builtin_recipes"]

logger = logging.getLogger(__name__)

#: What a quantizing pass provides (``quantize``); a target's ``after_quantize`` passes follow it.
QUANTIZED = "quantized"

RECIPE_KEYS = ("name", "description", "passes", "calibration", "accuracy", "recover")


def check_budget(value: float, what: str = "--max-drop", error: type[Exception] = UsageError) -> float:
    """Return ``value`` if it is a usable accuracy budget: a finite number >= 0.

    Raises:
        error: (``UsageError`` by default, exit 2) for a negative, NaN or infinite budget;
            NaN would make every comparison false and the gate meaningless.
    """
    if not math.isfinite(value) or value < 0:
        raise error(f"{what} must be a finite number >= 0 (an absolute drop of the metric, e.g. 0.01 for one "
                    f"point of top-1), got {value:g}")
    return value


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """``calibration:`` section.

    Attributes:
        samples: At most this many calibration samples are used.
        holdout: Fraction of calibration data held out for evaluation when no --eval is given.
        seed: Seed for sampling and for random data.
    """

    samples: int = 256
    holdout: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"option 'samples' must be >= 1, got {self.samples}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"option 'holdout' must be in [0, 1), got {self.holdout}")


@dataclasses.dataclass(frozen=True)
class AccuracyConfig:
    """``accuracy:`` section.

    Attributes:
        metric: ``top1`` (needs labels), ``cosine`` (fidelity to fp32), or ``auto``
            (top1 when the eval data has labels, else cosine).
        max_drop: Largest allowed drop of the metric (absolute), or ``None`` for no gate.
        max_fallback: Accuracy control gives back at most this fraction of the quantized
            layers; past it the gate fails (exit 3) instead of shipping a mostly-float model.
        ranking_samples: Samples used to rank layers by sensitivity: the eval samples on
            which the fully quantized model errs most (NNCF's subset selection).
        ranking_backend: ``onnxruntime``: rank on the Q/DQ model in ONNX Runtime's CPU
            int8 kernels, against the float model there (no backend compile per layer:
            about 2x faster on MiniLM); ``target``: rank on the target's own runtime.
            The greedy give-back and the gate always measure on the target.
        screen_samples: Two-stage ranking (:mod:`compressor.flow.ranking`): every layer is
            first ranked on this many of the samples with the largest error; 0 ranks every
            layer on all ``ranking_samples``.
        confirm_layers: After the screen, this many of the most sensitive layers are ranked
            again on all ``ranking_samples`` and tried first; the others follow in the
            screen's order. With no more layers than this, there is no screen.
    """

    metric: Literal["auto", "top1", "cosine"] = "auto"
    max_drop: float | None = None
    max_fallback: float = 0.5
    ranking_samples: int = 32
    ranking_backend: Literal["onnxruntime", "target"] = "onnxruntime"
    screen_samples: int = 8
    confirm_layers: int = 4

    def __post_init__(self) -> None:
        if self.max_drop is not None:
            check_budget(self.max_drop, "option 'max_drop'", ValueError)
        if not 0.0 <= self.max_fallback <= 1.0:
            raise ValueError(f"option 'max_fallback' must be in [0, 1], got {self.max_fallback}")
        if self.ranking_samples < 1:
            raise ValueError(f"option 'ranking_samples' must be >= 1, got {self.ranking_samples}")
        if self.screen_samples < 0:
            raise ValueError(f"option 'screen_samples' must be >= 0 (0: no screen), got {self.screen_samples}")
        if self.confirm_layers < 1:
            raise ValueError(f"option 'confirm_layers' must be >= 1, got {self.confirm_layers}")


@dataclasses.dataclass(frozen=True)
class PassStep:
    """One entry of ``passes:``: a pass name and its raw options."""

    name: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe."""

    name: str
    description: str
    passes: tuple[PassStep, ...]
    calibration: CalibrationConfig
    accuracy: AccuracyConfig
    source: str
    recover: RecoverConfig | None = None  # sparse fine-tuning before capture (compressor.recover)
    #: Names of the passes :meth:`for_target` appended (the target's, not the recipe's own).
    target_passes: tuple[str, ...] = ()

    def build_passes(self) -> list[Pass]:
        """Instantiate every pass (validating its options)."""
        return [build_pass(s.name, s.options, where=f"{self.source}: passes[{i}]") for i, s in enumerate(self.passes)]

    def with_overrides(self, *, max_drop: float | None = None, samples: int | None = None) -> Recipe:
        """The recipe with CLI overrides applied."""
        if max_drop is not None:
            check_budget(max_drop)
        accuracy = dataclasses.replace(self.accuracy, max_drop=max_drop) if max_drop is not None else self.accuracy
        calibration = dataclasses.replace(self.calibration, samples=samples) if samples is not None else self.calibration
        return dataclasses.replace(self, accuracy=accuracy, calibration=calibration)

    @property
    def target_steps(self) -> tuple[PassStep, ...]:
        """The steps :meth:`for_target` added (named in ``target_passes``)."""
        return tuple(s for s in self.passes if s.name in self.target_passes)

    def for_target(self, target: Target) -> Recipe:
        """The recipe completed with the passes ``target`` needs after quantization.

        For each of ``target.capabilities.after_quantize``: appended at the end (before a pass
        that ``runs_on_target``, ``device-bias-correction``) when a step
        of the recipe provides ``quantized`` and no step runs that pass or provides all it
        provides (``w8a8-npu`` lists ``qnn-legalize`` itself); its ``from_quantize`` options
        are the last quantizing step's, defaults filled in. A recipe that does not quantize
        (``fold``) is returned as it is.
        """
        wanted = target.capabilities.after_quantize
        quantizing = [s for s in self.passes if QUANTIZED in get_pass(s.name).provides]
        if not wanted or not quantizing:
            return self
        quantize = build_pass(quantizing[-1].name, quantizing[-1].options).options_dict()
        added = [_target_step(t, quantize, self.source) for t in wanted if not _runs(self.passes, t)]
        last = max(i for i, s in enumerate(self.passes) if QUANTIZED in get_pass(s.name).provides)
        # before a pass that measures the model on the device (after quantization): it must see
        # the model as lowered
        at = next((i for i, s in enumerate(self.passes) if i > last and get_pass(s.name).runs_on_target),
                  len(self.passes))
        passes = self.passes[:at] + tuple(added) + self.passes[at:]
        _check_device_passes(passes, wanted, self.source, target.name)
        if not added:
            return self
        logger.debug("target %s completes recipe %r after %s: %s", target.name, self.name, quantizing[-1].name,
                     ", ".join(f"{s.name} {dict(s.options)}" for s in added))
        return dataclasses.replace(self, passes=passes, target_passes=self.target_passes + tuple(s.name for s in added))

    def to_json(self) -> dict[str, Any]:
        """The resolved recipe: pass options with every default filled in."""
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "passes": [{p.name: p.options_dict()} for p in self.build_passes()],
            **({"target_passes": list(self.target_passes)} if self.target_passes else {}),
            "calibration": options_to_dict(self.calibration),
            "accuracy": options_to_dict(self.accuracy),
            **({"recover": options_to_dict(self.recover)} if self.recover is not None else {}),
        }


def _check_device_passes(steps: tuple[PassStep, ...], wanted: tuple[TargetPass, ...], source: str,
                         target: str) -> None:
    """Refuse a pass that measures on the device (``runs_on_target``) before quantization or
    before one of the target's passes: it would measure a model the device never runs.

    Raises:
        RecipeError: names the pass and the one it must follow.
    """
    for i, step in enumerate(steps):
        if not get_pass(step.name).runs_on_target:
            continue
        later = next((s.name for s in steps[i + 1:]
                      if QUANTIZED in get_pass(s.name).provides or any(_runs((s,), t) for t in wanted)), None)
        if later is not None:
            raise RecipeError(f"{source}: pass {step.name!r} measures the model on {target}'s device and must come "
                              f"after {later!r}: move it to the end of the passes")


def _runs(steps: tuple[PassStep, ...], wanted: TargetPass) -> bool:
    """Whether ``steps`` already run ``wanted``: by name, or a step providing all it provides."""
    provides = get_pass(wanted.name).provides
    return any(s.name == wanted.name or (provides and provides <= get_pass(s.name).provides) for s in steps)


def _target_step(wanted: TargetPass, quantize: Mapping[str, Any], source: str) -> PassStep:
    """``wanted`` as a recipe step, its ``from_quantize`` options from the quantizing step's."""
    options = {**wanted.options, **{key: quantize[key] for key in wanted.from_quantize if key in quantize}}
    build_pass(wanted.name, options, where=f"{source}: target pass")  # validated now, not halfway through a run
    return PassStep(wanted.name, options)


def _recipes_dir() -> importlib.resources.abc.Traversable:
    return importlib.resources.files("compressor.recipes")


def builtin_recipes() -> dict[str, str]:
    """Built-in recipe names and their one-line descriptions."""
    out = {}
    for entry in sorted(_recipes_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text()) or {}
            out[entry.name[:-5]] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def _parse_steps(raw: Any, where: str) -> tuple[PassStep, ...]:
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{where}: key 'passes' must be a non-empty list of pass names or {{name: {{options}}}} mappings")
    steps = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            steps.append(PassStep(item, {}))
        elif isinstance(item, Mapping) and len(item) == 1:
            (name, opts), = item.items()
            if opts is not None and not isinstance(opts, Mapping):
                raise RecipeError(f"{where}: passes[{i}] {name!r}: options must be a mapping, got {opts!r}")
            steps.append(PassStep(str(name), dict(opts or {})))
        else:
            raise RecipeError(f"{where}: passes[{i}] must be a pass name or a one-key mapping {{name: {{options}}}}, "
                              f"got {item!r}")
    return tuple(steps)


def parse_recipe(data: Any, source: str) -> Recipe:
    """Validate a recipe mapping (from YAML) into a :class:`Recipe`.

    Raises:
        RecipeError: names ``source``, the key and the valid choices.
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with keys {', '.join(RECIPE_KEYS)}")
    unknown = sorted(set(data) - set(RECIPE_KEYS), key=str)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), RECIPE_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{source}: unknown key {unknown[0]!r}{hint}; valid keys: {', '.join(RECIPE_KEYS)}")
    if "passes" not in data:
        raise RecipeError(f"{source}: missing key 'passes'")
    if not isinstance(data.get("recover", {}), (Mapping, bool, type(None))):
        raise RecipeError(f"{source}: key 'recover' must be a mapping of options (e.g. {{steps: 200}}) or true, "
                          f"got {data['recover']!r}")
    recipe = Recipe(
        name=str(data.get("name") or Path(source).stem),
        description=str(data.get("description") or ""),
        passes=_parse_steps(data["passes"], source),
        calibration=parse_options(CalibrationConfig, data.get("calibration"), f"{source}: calibration"),
        accuracy=parse_options(AccuracyConfig, data.get("accuracy"), f"{source}: accuracy"),
        source=source,
        recover=None if data.get("recover", False) in (None, False) else
        parse_options(RecoverConfig, {} if data["recover"] is True else data["recover"], f"{source}: recover"),
    )
    recipe.build_passes()  # validates pass names and options now, not halfway through a run
    return recipe


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a built-in recipe by name, or a recipe file by path.

    Raises:
        RecipeError: unknown name (lists built-ins), unreadable file, invalid YAML or content.
    """
    text_path = str(name_or_path)
    path = Path(text_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in text_path:
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
        source, text = str(path), path.read_text()
    else:
        entry = _recipes_dir() / f"{text_path}.yaml"
        if not entry.is_file():
            raise RecipeError(f"unknown recipe {text_path!r}; built-in recipes: {', '.join(builtin_recipes())} "
                              "(or give a path to a .yaml file)")
        source, text = f"recipes/{text_path}.yaml", entry.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{source}: invalid YAML{at}: {problem}") from None
    return parse_recipe(data, source)
