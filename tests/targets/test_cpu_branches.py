"""The targets' CPU-dependent weight grid, each branch forced (``tests/conftest.py``) on any CPU.

Without VNNI, x86 int8 kernels sum pairs of u8*s8 products in int16 with saturation, so
a target asks for 7-bit symmetric weights (``QuantSpec.bits = 7``, ``|q| <= 63``) on the
ops whose kernels do that; with VNNI (or on a CPU it cannot identify, where the x86
saturation does not apply) it keeps the full int8 grid. The numerics of each branch are
tested with the targets: ``tests/passes/test_quantize.py`` (ONNX Runtime) and
``tests/targets/test_openvino.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import compressor.targets
import pytest
from compressor.targets import base
from compressor.targets.onnx import OnnxTarget


def _weight_bits(target) -> dict[str, int | None]:
    return {op: q.weights.bits for op, q in target.capabilities.quantizable.items() if q.weights is not None}


def test_force_vnni_reaches_every_target_that_reads_the_cpu(force_vnni):
    """Every module of ``compressor.targets`` that calls ``cpu_has_vnni()`` sees the forced
    value; a module calling it some other way (``base.cpu_has_vnni()``) would escape the
    fixture, and fails here."""
    callers = []
    for info in pkgutil.walk_packages(compressor.targets.__path__, "compressor.targets."):
        path = Path(importlib.util.find_spec(info.name).origin)
        name = info.name.removeprefix("compressor.targets.")
        if name != "base" and re.search(r"cpu_has_vnni\(\)", path.read_text(encoding="utf-8")):
            callers.append(name)
    assert {"onnx", "openvino", "qnn_htp"} <= set(callers)
    for forced in (True, False, None):
        force_vnni(forced)
        for name in callers:
            try:
                module = importlib.import_module(f"compressor.targets.{name}")
            except ImportError:
                continue
            assert module.cpu_has_vnni() is forced, f"compressor.targets.{name} escapes force_vnni"
    assert base.cpu_has_vnni() in (True, False, None)  # the hardware's answer is left alone


def test_onnx_target_narrows_every_weight_without_vnni(vnni):
    """MLAS's u8s8 kernels (QLinearConv, QGemm, MatMulInteger) all saturate on AVX2."""
    target = OnnxTarget()
    assert _weight_bits(target) == dict.fromkeys(("Conv", "ConvTranspose", "Gemm", "MatMul"), None if vnni else 7)
    assert target.describe()["int8_vnni"] is vnni


def test_an_unidentified_cpu_keeps_the_full_grid(force_vnni):
    force_vnni(None)
    assert set(_weight_bits(OnnxTarget()).values()) == {None}
    openvino = pytest.importorskip("compressor.targets.openvino")
    if openvino.ov is not None:
        assert set(_weight_bits(openvino.OpenVinoTarget()).values()) == {None}


def test_openvino_keeps_the_key_projections_float_only_without_vnni(vnni, tmp_path):
    """With VNNI the plugin's int8 key projections are as faithful as weight-only ones and faster
    (MiniLM, docs/design.md "One int8 recipe"); without it the preset keeps their input float."""
    openvino = pytest.importorskip("compressor.targets.openvino")
    if openvino.ov is None:
        pytest.skip("openvino is not installed")
    import numpy as np

    from tests.passes.test_attention_roles import _quantize_for
    from tests.passes.test_quantize import _attention_feeds, _dataset, attention

    target = openvino.OpenVinoTarget()
    assert target.capabilities.preset_float_roles == (("attention-context",) if vnni else None)
    model = attention(np.random.default_rng(0))
    stats = _quantize_for(target, model, _dataset(model, tmp_path, _attention_feeds(1, 64))).stats
    assert stats["weight_only_layers"] == ({} if vnni else {
        "k_proj": "activation kept float (float_activations: attention-keys)"})
    assert stats["skipped_layers"]["context"] == "activation kept float (float_activations: attention-context)"
    assert ("k_proj" in stats["layers"]) is vnni


def test_openvino_gives_the_first_convolutions_7_bit_weights_on_every_cpu(vnni, tmp_path):
    """NNCF's and POT's default ``overflow_fix: first_layer_only``: the convolutions the graph's
    input reaches without passing another weighted layer (through a ``Div`` and a Focus-style
    ``Slice``/``Concat`` here) get ``|q| <= 63`` on every CPU, so an artifact built on a VNNI
    host is exact on that layer on an AVX2 one; the others keep the grid of the host's branch."""
    openvino = pytest.importorskip("compressor.targets.openvino")
    if openvino.ov is None:
        pytest.skip("openvino is not installed")
    import numpy as np

    from tests.ortutil import model_from_text
    from tests.passes.test_pair_site import _quantize
    from tests.passes.test_quantize import HEADER, _dataset, _node, _w

    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[1,3,8,8] x) => (float[1,8,4,4] y, float[1,8,8,8] z) {{
      [scale] s = Div(x, k255)
      [even] e = Slice(s, starts0, ends, axes, steps)
      [odd] o = Slice(s, starts1, ends, axes, steps)
      [focus] f = Concat <axis = 1> (e, o)
      [conv1] c1 = Conv <pads = [1, 1, 1, 1]> (f, w1, b1)
      [act] a = Relu(c1)
      [conv2] y = Conv <pads = [1, 1, 1, 1]> (a, w2, b2)
      [conv3] z = Conv <pads = [1, 1, 1, 1]> (x, w3, b3)
    }}""", k255=np.array(255.0, np.float32), starts0=np.array([0, 0], np.int64), starts1=np.array([1, 1], np.int64),
        ends=np.array([8, 8], np.int64), axes=np.array([2, 3], np.int64), steps=np.array([2, 2], np.int64),
        w1=_w(rng, 8, 6, 3, 3, fan_in=54), b1=_w(rng, 8) * 0.1, w2=_w(rng, 8, 8, 3, 3, fan_in=72), b2=_w(rng, 8) * 0.1,
        w3=_w(rng, 8, 3, 3, 3, fan_in=27), b3=_w(rng, 8) * 0.1)
    x = np.random.default_rng(1).integers(0, 256, (16, 1, 3, 8, 8)).astype(np.float32)
    q = _quantize(model, _dataset(model, tmp_path, {"x": x})).model

    def largest(name: str) -> int:
        weight = _node(q, name).inputs[1].producer().inputs[0].const_value.numpy()
        return int(np.abs(weight.astype(np.int16)).max())

    assert largest("conv1") <= 63 and largest("conv3") <= 63
    assert largest("conv2") == (127 if vnni else 63)


CPU_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@pytest.mark.parametrize("target_cpu", ["avx2", "vnni"])
def test_target_cpu_names_the_grid_whatever_the_host(vnni, target_cpu):
    """``--target-cpu``: the grid and the preset's float roles follow the CPU named, on either
    host branch (forced); the target's description (the manifest's) records both CPUs, and a
    pickled copy (a Ray task's) keeps the choice."""
    import pickle

    from compressor.targets import get_target

    named = target_cpu == "vnni"
    onnx = get_target("onnx", target_cpu)
    assert _weight_bits(onnx) == dict.fromkeys(CPU_OPS, None if named else 7)
    assert {k: onnx.describe()[k] for k in ("int8_vnni", "deployment_cpu")} == {"int8_vnni": vnni,
                                                                              "deployment_cpu": target_cpu}
    copy = pickle.loads(pickle.dumps(onnx))
    assert copy.capabilities == onnx.capabilities and copy.describe()["deployment_cpu"] == target_cpu
    openvino = pytest.importorskip("compressor.targets.openvino")
    if openvino.ov is None:
        pytest.skip("openvino is not installed")
    target = get_target("openvino", target_cpu)
    assert _weight_bits(target) == {"Conv": None if named else 7, "ConvTranspose": None if named else 7,
                                    "Gemm": None, "MatMul": None, "LSTM": None}
    assert target.capabilities.preset_float_roles == (("attention-context",) if named else None)
    assert target.capabilities.narrow_first_layers == {"Conv", "ConvTranspose"}  # 7-bit first layers either way
    assert {k: target.describe()[k] for k in ("int8_vnni", "deployment_cpu")} == {"int8_vnni": vnni,
                                                                                "deployment_cpu": target_cpu}
    copy = pickle.loads(pickle.dumps(target))
    assert copy.capabilities == target.capabilities and copy.describe()["deployment_cpu"] == target_cpu


@pytest.mark.parametrize("target_cpu", ["avx2", "vnni"])
def test_openvino_weights_follow_the_named_cpu_past_the_first_layer(target_cpu, force_vnni, tmp_path):
    """Built on a host of the other kind (forced), the quantized model has the named CPU's grid:
    7-bit Conv weights for ``avx2``, 8-bit for ``vnni`` except on the first convolutions."""
    openvino = pytest.importorskip("compressor.targets.openvino")
    if openvino.ov is None:
        pytest.skip("openvino is not installed")
    import numpy as np

    from tests.ortutil import model_from_text
    from tests.passes.test_attention_roles import _quantize_for
    from tests.passes.test_quantize import HEADER, _dataset, _node, _w

    force_vnni(target_cpu != "vnni")
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[1,3,8,8] x) => (float[1,8,8,8] y) {{
      [conv1] c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      [act] a = Relu(c1)
      [conv2] y = Conv <pads = [1, 1, 1, 1]> (a, w2, b2)
    }}""", w1=_w(rng, 8, 3, 3, 3, fan_in=27), b1=_w(rng, 8) * 0.1, w2=_w(rng, 8, 8, 3, 3, fan_in=72),
        b2=_w(rng, 8) * 0.1)
    x = np.random.default_rng(1).integers(0, 256, (16, 1, 3, 8, 8)).astype(np.float32)
    target = openvino.OpenVinoTarget(target_cpu=target_cpu)
    q = _quantize_for(target, model, _dataset(model, tmp_path, {"x": x})).model

    def largest(name: str) -> int:
        weight = _node(q, name).inputs[1].producer().inputs[0].const_value.numpy()
        return int(np.abs(weight.astype(np.int16)).max())

    assert largest("conv1") == 63
    assert largest("conv2") == (127 if target_cpu == "vnni" else 63)


PESSIMISTIC = ("{name}: the artifact is built for a CPU with VNNI (--target-cpu vnni) but measured on this CPU, which "
               "has none: its int8 kernels sum u8*s8 pairs in int16 and saturate on 1 layer(s) with weights beyond "
               "+-63 ({layer}), so the accuracy drop measured here is pessimistic for the named CPU, and accuracy "
               "control may give back more layers than it needs; measure on a VNNI CPU for its own figure")


@pytest.mark.parametrize("name", ["openvino"])
def test_vnni_artifact_measured_without_vnni_is_warned_about_once(name, force_vnni, tmp_path, caplog):
    """``--target-cpu vnni`` on a host without VNNI (forced): the host's kernels saturate on the
    8-bit weights, so the drop measured here is pessimistic; said once however often the
    target lowers (accuracy control's tries), and not at all on a VNNI host or for ``avx2``."""
    from compressor.targets import get_target
    from tests.ortutil import saturating_qdq_conv

    if name == "openvino":
        openvino = pytest.importorskip("compressor.targets.openvino")
        if openvino.ov is None:
            pytest.skip("openvino is not installed")
    model = saturating_qdq_conv()[0]
    layer = next(n.name for n in model.graph if n.op_type == "Conv")
    for host, target_cpu, warned in ((False, "vnni", True), (True, "vnni", False), (False, "avx2", False)):
        force_vnni(host)
        target = get_target(name, target_cpu)
        caplog.clear()
        with caplog.at_level("WARNING", logger="compressor.targets"):
            for i in range(3):
                target.lower(model, tmp_path / f"{host}-{target_cpu}-{i}")
        messages = [r.getMessage() for r in caplog.records]
        if warned:
            assert messages == [PESSIMISTIC.format(name=name, layer=layer)]
        else:
            assert not [m for m in messages if "pessimistic" in m], messages


def test_an_unknown_target_cpu_is_refused():
    """The Python API's spelling check (the CLI's ``choices`` refuse it before)."""
    from compressor.errors import UsageError
    from compressor.targets import get_target

    with pytest.raises(UsageError, match=r"^unknown --target-cpu 'avx512'; valid: host, avx2, vnni, amx$"):
        get_target("onnx", "avx512")


def test_a_shape_of_the_input_does_not_make_a_deep_convolution_a_first_layer(force_vnni, tmp_path):
    """U-Net/FPN upsampling to the input's size: ``Resize(sizes=Concat(nc, Shape(x)[2:]))`` before
    conv3. Only float values are followed from the inputs, so conv3 (behind conv1 and conv2)
    keeps the host's grid."""
    openvino = pytest.importorskip("compressor.targets.openvino")
    if openvino.ov is None:
        pytest.skip("openvino is not installed")
    import numpy as np

    from tests.ortutil import model_from_text
    from tests.passes.test_pair_site import _quantize
    from tests.passes.test_quantize import HEADER, _dataset, _node, _w

    force_vnni(True)
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[1,4,H,W] x) => (float[1,4,H,W] y) {{
      [conv1] c1 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1, b1)
      [conv2] c2 = Conv <pads = [1, 1, 1, 1]> (c1, w2, b2)
      [shape] s = Shape(x)
      [hw] hw = Slice(s, two, four)
      [sizes] z = Concat <axis = 0> (nc, hw)
      [up] u = Resize <mode = "nearest"> (c2, , , z)
      [conv3] y = Conv <pads = [1, 1, 1, 1]> (u, w3, b3)
    }}""", w1=_w(rng, 4, 4, 3, 3, fan_in=36), b1=_w(rng, 4), w2=_w(rng, 4, 4, 3, 3, fan_in=36), b2=_w(rng, 4),
        w3=_w(rng, 4, 4, 3, 3, fan_in=36), b3=_w(rng, 4), two=np.array([2], np.int64),
        four=np.array([4], np.int64), nc=np.array([1, 4], np.int64))
    x = np.random.default_rng(1).standard_normal((16, 1, 4, 8, 8)).astype(np.float32)
    q = _quantize(model, _dataset(model, tmp_path, {"x": x})).model

    def largest(name: str) -> int:
        weight = _node(q, name).inputs[1].producer().inputs[0].const_value.numpy()
        return int(np.abs(weight.astype(np.int16)).max())

    assert (largest("conv1"), largest("conv2"), largest("conv3")) == (63, 127, 127)


def test_the_saturation_warning_follows_the_cpu_the_artifact_is_for(force_vnni, tmp_path, caplog):
    """An artifact for ``--target-cpu avx2`` with 8-bit Conv weights (a model quantized
    elsewhere) saturates on the CPU it names, whatever this host has: warned on a VNNI host
    too; with ``host`` on a VNNI host, not."""
    openvino = pytest.importorskip("compressor.targets.openvino")
    if openvino.ov is None:
        pytest.skip("openvino is not installed")
    from compressor.targets import get_target
    from tests.ortutil import saturating_qdq_conv

    model = saturating_qdq_conv()[0]
    force_vnni(True)
    for target_cpu, warned in (("avx2", True), ("host", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="compressor.targets"):
            get_target("openvino", target_cpu).lower(model, tmp_path / target_cpu)
        said = [r.getMessage() for r in caplog.records if "saturates" in r.getMessage()]
        assert said == ([("openvino: the CPU named (--target-cpu avx2) has no VNNI, so int8 Conv sums u8*s8 pairs "
                          "in int16 and saturates: 1 layer(s) have int8 weights beyond +-63 (conv); quantize their "
                          "weights to 7 bits")] if warned else []), said


def test_a_weight_only_layer_never_saturates():
    """``weights_beyond`` counts integer kernels only: a MatMul reading a float input and a
    DQ(int8) weight (the transformer preset's key projections) computes in float."""
    import numpy as np
    import onnx_ir as ir

    from compressor.targets.base import weights_beyond
    from tests.ortutil import model_from_text

    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4] x) => (float[1,4] y, float[1,4] z) {
      [wd] w = DequantizeLinear(wq, ws)
      [k_proj] y = MatMul(x, w)
      [xq] q = QuantizeLinear(x, xs, xz)
      [xd] d = DequantizeLinear(q, xs, xz)
      [q_proj] z = MatMul(d, w)
    }""", wq=np.full((4, 4), 127, np.int8), ws=np.array(0.01, np.float32), xs=np.array(0.02, np.float32),
        xz=np.array(128, np.uint8))
    assert isinstance(model, ir.Model)
    assert weights_beyond(model, {"MatMul"}, 63) == ["q_proj"]


def test_an_untyped_value_on_the_way_to_the_first_convolution_is_followed():
    """A value shape inference left untyped (a custom op's output) is followed, where only
    typed float values were: the convolution after it is still a first layer."""
    openvino = pytest.importorskip("compressor.targets.openvino")
    if openvino.ov is None:
        pytest.skip("openvino is not installed")
    import numpy as np

    from compressor.passes._placement import first_layers
    from tests.ortutil import model_from_text
    from tests.passes.test_quantize import HEADER, _w

    model = model_from_text(f"""{HEADER}
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
      [scale] d = Div(x, k)
      [conv] y = Conv <pads = [1, 1, 1, 1]> (d, w, b)
    }}""", k=np.array(255.0, np.float32), w=_w(np.random.default_rng(0), 4, 3, 3, 3, fan_in=27),
        b=np.zeros(4, np.float32))
    (div,) = [n for n in model.graph if n.op_type == "Div"]
    assert div.outputs[0].dtype is None  # as written: no value_info
    (conv,) = [n for n in model.graph if n.op_type == "Conv"]
    assert first_layers(model.graph, openvino.OpenVinoTarget().capabilities) == {id(conv)}


def test_onnx_measures_a_vnni_artifact_as_written_on_a_host_without_vnni(force_vnni, tmp_path, caplog):
    """ONNX Runtime's fused int8 kernels saturate on a host without VNNI where the named CPU's
    do not; with graph optimizations off each Q/DQ unit computes in float, which is what
    exact VNNI sums give: the runner and accuracy control's ranking (``simulate_as_written``)
    measure that, said once, and the latency is marked as not the named CPU's. On a VNNI host,
    or for ``avx2``/``host``, the runner is ONNX Runtime's optimized session as before."""
    import numpy as np
    import onnxruntime as ort

    from compressor.targets import get_target
    from tests.ortutil import saturating_qdq_conv

    model, x, expected = saturating_qdq_conv()
    for host, target_cpu, written in ((False, "vnni", True), (True, "vnni", False), (False, "avx2", False),
                                      (False, "host", False)):
        force_vnni(host)
        target = get_target("onnx", target_cpu)
        assert target.capabilities.simulate_as_written is written
        caplog.clear()
        with caplog.at_level("WARNING", logger="compressor.targets"):
            files = [target.lower(model, tmp_path / f"{host}-{target_cpu}-{i}")[0] for i in range(2)]
        said = [r.getMessage() for r in caplog.records if "measured as written" in r.getMessage()]
        assert len(said) == (1 if written else 0), said
        runner = target.runner(files)
        level = runner.session.get_session_options().graph_optimization_level
        assert (level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL) is written
        assert (getattr(runner, "latency_note", None) is not None) is written
        if written:  # what the graph says, exactly: no saturation whatever this CPU's kernels do
            np.testing.assert_array_equal(runner({"x": x})[0], expected)
