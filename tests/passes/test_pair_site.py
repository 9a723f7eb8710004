"""``quantize`` on ``openvino``: a layer's input pair moves up through data movement (``passes/_pair_site``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from compressor.targets import get_target

from compressor.pipeline import PassContext, build_pass
from tests.ortutil import model_from_text, run_ort
from tests.passes.test_quantize import HEADER, _activation_source, _clone, _dataset, _node, _normal, _w

pytest.importorskip("openvino", reason="the openvino package is not installed")

C = 8


def padded_chain(rng: np.random.Generator, first: str = "Relu", mode: str = "constant"):
    """x -> Conv -> ``first`` -> Pad -> Reshape -> Transpose -> Conv: data movement between two convolutions."""
    return model_from_text(f"""{HEADER}
    g (float[1,{C},8,8] x) => (float[1,{C},5,20] y) {{
      [conv1] c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      [act] a = {first}(c1)
      [pad] p = Pad <mode = "{mode}"> (a, pads)
      [reshape] s = Reshape(p, shape)
      [transpose] t = Transpose <perm = [0, 1, 3, 2]> (s)
      [conv2] y = Conv <pads = [1, 1, 1, 1]> (t, w2, b2)
    }}""", w1=_w(rng, C, C, 3, 3, fan_in=9 * C), b1=_w(rng, C) * 0.1, w2=_w(rng, C, C, 3, 3, fan_in=9 * C),
        b2=_w(rng, C) * 0.1, pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        shape=np.array([1, C, 20, 5], np.int64))


def _quantize(model, calib, through: bool = True):
    target = get_target("openvino")
    if not through:  # the placement before the pair moved: at the layer's own input
        target.capabilities = dataclasses.replace(target.capabilities, input_pair_moves_through=frozenset())
    ctx = PassContext(target=target, calibration=calib)
    folded = build_pass("fold-constants", None).run(model, ctx)
    ctx.properties.add("constants-folded")
    return build_pass("quantize", None).run(folded.model, ctx)


def _runtime(model, tmp_path):
    """Runtime layers of the model lowered for openvino: name -> (layerType, runtimePrecision, originals)."""
    target = get_target("openvino")
    runner = target.runner(target.lower(model, tmp_path))
    layers = {}
    for op in runner.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        read = lambda key: info[key].astype(str) if key in info else ""  # noqa: E731
        layers[op.get_friendly_name()] = (read("layerType"), read("runtimePrecision"), read("originalLayersNames"))
    return runner, layers


def test_the_pair_moves_up_to_the_relu_and_openvino_runs_the_movement_in_uint8(tmp_path):
    model = padded_chain(np.random.default_rng(0))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    moved = _quantize(_clone(model), calib).model
    # conv2's input pair now sits on the Relu's output, before Pad/Reshape/Transpose
    assert _node(moved, "pad").inputs[0].producer().op_type == "DequantizeLinear"
    assert _activation_source(_node(moved, "pad").inputs[0]).name == "a"
    assert _node(moved, "conv2").inputs[0].producer().op_type == "Transpose"
    # exact (passes/_pair_site, cases 1-2): the same tensors as the pair at conv2's input
    at_input = _quantize(_clone(model), calib, through=False).model
    assert _activation_source(_node(at_input, "conv2").inputs[0]).name == "t"
    x = _normal(7, 1, C, 8, 8)
    np.testing.assert_allclose(run_ort(moved, {"x": x})[0], run_ort(at_input, {"x": x})[0], rtol=0, atol=1e-5)
    # what OpenVINO ran (read back): the Pad on u8, both convolutions int8
    runner, layers = _runtime(moved, tmp_path / "ov")
    pads = [v for v in layers.values() if v[0] == "Pad"]
    assert pads and all(precision == "u8" for _, precision, _ in pads), pads
    assert all(layer["int8"] for layer in runner.layer_precisions()), runner.layer_precisions()
    # and within one quantization step of the input pair of the fp32 model's output scale
    reference = run_ort(model, {"x": x})[0]
    step = float(np.abs(reference).max()) / 127
    assert np.abs(runner({"x": x})[0] - reference).max() < 8 * step


def test_a_zero_pad_on_a_signed_uint8_grid_is_not_crossed(tmp_path):
    """A signed range (no Relu): the zero point is not 0, OpenVINO would pad the integers with it (case 2)."""
    model = padded_chain(np.random.default_rng(1), first="Neg")
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    moved = _quantize(_clone(model), calib).model
    assert _node(moved, "pad").inputs[0].name == "a"  # not quantized before the Pad
    assert _activation_source(_node(moved, "reshape").inputs[0]).name == "p"  # moved up to it
    runner, _ = _runtime(moved, tmp_path / "ov")
    assert all(layer["int8"] for layer in runner.layer_precisions()), runner.layer_precisions()


def test_a_reflect_pad_is_crossed_on_any_grid(tmp_path):
    model = padded_chain(np.random.default_rng(2), first="Neg", mode="reflect")
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    moved = _quantize(_clone(model), calib).model
    assert _activation_source(_node(moved, "pad").inputs[0]).name == "a"
    x = _normal(7, 1, C, 8, 8)
    at_input = _quantize(_clone(model), calib, through=False).model
    np.testing.assert_allclose(run_ort(moved, {"x": x})[0], run_ort(at_input, {"x": x})[0], rtol=0, atol=1e-5)


def test_a_tensor_another_op_reads_stops_the_pair(tmp_path):
    """The Transpose's output is also a graph output: it keeps its float value, the pair is not moved above it."""
    rng = np.random.default_rng(3)
    model = model_from_text(f"""{HEADER}
    g (float[1,{C},8,8] x) => (float[1,{C},8,8] y, float[1,{C},8,8] t) {{
      [conv1] c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      [act] a = Relu(c1)
      [transpose] t = Transpose <perm = [0, 1, 3, 2]> (a)
      [conv2] y = Conv <pads = [1, 1, 1, 1]> (t, w2, b2)
    }}""", w1=_w(rng, C, C, 3, 3, fan_in=9 * C), b1=_w(rng, C) * 0.1, w2=_w(rng, C, C, 3, 3, fan_in=9 * C),
        b2=_w(rng, C) * 0.1)
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    moved = _quantize(_clone(model), calib).model
    assert _node(moved, "transpose").inputs[0].name == "a"
    assert _activation_source(_node(moved, "conv2").inputs[0]).name == "t"


def spp_block(rng: np.random.Generator):
    """Conv -> Relu -> Concat(r, MaxPool(r), MaxPool(MaxPool(r))) -> Conv: a spatial-pyramid join (case 4),
    and a Slice of the Relu another convolution reads beside it."""
    return model_from_text(f"""{HEADER}
    g (float[1,{C},8,8] x) => (float[1,{C},8,8] y, float[1,{C},8,8] z) {{
      [conv1] c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      [act] r = Relu(c1)
      [pool1] m1 = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r)
      [pool2] m2 = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (m1)
      [concat] k = Concat <axis = 1> (r, m1, m2)
      [conv2] y = Conv <pads = [1, 1, 1, 1]> (k, w2, b2)
      [slice] h = Slice(r, starts, ends, axes)
      [conv3] z = Conv <pads = [1, 1, 1, 1]> (h, w3, b3)
    }}""", w1=_w(rng, C, C, 3, 3, fan_in=9 * C), b1=_w(rng, C) * 0.1, w2=_w(rng, C, 3 * C, 3, 3, fan_in=27 * C),
        b2=_w(rng, C) * 0.1, w3=_w(rng, C, C // 2, 3, 3, fan_in=9 * C // 2), b3=_w(rng, C) * 0.1,
        starts=np.array([0], np.int64), ends=np.array([C // 2], np.int64), axes=np.array([1], np.int64))


def _at_inputs_with_the_same_ranges(model, calib, monkeypatch):
    """``model`` quantized with every pair at its layer's own input, on the ranges the moved
    pairs got (the groups' unions): the moves themselves must then change nothing."""
    import compressor.passes.quantize as quantize_module

    found = quantize_module.pair_sites

    def at_inputs(layers, spec_of, ranges, through, fixed=()):
        layers = list(layers)
        found(layers, spec_of, ranges, through, fixed)  # widens the groups' ranges in place
        return {(id(la.node), i): [(la.node, i, v)] for la in layers for i, v in la.activations}

    with monkeypatch.context() as patch:
        patch.setattr(quantize_module, "pair_sites", at_inputs)
        return _quantize(_clone(model), calib).model


def _requantized(layers):
    """Float Subgraphs other than the graph input's quantization (``x``): a tensor dequantized
    and quantized again because two pairs of different ranges read it."""
    return [v for v in layers.values() if v[0] == "Subgraph" and not v[2].startswith("x_")]


def _scale_of(value):
    return float(value.producer().inputs[1].const_value.numpy())


def test_a_pyramid_join_and_a_slice_of_its_source_share_one_pair(tmp_path, monkeypatch):
    """conv2's pair moves onto r through the pyramid (case 4); conv3's pair moves onto r through
    its Slice; the two land on one tensor, so they share one pair over the union of their
    ranges (case 6) instead of two FakeQuantizes on r."""
    model = spp_block(np.random.default_rng(4))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    moved = _quantize(_clone(model), calib).model
    pool1, concat, slice_in = _node(moved, "pool1"), _node(moved, "concat"), _node(moved, "slice").inputs[0]
    assert _activation_source(pool1.inputs[0]).name == "r"
    assert concat.inputs[0] is pool1.inputs[0] and concat.inputs[1].name == "m1" and concat.inputs[2].name == "m2"
    assert slice_in is pool1.inputs[0]  # one pair on r
    # its step is the coarser of the two the pairs at the layers' inputs had: the union of the ranges
    at_input = _quantize(_clone(model), calib, through=False).model
    own = [_scale_of(_node(at_input, name).inputs[0]) for name in ("conv2", "conv3")]
    assert _scale_of(slice_in) == pytest.approx(max(own), rel=1e-6)
    runner, layers = _runtime(moved, tmp_path / "ov")
    pools = [v for v in layers.values() if v[0] in ("Pooling", "Concatenation")]
    assert pools and all(precision == "u8" for _, precision, _ in pools), pools
    assert all(layer["int8"] for layer in runner.layer_precisions()), runner.layer_precisions()
    assert _requantized(layers) == [], layers  # no float requantization of r
    x = _normal(7, 1, C, 8, 8)
    for got, want in zip(run_ort(moved, {"x": x}), run_ort(_at_inputs_with_the_same_ranges(model, calib, monkeypatch),
                                                          {"x": x})):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # exact: cases 1, 4 and 6


def c2f_block(rng: np.random.Generator, spy: bool = False):
    """YOLOv8's C2f: Conv -> SiLU -> Split -> (y0, y1); y1 -> Conv -> SiLU -> Conv -> SiLU -> Add(y1, .) = m;
    Concat(y0, y1, m) -> Conv. With ``spy`` a float op also reads y0 (a graph output)."""
    h = C // 2
    silu = lambda x, out: f"[{out}_s] {out}_g = Sigmoid({x})\n      [{out}] {out} = Mul({x}, {out}_g)"  # noqa: E731
    return model_from_text(f"""{HEADER}
    g (float[1,{C},8,8] x) => (float[1,{C},8,8] y{", float[1,%d,8,8] e" % h if spy else ""}) {{
      [cv1] c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
      {silu("c1", "a")}
      [split] y0, y1 = Split <axis = 1> (a, halves)
      [m_cv1] d1 = Conv <pads = [1, 1, 1, 1]> (y1, w2, b2)
      {silu("d1", "e1")}
      [m_cv2] d2 = Conv <pads = [1, 1, 1, 1]> (e1, w3, b3)
      {silu("d2", "e2")}
      [add] m = Add(y1, e2)
      [concat] k = Concat <axis = 1> (y0, y1, m)
      [cv2] y = Conv (k, w4, b4)
      {"[spy] e = Sigmoid(y0)" if spy else ""}
    }}""", w1=_w(rng, C, C, 3, 3, fan_in=9 * C), b1=_w(rng, C) * 0.1, halves=np.array([h, h], np.int64),
        w2=_w(rng, h, h, 3, 3, fan_in=9 * h), b2=_w(rng, h) * 0.1, w3=_w(rng, h, h, 3, 3, fan_in=9 * h),
        b3=_w(rng, h) * 0.1, w4=_w(rng, C, 3 * h, 1, 1, fan_in=3 * h), b4=_w(rng, C) * 0.1)


def test_a_c2f_block_gets_one_pair_before_its_split_and_runs_wholly_int8(tmp_path, monkeypatch):
    """Every reader of the Split's outputs reads them through a pair of one spec (the residual
    Add, which joins a convolution through its SiLU, among them): one pair on the Split's input
    (case 5), as NNCF places it, and OpenVINO runs the split, the Add and the Concat on u8."""
    model = c2f_block(np.random.default_rng(5))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    result = _quantize(_clone(model), calib)
    q = result.model
    assert "add" in result.stats["layers"]  # Add(y1, SiLU(Conv)) joins a convolution
    split = _node(q, "split")
    assert _activation_source(split.inputs[0]).name == "a"
    assert _node(q, "m_cv1").inputs[0].name == "y1" and _node(q, "add").inputs[0].name == "y1"
    concat = _node(q, "concat")
    assert [v.name for v in concat.inputs[:2]] == ["y0", "y1"] and _activation_source(concat.inputs[2]).name == "m"
    # one range for the group: the Concat's (it covers y0, y1 and m), also on the Add's own input
    assert _scale_of(split.inputs[0]) == pytest.approx(_scale_of(concat.inputs[2]), rel=1e-6)
    runner, layers = _runtime(q, tmp_path / "ov")
    assert all(layer["int8"] for layer in runner.layer_precisions()), runner.layer_precisions()
    moving = [v for v in layers.values() if v[0] in ("Split", "Concatenation", "Eltwise")]
    assert moving and all(precision == "u8" for _, precision, _ in moving), moving
    assert _requantized(layers) == [], layers
    x = _normal(7, 1, C, 8, 8)
    np.testing.assert_allclose(run_ort(q, {"x": x})[0], run_ort(_at_inputs_with_the_same_ranges(model, calib, monkeypatch),
                                                              {"x": x})[0], rtol=0, atol=1e-5)  # exact: case 5


def test_a_split_an_unquantized_op_reads_keeps_its_pairs_after_it(tmp_path):
    """A float Sigmoid also reads y0: a pair above the Split would round what it reads, so the
    pairs stay on the Split's outputs."""
    model = c2f_block(np.random.default_rng(5), spy=True)
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    q = _quantize(_clone(model), calib).model
    assert _node(q, "split").inputs[0].name == "a"
    assert _node(q, "spy").inputs[0].name == "y0"
    assert _activation_source(_node(q, "m_cv1").inputs[0]).name == "y1"


def test_a_single_channel_filter_keeps_its_weight_float_and_its_input_pair(tmp_path):
    """basic-pitch's decimation filters (``W [1, 1, 1, k]``, stride 2): OpenVINO's int8
    convolution is 2x slower there than f32 (``OpQuant.float_weight_below``). The filter keeps
    its float weight and its input pair, so the conv before it still writes u8 and the conv
    after it (8 channels) runs int8; the filter itself computes exactly on the rounded input."""
    rng = np.random.default_rng(3)
    model = model_from_text(f"""{HEADER}
    g (float[1,{C},1,64] x) => (float[1,{C},1,28] y) {{
      [conv0] c0 = Conv (x, w0, b0)
      [act] a = Relu(c0)
      [filter] f = Conv <strides = [1, 2]> (a, wf)
      [conv2] y = Conv (f, w2, b2)
    }}""", w0=_w(rng, 1, C, 1, 1, fan_in=C), b0=_w(rng, 1) * 0.1, wf=_w(rng, 1, 1, 1, 4, fan_in=4),
        w2=_w(rng, C, 1, 1, 3, fan_in=3), b2=_w(rng, C) * 0.1)
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, 1, C, 1, 64)[:, 0]})
    result = _quantize(_clone(model), calib)
    q = result.model
    assert "filter" in result.stats["layers"]
    assert _node(q, "filter").inputs[1].producer() is None  # the float weight, no DequantizeLinear
    assert _node(q, "filter").inputs[0].producer().op_type == "DequantizeLinear"  # its input pair
    assert _node(q, "conv2").inputs[1].producer().op_type == "DequantizeLinear"  # 8 channels: int8 weight
    runner, _ = _runtime(q, tmp_path / "ov")
    floats = [la["original_layers"] for la in runner.layer_precisions() if not la["int8"]]
    assert len(floats) == 1 and "filter" in ",".join(floats[0]), runner.layer_precisions()  # conv0, conv2 int8


def test_giving_back_one_layer_of_a_split_group_keeps_the_pair_the_others_read(tmp_path):
    """The pair on the Split's input serves m_cv1, the Add and cv2: giving m_cv1 back makes its
    weight float and leaves that pair (the others would otherwise read float and run float);
    the input goes float with the last of the three."""
    from compressor.model_io import clone_model
    from compressor.quant.revert import give_back

    model = c2f_block(np.random.default_rng(5))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    result = _quantize(_clone(model), calib)
    record = result.quantization
    one = give_back(clone_model(result.model), record, ["m_cv1"])
    assert _activation_source(_node(one, "split").inputs[0]).name == "a"
    assert _node(one, "m_cv1").inputs[1].producer() is None  # its float weight
    assert _node(one, "cv2").inputs[1].producer().op_type == "DequantizeLinear"
    _, layers = _runtime(one, tmp_path / "ov")
    assert [v for v in layers.values() if v[0] == "Split"][0][1] == "u8"
    every = give_back(clone_model(result.model), record, ["m_cv1", "add", "cv2"])
    assert _node(every, "split").inputs[0].name == "a"  # float again


def test_a_convolution_reading_the_split_input_shares_the_pair_moved_there(tmp_path):
    """Another convolution reads the C2f's split input ``a`` directly: the group's pair, moved
    onto ``a``, and that convolution's own pair meet there and become one (case 6 after 5)."""
    h = C // 2
    model = c2f_block(np.random.default_rng(5))
    graph = model.graph
    other = ir.node("Conv", [_node(model, "split").inputs[0], ir.Value(name="wo"), ir.Value(name="bo")], name="other")
    rng = np.random.default_rng(6)
    for name, array in (("wo", _w(rng, h, C, 1, 1, fan_in=C)), ("bo", _w(rng, h) * 0.1)):
        value = other.inputs[1] if name == "wo" else other.inputs[2]
        value.const_value = ir.tensor(array, name=name)
        graph.register_initializer(value)
    graph.append(other)
    other.outputs[0].name = "o"
    other.outputs[0].dtype = ir.DataType.FLOAT
    graph.outputs.append(other.outputs[0])
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    q = _quantize(_clone(model), calib).model
    assert _node(q, "other").inputs[0] is _node(q, "split").inputs[0]  # one pair on a
    assert _activation_source(_node(q, "other").inputs[0]).name == "a"


def test_every_pair_of_one_tensor_reads_one_range_whatever_group_it_is_in(tmp_path):
    """Ranges are per tensor: ``t`` is read by Q·Kᵀ-style ``MatMul(t, Transpose(t))`` (int8
    symmetric, through the Transpose), by ``conv_a`` and, through a Concat with a wider tensor,
    by ``conv_e`` (uint8). Widening ``t`` for the Concat's group once gave the MatMul's two
    operands different ranges; now every reader of ``t`` is in one group: one range."""
    rng = np.random.default_rng(0)
    model = model_from_text(f"""{HEADER}
    g (float[1,{C},8,8] x) => (float[1,{C},8,8] b, float[1,{C},8,8] ya, float[1,{C},8,8] ye) {{
      [conv0] c = Conv <pads = [1, 1, 1, 1]> (x, w0, b0)
      [relu] t = Relu(c)
      [tr] t2 = Transpose <perm = [0, 1, 3, 2]> (t)
      [mm] b = MatMul(t, t2)
      [conv_a] ya = Conv <pads = [1, 1, 1, 1]> (t, wa, ba)
      [conv_z] z = Conv <pads = [1, 1, 1, 1]> (x, wz, bz)
      [cat] k = Concat <axis = 1> (t, z)
      [conv_e] ye = Conv <pads = [1, 1, 1, 1]> (k, we, be)
    }}""", w0=_w(rng, C, C, 3, 3, fan_in=9 * C), b0=_w(rng, C) * 0.1, wa=_w(rng, C, C, 3, 3, fan_in=9 * C),
        ba=_w(rng, C) * 0.1, wz=_w(rng, C, C, 3, 3, fan_in=9 * C) * 4, bz=_w(rng, C) * 0.1,
        we=_w(rng, C, 2 * C, 3, 3, fan_in=18 * C), be=_w(rng, C) * 0.1)
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8)})
    result = _quantize(_clone(model), calib)
    ranges = {(a.value, a.spec.dtype): (a.lo, a.hi) for la in result.quantization.layers for a in la.activations
              if a.value == "t"}
    on_t = [(a.lo, a.hi) for la in result.quantization.layers for a in la.activations if a.value == "t"]
    assert len(set(on_t)) == 1, ranges
    mm, tr = _node(result.model, "mm"), _node(result.model, "tr")  # the right operand's pair sits before tr
    assert _scale_of(mm.inputs[0]) == pytest.approx(_scale_of(tr.inputs[0]), rel=1e-7)


def fpn_top_down(rng: np.random.Generator):
    """A feature pyramid's top-down path (PP-OCR's detector neck): two residual joins of
    convolutions, the coarse one upsampled (nearest) and added to the fine one, and a
    transformer-style ``Add`` of a MatMul + bias and a graph input beside it."""
    join = lambda x, out: (f"[{out}_a] {out}_ca = Conv <pads = [1, 1, 1, 1]> ({x}, w, b)\n"  # noqa: E731
                           f"      [{out}_b] {out}_cb = Conv <pads = [1, 1, 1, 1]> ({x}, w, b)\n"
                           f"      [{out}_r] {out}_rb = Relu({out}_cb)\n"
                           f"      [{out}] {out} = Add({out}_ca, {out}_rb)")
    return model_from_text(f"""{HEADER}
    g (float[1,{C},8,8] x, float[1,{C},4,{C}] z) => (float[1,{C},8,8] y, float[1,{C},4,{C}] v) {{
      [down] d = Conv <strides = [2, 2]> (x, w2, b)
      {join("x", "fine")}
      {join("d", "coarse")}
      [up] u = Resize <mode = "nearest"> (coarse, roi, scales)
      [fpn] f = Add(fine, u)
      [head] y = Conv <pads = [1, 1, 1, 1]> (f, w, b)
      [mm] m = MatMul(d, wm)
      [bias] mb = Add(m, bm)
      [residual] v = Add(mb, z)
    }}""", w=_w(rng, C, C, 3, 3, fan_in=9 * C), w2=_w(rng, C, C, 2, 2, fan_in=4 * C), b=_w(rng, C) * 0.1,
        roi=np.zeros(0, np.float32), scales=np.array([1, 1, 2, 2], np.float32), wm=_w(rng, 4, C, fan_in=4),
        bm=_w(rng, C) * 0.1)


def test_a_pyramid_add_of_joins_is_a_convolutions_join_and_its_upsampling_runs_int8(tmp_path):
    """``Add(fine, Resize(coarse))``, both inputs joins of convolutions: a join too (through the
    Resize and the joins: _placement.computed_by), as NNCF quantizes it; the coarse input's pair
    moves up through the nearest Resize, which OpenVINO then runs on u8. The MatMul + bias
    residual stays float."""
    model = fpn_top_down(np.random.default_rng(6))
    calib = _dataset(model, tmp_path, {"x": _normal(1, 16, C, 8, 8), "z": _normal(2, 16, C, 4, C)})
    result = _quantize(_clone(model), calib)
    assert {"fine", "coarse", "fpn"} <= set(result.stats["layers"]), result.stats["layers"]
    assert "residual" not in result.stats["layers"]
    q = result.model
    assert _activation_source(_node(q, "up").inputs[0]).name == "coarse"  # the pair moved before the Resize
    runner, layers = _runtime(q, tmp_path / "ov")
    resizes = [v for v in layers.values() if v[0] == "Interpolate"]
    assert resizes and all(precision in ("u8", "i8") for _, precision, _ in resizes), resizes
    fpn = [v for v in layers.values() if "fpn" in v[2].split(",")]
    assert fpn and all(precision in ("u8", "i8") for _, precision, _ in fpn), fpn  # the Add on u8, not f32
