"""Each quantized layer's own quantization noise, for every layer in one tapped run.

Accuracy control's ranking (:mod:`compressor.flow.ranking`) measures a layer's sensitivity
by running the model with that layer given back: one session per layer. This is the cheap
signal that picks which layers deserve that run.

For each layer ``L`` of the :class:`~compressor.quant.revert.QuantizationRecord`, a copy of
the quantized model gets a float *twin* of ``L``'s node: the same op and attributes, reading
what :func:`~compressor.quant.revert.give_back` would give it back (the float activation
``x`` in place of ``DQ(Q(x))``, the float weight ``W`` in place of ``DQ(Wq)``, the bias
before correction). Both run on the same (already noisy) inputs, so their difference is
the noise ``L`` itself adds:

    noise(L) = Σ ‖y_q − y_f‖² / Σ ‖y_f‖²

over the samples (padding masked as in :func:`compressor.flow.evaluation.mask_padding`),
where ``y_q`` is what ``L``'s readers see in the quantized model (its output, or the
output's Q/DQ pair where ``quantize`` wrote one) and ``y_f`` the twin's output. Every twin
and tap is an extra output of one session, run once over the data. (Fetching a tensor
keeps ONNX Runtime from fusing its producer into an int8 kernel, so the tapped model
rounds a little differently from the quantized one: another reason this is a proxy.)

An approximation, stated: ``noise(L)`` is local. It does not say how much of that noise
reaches the model's output (a layer before a normalisation, or one whose output a later
layer saturates, can add much noise that matters little), so it only orders the layers
for the measured ranking, which confirms the first of them by running (NNCF's and AIMET's
per-layer analyses measure each layer's effect on the output the same way).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from compressor.data import Dataset
from compressor.flow.evaluation import mask_padding
from compressor.model_io import clone_model
from compressor.passes._graph import add_initializer
from compressor.quant.revert import QuantizationRecord, QuantizedLayer
from compressor.targets.onnx import SharedInitializers, ort_session

__all__ = ["noise_model", "layer_noise"]

logger = logging.getLogger(__name__)


def _producers(graph: ir.Graph) -> dict[str, ir.Node]:
    return {node.outputs[0].name: node for node in graph if node.outputs}


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    values.update(graph.initializers)
    for node in graph:
        values.update((v.name, v) for v in node.outputs if v.name)
    return values


def _twin(graph: ir.Graph, layer: QuantizedLayer, node: ir.Node, values: Mapping[str, ir.Value],
          suffix: str) -> ir.Value:
    """A float copy of ``node`` (one node of ``layer``) appended to ``graph``; returns its first output."""
    inputs: list[ir.Value | None] = list(node.inputs)
    name = node.outputs[0].name
    for act in layer.activations:
        if act.node == name:
            inputs[act.index] = values[act.value]
    cut = len(inputs)
    for const in layer.constants:
        if const.node != name:
            continue
        if const.array is None:  # bias correction added this input: the twin has none
            cut = min(cut, const.index)
            continue
        inputs[const.index] = add_initializer(graph, f"{const.name}__float_twin{suffix}", const.array)
    twin = ir.Node(node.domain, node.op_type, inputs[:cut], attributes=list(node.attributes.values()),
                   num_outputs=len(node.outputs), name=f"{node.name or name}__float_twin{suffix}",
                   overload=node.overload, version=node.version)
    for out, like in zip(twin.outputs, node.outputs):
        out.name = f"{like.name}__float_twin{suffix}"
        out.type, out.shape = like.type, like.shape
    graph.append(twin)
    return twin.outputs[0]


def noise_model(quantized: ir.Model, record: QuantizationRecord) -> tuple[ir.Model, dict[str, list[tuple[str, str]]]]:
    """A copy of ``quantized`` with a float twin of each layer's nodes (module docstring).

    Args:
        quantized: The model ``quantize`` returned with ``record`` (not changed).
        record: What ``quantize`` recorded.

    Returns:
        The copy, whose extra outputs are the taps, and per layer its ``(quantized tap,
        float twin)`` output names (one pair per node of the layer).
    """
    model = clone_model(quantized)
    graph = model.graph
    values, nodes = _values(graph), _producers(graph)
    outputs = {v.name for v in graph.outputs}
    taps: dict[str, list[tuple[str, str]]] = {}
    for i, layer in enumerate(record.layers):
        pairs = []
        for name in dict.fromkeys([a.node for a in layer.activations] + [c.node for c in layer.constants]):
            node = nodes[name]
            float_out = _twin(graph, layer, node, values, f"_{i}")
            # What the layer's readers see: its output's Q/DQ pair where quantize wrote one.
            read = next((nodes[o.node].inputs[o.index] for o in layer.outputs if o.value == name), node.outputs[0])
            for value in (read, float_out):
                if value.name not in outputs:
                    graph.outputs.append(value)
                    outputs.add(value.name)
            pairs.append((read.name, float_out.name))
        taps[layer.name] = pairs
    return model, taps


def layer_noise(quantized: ir.Model, record: QuantizationRecord, data: Dataset, *,
                shared: SharedInitializers | None = None) -> dict[str, float]:
    """``noise(L)`` of every layer (module docstring) from one run over ``data``.

    Args:
        quantized: The model ``quantize`` returned with ``record`` (not changed).
        record: What ``quantize`` recorded.
        data: The samples.
        shared: The initializers of ``quantized`` already held for ONNX Runtime (not serialized again).

    Returns:
        Layer name -> relative noise (0 for a layer whose twin's output is all zero), in
        the record's order.
    """
    start = time.perf_counter()
    model, taps = noise_model(quantized, record)
    fetch = list(dict.fromkeys(name for pairs in taps.values() for pair in pairs for name in pair))
    session = ort_session(model, shared=shared) if shared is not None else ort_session(model)
    del model
    inputs = {i.name for i in session.get_inputs()}
    noise = dict.fromkeys(taps, 0.0)
    signal = dict.fromkeys(taps, 0.0)
    size = data.batch_size()
    samples = 0
    for i, feed in enumerate(data.batches()):
        results = dict(zip(fetch, session.run(fetch, {k: v for k, v in feed.items() if k in inputs})))
        batch = data.subset(i * size, min((i + 1) * size, len(data)))  # its attention_mask, if any
        samples += min(size, len(data) - i * size)
        for layer, pairs in taps.items():
            for q_name, f_name in pairs:
                q, f = np.asarray(results[q_name], np.float64), np.asarray(results[f_name], np.float64)
                q, f = mask_padding([q], batch)[0], mask_padding([f], batch)[0]
                noise[layer] += float(((q - f) ** 2).sum())
                signal[layer] += float((f**2).sum())
        del results
    relative = {name: noise[name] / signal[name] if signal[name] > 0 else 0.0 for name in taps}
    logger.info("accuracy control: quantization noise of %d layers from one run on %d samples in %.2fs",
                len(taps), samples, time.perf_counter() - start)
    return relative
