"""What one ``compress`` run records in ``manifest.json``: latency, the gate, versions, the whole record.

The keys are DESIGN's "Artifact" contract; :class:`compressor.flow.artifact.ArtifactWriter`
writes the dict (strict JSON) and moves the folder into place.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from compressor import __version__
from compressor.data import Dataset
from compressor.flow.artifact import file_entries
from compressor.flow.calib_eval import RunData
from compressor.flow.evaluation import Evaluation, measure_latency
from compressor.inputs import InputSpec
from compressor.pass_manager import PassReport
from compressor.recipe import Recipe

__all__ = ["UNVERIFIED_GATE", "package_versions", "baseline_bytes", "latency_record", "gate_record",
           "build_manifest", "channel_record", "warn_if_slower"]

logger = logging.getLogger(__name__)

#: ``gate.reason`` then: the gate is not evaluated (recipe budget) or fails (explicit --max-drop).
UNVERIFIED_GATE = "accuracy unverified: no --calib or --eval data (random inputs say nothing about accuracy)"


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the artifact."""
    out = {"python": platform.python_version(), "compressor": __version__}
    for name in ("onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "torch", "openvino", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def baseline_bytes(folder: Path, tgt: Any) -> int:
    """Size of the baseline as deployed: the files the target wrote for it in ``folder`` that
    :meth:`~compressor.targets.base.Target.deployable` keeps (an fp32 engine, not the ONNX it
    was built from), as the artifact's size counts its own."""
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return sum(f.stat().st_size for f in tgt.deployable(files))


def latency_record(tgt: Any, baseline: Any, run_baseline: Any, run_compressed: Any, eval_set: Dataset,
                   work_dir: Path, repeats: int) -> dict[str, Any]:
    """``latency``: the baseline and the artifact timed on the first evaluation batch.

    Against the fp32 baseline in f32 and in the device's default precision (the gain a
    user on a bf16 CPU sees); the same run where the device's default is f32.
    """
    feed = next(eval_set.batches())
    run_device = tgt.device_reference_runner(baseline, work_dir / "baseline-device", run_baseline)
    baseline_ms = measure_latency(run_baseline, feed, repeats=repeats)
    record = {
        "baseline_ms": baseline_ms,
        "baseline_device_ms": baseline_ms if run_device is None else
        measure_latency(run_device, feed, repeats=repeats),
        "compressed_ms": measure_latency(run_compressed, feed, repeats=repeats),
        "batch": int(next(iter(feed.values())).shape[0]) if not all(eval_set.stacked.values()) else 1,
        "baseline_precision": getattr(run_baseline, "inference_precision", None),
        "device_precision": getattr(run_device or run_baseline, "inference_precision", None),
        "compressed_precision": getattr(run_compressed, "inference_precision", None),
        # what the artifact's time is when it is not the device's (the x86 HTP emulator)
        **({"compressed_note": note} if (note := getattr(run_compressed, "latency_note", None)) else {}),
    }
    warn_if_slower(record, tgt)
    return record


#: How much slower than the baseline an artifact may time before the run warns (timing noise).
SLOWER = 1.05
#: ... and by at least this much per call: below it, a call of a tiny model (the README's digits
#: CNN, 0.05 ms) is timer and thread wake-up noise (0.79x to 1.48x between two runs of one command).
SLOWER_MS = 0.05


def warn_if_slower(latency: Mapping[str, Any], tgt: Any) -> None:
    """Warn when the artifact runs slower than the fp32 model as the device runs it by default.

    Not for a time that is not the device's (``compressed_note``: the x86 HTP emulator). Where
    the target runs int8 on this host's CPU and the CPU has no VNNI (``describe()["int8_vnni"]``
    is ``False``), the warning says why that is expected for int8 matrix products.
    """
    base, ours = latency["baseline_device_ms"], latency["compressed_ms"]
    if latency.get("compressed_note") or not base or ours <= base * SLOWER or ours - base < SLOWER_MS:
        return
    vnni = tgt.describe().get("int8_vnni")
    why = (" This CPU has no VNNI: its int8 kernels sum u8 x s8 products through int16 (vpmaddubsw), which can be "
           "slower than its float kernels (transformer MatMuls, layers of few channels)." if vnni is False else "")
    logger.warning("the compressed artifact runs slower than the fp32 model here: %.2f ms vs %.2f ms per batch "
                   "(%.2fx).%s", ours, base, base / ours, why)


def channel_record(evaluation: Evaluation, model: Any) -> dict[str, Any] | None:
    """``evaluation.small_channels`` with the output's name; warns when the gate's metric hides them."""
    small = evaluation.small_channels
    if small is None:
        return None
    outputs = list(getattr(getattr(model, "graph", None), "outputs", []))
    record = {**small, "output": outputs[small["output"]].name if small["output"] < len(outputs) else small["output"]}
    if record["hidden"]:
        logger.warning("the %s metric hardly sees channels %s%s of output %r (%d of %d, %.2g%% of the outputs' energy): "
                       "together their cosine is %.4f. Small values beside large ones in one output (a detector's "
                       "class scores beside box coordinates) lose precision unseen; check the artifact with a task "
                       "metric.", evaluation.metric, record["channels"],
                       "" if record.get("axis", 1) == 1 else " (its last axis)", record["output"], record["count"],
                       record["of"], 100 * record["energy_share"], record["cosine"])
    return record


def gate_record(budget: float | None, verified: bool, evaluation: Evaluation, cause: PassReport | None,
                explicit: bool) -> dict[str, Any]:
    """``gate``: the budget and whether the drop is within it.

    Args:
        budget: The recipe's ``max_drop`` after CLI overrides (``None``: no gate).
        verified: Whether the evaluation samples are real (random ones judge nothing).
        evaluation: The artifact's evaluation.
        cause: The pass before quantization whose own drop broke the budget, if any.
        explicit: Whether ``--max-drop`` was given (unverified accuracy then fails the gate).
    """
    if budget is None:
        return {"max_drop": None, "passed": None}
    if not verified:
        return {"max_drop": budget, "passed": False if explicit else None, "reason": UNVERIFIED_GATE}
    gate: dict[str, Any] = {"max_drop": budget, "passed": bool(evaluation.drop <= budget + 1e-12)}
    if cause is not None:
        gate["reason"] = f"the drop comes from {cause.name} (drop {cause.accuracy_drop:.6f} right after it), " \
                         "not quantization"
    return gate


def build_manifest(*, model_path: str | Path, captured: Any, baseline_dir: Path, recipe: Recipe, tgt: Any,
                   specs: list[InputSpec], root: Path, files: list[Path], reports: list[PassReport],
                   data: RunData, evaluation: Evaluation, control: dict[str, Any] | None, gate: dict[str, Any],
                   precision_fallback: dict[str, Any] | None, recovery: dict[str, Any] | None,
                   latency: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The manifest's record of the run (the target's own report is added by the caller).

    Args:
        baseline_dir: Where the target lowered the fp32 baseline (``model.baseline_bytes``).
        root: The artifact folder ``files`` are relative to.
        control: Accuracy control's record (``None``: it did not run).
        recovery: The recovery stage's record (``None``: the recipe has no ``recover:``).
    """
    calib, eval_set = data.calib, data.eval
    return {
        "compressor": __version__,
        "model": {"source": str(model_path), "format": captured.source_format,
                  "baseline_bytes": baseline_bytes(baseline_dir, tgt), **captured.describe()},
        "recipe": recipe.to_json(),
        "target": tgt.describe(),
        "input_spec": [s.to_json() for s in specs],
        "files": file_entries(root, files, tgt.deployable(files)),
        "passes": [r.to_json() for r in reports],
        "calibration": None if calib is None else
        {"source": calib.source, "sha256": calib.sha256, "samples": len(calib)},
        "evaluation": {"source": data.source, "data": eval_set.source, "sha256": eval_set.sha256,
                       "samples": evaluation.samples, "metric": evaluation.metric,
                       "verified": data.verified,
                       "small_channels": channel_record(evaluation, captured.model)},
        "metrics": {"baseline": evaluation.baseline, "compressed": evaluation.compressed},
        "accuracy_drop": evaluation.drop,
        "accuracy_control": control,
        "gate": gate,
        "precision_fallback": precision_fallback,
        **({"recovery": recovery} if recovery is not None else {}),
        "latency": latency,
        "timings": timings,
        "versions": package_versions(),
    }
