"""Exact equivalents of ops QNN HTP refuses (``targets/qnn_htp/equivalents.py``): Gemm coefficients, Selu."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.cli import main
from compressor.model_io import model_bytes
from compressor.targets.onnx import ort_session
from compressor.targets.qnn_htp.equivalents import fold_gemm_coefficients, selu_as_elu

HAVE_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
M, K, N = 2, 3, 4


def _gemm(alpha: float, beta: float, c_shape: tuple[int, ...] | None, b_const: bool) -> ir.Model:
    """``Y = alpha·A·B + beta·C``; a constant ``B`` as ``quantize`` leaves it: DQ(int8 codes, per-column scale)."""
    rng = np.random.default_rng(0)
    inits, nodes, ins = [], [], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])]
    if b_const:
        codes = rng.integers(-127, 128, (K, N)).astype(np.int8)
        codes[0, 0] = 0  # a pruned weight stays 0
        inits += [numpy_helper.from_array(codes, "b_q"),
                  numpy_helper.from_array(rng.uniform(0.01, 0.02, N).astype(np.float32), "b_scale"),
                  numpy_helper.from_array(np.zeros(N, np.int8), "b_zp")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], axis=1))
    else:
        ins.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [K, N]))
    gemm_in = ["a", "b"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_shape).astype(np.float32), "c"))
        gemm_in.append("c")
    nodes.append(helper.make_node("Gemm", gemm_in, ["y"], alpha=alpha, beta=beta))
    graph = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort_session(model_bytes(model), as_written=True).run(None, feeds)[0]


@pytest.mark.parametrize("alpha, beta, c_shape", [
    (1.0, 0.0, (1,)),      # PyTorch's mm as old exporters wrote it (ONNX's test_operator_mm): C dropped
    (1.0, 0.5, (N,)),      # C scaled
    (2.0, 1.0, (N,)),      # the weight's scale doubled, the codes unchanged
    (-1.5, 0.25, (1, N)),  # codes negated, scale 1.5x, C scaled
    (3.0, 1.0, None),
])
def test_alpha_and_beta_go_into_the_constants(alpha, beta, c_shape):
    model = _gemm(alpha, beta, c_shape, b_const=True)
    feeds = {"a": np.random.default_rng(1).standard_normal((M, K)).astype(np.float32)}
    before = _run(model, feeds)
    codes = model.graph.initializers["b_q"].const_value.numpy()
    assert fold_gemm_coefficients(model.graph) == 1
    (gemm,) = [n for n in model.graph if n.op_type == "Gemm"]
    assert all(gemm.attributes[k].as_float() == 1.0 for k in ("alpha", "beta") if k in gemm.attributes)
    assert len(gemm.inputs) == (2 if c_shape is None or beta == 0 else 3)
    dq = gemm.inputs[1].producer()
    assert dq.op_type == "DequantizeLinear"
    np.testing.assert_array_equal(dq.inputs[0].const_value.numpy(), codes if alpha > 0 else -codes)
    assert dq.inputs[0].const_value.numpy()[0, 0] == 0
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph) == 1, "the old DQ goes"
    assert all(v.uses() for v in model.graph.initializers.values()), "and what only it read"
    np.testing.assert_allclose(_run(model, feeds), before, rtol=1e-5, atol=1e-6)


def test_alpha_on_a_computed_b_is_left_for_the_ep_to_name():
    model = _gemm(2.0, 1.0, None, b_const=False)
    assert fold_gemm_coefficients(model.graph) == 0
    (gemm,) = [n for n in model.graph if n.op_type == "Gemm"]
    assert gemm.attributes["alpha"].as_float() == 2.0


@pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn cannot be imported: no QNN HTP backend here")
def test_pytorch_mm_as_old_exporters_wrote_it_runs_wholly_on_htp(tmp_path, capsys):
    """``Gemm(A, B, C=[0], beta=0)`` of two inputs was exit 4 ("c_DequantizeLinear: Failed to add node")."""
    rng = np.random.default_rng(2)
    stats = _legalized_on_htp(tmp_path, capsys, _gemm(1.0, 0.0, (1,), b_const=False),
                              a=rng.standard_normal((8, M, K)).astype(np.float32),
                              b=rng.standard_normal((8, K, N)).astype(np.float32))
    assert stats["gemm_coefficients_folded"] == 1


def _legalized_on_htp(tmp_path, capsys, model: ir.Model, **data: np.ndarray) -> dict:
    """``compress --recipe int8 --target qnn-htp`` of ``model`` (exit 0, wholly on HTP, gate passed):
    qnn-legalize's stats."""
    (tmp_path / "m.onnx").write_bytes(model_bytes(model))
    np.savez(tmp_path / "d.npz", **data)
    code = main([str(tmp_path / "m.onnx"), "--recipe", "int8", "--target", "qnn-htp", "--calib",
                 str(tmp_path / "d.npz"), "--eval", str(tmp_path / "d.npz"), "--latency-runs", "1",
                 "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["qnn_htp"]["ran_wholly_on_htp"] and manifest["gate"]["passed"]
    (legalize,) = [p for p in manifest["passes"] if p["name"] == "qnn-legalize"]
    return legalize["stats"]


def _selu() -> ir.Model:
    graph = helper.make_graph([helper.make_node("Selu", ["x"], ["y"]), helper.make_node("Selu", ["y"], ["z"], alpha=2.0,
                                                                                          gamma=0.5)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 3, 4])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                        ir_version=8))


def test_selu_is_gamma_times_elu():
    model = _selu()
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 2, 3, 4)).astype(np.float32) * 3}
    before = _run(model, feeds)
    assert selu_as_elu(model.graph) == 2
    assert [n.op_type for n in model.graph] == ["Elu", "Mul", "Elu", "Mul"]
    assert [v.name for v in model.graph.outputs] == ["z"]
    np.testing.assert_allclose(_run(model, feeds), before, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn cannot be imported: no QNN HTP backend here")
def test_selu_runs_wholly_on_htp(tmp_path, capsys):
    """HTP failed to finalize a Selu (exit 4, bare QNN_COMMON_ERROR_MEM_ALLOC: ONNX's test_operator_selu)."""
    stats = _legalized_on_htp(tmp_path, capsys, _selu(),
                              x=np.random.default_rng(4).standard_normal((8, 1, 2, 3, 4)).astype(np.float32))
    assert stats["selu_as_elu"] == 2


@pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn cannot be imported: no QNN HTP backend here")
def test_an_op_htp_refuses_is_named_without_its_qdq_or_onnx_runtimes_own_log(tmp_path, capfd):
    """A 3-D MaxPool (ONNX's test_MaxPool3d): the exit 4 names the pool alone, not the Q and DQ of its node unit
    ("0_QuantizeLinear: refused (no reason logged); 0_DequantizeLinear: ..."), and ONNX Runtime's coloured
    ERROR lines do not reach the terminal."""
    graph = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2, 2], name="pool")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "pool.onnx"))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(5).standard_normal((4, 1, 2, 4, 4, 4)).astype(np.float32))
    code = main([str(tmp_path / "pool.onnx"), "--recipe", "int8", "--target", "qnn-htp", "--calib",
                 str(tmp_path / "d.npz"), "--eval", str(tmp_path / "d.npz"), "-o", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert code == 4, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert line.startswith("error: target 'qnn-htp' cannot run this model: pool: MaxPool node unit: "), line
    assert "QuantizeLinear" not in line and "DequantizeLinear" not in line and ";" not in line, line
    assert "E:onnxruntime" not in err
    assert not (tmp_path / "out").exists()


def test_a_float16_selu_gets_a_float16_gamma():
    """The review's case: a float32 gamma beside a float16 Elu made an invalid Mul (exit 1)."""
    graph = helper.make_graph([helper.make_node("Selu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                         ir_version=8))
    x = {"x": np.linspace(-3, 3, 6, dtype=np.float16).reshape(2, 3)}
    before = _run(model, x)
    assert selu_as_elu(model.graph) == 1
    np.testing.assert_allclose(_run(model, x).astype(np.float32), before.astype(np.float32), rtol=2e-3, atol=2e-3)


def _expand_to_input_shape() -> ir.Model:
    """ONNX's ``test_expand_shape_model*``: ``Y = Expand(X, shape)``, the shape a graph input."""
    graph = helper.make_graph([helper.make_node("Expand", ["x", "shape"], ["y"], name="grow")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1]),
                               helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                        ir_version=8))


def test_a_shape_taken_from_an_input_names_the_freeze_that_fixes_it():
    from compressor.targets.qnn_htp import lint

    assert lint(_expand_to_input_shape()) == [
        ("grow", "op Expand takes its shape from input 'shape': HTP compiles static shapes only; "
                 "--freeze shape=VALUE makes it a constant")]


@pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn cannot be imported: no QNN HTP backend here")
def test_the_named_freeze_makes_it_run_on_htp(tmp_path, capsys):
    """Was exit 4 with the EP's "QNN doesn't support dynamic shape"; the freeze folds the Expand's shape."""
    (tmp_path / "m.onnx").write_bytes(model_bytes(_expand_to_input_shape()))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(6).standard_normal((8, 3, 1)).astype(np.float32),
             shape=np.tile(np.array([3, 4], np.int64), (8, 1)))
    argv = [str(tmp_path / "m.onnx"), "--recipe", "int8", "--target", "qnn-htp", "--calib", str(tmp_path / "d.npz"),
            "--eval", str(tmp_path / "d.npz"), "--latency-runs", "1", "-o", str(tmp_path / "out")]
    assert main(argv) == 4 and "--freeze shape=VALUE" in capsys.readouterr().err
    assert main([*argv, "--freeze", "shape=3,4"]) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["qnn_htp"]["ran_wholly_on_htp"] and manifest["frozen_inputs"] == {"shape": [3, 4]}
