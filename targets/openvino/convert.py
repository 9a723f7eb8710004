"""ONNX -> OpenVINO conversion for target ``openvino``: the conversion, its errors per node, stable names.

* :func:`convert`: the model's bytes through the ONNX frontend and ovc's offline transformations
  (``ov.convert_model``'s path without its no-op preprocessing step).
* :func:`conversion_offenders` reads OpenVINO's conversion error (a translator's per-node
  failures, "No conversion rule found for operations: ...", "Conversion is failed for: ...")
  back to the ONNX nodes it concerns, one ``(node, reason)`` each (exit 4).
* :func:`canonical_names`: OpenVINO names nodes it creates ``<Type>_<n>`` with ``n`` from a
  process-wide counter, so the same model converted twice in one process would differ in
  those names; they are renumbered in graph order before saving, so lowering is
  deterministic.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from typing import Any

import onnx_ir as ir
from compressor.passes._graph import label

from compressor.model_io import model_bytes

try:
    import openvino as ov
except ImportError:  # optional backend: the openvino target refuses to start without it
    ov = None

__all__ = ["convert", "conversion_offenders", "canonical_names", "keep_input_names", "onnx_names"]

_NO_RULE = re.compile(r"No conversion rule found for operations: (.+)")
_FAILED_FOR = re.compile(r"Conversion is failed for: (.+)")
_DETAIL = re.compile(r"^-- (\S+) with a message:\n(.*?)(?=^-- |^Summary:|\Z)", re.M | re.S)
_ONNX_NODE = re.compile(r"While validating ONNX node '<Node\(([^)]*)\): ([^>]*)>'")
_AUTO_NAME = re.compile(r"(?<![\w.])([A-Z][A-Za-z0-9]*)_(\d+)(?!\w)")


def _op_key(node: ir.Node) -> tuple[str, str]:
    return ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)


def _nodes_for(model: ir.Model, ops_text: str) -> dict[tuple[str, str], list[str]]:
    """OpenVINO's op list (``com.example.Foo, TfIdfVectorizer-17``) -> the ONNX nodes using each."""
    wanted: dict[tuple[str, str], list[str]] = {}
    for item in ops_text.split(","):
        item = re.sub(r"-\d+$", "", item.strip())
        domain, _, op = item.rpartition(".")
        wanted[(domain, op)] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        key = _op_key(node)
        if key in wanted:
            wanted[key].append(label(node))
    return wanted


def conversion_offenders(model: ir.Model, text: str) -> list[tuple[str, str]]:
    """``(node, reason)`` pairs read from an OpenVINO conversion error."""
    offenders: list[tuple[str, str]] = []
    for op, block in _DETAIL.findall(text):  # per-node failures of a translator
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        named = _ONNX_NODE.search(block)
        node = (named.group(2) or named.group(1)) if named else op
        offenders.append((node, f"OpenVINO cannot convert {op}: {lines[-1] if lines else 'conversion failed'}"))
    match = _NO_RULE.search(text)
    if match:
        for (domain, op), nodes in _nodes_for(model, match.group(1)).items():
            what = f"{domain}::{op}" if domain else op
            for node in nodes or [what]:
                offenders.append((node, f"OpenVINO has no conversion rule for op {what}"))
    if not offenders and (match := _FAILED_FOR.search(text)):
        for (domain, op), nodes in _nodes_for(model, match.group(1)).items():
            offenders.extend((node, f"OpenVINO failed to convert op {op}") for node in nodes or [op])
    if not offenders:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        offenders.append(("model", f"OpenVINO cannot convert it: {(lines[-1] if lines else 'unknown error')[:300]}"))
    return offenders


def onnx_names(model: ir.Model) -> set[str]:
    names = {v.name for v in (*model.graph.inputs, *model.graph.outputs) if v.name}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        names.add(node.name or "")
        names.update(v.name for v in (*node.inputs, *node.outputs) if v is not None and v.name)
    names.update(model.graph.initializers)
    return names


def canonical_names(ov_model: Any, keep: Iterable[str]) -> int:
    """Renumber OpenVINO's auto names (``Constant_7288``) in graph order; returns how many.

    Tokens that also occur in the ONNX model's own names (``Conv_12`` from an old torch
    export) are kept as they are.
    """
    kept = {m.group(0) for name in keep for m in _AUTO_NAME.finditer(name)}
    mapping: dict[str, str] = {}

    def renumber(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in kept:
            return token
        if token not in mapping:
            new = f"{match.group(1)}_{len(mapping)}"
            while new in kept:
                new += "_"
            mapping[token] = new
        return mapping[token]

    for op in ov_model.get_ordered_ops():
        name = op.get_friendly_name()
        new_name = _AUTO_NAME.sub(renumber, name)
        if new_name != name:
            op.set_friendly_name(new_name)
    return len(mapping)


def keep_input_names(ov_model: Any, model: ir.Model) -> int:
    """Give each OpenVINO input the name of the ONNX input it came from, where conversion dropped it.

    The ONNX frontend merges tensor names: an input the graph hands on unchanged (ONNX's
    ``test_sequence_model1``: a ``SequenceAt`` that picks input ``Y``) keeps only the output's
    name (``out``), and the artifact would no longer take ``Y``. Inputs are matched in order
    (the frontend keeps the graph's input order), and only when every named one agrees.
    Returns how many names were added.
    """
    params = ov_model.get_parameters()
    wanted = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    if len(params) != len(wanted):
        return 0
    port_names = [param.output(0).get_names() for param in params]
    if any(names & set(wanted) and name not in names for names, name in zip(port_names, wanted)):
        return 0  # not the same order: leave the names as OpenVINO wrote them
    added = 0
    for param, names, name in zip(params, port_names, wanted):
        if name and name not in names:
            param.output(0).get_tensor().add_names({name})
            added += 1
    return added


def convert(model: ir.Model) -> Any:
    """``ov.Model`` of ``model`` (raises OpenVINO's error when conversion fails).

    What ``ov.convert_model`` does with an ONNX model and no options, minus ovc's
    preprocessing step (``apply_preprocessing`` builds a ``PrePostProcessor`` on every model,
    even with nothing to apply: about 0.7 s of 1.1 s on ddddocr's recogniser, three times a
    run): the ONNX frontend, then the offline transformations ovc applies, in its order
    (``openvino/tools/ovc/moc_frontend/moc_emit_ir.py``). The IR is the same but for
    OpenVINO's generated names, which :func:`canonical_names` renumbers anyway, and ovc's
    ``conversion_parameters`` in ``rt_info`` (tested). Any failure on this path is left to
    ``ov.convert_model`` itself, so a conversion error reads as ovc's
    (:func:`conversion_offenders` parses it).
    """
    data = model_bytes(model)
    try:
        from openvino._offline_transformations import (
            apply_moc_transformations,
            compress_quantize_weights_transformation,
        )
        from openvino.frontend import FrontEndManager
        from openvino.tools.ovc.moc_frontend.offline_transformations import (
            apply_fused_names_cleanup,
            apply_moc_legacy_transformations,
        )

        frontend = FrontEndManager().load_by_framework("onnx")
        ov_model = frontend.convert(frontend.load(io.BytesIO(data)))
        apply_moc_transformations(ov_model, cf=False, smart_reshape=True)
        compress_quantize_weights_transformation(ov_model)
        apply_moc_legacy_transformations(ov_model, [])
        apply_fused_names_cleanup(ov_model)
    except Exception:  # noqa: BLE001  (ovc's own path raises the error users and conversion_offenders read)
        ov_model = ov.convert_model(io.BytesIO(data))
    keep_input_names(ov_model, model)
    return ov_model
