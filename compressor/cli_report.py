"""What the ``compress`` commands print and write besides the artifact: the summary table, the
gate's error line, the JUnit test case of the accuracy gate, and the text of ``recipes``,
``inspect``, ``sweep`` and ``search``. Each function returns text; :mod:`compressor.cli` prints it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compressor import strict_json
from compressor.flow.artifact import deployable_bytes, deployable_entries
from compressor.targets.base import VNNI_CPUS

__all__ = ["fmt", "gate_failure", "inspect_text", "recipes_table", "search_text", "size_row", "summary", "sweep_text",
           "table", "write_junit"]


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Rows under a header, columns padded to their widest cell, a dashed rule between."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def fmt(x: Any, digits: int = 4) -> str:
    """A float to ``digits`` places, ``None`` as ``-``, anything else as text."""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return "-" if x is None else str(x)


def recipes_table(target: Any = None) -> str:
    """The built-in recipes, one row each; with a target, also the passes each runs there,
    those the target appends (``Capabilities.after_quantize``) marked ``+``."""
    from compressor.recipe import builtin_recipes, load_recipe

    recipes = sorted(builtin_recipes().items())
    if target is None:
        return table(recipes, ["recipe", "description"])
    rows = []
    for name, description in recipes:
        recipe = load_recipe(name).for_target(target)
        added = recipe.target_steps
        rows.append((name, ", ".join(s.name if s not in added else f"+{s.name}" for s in recipe.passes), description))
    return table(rows, ["recipe", f"passes on {target.name}", "description"])


def size_row(manifest: dict[str, Any]) -> str:
    """The summary's ``size``: the baseline's bytes against the artifact's deployed files
    (:func:`~compressor.flow.artifact.deployable_bytes`), naming them when companions are left out."""
    files = manifest["files"]
    deployed = deployable_entries(files)
    size_in, size_out = manifest["model"]["baseline_bytes"], deployable_bytes(files)
    ratio = size_in / max(size_out, 1)  # "0.52x smaller" read as smaller; a larger artifact says so
    if not size_in or not size_out:
        change = "(size not compared"  # an empty side: no ratio to print (nor to divide by)
    elif f"{ratio:.2f}" == "1.00" or f"{1 / ratio:.2f}" == "1.00":
        change = "(the same size"
    else:
        change = f"({ratio:.2f}x smaller" if ratio > 1 else f"({1 / ratio:.2f}x larger"
    row = f"{size_in / 1e6:.3f} MB -> {size_out / 1e6:.3f} MB " + change
    if len(deployed) == len(files):
        return row + ")"
    left = len(files) - len(deployed)
    return (row + f"; deployable files: {', '.join(e['path'] for e in deployed)}; "
            f"{left} companion file{'s' if left > 1 else ''} not counted)")


def summary(manifest: dict[str, Any]) -> str:
    """The per-pass table and the summary table printed after a run, from its manifest.

    A pass the target appended to the recipe (``recipe.target_passes``) is marked with the target's name.
    """
    added = set(manifest["recipe"].get("target_passes", ()))
    mark = f" (target {manifest['target']['name']})"
    passes = table([(r["name"] + (mark if r["name"] in added else ""), "yes" if r["modified"] else "no",
                      ", ".join(f"{k}={fmt(v, 3)}" for k, v in r["stats"].items()
                                if not isinstance(v, (dict, list)) and k != "nothing_quantized"),
                      f"{r['seconds']:.2f}") for r in manifest["passes"]],
                    ["pass", "changed", "stats", "s"])
    metric = manifest["evaluation"]["metric"]
    key = "top1" if metric == "top1" else "cosine_mean"
    lat = manifest["latency"]
    gate = manifest["gate"]
    if "reason" in gate:
        verdict = f"{'n/a' if gate['passed'] is None else 'FAIL'} ({gate['reason']})"
    elif gate["passed"] is None:
        verdict = "n/a (no --max-drop)"
    else:
        verdict = f"{'PASS' if gate['passed'] else 'FAIL'} (max drop {gate['max_drop']})"
    rows = [
        ("target", manifest["target"]["name"] + (
            f", for a CPU {'with' if cpu in VNNI_CPUS else 'without'} VNNI (--target-cpu {cpu})"
            if (cpu := manifest["target"].get("deployment_cpu", "host")) != "host" else "")),
        ("size", size_row(manifest)),
        ("latency", f"{lat['baseline_ms']:.2f} ms -> {lat['compressed_ms']:.2f} ms per batch of {lat['batch']} "
                    + (f"({lat['compressed_note']}; no ratio)" if lat.get("compressed_note") else
                       f"({lat['baseline_ms'] / max(lat['compressed_ms'], 1e-9):.2f}x)")
                    + (f"; fp32 in the device's default {lat['device_precision']}: {lat['baseline_device_ms']:.2f} ms "
                       f"({lat['baseline_device_ms'] / max(lat['compressed_ms'], 1e-9):.2f}x)"
                       if lat.get("device_precision") not in (None, lat.get("baseline_precision"))
                       and not lat.get("compressed_note") else "")),
        (f"{metric}", f"{fmt(manifest['metrics']['baseline'][key])} -> {fmt(manifest['metrics']['compressed'][key])} "
                      f"on {manifest['evaluation']['samples']} samples ({manifest['evaluation']['source']})"),
        ("drop", fmt(manifest["accuracy_drop"])),
        *([("small channels", f"{sc['output']} channels {sc['channels']}"
                              f"{'' if sc.get('axis', 1) == 1 else ' (last axis)'} ({sc['count']} of {sc['of']}, "
                              f"{100 * sc['energy_share']:.2g}% of the outputs' energy): cosine {sc['cosine']:.4f} "
                              f"together; the {metric} above hardly sees them: check a task metric")]
          if (sc := manifest["evaluation"].get("small_channels")) and sc.get("hidden") else []),
        *([("drop by pass", ", ".join(f"{r['name']} {r['accuracy_drop']:.4f}" for r in measured))]
          if len(measured := [r for r in manifest["passes"] if r.get("accuracy_drop") is not None]) > 1 else []),
        *([("int8 layers", f"{rt['int8']} of {rt['int8'] + rt['float']} compute layers ran in int8"
                           + (f"; float: {', '.join(rt['float_layers'][:4])}" if rt["float_layers"] else ""))]
          if (rt := manifest.get("runtime_layers")) else []),
        *([("precision", (f"drop {pf['drop']:.6f} in the device's default {pf['evaluated_in']}, "
                          f"{pf['fallback_drop']:.6f} in {pf['fallback']}: "
                          + (f"{pf['fallback']} pinned in the artifact" if pf["pinned"] else "not pinned")
                          + (f" after accuracy control ({len(pf['requantized'])} given-back layer(s) quantized "
                             "again)" if pf.get("after_accuracy_control") and pf["pinned"] else "")
                          + (f"; {pin['note']}" if pf["pinned"] and (pin := (
                              manifest.get("inference_precision") or {}).get("pinned") or {}).get("note") else "")))]
          if (pf := manifest.get("precision_fallback")) else []),
        *([("activations", f"{sf['scheme']}: drop {sf['drop']:.6f}; {sf['fallback']}: {sf['fallback_drop']:.6f}, "
                           + ("kept" if sf["kept"] else "not kept"))]
          if (sf := manifest.get("scheme_fallback")) else []),
        *([("cpu front end", f"{fe['nodes']} node(s) in float on the CPU ({fe['file']}), the rest on the device")]
          if (fe := (manifest.get("qnn_htp") or {}).get("cpu_front_end")) else []),
        *([("given back", f"{len(ac['layers'])} layer(s) ({ac['action']}): {', '.join(ac['layers'][:4]) or 'none'}"
                          + (f"; {n} not tried (promoting them changes nothing)"
                             if (n := ac.get("skipped_already_16bit")) else ""))]
          if (ac := manifest.get("accuracy_control")) else []),
        *[("quantized", _nothing_quantized(r, manifest["passes"]))
          for r in manifest["passes"] if r["stats"].get("nothing_quantized")],
        ("gate", verdict),
    ]
    return passes + "\n\n" + table(rows, ["summary", ""])


def _nothing_quantized(report: dict[str, Any], passes: list[dict[str, Any]]) -> str:
    """The summary's row for a ``quantize`` that quantized no layer: a no-op, unless a target pass
    after it (``qnn-legalize``: HTP has no float path) put Q/DQ on every tensor."""
    why = report["stats"]["nothing_quantized"]
    after = passes[passes.index(report) + 1:]
    done = next((p for p in after if p["stats"].get("qdq_added")), None)
    if done is None:
        return f"nothing was quantized: {why}"
    return (f"no layer by {report['name']} ({why}); {done['name']} quantized every tensor "
            f"({done['stats']['qdq_added']} Q/DQ pairs)")


def write_junit(path: Path, manifest: dict[str, Any] | None, error: str | None) -> None:
    """One JUnit test case, ``accuracy-gate``: a failure when the gate failed, an error when the run did."""
    from xml.sax.saxutils import escape, quoteattr

    name = "accuracy-gate"
    body, failures, errors = "", 0, 0
    if error is not None:
        errors = 1
        body = f"<error message={quoteattr(error)}/>"
    elif manifest is not None and manifest["gate"]["passed"] is False:
        failures = 1
        msg = manifest["gate"].get("reason") or (
            f"accuracy drop {manifest['accuracy_drop']:.6f} > max_drop {manifest['gate']['max_drop']}")
        body = f"<failure message={quoteattr(msg)}>{escape(strict_json.dumps(manifest['metrics']))}</failure>"
    classname = "compressor" if manifest is None else f"compressor.{manifest['target']['name']}.{manifest['recipe']['name']}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<testsuite name="compressor" tests="1" failures="{failures}" errors="{errors}">\n'
        f'  <testcase classname={quoteattr(classname)} name="{name}">{body}</testcase>\n'
        "</testsuite>\n"
    )


def gate_failure(manifest: dict[str, Any]) -> str:
    """The error line of a failed accuracy gate (exit 3), from the run's manifest."""
    gate = manifest["gate"]
    if not manifest["evaluation"]["verified"]:
        return (f"accuracy gate failed: {gate['reason']}; pass --calib or --eval with real samples "
                "(artifact written, gate.passed: false)")
    if "reason" in gate:
        return (f"accuracy gate failed: drop {manifest['accuracy_drop']:.6f} > max_drop {gate['max_drop']}: "
                f"{gate['reason']} (artifact written, gate.passed: false)")
    return (f"accuracy gate failed: drop {manifest['accuracy_drop']:.6f} > max_drop {gate['max_drop']} "
            "(artifact written, gate.passed: false)")


def inspect_text(model: str, report: dict[str, Any]) -> str:
    """``compress inspect``'s tables: inputs and outputs, the op histogram, what each pass would change."""
    in_nodes = report.get("parameters_in_constant_nodes", 0)
    held = "" if not in_nodes else (" (all in Constant nodes)" if in_nodes == report["parameters"]
                                    else f" ({in_nodes:,} in Constant nodes)")
    head = (f"model: {model} ({report['format']}, opset {report['opset']}, "
            f"{report['parameters']:,} parameters{held}, {report['nodes']} nodes)\n")
    io = table([("input", v["name"], v["shape"], v["dtype"]) for v in report["inputs"]]
               + [("output", v["name"], v["shape"], v["dtype"]) for v in report["outputs"]],
               ["kind", "name", "shape", "dtype"])
    ops = table(sorted(report["ops"].items(), key=lambda kv: (-kv[1], kv[0])), ["op", "count"])
    passes = table([(n, v["would_change"], v["detail"]) for n, v in report["passes"].items()],
                   ["pass", "would change", "detail"])
    return "\n\n".join([head + "\n" + io, ops, passes])


def sweep_text(result: Any) -> str:
    """``compress sweep``'s table, knees and written files (a :class:`compressor.flow.sweep.SweepResult`)."""
    from compressor.flow.sweep import format_table

    lines = [format_table(result), ""]
    if result.max_drop is not None:
        if result.knee is not None:
            lines.append(f"knee (largest level within max drop {result.max_drop:g}): {result.knee.level} "
                         f"(sparsity {result.knee.sparsity:.3f}, {result.metric} {result.knee.metric:.4f}, "
                         f"drop {result.knee.drop:.4f})")
        else:
            lines.append(f"knee: none; no level is within max drop {result.max_drop:g}")
        if result.recovered:
            knee = result.recovered_knee
            lines.append(f"knee recovered: {knee.level} (sparsity {knee.sparsity:.3f}, {result.metric} "
                         f"{knee.metric:.4f}, drop {knee.drop:.4f})" if knee is not None
                         else "knee recovered: none within max drop")
    lines.append(f"written: {', '.join(str(path) for path in result.files.values())}")
    if "png" not in result.files:
        lines.append("no plot: matplotlib is not installed (pip install matplotlib); the curve is in sweep.csv")
    return "\n".join(lines)


def search_text(result: Any, max_drop: float) -> str:
    """``compress search``'s table, budget, written files and best candidate (a ``SearchResult``)."""
    from compressor.flow.search import format_search_table

    lines = [format_search_table(result), ""]
    if result.latency_note:
        lines.append(f"latency: {result.latency_note}; the front and the best are ordered by these times")
    if result.budget_minutes is not None:
        lines.append(f"budget: {result.budget_minutes:g} min; {result.ran} of {len(result.candidates)} candidates "
                     f"ran, {result.not_run} not run")
    lines.append(f"written: {', '.join(str(path) for path in result.files.values())}")
    if "png" not in result.files:
        lines.append("no plot: matplotlib is not installed (pip install matplotlib); the candidates are in "
                     "search.csv")
    if result.best is None:
        lines.append(f"best: none; no candidate is within max drop {max_drop:g}")
    else:
        lines.append(f"best: candidate {result.best.index} {result.best.options} -> {result.files['best']}")
    return "\n".join(lines)
