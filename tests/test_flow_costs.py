"""What a plain ``int8`` run costs, and that it is reproducible, on every target.

1. **Serialisations.** Every ``ir.serde.serialize_model`` copies the whole model with its
   weights. A plain run needs: the target's check (ONNX Runtime / OpenVINO load it), the
   verification bar of the input, one verification per pass that changed the model,
   the statistics cache key, the calibration model (extra outputs), and the artifact's
   lowering. Clones are ``ir.Model.clone`` (no serialisation), the fp32 model is lowered from
   what the check prepared, the baseline's size is read from its written files.
2. **One fp32 conversion** on OpenVINO (the check's conversion is the baseline's).
3. **Byte-identical artifacts**: the same inputs and seed give the same files on every
   target (TensorRT only where it builds an engine; skipped otherwise, with the reason).

Runs share one capture of the digits CNN (its torch export is most of a run's time).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import onnx_ir as ir
import pytest
from compressor.targets import get_target

import compressor.flow.calib_eval
from compressor.flow.compress import compress
from compressor.model_io import clone_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: Serialisations of a plain int8 run of the digits CNN (the exporter already folded its
#: BatchNorms, so quantize is the one pass that changes it): the target's check 1, the input's
#: verification bar 1, one verification 1, the statistics cache key 1, the calibration model 1,
#: the artifact 1. It was 12 before clones, the baseline's lowering and its size stopped
#: serialising and the bar was measured once per run.
MAX_SERIALISATIONS = 6


@pytest.fixture(scope="module")
def capture_once():
    real = compressor.flow.calib_eval.capture
    done: dict[str, Any] = {}

    def capture(path, **kwargs):
        key = repr(sorted(kwargs.items()))
        if key not in done:
            done[key] = real(path, **kwargs)
        first = done[key]
        return dataclasses.replace(first, model=clone_model(first.model), notes=list(first.notes))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compressor.flow.calib_eval, "capture", capture)
        yield


def _run(outdir: Path, target: str) -> None:
    static = get_target(target).capabilities.static_shapes  # qnn-htp: fixed shapes only
    compress(EXAMPLES / "digits_cnn.pt2", recipe="int8", target=target, calib=EXAMPLES / "digits_calib.npz",
             eval_data=EXAMPLES / "digits_eval.npz", outdir=outdir, latency_runs=1,
             inputs=["images=1x1x8x8"] if static else ())


def _counted_run(outdir: Path, target: str) -> collections.Counter[str]:
    """``serialize_model`` (``ir.serde`` calls) and ``convert`` (OpenVINO frontend conversions) of one run."""
    counts: collections.Counter[str] = collections.Counter()

    def counting(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)

        mp.setattr(owner, name, wrapper)

    with pytest.MonkeyPatch.context() as mp:
        counting(ir.serde, "serialize_model")
        if target == "openvino":
            from openvino.frontend import FrontEnd

            counting(FrontEnd, "convert")  # every ONNX -> OpenVINO conversion (ours, or ov.convert_model's)
        _run(outdir, target)
    return counts


def _unavailable(target: str) -> str | None:
    """Why ``target`` cannot give a comparable artifact here, or ``None``."""
    if target == "openvino" and importlib.util.find_spec("openvino") is None:
        return "openvino is not installed"
    try:
        tgt = get_target(target)
    except Exception as err:  # the backend's package is missing: the target says which
        return str(err)
    if target == "tensorrt" and not tgt.describe().get("engine_build"):
        return f"no TensorRT engine can be built here: {tgt.describe().get('engine_not_built_because')}"
    return None


@pytest.fixture(scope="module")
def twice(capture_once, tmp_path_factory) -> Any:
    """Per target: the counts of the first run, and the two artifact folders."""
    done: dict[str, tuple[collections.Counter[str], Path, Path]] = {}

    def get(target: str) -> tuple[collections.Counter[str], Path, Path]:
        if target not in done:
            why = _unavailable(target)
            if why:
                pytest.skip(why)
            root = tmp_path_factory.mktemp(target)
            # Plain `int8` on every target: qnn-htp completes it with its legalization
            # (Capabilities.after_quantize), so the whole graph runs on HTP.
            counts = _counted_run(root / "a", target)
            _run(root / "b", target)
            done[target] = (counts, root / "a", root / "b")
        return done[target]

    return get


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_a_plain_int8_run_serialises_the_model_a_bounded_number_of_times(twice, target):
    counts, _, _ = twice(target)
    assert counts["serialize_model"] <= MAX_SERIALISATIONS, counts


def test_openvino_converts_the_fp32_model_once(twice):
    counts, _, _ = twice("openvino")
    assert counts["convert"] == 2, f"fp32 once (check = baseline) + the int8 artifact once: {counts}"


@pytest.mark.parametrize("device", ["f32", "bf16"])
def test_openvino_converts_the_fp32_model_once_in_either_device_precision(capture_once, force_precision, tmp_path,
                                                                          device):
    """Where the device's default float precision is bf16 (AVX512-BF16, AMX) the run also times
    the fp32 model in it (``latency.baseline_device_ms``): it compiles the baseline's IR again,
    it does not convert and serialise the model again (it did: 3 conversions and 7
    serialisations on an AVX-512 BF16 CPU)."""
    force_precision(device)
    counts = _counted_run(tmp_path / "out", "openvino")
    assert counts["convert"] == 2 and counts["serialize_model"] <= MAX_SERIALISATIONS, counts
    latency = json.loads((tmp_path / "out" / "manifest.json").read_text())["latency"]
    assert latency["device_precision"] == device and latency["baseline_precision"] == "f32"


@pytest.mark.parametrize("target", ["onnx", "openvino", "qnn-htp", "tensorrt"])
def test_int8_artifacts_are_byte_identical_across_runs(twice, target):
    _, first, second = twice(target)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files, f"{target}: the artifact holds no files"
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file() and p.name != "manifest.json")
    different = [str(f) for f in files if (first / f).read_bytes() != (second / f).read_bytes()]
    assert not different, f"{target}: these files differ between two identical runs: {different}"


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_the_baseline_reuses_the_check_only_for_the_model_it_checked(target, tmp_path):
    """``check`` prepares the model for the baseline; any other model is lowered afresh."""
    import numpy as np
    import onnx

    why = _unavailable(target)
    if why:
        pytest.skip(why)

    def model(op: str) -> ir.Model:
        return ir.serde.deserialize_model(onnx.parser.parse_model(
            f"""<ir_version: 8, opset_import: ["" : 17]>
            g (float[1, 4] x) => (float[1, 4] y) {{ y = {op}(x) }}"""))

    x = np.array([[-2.0, -1.0, 1.0, 2.0]], np.float32)
    tgt = get_target(target)
    checked, other = model("Relu"), model("Neg")
    assert tgt.check(checked) == []
    np.testing.assert_array_equal(tgt.reference_runner(other, tmp_path / "other")({"x": x})[0], -x)
    assert tgt.check(checked) == []
    np.testing.assert_array_equal(tgt.reference_runner(checked, tmp_path / "checked")({"x": x})[0], np.maximum(x, 0))
    np.testing.assert_array_equal(tgt.reference_runner(other, tmp_path / "again")({"x": x})[0], -x)


def test_clone_model_is_a_byte_identical_independent_copy():
    """``clone_model`` (no serialisation) keeps everything serialisation would: subgraphs, value_info, metadata."""
    import onnx

    from compressor.model_io import ir_bytes

    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17], producer_name: "test", doc_string: "a model">
        g (float[2] x, bool c) => (float[2] y) <float[2] w = {1.0, 2.0}, float[2] t> {
            t = Mul(x, w)
            y = If(c) <then_branch = a () => (float[2] o) { o = Relu(t) },
                       else_branch = b () => (float[2] o) { o = Neg(t) }>
        }""")
    onnx.helper.set_model_props(proto, {"source": "test"})
    model = ir.serde.deserialize_model(proto)
    copy = clone_model(model)
    assert ir_bytes(copy) == ir_bytes(model)
    copy.graph.node(0).op_type = "Add"  # a pass editing the copy leaves the original as it was
    assert model.graph.node(0).op_type == "Mul"
