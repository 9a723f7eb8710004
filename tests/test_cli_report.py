"""The summary's ``size`` row (``compressor/cli_report.py``): the deployable files, not their companions."""

from __future__ import annotations

from compressor.cli_report import size_row, summary


def _entry(path: str, size: int, deploy: bool | None = None) -> dict:
    entry = {"path": path, "bytes": size, "sha256": "0" * 64}
    if deploy is not None:
        entry["deploy"] = deploy
    return entry


#: A qnn-htp artifact as its lowering writes it: the context deployed, the QDQ model and
#: the AIMET encodings beside it.
HTP_FILES = [_entry("model.encodings", 6_000, False), _entry("model.onnx", 130_000, False),
             _entry("model_ctx.onnx", 1_000, True), _entry("model_ctx_qnn.bin", 69_000, True)]


def _manifest(files: list[dict], baseline: int = 206_000) -> dict:
    """The keys :func:`summary` reads, for a run that changed nothing else."""
    return {
        "recipe": {"target_passes": []}, "target": {"name": "qnn-htp"}, "passes": [], "files": files,
        "model": {"baseline_bytes": baseline},
        "evaluation": {"metric": "top1", "samples": 8, "source": "--eval"},
        "metrics": {"baseline": {"top1": 1.0}, "compressed": {"top1": 1.0}}, "accuracy_drop": 0.0,
        "latency": {"baseline_ms": 1.0, "compressed_ms": 1.0, "batch": 1},
        "gate": {"max_drop": 0.01, "passed": True},
    }


def test_size_counts_the_deployable_files_and_names_them():
    row = size_row(_manifest(HTP_FILES))
    assert row == ("0.206 MB -> 0.070 MB (2.94x smaller; deployable files: model_ctx.onnx, model_ctx_qnn.bin; "
                   "2 companion files not counted)")
    lines = summary(_manifest(HTP_FILES)).splitlines()
    assert [line.split(None, 1)[1] for line in lines if line.startswith("size ")] == [row]


def test_size_of_an_artifact_that_is_all_deployed_says_nothing_more():
    files = [_entry("model.bin", 50_000, True), _entry("model.xml", 2_000, True)]
    assert size_row(_manifest(files, baseline=208_000)) == "0.208 MB -> 0.052 MB (4.00x smaller)"


def test_one_companion_is_named_in_the_singular():
    files = [_entry("build_log.json", 3_000, False), _entry("model.onnx", 52_000, True)]
    assert size_row(_manifest(files, baseline=208_000)).endswith(
        "(4.00x smaller; deployable files: model.onnx; 1 companion file not counted)")


def test_an_artifact_larger_than_the_baseline_says_larger():
    # PP-OCR's 0.586 MB classifier became a 1.135 MB HTP context: the row read "0.52x smaller"
    files = [_entry("model_ctx.onnx", 1_000, True), _entry("model_ctx_qnn.bin", 1_134_000, True)]
    assert size_row(_manifest(files, baseline=586_000)) == "0.586 MB -> 1.135 MB (1.94x larger)"


def test_a_manifest_written_before_the_deploy_flag_counts_every_file():
    files = [_entry(e["path"], e["bytes"]) for e in HTP_FILES]
    assert size_row(_manifest(files)) == "0.206 MB -> 0.206 MB (the same size)"


def test_an_emulated_latency_gives_no_ratio():
    """The x86 HTP emulator's time is not the device's: the row says so instead of a speed-up."""
    manifest = _manifest(HTP_FILES)
    manifest["latency"] = {"baseline_ms": 0.04, "compressed_ms": 7.95, "batch": 1,
                           "compressed_note": "HTP emulated on this x86 CPU: not the device's latency"}
    (row,) = [line.split(None, 1)[1] for line in summary(manifest).splitlines() if line.startswith("latency ")]
    assert row == "0.04 ms -> 7.95 ms per batch of 1 (HTP emulated on this x86 CPU: not the device's latency; no ratio)"
    manifest["latency"].pop("compressed_note")
    (row,) = [line.split(None, 1)[1] for line in summary(manifest).splitlines() if line.startswith("latency ")]
    assert row.endswith("(0.01x)")


class _Cpu:
    """A target whose int8 runs on this host's CPU, with or without VNNI (``describe()``)."""

    def __init__(self, vnni):
        self.vnni = vnni

    def describe(self):
        return {"name": "openvino", "int8_vnni": self.vnni}


def test_an_artifact_slower_than_the_baseline_is_warned_about(caplog):
    from compressor.flow.manifest import warn_if_slower

    slow = {"baseline_device_ms": 205.9, "compressed_ms": 276.0}
    with caplog.at_level("WARNING", logger="compressor.flow.manifest"):
        warn_if_slower(slow, _Cpu(False))
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("the compressed artifact runs slower than the fp32 model here: 276.00 ms vs 205.90 ms "
                              "per batch (0.75x). This CPU has no VNNI")
    caplog.clear()
    with caplog.at_level("WARNING", logger="compressor.flow.manifest"):
        warn_if_slower(slow, _Cpu(True))  # no reason to give
        warn_if_slower({"baseline_device_ms": 205.9, "compressed_ms": 210.0}, _Cpu(False))  # within timing noise
        warn_if_slower({"baseline_device_ms": 0.05, "compressed_ms": 0.06}, _Cpu(False))  # 10 µs: a tiny model's noise
        warn_if_slower({**slow, "compressed_note": "HTP emulated on this x86 CPU: not the device's latency"}, _Cpu(None))
    assert [r.getMessage() for r in caplog.records] == [
        "the compressed artifact runs slower than the fp32 model here: 276.00 ms vs 205.90 ms per batch (0.75x)."]


def test_a_quantize_with_no_layer_is_a_no_op_unless_a_target_pass_quantized_every_tensor():
    """ONNX's ``test_operator_selu`` on qnn-htp: no layer ``quantize`` handles, but qnn-legalize puts Q/DQ on
    every tensor (HTP has no float path), so the summary must not say nothing was quantized."""
    why = "the model has no layer the target quantizes (Conv/ConvTranspose/Gemm/MatMul)"
    manifest = _manifest(HTP_FILES)
    quantize = {"name": "quantize", "modified": False, "seconds": 0.0,
                "stats": {"nothing_quantized": why, "layers_quantized": 0}}
    legalize = {"name": "qnn-legalize", "modified": True, "seconds": 0.0,
                "stats": {"qdq_added": 3, "constants_quantized": 1}}

    def row(passes: list[dict]) -> str:
        manifest["passes"] = passes
        (line,) = [ln.split(None, 1)[1] for ln in summary(manifest).splitlines() if ln.startswith("quantized ")]
        return line

    assert row([quantize]) == f"nothing was quantized: {why}"
    assert row([quantize, legalize]) == f"no layer by quantize ({why}); qnn-legalize quantized every tensor (3 Q/DQ pairs)"


def test_a_size_with_an_empty_side_or_no_change_prints_no_ratio():
    """The review's cases: an empty baseline divided by zero (the summary crashed after the artifact was
    written), and 999 -> 1000 bytes read "1.00x larger"."""
    assert size_row(_manifest([_entry("model.onnx", 1000, True)], baseline=0)).endswith("(size not compared)")
    assert size_row(_manifest([_entry("model.onnx", 1000, True)], baseline=999)).endswith("(the same size)")
    assert size_row(_manifest([_entry("model.onnx", 500, True)], baseline=1000)).endswith("(2.00x smaller)")
    assert size_row(_manifest([_entry("model.onnx", 2000, True)], baseline=1000)).endswith("(2.00x larger)")
