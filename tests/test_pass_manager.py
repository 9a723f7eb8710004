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
