"""Smoke tests of the zoo's data builders and metrics (tools/zoo/): pure functions, no downloads.

The tests that read a fetched file (ddddocr's charset) skip when the zoo cache lacks it
(``python tools/zoo/fetch.py`` fills it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "zoo"))

import audio  # noqa: E402
import figures  # noqa: E402
import ocr  # noqa: E402
import ppocr  # noqa: E402
from fetch import cache_dir  # noqa: E402


def test_vad_frames_carry_64_samples_of_context_and_label_by_majority():
    x = np.arange(1, 1201, dtype=np.float32)  # 2 frames and a bit -> 3 frames, zero padded
    mask = np.zeros(1200, dtype=bool)
    mask[512:1024] = True
    frames, labels = audio.vad_frames(x, mask)
    assert frames.shape == (3, audio.VAD_CONTEXT + audio.VAD_FRAME)
    assert np.all(frames[0, :64] == 0) and frames[0, 64] == 1  # no context before the first frame
    np.testing.assert_array_equal(frames[1, :64], x[512 - 64:512])  # the previous frame's tail
    assert labels.tolist() == [False, True, False]


def test_run_vad_records_the_state_before_each_frame_and_resets_per_clip():
    def fake(feed):  # output = frame mean, new state = old state + 1
        return [np.array([[feed["input"].mean()]]), feed["state"] + 1]

    frames = np.ones((4, 576), dtype=np.float32)
    probs, states = audio.run_vad(fake, ["input", "state"], frames, np.array([0, 0, 0, 1]))
    assert states[:, 0, 0, 0].tolist() == [0, 1, 2, 0]
    assert np.allclose(probs, 1.0)
    assert "sr" not in audio.vad_feed(frames[0], states[0], ["input", "state"])
    assert audio.vad_feed(frames[0], states[0], ["input", "state", "sr"])["sr"].dtype == np.int64


def test_speech_mask_bridges_short_pauses_and_drops_silence():
    sig = np.zeros(16000, dtype=np.float32)
    sig[2000:6000] = np.sin(np.arange(4000) * 0.3)
    sig[6800:9000] = np.sin(np.arange(2200) * 0.3)  # 800 samples (50 ms) pause: one segment
    mask = audio.speech_mask(sig)
    assert not mask[:1800].any() and not mask[9300:].any()
    assert mask[2100:8900].all()


def test_f1():
    assert audio.f1(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    assert audio.f1(np.zeros(3), np.zeros(3)) == 1.0


def test_notes_roll_matches_the_window():
    audio_w, roll = audio.synth_notes(np.random.default_rng(0))
    assert audio_w.shape == (audio.BP_SAMPLES,) and audio_w.dtype == np.float32
    assert roll.shape == (audio.BP_FRAMES, 88) and roll.any()
    assert np.abs(audio_w).max() <= 0.8 + 1e-6


def test_crepe_decode_recovers_the_bin_and_normalise_matches_torchcrepe():
    probs = np.zeros((1, audio.CREPE_BINS))
    probs[0, 100] = 1.0
    cents, periodicity = audio.crepe_decode(probs)
    assert cents[0] == pytest.approx(20 * 100 + audio.CREPE_CENTS_OFFSET)
    assert periodicity[0] == 1.0
    assert audio.hz_to_cents(np.array([10.0 * 2]))[0] == pytest.approx(1200)
    frames = audio.crepe_normalise(np.random.default_rng(0).normal(3, 2, (2, 1024)))
    assert np.allclose(frames.mean(1), 0, atol=1e-5) and np.allclose(frames.std(1, ddof=1), 1, atol=1e-4)
    x, f0 = audio.synth_crepe_frame(np.random.default_rng(1), voiced=True)
    assert x.shape == (1024,) and 50 * 0.97 < f0 < 1000 * 1.03


def test_ctc_and_character_accuracy():
    logits = np.full((6, 1, 5), -1.0)
    for t, k in enumerate([0, 3, 3, 0, 3, 2]):
        logits[t, 0, k] = 1.0
    assert ocr.ctc_greedy(logits) == [3, 3, 2]
    assert ocr.edit_distance("kitten", "sitting") == 3
    assert ocr.char_accuracy(["AbC"], ["abc"]) == 1.0
    assert ocr.char_accuracy(["", "abcd"], ["ab", "abxd"]) == pytest.approx(1 - 3 / 6)


def test_ap50_and_iou():
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)]
    perfect = [np.array([[0, 0, 10, 10, 0.9], [20, 20, 30, 30, 0.8]])]
    assert ocr.ap50(perfect, truth) == pytest.approx(1.0)
    half = [np.array([[0, 0, 10, 10, 0.9], [50, 50, 60, 60, 0.8]])]
    assert ocr.ap50(half, truth) == pytest.approx(0.5)
    assert ocr.iou(np.array([0, 0, 10, 10.0]), np.array([[5, 0, 15, 10.0]]))[0] == pytest.approx(1 / 3)


def test_det_decode_puts_one_anchor_back_in_pixels():
    out = np.zeros((1, 3549, 6))
    out[0, :, 4] = -1  # objectness below the threshold everywhere ...
    out[0, 0, :] = [0.5, 0.5, np.log(2), np.log(2), 1.0, 0.9]  # ... but the first stride-8 cell
    dets = ocr.det_decode(out)
    assert dets.shape == (1, 5)
    np.testing.assert_allclose(dets[0, :4], [-4, -4, 12, 12])  # centre (4, 4), 16 x 16


def test_captcha_and_detector_images_have_the_model_shapes():
    pytest.importorskip("PIL")
    try:
        ocr.fonts()
    except RuntimeError as err:
        pytest.skip(str(err))
    img, text = ocr.captcha(np.random.default_rng(0))
    assert 4 <= len(text) <= 6
    assert ocr.ocr_preprocess(img).shape == (1, 64, 192)
    img, boxes = ocr.scatter_chars(np.random.default_rng(0))
    x, r = ocr.det_preprocess(img)
    assert x.shape == (3, 416, 416) and x.dtype == np.float32 and boxes.shape[1] == 4
    assert (boxes * r).max() <= 416


def test_charset_is_read_from_the_wheel_without_importing_it():
    path = cache_dir() / "src/ddddocr/charset_manager.py"
    if not path.exists():
        pytest.skip("ddddocr not in the zoo cache (python tools/zoo/fetch.py)")
    charset = ocr.read_charset(path, "beta")
    assert len(charset) == 8210 and charset[0] == ""
    assert all(c in charset for c in ocr.ALPHABET)


def test_db_boxes_find_each_text_region_and_unclip_it():
    prob = np.zeros((1, 1, 64, 96), dtype=np.float32)
    prob[0, 0, 10:20, 10:50] = 0.9  # a line 40 x 10
    prob[0, 0, 40:44, 60:64] = 0.2  # under thresh 0.3: nothing
    boxes = ppocr.db_boxes(prob)
    assert boxes.shape == (1, 5) and boxes[0, 4] > 0.5
    # the 2x2 dilation grows the region right and down to 41 x 11 (as cv2.dilate); unclip by
    # area * 1.6 / perimeter = 6.9 px a side
    d = 41 * 11 * 1.6 / (2 * (41 + 11))
    np.testing.assert_allclose(boxes[0, :4], [10 - d, 10 - d, 51 + d, 21 + d], atol=1e-6)


def test_rec_and_cls_images_have_the_model_shapes_and_normalisation():
    rng = np.random.default_rng(0)
    text = ppocr.phrase(rng, 12)
    assert 0 < len(text) <= 12 and text[0] not in ppocr.PUNCT
    x = ppocr.normalise(ppocr.line_image(rng, text), ppocr.REC_HEIGHT, ppocr.REC_WIDTH)
    assert x.shape == (3, 48, 320) and x.min() >= -1 and x.max() <= 1
    page, boxes = ppocr.page_with_lines(rng)
    assert page.size == (ppocr.DET_SIZE, ppocr.DET_SIZE) and boxes.shape[1] == 4 and len(boxes) >= 1
    assert ocr.char_accuracy(["Road 5"], ["road 5"], ignore_case=False) == 1 - 1 / 6
    assert ocr.char_accuracy(["Road 5"], ["road 5"]) == 1.0


def test_nudenet_decode_keeps_the_best_of_overlapping_boxes_and_their_class():
    out = np.zeros((1, 22, 3), dtype=np.float32)
    out[0, :4, 0] = [100, 100, 40, 40]  # cx, cy, w, h
    out[0, :4, 1] = [102, 101, 40, 40]  # the same object, less sure
    out[0, :4, 2] = [250, 250, 20, 20]
    out[0, 4 + 1, 0], out[0, 4 + 1, 1], out[0, 4 + 7, 2] = 0.8, 0.6, 0.3
    dets = figures.decode(out)
    assert dets[:, 4].tolist() == pytest.approx([0.8, 0.3]) and dets[:, 5].tolist() == [1, 7]
    np.testing.assert_allclose(dets[0, :4], [80, 80, 120, 120])
    # class-aware AP50: the same box of another class does not match (the surer detection is a
    # false positive, the other a true one: recall 0.5 at precision 0.5)
    other = dets.copy()
    other[:, 5] = [2, 7]
    assert figures.score_parts(lambda f: [out], {}, {"dets": [other]}, images=np.zeros((1, 3, 4, 4)))[
        "ap50_vs_fp32"] == pytest.approx(0.25)

