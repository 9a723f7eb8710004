"""Target ``tensorrt``: capabilities, the Q/DQ placement checker, the engine-build helpers, the CLI.

Everything here runs on the CPU. Where TensorRT and a GPU are absent (CI), the CLI test
checks the no-engine path (QDQ ONNX written, accuracy on ONNX Runtime CPU, a warning and
``engine: not built`` with the reason); where they are present it checks the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compressor.targets import get_target
from compressor.targets.onnx import ort_session
from compressor.targets.tensorrt import (
    TENSORRT_CAPABILITIES,
    TENSORRT_FP8_CAPABILITIES,
    TensorRtTarget,
)
from compressor.targets.tensorrt.engine import (
    BuildSettings,
    QdqReferenceRunner,
    builder_offenders,
    parser_offenders,
    profile_shapes,
    summarize_engine_layers,
    tensorrt_status,
    timing_cache_path,
)
from compressor.targets.tensorrt.qdq import check_qdq_placement, nm_sparse_layers
from onnx import TensorProto, helper, numpy_helper

from compressor.cli import main
from compressor.data import random_dataset
from compressor.inputs import InputSpec, model_input_specs
from compressor.pipeline import PassContext, build_pass

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
HAVE_TRT = tensorrt_status()[0]


def _model(nodes, inputs, outputs, inits, opset=17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def qdq_residual(*, act_zp=(np.int8, 0), w_axis=0, skip_quantized=True, conv_input_quantized=True,
                 dq_scale=None) -> ir.Model:
    """x -> Q/DQ -> Conv(DQ(Wq)) -> Add(., DQ(Q(x))) -> y, the pattern TensorRT fuses; knobs break it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    w_scale = (np.abs(w).max(axis=(1, 2, 3)) / 127).astype(np.float32)
    wq = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    if w_axis != 0:  # scales along the input channels: the wrong axis
        w_scale = (np.abs(w).max(axis=(0, 2, 3)) / 127).astype(np.float32)
    zp_type, zp = act_zp
    inits = [
        numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(zp, zp_type), "x_zp"),
        numpy_helper.from_array(np.array(dq_scale or 0.05, np.float32), "x_scale_dq"),
        numpy_helper.from_array(np.array(0.1, np.float32), "c_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "c_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale_dq", "x_zp"], ["x_dq"], name="x_dequant"),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["w"], name="w_dequant", axis=w_axis),
        helper.make_node("Conv", ["x_dq" if conv_input_quantized else "x", "w"], ["c"], name="conv",
                         pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "c_scale", "c_zp"], ["c_q"], name="c_quant"),
        helper.make_node("DequantizeLinear", ["c_q", "c_scale", "c_zp"], ["c_dq"], name="c_dequant"),
        helper.make_node("Add", ["c_dq", "x_dq" if skip_quantized else "x"], ["y"], name="residual"),
    ]
    return _model(nodes, [_f("x", ["N", 8, 8, 8])], [_f("y", ["N", 8, 8, 8])], inits)


def test_registered_and_capabilities_as_data():
    target = get_target("tensorrt")
    assert isinstance(target, TensorRtTarget) and target.capabilities is TENSORRT_CAPABILITIES
    caps = TENSORRT_CAPABILITIES
    assert caps.nm_patterns == ((2, 4),) and not caps.static_shapes
    for op in ("Conv", "MatMul", "Gemm"):
        q = caps.quantizable[op]
        assert q.activations.dtype == "int8" and q.activations.symmetric and q.activations.axis is None
        assert q.weights.dtype == "int8" and q.weights.symmetric and q.weights.axis is not None
    assert caps.quantizable["Conv"].weights.axis == 0
    assert caps.quantizable["Add"].weights is None and caps.quantizable["Add"].activations.symmetric
    assert {q.activations.dtype for q in TENSORRT_FP8_CAPABILITIES.quantizable.values()} == {"float8e4m3fn"}
    info = target.describe()
    assert info["name"] == "tensorrt" and info["engine_build"] is HAVE_TRT


def test_checker_accepts_the_fusable_pattern():
    assert check_qdq_placement(qdq_residual()) == []


@pytest.mark.parametrize("kwargs, words", [
    ({"act_zp": (np.uint8, 128)}, "uint8"),
    ({"act_zp": (np.int8, 3)}, "non-zero zero point"),
    ({"w_axis": 1}, "axis 1"),
    ({"conv_input_quantized": False}, "activation 'x' is not"),
    ({"skip_quantized": False}, "residual Add after quantized layer 'conv'"),
    ({"dq_scale": 0.07}, "cannot fold the pair"),
])
def test_checker_names_what_blocks_fusion(kwargs, words):
    findings = check_qdq_placement(qdq_residual(**kwargs))
    assert findings, kwargs
    assert any(words in why for _, why in findings), findings
    assert all(node for node, _ in findings)


def test_checker_flags_qdq_on_a_mask_path_but_not_the_mask_add():
    """Softmax(scores + mask * -1e4): Q/DQ on the mask is flagged; the float mask Add itself is no residual.

    The Softmax is what makes the integer-derived tensor a mask: integer data that feeds a
    compute op is data (``test_checker_accepts_qdq_on_integer_data``)."""
    inits = [numpy_helper.from_array(np.array(0.01, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "big")]
    nodes = [
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["mask_f", "big"], ["bias"], name="scale_mask"),
        helper.make_node("QuantizeLinear", ["bias", "s", "z"], ["bias_q"], name="mask_quant"),
        helper.make_node("DequantizeLinear", ["bias_q", "s", "z"], ["bias_dq"], name="mask_dequant"),
        helper.make_node("Add", ["scores", "bias_dq"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["y"], name="softmax"),
    ]
    model = _model(nodes, [_f("scores", ["N", 8]), helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 8])],
                   [_f("y", ["N", 8])], inits)
    findings = check_qdq_placement(model)
    assert [n for n, _ in findings] == ["mask_quant"] and "mask/shape path" in findings[0][1]


def test_checker_accepts_qdq_on_integer_data():
    """uint8 pixels -> Cast -> Mul(1/255) -> Q/DQ -> Conv: integer data, not a mask path."""
    inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.array(1 / 255, np.float32), "inv255"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws")]
    wq = numpy_helper.from_array(np.full((4, 3, 3, 3), 10, np.int8), "wq")
    zw = numpy_helper.from_array(np.zeros(4, np.int8), "zw")
    nodes = [
        helper.make_node("Cast", ["pixels"], ["pf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["pf", "inv255"], ["x"], name="scale"),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"], name="x_dequant"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "zw"], ["wdq"], name="w_dequant", axis=0),
        helper.make_node("Conv", ["xdq", "wdq"], ["y"], name="conv"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 3, 8, 8])],
                   [_f("y", ["N", 4, 6, 6])], inits + [wq, zw])
    assert check_qdq_placement(model) == []


def _residual_fp32() -> ir.Model:
    """x -> Conv -> Relu -> Conv -> Add(x) -> Relu -> Flatten -> Gemm: a ResNet block and a head."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    w1[:, 1::2] = 0  # 2:4 along the input channels
    w1[:, 2::4] = 0
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2, "w2"),
             numpy_helper.from_array(rng.standard_normal((10, 512)).astype(np.float32) * 0.05, "fc_w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, [_f("x", ["N", 8, 8, 8])], [_f("y", ["N", 10])], inits)


def _raise_on_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def test_quantize_pass_writes_what_the_checker_accepts(tmp_path):
    model = _residual_fp32()
    target = TensorRtTarget()
    data = random_dataset(model_input_specs(model), 16, seed=0)
    ctx = PassContext(target=target, calibration=data)
    result = build_pass("quantize", {"calibrator": "minmax"}).run(model, ctx)
    quantized = result.model
    assert set(result.stats["layers"]) == {"conv1", "conv2", "fc", "residual"}
    assert check_qdq_placement(quantized) == []
    add = next(n for n in quantized.graph if n.name == "residual")
    assert all(v.producer().op_type == "DequantizeLinear" for v in add.inputs)
    for node in quantized.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = node.inputs[2].const_value.numpy()
            assert zp.dtype == np.int8 and not zp.any()
    assert nm_sparse_layers(quantized) == ["conv1"]  # 2:4 kept through int8 (zeros quantize to 0)
    assert nm_sparse_layers(model) == ["conv1"]
    # The no-engine runner executes Q/DQ as written: equal to the fake-quant graph's float maths.
    files = target.lower(quantized, tmp_path) if not HAVE_TRT else None
    if files is not None:
        assert [f.name for f in files] == ["model.onnx", "build_log.json"]
        run = target.runner(files)
        assert isinstance(run, QdqReferenceRunner)
        x = np.random.default_rng(2).standard_normal((3, 8, 8, 8)).astype(np.float32)
        (got,) = run({"x": x})
        (fp32,) = ort_session(model).run(None, {"x": x})
        assert np.corrcoef(got.ravel(), fp32.ravel())[0, 1] > 0.99
        log = json.loads((tmp_path / "build_log.json").read_text(), parse_constant=_raise_on_constant)  # strict
        assert log["engine"]["status"] == "not built" and log["sparse_2_4_layers"] == ["conv1"]


def test_the_engine_is_deployed_else_the_tensorrt_ready_onnx(tmp_path):
    """``build_log.json`` is a companion; so is ``model.onnx`` once an engine was built from it."""
    target = TensorRtTarget()
    files = target.lower(_residual_fp32(), tmp_path)
    assert [f.name for f in target.deployable(files)] == ["model.engine" if HAVE_TRT else "model.onnx"]
    built = [tmp_path / n for n in ("model.onnx", "model.engine", "build_log.json")]
    assert target.deployable(built) == [tmp_path / "model.engine"]


def test_report_comes_from_the_runners_own_lowering(tmp_path):
    """The target keeps no state between calls: a report is about the files its runner ran,
    even after another model was lowered with the same target (accuracy control does that)."""
    target = TensorRtTarget()
    sparse = _residual_fp32()
    dense = _residual_fp32()
    w1 = dense.graph.initializers["w1"]
    w1.const_value = ir.tensor(np.random.default_rng(3).standard_normal((8, 8, 3, 3)).astype(np.float32), name="w1")
    first = target.runner(target.lower(sparse, tmp_path / "sparse"))
    target.lower(dense, tmp_path / "dense")
    assert target.report(first)["tensorrt"]["sparse_2_4_layers"] == ["conv1"]
    assert not [k for k in vars(target) if k not in ("settings", "available", "status")]


def test_profile_shapes_from_input_specs():
    specs = [InputSpec("input_ids", ("batch", "seq"), "int64"), InputSpec("images", (1, 3, 224, 224), "float32"),
             InputSpec("lengths", (None,), "int64")]
    shapes = profile_shapes(specs, BuildSettings(batch=(1, 8, 32), other=(1, 128, 256)))
    assert shapes["input_ids"] == ((1, 1), (8, 128), (32, 256))
    assert shapes["images"] == ((1, 3, 224, 224),) * 3
    assert shapes["lengths"] == ((1,), (8,), (32,))
    with pytest.raises(Exception, match="min <= opt <= max"):
        profile_shapes(specs, BuildSettings(batch=(4, 2, 8)))


def test_parser_and_builder_errors_name_the_onnx_node():
    new_style = SimpleNamespace(node_name=lambda: "/encoder/Attention", node_operator=lambda: "Einsum",
                                node=lambda: 3, desc=lambda: "unsupported equation")
    old_style = SimpleNamespace(node=lambda: 1, desc=lambda: "Assertion failed: axis")
    whole = SimpleNamespace(node=lambda: -1, desc=lambda: "invalid graph")
    got = parser_offenders([new_style, old_style, whole], ["a", "conv_7", "c", "d"], ["Relu", "Conv", "X", "Y"])
    assert got[0] == ("/encoder/Attention", "TensorRT's ONNX parser: Einsum: unsupported equation")
    assert got[1] == ("conv_7", "TensorRT's ONNX parser: Conv: Assertion failed: axis")
    assert got[2][0] == "model"
    msgs = ["Error Code 10: Could not find any implementation for node /layer1/conv/Conv + /layer1/Relu."]
    assert builder_offenders(msgs, ["/layer1/conv/Conv", "/layer1/Relu", "/layer1"])[0][0] == "/layer1/conv/Conv"
    assert builder_offenders([], ["a"]) == [("model", "TensorRT builder returned no engine and logged no error")]


def test_engine_layer_summary_reads_int8_and_sparse_kernels():
    info = json.dumps({"Layers": [
        {"Name": "conv1 + relu1", "LayerType": "CaskConvolution",
         "Inputs": [{"Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}],
         "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_i8i8_i8i32_f32_nchw_vect_c_32"},
        {"Name": "conv2 + residual", "LayerType": "CaskConvolution",
         "Inputs": [{"Format/Datatype": "Channel major INT8 format"}], "TacticName": "sm80_xmma_fprop_implicit_gemm_i8i8"},
        {"Name": "fc", "LayerType": "CaskGemmMatrixMultiply", "Inputs": [{"Format/Datatype": "Row major linear FP32"}],
         "TacticName": "sm80_xmma_gemm_f32f32"},
        {"Name": "x_quant", "LayerType": "Scale", "Inputs": [{"Format/Datatype": "Row major linear FP32"}]},
    ]})
    log = ["[INFO] (Sparsity) TRT inference plan picks sparse implementation for layers: conv1 + relu1"]
    summary = summarize_engine_layers(info, log)
    assert summary["compute_layers"] == 3 and summary["int8"] == 2 and summary["sparse"] == 1
    assert summary["float_compute_layers"] == ["fc"] and summary["sparse_layers"] == ["conv1 + relu1"]
    assert summarize_engine_layers({"Layers": ["a", "b"]})["layers"] == 2  # LAYER_NAMES_ONLY verbosity


def test_timing_cache_is_persisted_where_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_TRT_TIMING_CACHE", str(tmp_path / "t.cache"))
    assert timing_cache_path() == tmp_path / "t.cache"
    assert timing_cache_path(BuildSettings(timing_cache=tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("COMPRESSOR_TRT_TIMING_CACHE")
    assert timing_cache_path().name == "tensorrt.timing-cache"


def test_cli_int8_digits(tmp_path, capsys):
    out = tmp_path / "art"
    code = main([str(EXAMPLES / "digits_cnn.pt2"), "--target", "tensorrt", "--recipe", "int8",
                 "--calib", str(EXAMPLES / "digits_calib.npz"), "--eval", str(EXAMPLES / "digits_eval.npz"),
                 "--max-drop", "0.02", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "tensorrt" and manifest["gate"]["passed"] is True
    model = ir.load(out / "model.onnx")
    qdq = [n for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zp = node.inputs[2].const_value.numpy()
        assert zp.dtype == np.int8 and not zp.any(), node.name
    assert check_qdq_placement(model) == []
    assert manifest["tensorrt"]["qdq_placement_findings"] == 0
    files = {f["path"] for f in manifest["files"]}
    assert {f["path"] for f in manifest["files"] if f["deploy"]} == {"model.engine" if HAVE_TRT else "model.onnx"}
    if HAVE_TRT:
        assert manifest["engine"]["built"] is True and "model.engine" in files
        assert manifest["tensorrt"]["kernels"]["int8"] > 0
    else:
        engine = manifest["engine"]
        assert engine["status"] == "not built" and engine["built"] is False and engine["reason"]
        assert files == {"model.onnx", "build_log.json"}
        warning = [line for line in err.splitlines() if line.startswith("WARNING") and "engine not built" in line]
        assert warning and engine["reason"] in warning[0]
        assert manifest["tensorrt"]["accuracy_measured_on"].startswith("model.onnx on ONNX Runtime CPU")
        assert manifest["metrics"]["compressed"]["top1"] > 0.95
