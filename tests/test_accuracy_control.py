"""Accuracy control end to end on tiny graphs: giving back by graph edit, 16-bit promotion,
where the ranking runs, and the ranking cache.

The model is a small CNN built here (Conv -> Relu -> Conv -> Relu -> Flatten -> Gemm ->
Relu -> Gemm) with random weights; fidelity to the fp32 model (cosine) is the metric and a
zero budget is never met, so every run ranks and tries layers. Exactness is asserted
bit for bit through ONNX Runtime: a layer given back by the edit computes exactly what it
computes when it is never quantized.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import compressor.targets.onnx as onnx_target
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compressor.targets.onnx import OnnxTarget, SharedInitializers, ort_session
from compressor.targets.qnn_htp import QNN_HTP_CAPABILITIES
from onnx import TensorProto, helper, numpy_helper

import compressor.flow.ranking as ranking_module
import compressor.flow.compress as compress_module
from compressor.data import load_npz
from compressor.executor import InProcessExecutor
from compressor.flow.accuracy import ControlResult, given_back_stats
from compressor.flow.compress import compress
from compressor.inputs import model_input_specs
from compressor.model_io import clone_model, ir_bytes, model_bytes, save_model
from compressor.pass_manager import PassReport
from compressor.pipeline import Pass, PassContext, PassResult, build_pass
from compressor.quant.revert import give_back
from compressor.targets import get_target
from tests.ortutil import SimulatedHtp, model_from_text, onnx_specs_target, saturating_qdq_conv

LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def cnn() -> ir.Model:
    """x[N,4,6,6] -> conv1(+b) -> Relu -> conv2 (no bias) -> Relu -> Flatten -> fc1(+b) -> Relu -> fc2(+b)."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", w(8, 4, 3, 3)), ("b1", (rng.standard_normal(8) * 0.1).astype(np.float32)), ("w2", w(8, 8, 3, 3)),
        ("fw1", w(16, 8 * 6 * 6)), ("fb1", (rng.standard_normal(16) * 0.1).astype(np.float32)),
        ("fw2", w(5, 16)), ("fb2", (rng.standard_normal(5) * 0.1).astype(np.float32))]]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw1", "fb1"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "fw2", "fb2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


@pytest.fixture(autouse=True)
def _onnx_specs(monkeypatch):
    """Accuracy control's mechanics on the ``onnx`` target's specs without its speed rules:
    ``min_output_channels`` would keep this net's 8-channel convolutions float
    (:func:`~tests.ortutil.onnx_specs_target`). A test that sets its own target overrides it."""
    real = compress_module.get_target
    monkeypatch.setattr(compress_module, "get_target", lambda name, target_cpu="host": onnx_specs_target(target_cpu)
                        if name == "onnx" else real(name, target_cpu))


def write_files(tmp: Path) -> dict[str, Path]:
    """The tiny CNN, its calibration and its eval data, written under ``tmp``."""
    rng = np.random.default_rng(1)
    out = {"model": tmp / "cnn.onnx", "calib": tmp / "calib.npz", "eval": tmp / "eval.npz"}
    save_model(cnn(), out["model"])
    np.savez(out["calib"], x=rng.standard_normal((32, 4, 6, 6)).astype(np.float32))
    np.savez(out["eval"], x=rng.standard_normal((24, 4, 6, 6)).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_files(tmp_path_factory.mktemp("acctl"))


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _quantize(files: dict[str, Path], **options):
    model = cnn()
    ctx = PassContext(target=onnx_specs_target(), calibration=load_npz(files["calib"], model_input_specs(model)),
                      properties={"constants-folded"})
    return build_pass("quantize", {"calibrator": "minmax", "bias_correction": True, **options}).run(model, ctx)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return ort_session(model).run(None, {"x": x})[0]


class CountingExecutor(InProcessExecutor):
    """Counts the tasks it runs (one per ranking candidate)."""

    def __init__(self) -> None:
        self.tasks = 0

    def map(self, fn, items, **kwargs):
        self.tasks += len(items)
        return super().map(fn, items, **kwargs)


def _recipe(tmp_path: Path, accuracy: str = "", recipe: str = "int8", **extra: str) -> Path:
    path = tmp_path / f"{recipe}-{abs(hash(accuracy)) % 10**6}.yaml"
    root = Path(__file__).resolve().parents[1] / "recipes"
    text = (root / f"{recipe}.yaml").read_text()
    if accuracy:
        text = text.replace("accuracy: {metric: auto, max_drop: 0.01}", f"accuracy: {{metric: auto, {accuracy}}}")
        assert accuracy in text
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- the edit


@pytest.mark.parametrize("layer", LAYERS)
def test_giving_a_layer_back_by_graph_edit_equals_never_quantizing_it(files, layer):
    """The edit restores the float weight (a saved copy, not DQ(Wq)), the bias before bias
    correction and the float activations: bit for bit the model quantized without that layer."""
    quantized = _quantize(files)
    assert quantized.quantization.names == LAYERS
    edited = give_back(_clone(quantized.model), quantized.quantization, [layer])
    never = _quantize(files, scope={"exclude": [layer]}).model
    x = np.random.default_rng(2).standard_normal((8, 4, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(edited, x), _run(never, x))
    reads = {n.name: [v.name if v is not None else None for v in n.inputs] for n in edited.graph}
    assert reads[layer][1] in {"w1", "w2", "fw1", "fw2"}, "the layer reads its float weight again"
    assert len(reads[layer]) == (2 if layer == "conv2" else 3), "conv2 had no bias: the corrected one is dropped"


def test_giving_every_layer_back_gives_the_float_model_without_any_q_dq(files):
    quantized = _quantize(files)
    edited = give_back(_clone(quantized.model), quantized.quantization, LAYERS)
    assert not [n for n in edited.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert not [v for v in edited.graph.initializers.values() if v.dtype == ir.DataType.INT8]
    x = np.random.default_rng(3).standard_normal((8, 4, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(edited, x), _run(cnn(), x))


def test_widening_to_16_bits_reads_the_same_range_on_a_finer_grid(files):
    """Case 2: the layer's activations go through a 16-bit pair over the calibrated range; its weight stays int8."""
    quantized = _quantize(files)
    entry = quantized.quantization["fc1"].activations[0]
    edited = give_back(_clone(quantized.model), quantized.quantization, ["fc1"], mode="int16")
    fc1 = next(n for n in edited.graph if n.name == "fc1")
    dq = fc1.inputs[0].producer()
    assert dq.op_type == "DequantizeLinear" and dq.inputs[2].const_value.numpy().dtype == np.uint16
    assert fc1.inputs[1].producer().inputs[0].const_value.numpy().dtype == np.int8, "the weight stays int8"
    step16 = (entry.hi - entry.lo) / 65535
    assert float(dq.inputs[1].const_value.numpy()) == pytest.approx(step16, rel=1e-6)
    assert edited.opset_imports[""] >= 21
    # fc1 reads its input within one 16-bit step where it is in range (half a step, plus up to half a step where
    # the zero point's rounding shifts the grid's ends): 128 times finer than the 8-bit pair's half step.
    edited.graph.outputs.extend([dq.inputs[0].producer().inputs[0], dq.outputs[0]])
    x = np.load(files["calib"])["x"]
    _, f, f16 = ort_session(edited).run(None, {"x": x})
    inside = (f >= entry.lo) & (f <= entry.hi)
    assert inside.mean() > 0.99
    assert np.abs(f16 - f)[inside].max() <= step16 * (1 + 1e-3)


def _int8_weight_bytes(model: ir.Model) -> int:
    """Bytes of the int8 weights ``model`` holds: initializers a DequantizeLinear reads as its data."""
    return sum(n.inputs[0].const_value.numpy().nbytes for n in model.graph if n.op_type == "DequantizeLinear"
               and n.inputs[0].is_initializer() and n.inputs[0].const_value.dtype == ir.DataType.INT8)


def test_a_give_back_changes_the_reported_int8_weight_size(files):
    """After accuracy control the report's ``weight_mb_*`` say what the artifact holds: a layer
    given back float no longer counts as int8; promoted to 16 bits, its weight stays int8."""
    quantized = _quantize(files)
    assert quantized.stats["weight_mb_int8"] == round(_int8_weight_bytes(quantized.model) / 1e6, 3)
    fc1_bytes = quantized.quantization["fc1"].weight_bytes
    assert fc1_bytes == (16 * 288 * 4, 16 * 288)

    report = PassReport("quantize", {}, True, dict(quantized.stats), 0.0, quantization=quantized.quantization)
    given_back_stats(report, ["fc1"], "float")
    edited = give_back(_clone(quantized.model), quantized.quantization, ["fc1"])
    assert report.stats["weight_mb_int8"] == round(_int8_weight_bytes(edited) / 1e6, 3)
    assert report.stats["weight_mb_int8"] < quantized.stats["weight_mb_int8"]
    assert quantized.quantization.weight_sizes(["fc1"]) == tuple(
        whole - part for whole, part in zip(quantized.quantization.weight_bytes, fc1_bytes))

    promoted = PassReport("quantize", {}, True, dict(quantized.stats), 0.0, quantization=quantized.quantization)
    given_back_stats(promoted, ["fc1"], "int16")
    assert promoted.stats["weight_mb_int8"] == quantized.stats["weight_mb_int8"]


# ---------------------------------------------------------------------------- the flow


def test_int8_nm_runs_each_pass_once_with_accuracy_control(files, tmp_path, monkeypatch):
    """Giving back is an edit: no candidate re-runs sparsify-nm or quantize."""
    # 2:4 on this random net loses more than int8 does: let accuracy control run anyway (its layers are int8's).
    monkeypatch.setattr(compress_module, "_drop_source", lambda *_: None)
    calls: dict[str, int] = {}
    for name in ("sparsify-nm", "quantize"):
        cls = type(build_pass(name, None))
        original = cls.run

        def counted(self, model, ctx, _original=original, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(self, model, ctx)

        monkeypatch.setattr(cls, "run", counted)
    executor = CountingExecutor()
    result = compress(files["model"], recipe="int8-nm", outdir=tmp_path / "out", calib=files["calib"],
                      eval_data=files["eval"], max_drop=0.0, latency_runs=1, executor=executor)
    control = result.manifest["accuracy_control"]
    assert control is not None and len(control["ranking"]) >= 2
    assert executor.tasks == len(control["ranking"]) + 1
    assert calls == {"sparsify-nm": 1, "quantize": 1}


def test_the_ranking_is_cached_and_a_new_budget_only_evaluates(files, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    first_exec = CountingExecutor()
    first = compress(files["model"], recipe="int8", outdir=tmp_path / "a", calib=files["calib"],
                     eval_data=files["eval"], max_drop=0.0, latency_runs=1, executor=first_exec).manifest
    control = first["accuracy_control"]
    assert first_exec.tasks == len(LAYERS) + 1 and control["ranking_cached"] is False
    assert sorted(r["layer"] for r in control["ranking"]) == LAYERS
    budget = (control["steps"][0]["drop"] + control["steps"][1]["drop"]) / 2  # met after the first give-back

    again = CountingExecutor()
    with caplog.at_level(logging.INFO, logger="compressor"):
        second = compress(files["model"], recipe="int8", outdir=tmp_path / "b", calib=files["calib"],
                          eval_data=files["eval"], max_drop=budget, latency_runs=1, executor=again).manifest
    assert again.tasks == 0, "the ranking is not recomputed"
    assert any("ranking reused from cache" in r.getMessage() for r in caplog.records)
    assert second["accuracy_control"]["ranking"] == control["ranking"]
    assert second["accuracy_control"]["ranking_cached"] is True
    assert second["gate"]["passed"] is True

    (path,) = (tmp_path / "cache" / "ranking").glob("*.json")
    path.write_text("{not json")
    caplog.clear()
    third_exec = CountingExecutor()
    with caplog.at_level(logging.WARNING, logger="compressor"):
        third = compress(files["model"], recipe="int8", outdir=tmp_path / "c", calib=files["calib"],
                         eval_data=files["eval"], max_drop=budget, latency_runs=1, executor=third_exec).manifest
    assert third_exec.tasks == len(LAYERS) + 1, "a corrupt cache file is ranked again"
    assert any("ignoring the cached ranking" in r.getMessage() for r in caplog.records)
    assert third["accuracy_control"]["ranking"] == control["ranking"] and third["gate"]["passed"] is True


def test_a_ranking_cached_for_one_cpu_is_not_reused_for_the_other(files, tmp_path, caplog, monkeypatch):
    """``--target-cpu`` changes the grid, so the ranking: the cache key (the target's description)
    tells the CPUs apart, and each CPU's ranking is found again for that CPU."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    tasks = {}
    for run, target_cpu in enumerate(("avx2", "vnni", "avx2", "vnni")):
        executor = CountingExecutor()
        compress(files["model"], recipe="int8", outdir=tmp_path / f"out{run}", calib=files["calib"],
                 eval_data=files["eval"], max_drop=0.0, latency_runs=1, executor=executor, target_cpu=target_cpu)
        tasks[run] = executor.tasks
    assert tasks == {0: len(LAYERS) + 1, 1: len(LAYERS) + 1, 2: 0, 3: 0}
    assert len(list((tmp_path / "cache" / "ranking").glob("*.json"))) == 2


def test_ranking_uses_the_samples_with_the_largest_error(files, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    recipe = _recipe(tmp_path, "max_drop: 0.01, ranking_samples: 5")
    compress(files["model"], recipe=recipe, outdir=tmp_path / "out", calib=files["calib"], eval_data=files["eval"],
             max_drop=0.0, latency_runs=1)
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "ranking").glob("*.json")]
    chosen = entry["ranking_samples"]
    quantized = _quantize(files).model
    x = np.load(files["eval"])["x"]
    ref, out = _run(cnn(), x), _run(quantized, x)
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    assert len(chosen) == 5 and set(chosen) == set(np.argsort(cos)[:5].tolist())


def test_ranking_on_the_target_and_its_fallback(files, tmp_path, monkeypatch, caplog):
    recipe = _recipe(tmp_path, "max_drop: 0.01, ranking_backend: target")
    on_target = compress(files["model"], recipe=recipe, outdir=tmp_path / "target", calib=files["calib"],
                         eval_data=files["eval"], max_drop=0.0, latency_runs=1).manifest["accuracy_control"]
    assert on_target["ranking_backend"] == "target" and len(on_target["ranking"]) == len(LAYERS)

    def no_kernel(*_args, **_kwargs):
        raise RuntimeError("Could not find an implementation for Foo(1) node with name 'foo'")

    monkeypatch.setattr(ranking_module, "OrtRunner", no_kernel)
    with caplog.at_level(logging.WARNING, logger="compressor"):
        fallback = compress(files["model"], recipe="int8", outdir=tmp_path / "fallback", calib=files["calib"],
                            eval_data=files["eval"], max_drop=0.0, latency_runs=1).manifest["accuracy_control"]
    assert fallback["ranking_backend"] == "target"
    assert [r["layer"] for r in fallback["ranking"]] == [r["layer"] for r in on_target["ranking"]]
    (warning,) = [r.getMessage() for r in caplog.records if "ONNX Runtime cannot run" in r.getMessage()]
    assert warning == ("accuracy control: ONNX Runtime cannot run this model (Could not find an implementation "
                       "for Foo(1) node with name 'foo'); ranking on the target")


def test_two_stage_ranking_reaches_the_budget_with_the_full_rankings_layer(files, tmp_path, monkeypatch):
    # Screened on the 8 worst samples, the 2 most sensitive confirmed on all 24: the budget
    # that one give-back meets in a full ranking is met by the same layer.
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    full_exec, staged_exec = CountingExecutor(), CountingExecutor()
    full = compress(files["model"], recipe=_recipe(tmp_path, "max_drop: 0.01, screen_samples: 0"),
                    outdir=tmp_path / "full", calib=files["calib"], eval_data=files["eval"], max_drop=0.0,
                    latency_runs=1, executor=full_exec).manifest["accuracy_control"]
    assert full_exec.tasks == len(LAYERS) + 1 and not any(r.get("screened") for r in full["ranking"])
    budget = (full["steps"][0]["drop"] + full["steps"][1]["drop"]) / 2  # met after the first give-back
    staged = compress(files["model"], recipe=_recipe(tmp_path, "max_drop: 0.01, screen_samples: 8, confirm_layers: 2"),
                      outdir=tmp_path / "staged", calib=files["calib"], eval_data=files["eval"], max_drop=budget,
                      latency_runs=1, executor=staged_exec).manifest
    control = staged["accuracy_control"]
    assert staged_exec.tasks == (len(LAYERS) + 1) + (2 + 1)
    assert [r.get("screened", False) for r in control["ranking"]] == [False, False, True, True]
    assert control["ranking"][:1] == full["ranking"][:1], "the full ranking's top layer, measured on every sample"
    assert control["layers"] == [full["ranking"][0]["layer"]] == [full["steps"][1]["layer"]]
    assert staged["gate"]["passed"] is True
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "ranking").glob("*.json")
                if json.loads(p.read_text())["screen_samples"] is not None]
    assert len(entry["screen_samples"]) == 8 and set(entry["screen_samples"]) <= set(entry["ranking_samples"])


def test_candidates_of_one_ranking_decode_the_quantized_model_once(files, monkeypatch):
    quantized = _quantize(files)
    data = load_npz(files["eval"], model_input_specs(cnn()))
    shared = {"quantized": ir_bytes(quantized.model), "record": quantized.quantization,
              "mode": "float", "post": [], "runtime": "onnxruntime", "data": data,
              "ref": [_run(cnn(), np.load(files["eval"])["x"])]}
    decoded = []
    real = ranking_module.ir_from_bytes
    monkeypatch.setattr(ranking_module, "ir_from_bytes", lambda b: decoded.append(1) or real(b))
    errors = [ranking_module.candidate_error(frozenset(given), shared) for given in ([], ["fc1"], [], ["conv1"])]
    assert len(decoded) == 1 and errors[0] == errors[2] and errors[1] != errors[0]
    ranking_module.release_decoded()
    fresh = {**shared, "quantized": bytes(bytearray(shared["quantized"]))}  # equal bytes from elsewhere (a Ray task's copy)
    assert ranking_module.candidate_error(frozenset(["fc1"]), fresh) == errors[1] and len(decoded) == 2
    ranking_module.release_decoded()


class _OnDevice(Pass):
    """A pass that would run on the device (``device-bias-correction``'s kind): counts its runs."""

    name = "test-on-device"
    runs_on_target = True
    runs: list[int] = []

    def run(self, model, ctx):
        self.runs.append(1)
        return PassResult(model, False, {})


def test_a_pass_that_runs_on_the_device_is_left_out_of_the_onnxruntime_ranking(files):
    quantized = _quantize(files)
    shared = {"quantized": ir_bytes(quantized.model), "record": quantized.quantization, "mode": "float",
              "post": [_OnDevice()], "context": PassContext(target=onnx_specs_target())}
    ranking_module.build_candidate(frozenset(["fc1"]), {**shared, "runtime": "onnxruntime"})
    assert _OnDevice.runs == []
    ranking_module.build_candidate(frozenset(["fc1"]), {**shared, "runtime": "target"})
    assert _OnDevice.runs == [1]
    ranking_module.release_decoded()


def test_a_session_sharing_the_quantized_initializers_computes_what_the_full_bytes_do(files, monkeypatch):
    quantized = _quantize(files)
    base = quantized.model
    shared = SharedInitializers(base, min_elements=16)
    x = np.load(files["eval"])["x"]
    for given in ([], ["conv1"], ["fc1", "conv2"]):
        candidate = give_back(clone_model(base), quantized.quantization, given)
        assert np.array_equal(shared.session(candidate).run(None, {"x": x})[0], _run(candidate, x)), given
    # The int8 weights the edit left alone (conv1, conv2, fc2) travel as references, not
    # bytes (a reference costs tens of bytes); fc1's restored float weight is serialized.
    sizes = []
    real = onnx_target.ort.InferenceSession
    monkeypatch.setattr(onnx_target.ort, "InferenceSession",
                        lambda data, *a, **k: sizes.append(len(data)) or real(data, *a, **k))
    candidate = give_back(clone_model(base), quantized.quantization, ["fc1"])
    shared.session(candidate)
    left_alone = 8 * 4 * 3 * 3 + 8 * 8 * 3 * 3 + 5 * 16  # int8: one byte each
    assert 16 * 8 * 6 * 6 * 4 < sizes[0] < len(model_bytes(candidate)) - left_alone // 2


def test_ranking_a_time_major_model_whose_calls_return_several_rows_per_sample(tmp_path, monkeypatch):
    # ddddocr's recogniser: a static batch of 1 and a [T, 1, C] output (time first), so the
    # outputs have T rows per sample; the worst samples are picked per sample, not per row.
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 12)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((12, 12)).astype(np.float32) / 3, "w2"),
             numpy_helper.from_array(np.array([3, 1, 4], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="mm2"),
             helper.make_node("Reshape", ["m", "shape"], ["y"], name="time_major")]
    graph = helper.make_graph(nodes, "tm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1, 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "tm.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 8)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((20, 8)).astype(np.float32))
    recipe = _recipe(tmp_path, "max_drop: 0.01, ranking_samples: 8, screen_samples: 4, confirm_layers: 1")
    control = compress(tmp_path / "tm.onnx", recipe=recipe, outdir=tmp_path / "out", calib=tmp_path / "calib.npz",
                       eval_data=tmp_path / "eval.npz", max_drop=0.0, latency_runs=1).manifest["accuracy_control"]
    assert sorted(r["layer"] for r in control["ranking"]) == ["mm1", "mm2"]
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "ranking").glob("*.json")]
    assert len(entry["ranking_samples"]) == 8 and max(entry["ranking_samples"]) < 20
    assert len(entry["screen_samples"]) == 4 and set(entry["screen_samples"]) <= set(entry["ranking_samples"])


@pytest.mark.parametrize("recipe", ["w8a8-npu", "int8"])
def test_accuracy_control_promotes_to_16_bits_on_a_target_without_a_float_path(files, tmp_path, monkeypatch, recipe):
    """Also with plain ``int8``, which the target completes with ``qnn-legalize`` (re-run after each promotion)."""
    monkeypatch.setattr(compress_module, "get_target", lambda name, target_cpu="host": SimulatedHtp())
    executor = CountingExecutor()
    result = compress(files["model"], recipe=recipe, target="qnn-htp", outdir=tmp_path / "out",
                      inputs=["x=4x4x6x6"], calib=files["calib"], eval_data=files["eval"], max_drop=0.0,
                      latency_runs=1, executor=executor)
    m = result.manifest
    control = m["accuracy_control"]
    assert control["action"] == "int16" and control["layers"], control
    assert executor.tasks == len(control["ranking"]) + 1 == len(LAYERS) + 1
    kept = [s for s in control["steps"] if s["kept"]]
    assert kept[-1]["drop"] == m["accuracy_drop"] < control["steps"][0]["drop"]
    quant = next(p for p in m["passes"] if p["name"] == "quantize")["stats"]
    assert quant["layers_promoted_to_int16"] == sorted(control["layers"])
    assert quant["layers_quantized"] == len(LAYERS), "promoted layers stay quantized"
    assert [p["name"] for p in m["passes"]][-1] == "qnn-legalize"
    model = onnx.load(tmp_path / "out" / "model.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.name in LAYERS:
            dq = producers[node.input[0]]
            zero_point = inits[dq.input[2]]
            wide = node.name in control["layers"]
            assert zero_point.dtype == (np.uint16 if wide else np.uint8), node.name


def test_giving_back_a_matmul_whose_bias_correction_added_an_add(tmp_path):
    """A MatMul with no bias gets ``Add(y, b)`` from bias correction, and the Add takes over
    ``y``'s name; giving the MatMul back still edits the MatMul (not the Add) and zeroes the
    added bias, so the layer computes exactly its float product again."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 6)) / 3).astype(np.float32), "wa"),
             numpy_helper.from_array((rng.standard_normal((6, 4)) / 3).astype(np.float32), "wb")]
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "wb"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8

    def fresh() -> ir.Model:
        return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))

    np.savez(tmp_path / "calib.npz", x=(rng.standard_normal((32, 8)) + 0.5).astype(np.float32))
    model = fresh()
    ctx = PassContext(target=get_target("onnx"), calibration=load_npz(tmp_path / "calib.npz", model_input_specs(model)),
                      properties={"constants-folded"})
    quantized = build_pass("quantize", {"calibrator": "minmax", "bias_correction": True}).run(model, ctx)
    assert quantized.stats["bias_corrected"] >= 1
    assert [n for n in quantized.model.graph if n.op_type == "Add"], "bias correction added an Add"
    x = (rng.standard_normal((6, 8)) + 0.5).astype(np.float32)
    edited = give_back(_clone(quantized.model), quantized.quantization, quantized.quantization.names)
    assert not [n for n in edited.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    np.testing.assert_array_equal(_run(edited, x), _run(fresh(), x))


def test_the_artifact_is_the_final_tries_files_not_a_second_lowering(files, tmp_path, monkeypatch):
    """The give-back try that built the final model lowered it: its files become the artifact
    (no lowering after accuracy control), and they are the model whose drop the manifest reports."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    lowered = []
    real = OnnxTarget.lower_pinned
    monkeypatch.setattr(OnnxTarget, "lower_pinned",
                        lambda self, model, outdir, pin: lowered.append(outdir) or real(self, model, outdir, pin))
    out = tmp_path / "out"
    manifest = compress(files["model"], recipe="int8", outdir=out, calib=files["calib"], eval_data=files["eval"],
                        max_drop=0.0, latency_runs=1).manifest
    control = manifest["accuracy_control"]
    assert control["layers"], "a layer was given back"
    assert len(lowered) == len(control["steps"]) - 1, "one lowering per try, none after"
    assert [f["path"] for f in manifest["files"]] == ["model.onnx"] and sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "model.onnx"]
    x = np.load(files["eval"])["x"]
    ref = _run(cnn(), x).astype(np.float64)
    got = ort_session(str(out / "model.onnx")).run(None, {"x": x})[0].astype(np.float64)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert manifest["accuracy_drop"] == pytest.approx(1 - cos.mean(), abs=1e-12)


def test_a_session_as_written_computes_the_qdq_graph_in_float():
    # qnn-htp's simulation: HTP computes what the Q/DQ graph says; ONNX Runtime's fused
    # integer kernels need not (on a host without VNNI they saturate)
    model, x, expected = saturating_qdq_conv()
    got = ort_session(model, as_written=True).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    shared = SharedInitializers(model, min_elements=16, as_written=True)
    np.testing.assert_allclose(shared.session(model).run(None, {"x": x})[0], expected, rtol=0, atol=1e-6)


def test_ranking_runs_qnn_htp_candidates_as_written(files, monkeypatch):
    assert QNN_HTP_CAPABILITIES.simulate_as_written and not OnnxTarget().capabilities.simulate_as_written
    quantized = _quantize(files)
    data = load_npz(files["eval"], model_input_specs(cnn()))
    levels = []
    real = onnx_target.ort.InferenceSession
    monkeypatch.setattr(onnx_target.ort, "InferenceSession",
                        lambda data, opts, *a, **k: levels.append(opts.graph_optimization_level) or real(data, opts, *a, **k))

    class HtpLike:
        capabilities = QNN_HTP_CAPABILITIES

    for target, level in ((HtpLike(), onnx_target.ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                          (onnx_specs_target(), onnx_target.ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
        shared = {"quantized": ir_bytes(quantized.model), "record": quantized.quantization, "mode": "float",
                  "post": [], "runtime": "onnxruntime", "data": data, "context": PassContext(target=target),
                  "ref": [_run(cnn(), np.load(files["eval"])["x"])]}
        levels.clear()
        ranking_module.candidate_error(frozenset(["fc1"]), shared)
        ranking_module.candidate_errors([frozenset(), frozenset(["conv1"])], shared)
        ranking_module.release_decoded()
        assert levels and set(levels) == {level}, target


def test_the_kept_tries_runner_still_reads_its_files_once_the_artifact_holds_them(tmp_path):
    """``qnn-htp``'s runner reads the QDQ model it was lowered with again in the report (the
    simulation gap). When accuracy control kept a give-back, the try's files were moved into
    the artifact under the runner it reuses, and compress exited 2 on MiniLM ("control-0/model.onnx:
    not a readable ONNX model") after the budget was met."""
    folder = tmp_path / "work" / "control-0"
    folder.mkdir(parents=True)
    tried = [folder / "model.onnx", folder / "model_ctx.onnx"]
    for path in tried:
        path.write_bytes(path.name.encode())

    class Runner:  # reads its files when called, as QnnHtpRunner's report does
        def __call__(self) -> list[bytes]:
            return [path.read_bytes() for path in tried]

    run = Runner()
    outdir = tmp_path / "artifact"
    outdir.mkdir()
    first = outdir / "model.onnx"
    first.write_bytes(b"the first lowering")
    result = ControlResult(["layer"], [], [], None, True, lowered=(folder, tried, run))
    files, runner = result.artifact(None, None, outdir, None, [first], None)
    assert runner is run and [f.parent for f in files] == [outdir, outdir]
    assert [f.read_bytes() for f in files] == runner() == [b"model.onnx", b"model_ctx.onnx"]


def test_a_nan_drop_gets_accuracy_control_not_a_straight_fail(tmp_path, monkeypatch):
    """``Sqrt(x·W + c)``, with ``c`` putting the float model's smallest value just above 0 on
    the data: the int8 MatMul's rounding takes some below 0, the artifact computes NaN where
    fp32 does not, and the drop is NaN. ``NaN > budget`` is false, so this went straight to a
    failed gate (exit 3) with nothing tried; NaN now counts as over the budget and as the
    worst cosine in the ranking, and giving the MatMul back meets the budget."""
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 16)) / 4).astype(np.float32)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,16] x) => (float[N,16] z) {
      [mm] y = MatMul(x, w)
      [shift] s = Add(y, c)
      [root] z = Sqrt(s)
    }""", w=w, c=(1e-3 - (x @ w).min(0)).astype(np.float32))
    save_model(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x)
    recipe = _recipe(tmp_path, "max_drop: 0.01, max_fallback: 1.0")
    result = compress(tmp_path / "m.onnx", recipe=recipe, outdir=tmp_path / "out", calib=tmp_path / "d.npz",
                      eval_data=tmp_path / "d.npz", latency_runs=1)
    control = result.manifest["accuracy_control"]
    first_drop = control["steps"][0]["drop"]
    assert first_drop is None or np.isnan(first_drop)  # NaN, or null in strict JSON
    assert control["layers"] == ["mm"] and result.gate_passed is True
    assert result.evaluation.drop == 0.0
