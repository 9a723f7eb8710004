"""The pass manager: needs checked before running, verification, errors naming the pass."""

from __future__ import annotations

import dataclasses

import onnx
import onnx_ir as ir
import pytest

from compressor.errors import PipelineError, RecipeError
from compressor.pass_manager import PassManager
from compressor.pipeline import Pass, PassContext, PassResult, register_pass


def tiny_model() -> ir.Model:
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) { t = Relu(x)  y = Neg(t) }""")
    return ir.serde.deserialize_model(proto)


@register_pass
class Marker(Pass):
    name = "test-marker"
    provides = frozenset({"marked"})

    @dataclasses.dataclass(frozen=True)
    class Options:
        count: int = 1

    def run(self, model, ctx):
        return PassResult(model, False, {"count": self.options.count})


class NeedsMarker(Pass):
    name = "test-needs-marker"
    requires = frozenset({"marked"})

    def run(self, model, ctx):
        return PassResult(model, False, {})


class Breaker(Pass):
    """Leaves a node reading a value no one produces: the checker must catch it."""

    name = "test-breaker"

    def run(self, model, ctx):
        dangling = ir.Value(name="dangling")
        node = ir.node("Relu", [dangling], name="broken")
        model.graph.append(node)
        model.graph.outputs.append(node.outputs[0])
        node.outputs[0].name = "z"
        return PassResult(model, True, {})


class Crasher(Pass):
    name = "test-crasher"

    def run(self, model, ctx):
        raise ValueError("boom")


def test_runs_in_order_and_reports():
    result = PassManager([Marker({"count": 3}), NeedsMarker()]).run(tiny_model(), PassContext())
    assert [r.name for r in result.reports] == ["test-marker", "test-needs-marker"]
    assert result.reports[0].stats == {"count": 3}
    assert result.reports[0].options == {"count": 3}
    assert not result.modified


def test_unmet_requirement_refused_before_running():
    with pytest.raises(RecipeError, match=r"passes\[0\] 'test-needs-marker' requires 'marked'.*provided by test-marker"):
        PassManager([NeedsMarker(), Marker()]).run(tiny_model(), PassContext())


def test_verification_names_the_breaking_pass():
    with pytest.raises(PipelineError, match=r"pass 'test-breaker' failed .*passes already run: test-marker"):
        PassManager([Marker(), Breaker()]).run(tiny_model(), PassContext())


def test_crash_is_wrapped_with_exit_code_1():
    with pytest.raises(PipelineError) as info:
        PassManager([Crasher()]).run(tiny_model(), PassContext())
    assert info.value.exit_code == 1
    assert "ValueError: boom" in str(info.value)


def test_dump_passes(tmp_path):
    PassManager([Marker(), NeedsMarker()], dump_dir=tmp_path).run(tiny_model(), PassContext())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.onnx", "01-test-marker.onnx", "02-test-needs-marker.onnx"]
    onnx.checker.check_model(onnx.load(tmp_path / "01-test-marker.onnx"))


def test_min_opset_upgrades_first():
    class NeedsOpset18(Pass):
        name = "test-opset"
        min_opset = 18

        def run(self, model, ctx):
            return PassResult(model, False, {"opset": model.opset_imports[""]})

    result = PassManager([NeedsOpset18()]).run(tiny_model(), PassContext())
    assert result.reports[0].stats == {"opset": 18}


def test_passes_name_the_control_flow_bodies_they_leave_alone():
    """An ``If`` whose branches hold a Conv: prune-magnitude works on the main graph only, so its
    report names both bodies (left as they were); fold-constants walks into them and says nothing.
    (``quantize`` walks the branch the calibration data takes: tests/passes/test_control_flow.py.)"""
    import numpy as np
    from compressor.targets import get_target
    from onnx import TensorProto, helper, numpy_helper

    from compressor.data import Dataset
    from compressor.inputs import model_input_specs
    from compressor.pipeline import build_pass

    def branch(name: str, scale: float) -> onnx.GraphProto:
        w = numpy_helper.from_array(np.full((2, 1, 1, 1), scale, np.float32), f"{name}_w")
        return helper.make_graph([helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_conv")],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], [w])

    nodes = [helper.make_node("If", ["flag"], ["y"], name="choose", then_branch=branch("then", 2.0),
                              else_branch=branch("else", 3.0))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    specs = model_input_specs(model)
    data = Dataset({"x": np.random.default_rng(0).random((4, 1, 1, 4, 4), np.float32),
                    "flag": np.ones((4,), bool)}, specs, {"x": True, "flag": True}, None, "test", "0")
    ctx = PassContext(target=get_target("onnx"), calibration=data, properties={"captured"})
    result = PassManager([build_pass("fold-constants", {}), build_pass("prune-magnitude", {})]).run(model, ctx)
    fold, prune = result.reports
    assert "subgraphs_left_as_is" not in fold.stats
    assert prune.stats["subgraphs_left_as_is"] == {
        "If 'choose'.then_branch": "1 nodes; prune-magnitude works on the main graph only",
        "If 'choose'.else_branch": "1 nodes; prune-magnitude works on the main graph only"}
    weights = [n.inputs[1].const_value.numpy() for n in ir.traversal.RecursiveGraphIterator(result.model.graph)
               if n.op_type == "Conv"]
    assert all((w != 0).all() for w in weights), "never a half-rewritten body"


def _wrongly_declared_output() -> ir.Model:
    """``y = Reshape(x, [6, 1, 4])`` declared ``[1, seqlen]`` (ddddocr's ``common.onnx`` in small).

    The target shape is gathered with a ``Range`` whose length depends on ``Size(x)``, so
    inference cannot see the reshape's rank until ``fold-constants`` makes it a constant.
    """
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 1, 4, 6] x) => (float[1, seqlen] y) {
            dims = Constant<value = int64[4] {6, 1, 4, 99}>()
            eight = Constant<value = int64 {8}>()
            zero = Constant<value = int64 {0}>()
            one = Constant<value = int64 {1}>()
            size = Size(x)
            count = Div(size, eight)
            idx = Range(zero, count, one)
            shape = Gather(dims, idx)
            y = Reshape(x, shape)
        }""")
    return ir.serde.deserialize_model(proto)


def test_wrongly_declared_output_shape_is_replaced_by_the_inferred_one():
    import numpy as np
    from compressor.passes.fold_constants import FoldConstants

    from tests.ortutil import run_ort

    model = _wrongly_declared_output()
    x = np.arange(24, dtype=np.float32).reshape(1, 1, 4, 6)
    result = PassManager([FoldConstants()]).run(model, PassContext())
    assert result.verify_level is True  # the input passed strict inference: the bar stays strict
    assert result.reports[0].stats["output_shapes_corrected"] == {"y": "declared [1, seqlen], inferred [6, 1, 4]"}
    assert list(result.model.graph.outputs[0].shape) == [6, 1, 4]
    np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], x.reshape(6, 1, 4))


def test_output_shapes_are_left_alone_when_they_agree():
    from compressor.model_io import correct_output_shapes

    assert correct_output_shapes(tiny_model()) == {}


class PerLayer(Pass):
    name = "test-per-layer"

    def run(self, model, ctx):
        return PassResult(model, False, {"layers": [f"layer_{i}" for i in range(40)], "sparsity": 0.123456,
                                         "per_layer": {f"layer_{i}": 0.5 for i in range(40)}})


def test_the_info_line_summarises_per_layer_stats_and_debug_has_them_all(caplog):
    """A pass's info line stays one short line (MiniLM's per-layer stats ran to thousands of
    characters per pass); the whole stats are in the debug log and the report."""
    with caplog.at_level("DEBUG", logger="compressor.pass_manager"):
        result = PassManager([PerLayer()]).run(tiny_model(), PassContext())
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(info) == 1 and "layers: [40]" in info[0] and "per_layer: [40]" in info[0]
    assert "sparsity: 0.1235" in info[0] and "layer_7" not in info[0]
    assert any("layer_39" in r.getMessage() for r in caplog.records if r.levelname == "DEBUG")
    assert len(result.reports[0].stats["per_layer"]) == 40
