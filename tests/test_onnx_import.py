"""Import of ONNX files as other exporters write them (``compressor/capture/onnx_import.py``).

Dynamic axes written as ``-1``/empty/``?``/``unk__N``, opsets older than the backends'
kernels, already-quantized and float16 models, scalar inputs. Each failure path asserts
the exit code and the one error line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.capture.onnx_import import IMPORT_OPSET, normalize_dims, quantized_nodes
from compressor.cli import main
from compressor.errors import UnsupportedModel, UsageError
from compressor.inputs import override_text, parse_input_overrides, shape_text
from compressor.model_io import load_onnx, upgrade_opset

RNG = np.random.default_rng(0)


def _save(tmp_path: Path, nodes, inputs, outputs, inits=(), opset: int = 17, name: str = "model.onnx",
          ir_version: int = 8, extra_opsets=()) -> Path:
    if ir_version < 4:  # IR 3: every initializer is also a graph input
        inputs = [*inputs, *(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
                              ir_version=ir_version)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _run(argv, capsys) -> tuple[int, str, list[str]]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err, [line for line in err.splitlines() if line.startswith("error: ")]


def _matmul_model(tmp_path: Path, dim) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 4])
    x.type.tensor_type.shape.dim[0].Clear()
    if isinstance(dim, int):
        x.type.tensor_type.shape.dim[0].dim_value = dim
    elif dim:
        x.type.tensor_type.shape.dim[0].dim_param = dim
    w = numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w")
    return _save(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [x],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [w])


# -- 1. dynamic axes -------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [-1, "", "?", "unk__7"], ids=["minus-one", "empty", "question-mark", "tf2onnx"])
def test_dynamic_dim_spellings_are_fixed_by_input(dim, tmp_path, capsys):
    path = _matmul_model(tmp_path, dim)
    np.savez(tmp_path / "eval.npz", x=RNG.standard_normal((6, 4)).astype(np.float32))
    code, err, errors = _run([path, "--recipe", "fold", "--input", "x=2x4", "--eval", tmp_path / "eval.npz",
                              "-o", tmp_path / "out", "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input_spec"] == [{"name": "x", "shape": [2, 4], "dtype": "float32"}]


def test_minus_one_takes_any_batch_without_input(tmp_path, capsys):
    path = _matmul_model(tmp_path, -1)
    np.savez(tmp_path / "eval.npz", x=RNG.standard_normal((5, 4)).astype(np.float32))
    code, err, _ = _run([path, "--recipe", "fold", "--eval", tmp_path / "eval.npz", "-o", tmp_path / "out",
                         "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    assert "dimension(s) written as -1, empty or '?' read as dynamic" in " ".join(
        json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["notes"])


def test_normalize_dims_counts_and_keeps_names(tmp_path):
    model = load_onnx(_matmul_model(tmp_path, -1))
    assert normalize_dims(model) == 1  # x's -1 (y's dim written without value or name is dynamic already)
    assert model.graph.inputs[0].shape[0].value is None
    named = load_onnx(_matmul_model(tmp_path, "unk__7"))
    normalize_dims(named)
    assert named.graph.inputs[0].shape[0].value == "unk__7"  # equal names keep saying equal axes


def test_shape_text_is_readable():
    assert shape_text(("unk__12", 3, None, "s34", "batch", "AddstateN_dim_0", "x_dim1")) == "Nx3x?x?xbatchx?x?"
    assert shape_text((None, "sequence")) == "Nxsequence"
    assert shape_text(()) == "scalar"
    assert shape_text(("p2o.DynamicDimension.0", 3, "?", "p2o.DynamicDimension.1")) == "Nx3x?x?"  # paddle2onnx


def test_inspect_shows_a_formula_dim_as_unnamed(tmp_path, capsys):
    # ultralytics writes output dims as formulas of the input's, hundreds of characters long
    formula = "(floor(floor(height/2 - 1/2)/2) + 1)*(floor(floor(width/2 - 1/2)/2) + 1)"
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    path = _save(tmp_path, [helper.make_node("Reshape", ["images", "shape"], ["y"])], [x],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, formula])],
                 [numpy_helper.from_array(np.array([0, 3, -1], np.int64), "shape")])
    code = main(["inspect", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["inputs"][0]["shape"] == "batchx3xheightxwidth"
    assert report["outputs"][0]["shape"] == "batchx3x?"


def test_inspect_counts_weights_held_in_constant_nodes(tmp_path, capsys):
    # paddle2onnx writes every weight as a Constant node and no initializer ("0 parameters" before)
    w = numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Constant", [], ["w"], value=w, name="w_const"),
             helper.make_node("Constant", [], ["b"], value_floats=[0.1, 0.2, 0.3], name="b_const"),
             helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "b"], ["y"], name="bias")]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["parameters"], report["parameters_in_constant_nodes"]) == (15, 15)
    assert main(["inspect", str(path)]) == 0
    assert "15 parameters (all in Constant nodes)" in capsys.readouterr().out


def test_inspect_shows_readable_dims(tmp_path, capsys):
    x = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["unk__749", 16, 1])
    path = _save(tmp_path, [helper.make_node("Relu", ["audio"], ["y"])], [x],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["unk__750", 16, 1])])
    code = main(["inspect", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["inputs"][0]["shape"] == "Nx16x1"
    assert report["outputs"][0]["shape"] == "Nx16x1"


# -- 2. old opsets ---------------------------------------------------------------------------------

def _prelu6(tmp_path: Path) -> tuple[Path, np.ndarray]:
    slope = RNG.uniform(0.1, 0.5, 3).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])
    nodes = [helper.make_node("PRelu", ["x", "slope"], ["p"], name="prelu"),
             helper.make_node("Add", ["p", "x"], ["y"], name="add")]  # Add-6: no ONNX Runtime kernel
    return _save(tmp_path, nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 5])],
                 [numpy_helper.from_array(slope, "slope")], opset=6, ir_version=3), slope


def test_old_opset_is_upgraded_and_recorded(tmp_path, capsys):
    path, slope = _prelu6(tmp_path)
    xs = RNG.standard_normal((3, 1, 3, 4, 5)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=xs)
    code, err, _ = _run([path, "--recipe", "fold", "--eval", tmp_path / "eval.npz", "-o", tmp_path / "out",
                         "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"]["opset_upgraded"] == {"from": 6, "to": IMPORT_OPSET}
    assert any("upgraded from opset 6" in note for note in manifest["model"]["notes"])
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": xs[0]})[0]
    per_channel = slope.reshape(1, 3, 1, 1)  # PRelu-6: a [C] slope is per channel (axis 1)
    want = np.where(xs[0] >= 0, xs[0], xs[0] * per_channel) + xs[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_inspect_reports_the_upgrade(tmp_path, capsys):
    path, _ = _prelu6(tmp_path)
    code = main(["inspect", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["opset"] == IMPORT_OPSET
    assert report["opset_upgraded"] == {"from": 6, "to": IMPORT_OPSET}


def _image_scaler6(tmp_path: Path, with_conv: bool = False) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    nodes = [helper.make_node("ImageScaler", ["x"], ["s"], name="scaler", scale=2.0, bias=[0.0, 1.0, 2.0])]
    inits = []
    if with_conv:
        nodes.append(helper.make_node("Conv", ["s", "w"], ["y"], name="conv"))
        inits.append(numpy_helper.from_array(RNG.standard_normal((2, 3, 1, 1)).astype(np.float32), "w"))
    else:
        nodes.append(helper.make_node("Relu", ["s"], ["y"], name="relu"))
    shape = [1, 2, 4, 4] if with_conv else [1, 3, 4, 4]
    return _save(tmp_path, nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits,
                 opset=6, ir_version=3)


def test_converter_failure_names_the_op(tmp_path):
    with pytest.raises(UnsupportedModel) as info:
        upgrade_opset(load_onnx(_image_scaler6(tmp_path)), 13)
    assert info.value.exit_code == 4
    assert info.value.offenders == [("scaler", "op ImageScaler does not exist in opset 13 (an experimental op "
                                                "ONNX removed), so it cannot be upgraded")]


def test_unconvertible_old_model_is_kept_where_the_backend_runs_it(tmp_path, capsys):
    """ONNX Runtime still runs ImageScaler-1: import keeps opset 6 (noted) and the run succeeds."""
    code, err, _ = _run([_image_scaler6(tmp_path), "--recipe", "fold", "-o", tmp_path / "out", "--latency-runs",
                         "1", "-q"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "opset_upgraded" not in manifest["model"]
    assert any(n.startswith("kept at opset 6") and "ImageScaler" in n for n in manifest["model"]["notes"])


def test_required_upgrade_that_fails_is_exit_4(tmp_path, capsys):
    """quantize needs opset 13; the converter cannot bring ImageScaler there."""
    code, err, errors = _run([_image_scaler6(tmp_path, with_conv=True), "--recipe", "int8", "-o", tmp_path / "out",
                              "-q"], capsys)
    assert code == 4, err
    assert len(errors) == 1, err
    assert "cannot upgrade the model from opset 6 to 13" in errors[0] and "scaler: op ImageScaler" in errors[0]
    assert not (tmp_path / "out").exists()


# -- 4/5. float16 and already-quantized models ---------------------------------------------------------

def _conv_integer(tmp_path: Path) -> Path:
    """What onnxruntime's dynamic quantization writes (ddddocr's common_old.onnx): ConvInteger."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    wq = numpy_helper.from_array(RNG.integers(-100, 100, (2, 3, 1, 1)).astype(np.int8), "wq")
    wzp = numpy_helper.from_array(np.array(0, np.int8), "wzp")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"], name="x_quant"),
             helper.make_node("ConvInteger", ["xq", "wq", "xzp", "wzp"], ["acc"], name="conv_int"),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["accf", "xs"], ["y"], name="rescale")]
    return _save(tmp_path, nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                 [wq, wzp], opset=13)


def test_already_quantized_model_is_refused_by_quantize(tmp_path, capsys):
    code, err, errors = _run([_conv_integer(tmp_path), "--recipe", "int8", "-o", tmp_path / "out", "-q"], capsys)
    assert code == 2, err
    assert len(errors) == 1, err
    want = "error: the model is already quantized (1 DynamicQuantizeLinear, 1 ConvInteger"
    assert errors[0].startswith(want), errors[0]  # said about the model, not as a failed pass
    assert "recipe without 'quantize'" in errors[0]
    assert not (tmp_path / "out").exists()


def test_already_quantized_is_said_before_what_a_target_lacks(tmp_path, capsys):
    """On qnn-htp (no ConvInteger) the model's real problem comes first: exit 2, not exit 4."""
    code, err, errors = _run([_conv_integer(tmp_path), "--recipe", "int8", "--target", "qnn-htp",
                              "-o", tmp_path / "out", "-q"], capsys)
    assert code == 2, err
    assert errors[0].startswith("error: the model is already quantized (1 DynamicQuantizeLinear"), errors[0]
    assert not (tmp_path / "out").exists()


def test_already_quantized_model_may_still_be_folded(tmp_path, capsys):
    code, err, _ = _run([_conv_integer(tmp_path), "--recipe", "fold", "-o", tmp_path / "out", "--latency-runs", "1",
                         "-q"], capsys)
    assert code == 0, err


def test_quantized_nodes_covers_contrib_ops(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", name="q4", K=4, N=3,
                            bits=4, block_size=16)
    graph = helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    import onnx_ir as ir
    assert quantized_nodes(ir.serde.deserialize_model(model)) == [("q4", "com.microsoft:MatMulNBits")]


def _fp16_conv(tmp_path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 4, 4])
    w = numpy_helper.from_array(RNG.standard_normal((2, 3, 1, 1)).astype(np.float16), "w")
    return _save(tmp_path, [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [x],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 2, 4, 4])], [w])


def test_float16_model_is_quantized_in_float32_keeping_its_interface(tmp_path, capsys, monkeypatch):
    """Used to crash (exit 1: QuantizeLinear-13 takes no float16)."""
    from compressor.flow import compress as compress_module
    from tests.ortutil import onnx_specs_target

    # The onnx target's specs without its speed rules: its one 2-channel Conv would stay float.
    monkeypatch.setattr(compress_module, "get_target", lambda name, target_cpu="host": onnx_specs_target())
    xs = RNG.standard_normal((4, 1, 3, 4, 4)).astype(np.float16)
    np.savez(tmp_path / "calib.npz", x=xs)
    path = _fp16_conv(tmp_path)
    code, err, _ = _run([path, "--recipe", "int8", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "out",
                         "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    assert "compute in float16/bfloat16 (e.g. conv: input 'x' is float16); the model is quantized in float32" in err
    art = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [i.type.tensor_type.elem_type for i in art.graph.input] == [TensorProto.FLOAT16]
    assert [o.type.tensor_type.elem_type for o in art.graph.output] == [TensorProto.FLOAT16]
    assert {t.name: t.data_type for t in art.graph.initializer}["w_quantized"] == TensorProto.INT8
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": xs[0]})[0]
    got = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": xs[0]})[0]
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - want).max() < 0.05 * np.abs(want).max()


def test_widening_is_exact_with_constants_casts_and_subgraphs(tmp_path):
    """Constant/ConstantOfShape values, Cast(to=float16) and an If body: float16 in, float16 out, same numbers."""
    from compressor.passes._float32 import widen_to_float32

    from compressor.model_io import to_proto

    h = TensorProto.FLOAT16
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    half_one = numpy_helper.from_array(np.array([1.5], np.float16))
    then_out = helper.make_tensor_value_info("b", h, [2, 3])
    then = helper.make_graph([helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
        np.array(0.25, np.float16)), name="k"), helper.make_node("Mul", ["xh", "k"], ["b"], name="scale")],
        "then", [], [then_out])
    other = helper.make_graph([helper.make_node("Neg", ["xh"], ["b"], name="neg")], "else", [], [then_out])
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=h, name="to_half"),
             helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=half_one, name="ones"),
             helper.make_node("Add", ["xh", "ones"], ["a"], name="add"),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="cond"),
             helper.make_node("If", ["c"], ["i"], then_branch=then, else_branch=other, name="branch"),
             helper.make_node("Sub", ["a", "i"], ["y"], name="sub")]
    path = _save(tmp_path, nodes, [x], [helper.make_tensor_value_info("y", h, [2, 3])],
                 [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = load_onnx(path)
    assert widen_to_float32(model) > 0
    wide = to_proto(model)
    onnx.checker.check_model(wide, full_check=True)
    assert not [t for t in wide.graph.initializer if t.data_type == h]
    for xv in (np.array([[1, 2, 3], [4, 5, 6]], np.float32), -np.array([[1, 2, 3], [4, 5, 6]], np.float32)):
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
        got = ort.InferenceSession(wide.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, want)


def test_unsorted_nodes_are_sorted_on_import(tmp_path, capsys):
    """onnxruntime.transformers.float16 (keep_io_types) appends its input casts after their readers."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("Relu", ["c"], ["y"], name="relu"), helper.make_node("Neg", ["x"], ["c"], name="neg")]
    path = _save(tmp_path, nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    code, err, _ = _run([path, "--recipe", "fold", "-o", tmp_path / "out", "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    assert "not in topological order" in err


def _shapeless_model(tmp_path: Path) -> Path:
    """A MatMul whose graph input and output declare a type but no shape (ONNX requires one)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w")
    return _save(tmp_path, [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [x], [y], [w])


def test_shapeless_input_is_refused_by_the_checker_alone(tmp_path):
    """The premise: ONNX's checker refuses the file, and ONNX Runtime runs it."""
    path = _shapeless_model(tmp_path)
    with pytest.raises(onnx.checker.ValidationError, match="'shape' of 'type' is required"):
        onnx.checker.check_model(onnx.load(str(path)))
    xv = RNG.standard_normal((2, 4)).astype(np.float32)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": xv})


@pytest.mark.parametrize("given", ["input", "data"])
def test_shapeless_input_takes_input_or_the_data_shape(given, tmp_path, capsys):
    path = _shapeless_model(tmp_path)
    np.savez(tmp_path / "eval.npz", x=RNG.standard_normal((6, 4)).astype(np.float32))
    extra = ["--input", "x=?x4"] if given == "input" else []
    code, err, _ = _run([path, "--recipe", "fold", *extra, "--eval", tmp_path / "eval.npz", "-o", tmp_path / "out",
                         "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input_spec"] == [{"name": "x", "shape": [None, 4], "dtype": "float32"}]
    artifact = onnx.load(str(tmp_path / "out" / "model.onnx"))
    onnx.checker.check_model(artifact)  # the artifact declares the shapes ONNX requires
    assert [d.dim_value for d in artifact.graph.output[0].type.tensor_type.shape.dim][1:] == [3]


def test_shapeless_input_without_input_or_data_is_exit_2_naming_it(tmp_path, capsys):
    code, err, errors = _run([_shapeless_model(tmp_path), "--recipe", "fold", "-o", tmp_path / "out", "-q"], capsys)
    assert code == 2, err
    assert errors == ["error: the model's input 'x' declares no shape (ONNX requires one; its exporter left it out): "
                      "give it with --input x=DIMxDIM... (e.g. x=1x3x224x224; ? leaves an axis dynamic; x=scalar "
                      "for rank 0), or pass --calib/--eval data that holds it"]
    assert not (tmp_path / "out").exists()


def test_cyclic_graph_is_still_refused(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add"), helper.make_node("Neg", ["a"], ["b"], name="neg"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    path = _save(tmp_path, nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    code, err, errors = _run([path, "--recipe", "fold", "-o", tmp_path / "out", "-q"], capsys)
    assert code == 2, err
    assert "the ONNX model is invalid: Nodes in a graph must be topologically sorted" in errors[0], errors[0]


def test_float16_model_folds(tmp_path, capsys):
    np.savez(tmp_path / "eval.npz", x=RNG.standard_normal((4, 1, 3, 4, 4)).astype(np.float16))
    code, err, _ = _run([_fp16_conv(tmp_path), "--recipe", "fold", "--eval", tmp_path / "eval.npz",
                         "-o", tmp_path / "out", "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err


# -- 6. scalar inputs ------------------------------------------------------------------------------

def _scalar_model(tmp_path: Path) -> Path:
    """``y = (x @ w) * float(sr)``: silero-vad's 0-d int64 ``sr`` next to a batched ``x``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    w = numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["m", "srf"], ["y"], name="scale")]
    path = _save(tmp_path, nodes, [x, sr], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [w])
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((8, 1, 4)).astype(np.float32),
             sr=np.full(8, 16000, np.int64))
    return path


def test_scalar_input_is_fed_as_a_0d_array(tmp_path, capsys):
    """silero-vad's ``sr``: an int64 scalar, one per sample; ONNX Runtime refuses a numpy scalar."""
    path = _scalar_model(tmp_path)
    code, err, _ = _run([path, "--recipe", "int8", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "out",
                         "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err


def test_input_scalar_spelling_parses():
    """``--input NAME=scalar[:dtype]`` is rank 0; it cannot be read as a shape (no dimension list spells rank 0)."""
    assert parse_input_overrides(["sr=scalar", "rate=scalar:int64", "x=?x4"]) == {
        "sr": ((), None), "rate": ((), "int64"), "x": ((None, 4), None)}
    assert override_text(()) == "scalar" and override_text((None, 4)) == "?x4"
    with pytest.raises(UsageError, match=r"or NAME=scalar for a rank-0 input \(e\.g\. sr=scalar:int64\)"):
        parse_input_overrides(["sr="])


def test_input_scalar_end_to_end(tmp_path, capsys):
    path = _scalar_model(tmp_path)
    out = tmp_path / "out"
    code, err, _ = _run([path, "--recipe", "int8", "--input", "sr=scalar:int64", "--input", "x=1x4",
                         "--calib", tmp_path / "calib.npz", "-o", out, "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    spec = {s["name"]: s for s in json.loads((out / "manifest.json").read_text())["input_spec"]}
    assert spec["sr"] == {"name": "sr", "shape": [], "dtype": "int64"}
    assert spec["x"]["shape"] == [1, 4]
    sr = next(i for i in onnx.load(out / "model.onnx").graph.input if i.name == "sr")
    assert sr.type.tensor_type.HasField("shape") and len(sr.type.tensor_type.shape.dim) == 0


def test_input_scalar_for_a_rank_2_input_is_exit_2_naming_it(tmp_path, capsys):
    path = _scalar_model(tmp_path)
    out = tmp_path / "out"
    code, err, errors = _run([path, "--recipe", "fold", "--input", "x=scalar", "-o", out, "-q"], capsys)
    assert code == 2, err
    assert errors == ["error: --input x=scalar: the model's input 'x' has rank 2 (Nx4), not 0; NAME=scalar is "
                      "for a rank-0 input only: give x a DIMxDIM... shape"], err
    assert not out.exists()
    code, err, errors = _run([path, "--recipe", "fold", "--input", "sr=1", "-o", out, "-q"], capsys)
    assert code == 2, err
    assert errors == ["error: --input sr: shape 1 has rank 1, but the model's input 'sr' has rank 0 (scalar); "
                      "a rank-0 input is --input sr=scalar"], err
    assert not out.exists()


@pytest.mark.parametrize("command", [[], ["inspect"], ["sweep"]])
def test_input_help_names_the_scalar_spelling(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "NAME=scalar" in " ".join(capsys.readouterr().out.split())


# -- 8. models that used to reach an uncaught exception ------------------------------------------------

def _fc(tmp_path: Path, w: np.ndarray, value_info=()) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "w")], value_info=list(value_info))
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((8, 2, 4)).astype(np.float32))
    return path


def test_nonfinite_weight_is_exit_2_naming_layer_and_weight(tmp_path, capsys):
    w = RNG.standard_normal((4, 3)).astype(np.float32)
    w[0, 0], w[1, 2] = np.nan, np.inf
    code, err, errors = _run([_fc(tmp_path, w), "--recipe", "int8", "--calib", tmp_path / "calib.npz",
                              "-o", tmp_path / "out", "-q"], capsys)
    assert code == 2, err
    assert len(errors) == 1, err
    assert "fc: weight 'w' holds 2 NaN/inf value(s)" in errors[0] and "exclude" in errors[0], errors[0]


def test_calibration_run_failing_is_exit_2(tmp_path, capsys):
    """The float model fails in ONNX Runtime on the calibration data (it runs on the eval
    data, so the baseline passes): bad input, not a crash."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="fc")]
    inits = [numpy_helper.from_array(np.array([3, 4], np.int64), "shape"),
             numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w")]
    path = _save(tmp_path, nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])], inits)
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((8, 2, 4)).astype(np.float32))  # 2 rows: no reshape to 3x4
    np.savez(tmp_path / "eval.npz", x=RNG.standard_normal((4, 3, 4)).astype(np.float32))
    code, err, errors = _run([path, "--recipe", "int8", "--calib", tmp_path / "calib.npz", "--eval",
                              tmp_path / "eval.npz", "-o", tmp_path / "out", "-q"], capsys)
    assert code == 2, err
    assert len(errors) == 1, err
    assert "calibration: the model fails in ONNX Runtime on the calibration data" in errors[0], errors[0]
    assert "reshape" in errors[0]


def test_contradicting_value_info_is_inferred_again(tmp_path, capsys):
    """A wrong declared intermediate shape used to be copied onto Q/DQ outputs: ORT refused the artifact."""
    wrong = helper.make_tensor_value_info("r", TensorProto.FLOAT, [7, 5, 2])
    path = _fc(tmp_path, RNG.standard_normal((4, 3)).astype(np.float32), [wrong])
    code, err, _ = _run([path, "--recipe", "int8", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "out",
                         "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    assert "contradict shape inference" in err
    notes = json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]["notes"]
    assert any("value_info" in n for n in notes)


def test_nothing_to_quantize_is_exit_0_with_a_warning(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="relu")], [x],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((8, 2, 4)).astype(np.float32))
    code, err, _ = _run([path, "--recipe", "int8", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "out",
                         "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    assert "quantize: nothing was quantized: the model has no layer the target quantizes (" in err


def test_nothing_to_quantize_names_layers_inside_if_bodies(tmp_path, capsys):
    """silero-vad: every Conv sits in an If branch; the warning says they were left alone."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    w = numpy_helper.from_array(RNG.standard_normal((4, 4)).astype(np.float32), "w")
    body_out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["b"], name="inner_fc")], "then", [], [body_out])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["b"], name="pass")], "else", [], [body_out])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="cond"),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="branch")]
    path = _save(tmp_path, nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                 [w, numpy_helper.from_array(np.array(0, np.float32), "zero")])
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((8, 2, 4)).astype(np.float32))
    code, err, _ = _run([path, "--recipe", "int8", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "out",
                         "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    assert "1 such node(s) inside If/Loop/Scan bodies (e.g. 'inner_fc') are left alone" in err


# -- 3. custom domains -------------------------------------------------------------------------------

def _custom_domains(tmp_path: Path) -> Path:
    """tf2onnx's ai.onnx.ml and ONNX Runtime's com.microsoft ops around a quantizable MatMul."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    w = numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Normalizer", ["x"], ["n"], domain="ai.onnx.ml", norm="L2", name="norm"),
             helper.make_node("MatMul", ["n", "w"], ["m"], name="fc"),
             helper.make_node("Gelu", ["m"], ["y"], domain="com.microsoft", name="gelu")]
    path = _save(tmp_path, nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w],
                 extra_opsets=[helper.make_opsetid("ai.onnx.ml", 2), helper.make_opsetid("com.microsoft", 1)])
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((8, 2, 4)).astype(np.float32))
    return path


def test_custom_domains_pass_through_where_the_target_runs_them(tmp_path, capsys):
    code, err, _ = _run([_custom_domains(tmp_path), "--recipe", "int8", "--calib", tmp_path / "calib.npz",
                         "-o", tmp_path / "out", "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    ops = {(n.domain, n.op_type) for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    assert {("ai.onnx.ml", "Normalizer"), ("com.microsoft", "Gelu"), ("", "QuantizeLinear")} <= ops


def test_custom_domains_are_named_by_a_target_that_cannot_run_them(tmp_path):
    from compressor.targets.qnn_htp import lint

    offenders = dict(lint(load_onnx(_custom_domains(tmp_path))))
    assert offenders["norm"] == "op ai.onnx.ml::Normalizer is not supported by QNN HTP"
    assert offenders["gelu"] == "op com.microsoft::Gelu is not supported by QNN HTP"


def test_model_without_an_onnx_opset_is_not_upgraded(tmp_path, capsys):
    """An ai.onnx.ml-only graph (sklearn-onnx can write one) has no ai.onnx opset to upgrade."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    node = helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L2", name="norm")
    graph = helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 2)], ir_version=8), str(path))
    code, err, _ = _run([path, "--recipe", "fold", "-o", tmp_path / "out", "--latency-runs", "1", "-q"], capsys)
    assert code == 0, err
    model = json.loads((tmp_path / "out" / "manifest.json").read_text())["model"]
    assert "opset_upgraded" not in model and not any("opset" in n for n in model["notes"])
