"""Calibration and evaluation data: ``.npz`` files keyed by input name.

Each array's first axis counts samples. Two layouts are accepted per input:

1. the array has the input's rank: samples are stacked along the model's batch axis
   (``images: (1000, 1, 8, 8)`` for an input ``N x 1 x 8 x 8``), fed in batches;
2. the array has one axis more than the input: each sample is one whole input tensor
   (``x: (5, 3, 4)`` for an input ``3 x 4``), fed one at a time.

An eval file may add ``labels``: one integer class per sample, or one one-hot row per sample
(``[N, classes]``, reduced by argmax); then the metric is top-1. Integer arrays given for a
float input are cast (with a warning naming the input).

Files are read in two steps: :func:`read_npz` checks what needs no model (an ``.npz`` at all,
sample counts, finite values, labels) before the model is captured, and
:meth:`RawData.validate` checks the arrays against the captured model's inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from compressor.errors import DataError
from compressor.inputs import InputSpec

__all__ = ["Dataset", "RawData", "example_inputs", "read_npz", "load_npz", "random_dataset", "LABELS_KEY", "MASK_INPUT"]

logger = logging.getLogger(__name__)

LABELS_KEY = "labels"
DEFAULT_BATCH = 16

#: The input whose ``[samples, positions]`` values say which positions are real tokens
#: (padding is masked out of statistics and comparisons).
MASK_INPUT = "attention_mask"


@dataclasses.dataclass
class Dataset:
    """Samples for every model input, batched the way the model takes them.

    Attributes:
        arrays: One array per input name, first axis = samples.
        specs: The model's inputs these arrays were validated against.
        stacked: Per input, whether each sample is a whole input tensor (layout 2).
        labels: One class per sample, or ``None``.
        source: Where the data came from (a path, or ``"random"``).
        sha256: Digest of the file (or of the generated arrays).
    """

    arrays: dict[str, np.ndarray]
    specs: list[InputSpec]
    stacked: dict[str, bool]
    labels: np.ndarray | None
    source: str
    sha256: str

    def __len__(self) -> int:
        return next(iter(self.arrays.values())).shape[0] if self.arrays else 0

    def batch_size(self) -> int:
        """Samples per model call: the static batch dimension if the model fixes one."""
        sizes = set()
        for spec in self.specs:
            if self.stacked[spec.name]:
                return 1
            first = spec.shape[0] if spec.shape else None
            if isinstance(first, int):
                sizes.add(first)
        return min(sizes) if sizes else DEFAULT_BATCH

    def batches(self, batch_size: int | None = None, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds ``{input name: array}``; the last batch may be smaller unless fixed."""
        size = batch_size or self.batch_size()
        total = len(self) if limit is None else min(limit, len(self))
        fixed = any(isinstance(s.shape[0], int) for s in self.specs if s.shape and not self.stacked[s.name])
        for start in range(0, total, size):
            stop = min(start + size, total)
            if fixed and stop - start < size:
                break  # a static batch axis cannot take a short batch
            feed = {}
            for spec in self.specs:
                arr = self.arrays[spec.name]
                feed[spec.name] = np.asarray(arr[start]) if self.stacked[spec.name] else arr[start:stop]
            yield feed

    def check_batches(self, what: str) -> None:
        """Refuse data too small for the model's static batch axis (it would feed nothing).

        Raises:
            DataError: names the sample count and the batch size.
        """
        if self.usable() == 0:
            raise DataError(f"{what} ({self.source}): {len(self)} samples, but the model's batch axis is fixed to "
                            f"{self.batch_size()}: give at least {self.batch_size()} samples (a multiple of "
                            f"{self.batch_size()} uses them all)")
        if self.usable() < len(self):
            logger.warning("%s (%s): the model's batch axis is fixed to %d, so %d of %d samples are used",
                           what, self.source, self.batch_size(), self.usable(), len(self))

    def usable(self, batch_size: int | None = None) -> int:
        """How many samples :meth:`batches` feeds (a static batch axis drops the remainder)."""
        return sum(next(iter(f.values())).shape[0] if not all(self.stacked.values()) else 1 for f in self.batches(batch_size))

    def take(self, indices: Sequence[int], what: str) -> Dataset:
        """The samples at ``indices`` (in that order), e.g. those with the largest error; ``what`` names them."""
        index = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            arrays={k: v[index] for k, v in self.arrays.items()},
            labels=None if self.labels is None else self.labels[index],
            source=f"{self.source}[{what}]",
        )

    def subset(self, start: int, stop: int) -> Dataset:
        """Samples ``start:stop`` (e.g. a held-out part of the calibration data)."""
        return dataclasses.replace(
            self,
            arrays={k: v[start:stop] for k, v in self.arrays.items()},
            labels=None if self.labels is None else self.labels[start:stop],
            source=f"{self.source}[{start}:{stop}]",
        )


def _check_array(spec: InputSpec, arr: np.ndarray, where: str) -> bool:
    """Validate one array against its input; return whether it is stacked (layout 2)."""
    rank = len(spec.shape)
    if arr.ndim == rank + 1:
        body, stacked = arr.shape[1:], True
    elif arr.ndim == rank and rank > 0:
        body, stacked = arr.shape[1:], False
    else:
        raise DataError(f"{where}: {spec.name!r} has shape {arr.shape}, but the model's input is "
                        f"{spec.shape_text()} (rank {rank}); give one array of rank {rank} (samples along the "
                        f"batch axis) or {rank + 1} (one input tensor per sample)")
    dims = spec.shape if stacked else spec.shape[1:]
    for axis, (want, got) in enumerate(zip(dims, body), start=0 if stacked else 1):
        if isinstance(want, int) and want != got:
            raise DataError(f"{where}: {spec.name!r} has shape {arr.shape}, but the model's input is "
                            f"{spec.shape_text()}: axis {axis} must be {want}, got {got}")
    want_dtype = np.dtype(spec.dtype) if spec.dtype != "bool" else np.dtype(bool)
    if arr.dtype != want_dtype and not np.can_cast(arr.dtype, want_dtype, casting="same_kind"):
        raise DataError(f"{where}: {spec.name!r} is {arr.dtype}, but the model's input is {spec.dtype}")
    return stacked


_NPZ_MAGIC = b"PK"  # an .npz is a zip archive
_NPY_MAGIC = b"\x93NUMPY"


def _not_npz(where: str, head: bytes) -> DataError:
    """The error for a file that is not an .npz, saying what it looks like instead."""
    if head.startswith(_NPY_MAGIC):
        what = "a single .npy array"
    elif head.startswith(b"\x80"):
        what = "a Python pickle"
    elif head.strip()[:1] in (b"{", b"["):
        what = "JSON or text"
    else:
        what = "not a NumPy archive"
    return DataError(f"{where}: not an .npz file ({what}); save one array per model input with "
                     "numpy.savez(path, input_name=array, ...)")


@dataclasses.dataclass
class RawData:
    """An ``.npz`` read and checked on its own, before the model is known.

    Attributes:
        arrays: One array per key (``labels`` excluded), as stored.
        labels: One class per sample (one-hot rows already reduced by argmax), or ``None``.
        source: The file's path.
        sha256: Digest of the file.
        what: ``calib`` or ``eval`` (for messages).
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    sha256: str
    what: str

    @property
    def where(self) -> str:
        return f"{self.what} {self.source}"

    def __len__(self) -> int:
        return next((a.shape[0] for a in self.arrays.values() if a.ndim > 0), 0)

    def validate(self, specs: Sequence[InputSpec]) -> Dataset:
        """Check the arrays against the model's inputs and cast them to the inputs' dtypes.

        Raises:
            DataError: keys that do not match the inputs, wrong shapes or dtypes.
        """
        names = [s.name for s in specs]
        keys = set(self.arrays)
        missing, extra = [n for n in names if n not in keys], sorted(keys - set(names))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(map(repr, missing))}")
            if extra:
                parts.append(f"unexpected {', '.join(map(repr, extra))}")
            raise DataError(f"{self.where}: keys do not match the model's inputs ({'; '.join(parts)}); "
                            f"the model's inputs are {', '.join(map(repr, names))}"
                            f"{' (plus optional ' + repr(LABELS_KEY) + ')' if self.what == 'eval' else ''}")
        arrays, stacked = {}, {}
        for spec in specs:
            arr = self.arrays[spec.name]
            stacked[spec.name] = _check_array(spec, arr, self.where)
            want = np.dtype(spec.dtype) if spec.dtype != "bool" else np.dtype(bool)
            if arr.dtype != want and arr.dtype.kind in "iub" and want.kind == "f":
                logger.warning("%s: %r is %s, the model's input is %s: cast to %s", self.where, spec.name,
                               arr.dtype, spec.dtype, spec.dtype)
            arrays[spec.name] = arr.astype(want, copy=False)
        return Dataset(arrays, list(specs), stacked, self.labels, self.source, self.sha256)


def read_npz(path: str | Path, *, what: str = "data") -> RawData:
    """Read an ``.npz`` and check what can be checked without the model.

    Called before the model is captured, so a bad data file fails in a second, not after
    a long export.

    Raises:
        DataError: no such file, not an ``.npz``, unreadable, no arrays, 0 samples,
            differing sample counts, non-finite floats, labels that do not fit.
    """
    path = Path(path)
    where = f"{what} {path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file" if not path.exists() else f"{where}: is a folder, not an .npz file")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(_NPZ_MAGIC):
        raise _not_npz(where, head)
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except ValueError as err:
        if "pickle" in str(err):
            raise DataError(f"{where}: holds object arrays (Python pickles), which are not loaded; save plain "
                            "numeric arrays with numpy.savez") from None
        raise DataError(f"{where}: not a readable .npz file ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{where}: not a readable .npz file ({err})") from None
    labels = raw.pop(LABELS_KEY, None)
    if not raw:
        raise DataError(f"{where}: holds no input arrays; save one array per model input, keyed by input name")
    counts = {k: v.shape[0] for k, v in raw.items() if v.ndim > 0}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: inputs hold different sample counts {counts}; every array's first axis "
                        "counts samples")
    n = next(iter(counts.values()), None)
    if n == 0:
        raise DataError(f"{where}: holds 0 samples; give at least one sample per input (the first axis counts "
                        "samples)")
    for name, arr in raw.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{where}: {name!r} holds {bad} non-finite values (NaN or inf); clean the data")
    if labels is not None:
        labels = _labels(np.asarray(labels), n, where)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    logger.info("%s: %s samples from %s", what, n if n is not None else "?", path)
    return RawData(raw, labels, str(path), digest, what)


def example_inputs(*sources: RawData | None, rows: int = 2) -> dict[str, np.ndarray] | None:
    """The first ``rows`` samples of the first data given (calibration, else evaluation).

    Capture takes from them the input shapes and dtypes a torch file does not record.
    """
    raw = next((r for r in sources if r is not None), None)
    if raw is None:
        return None
    return {name: arr[:rows] if arr.ndim else arr for name, arr in raw.arrays.items()}


def _labels(labels: np.ndarray, n: int | None, where: str) -> np.ndarray:
    """One integer class per sample; one-hot (or probability) rows ``[N, classes]`` give their argmax."""
    if labels.dtype.kind not in "iubf":
        raise DataError(f"{where}: {LABELS_KEY!r} holds {labels.dtype} values; give integer class indices "
                        "(map class names to 0..K-1 first)")
    if labels.ndim == 2 and labels.shape[0] == n and labels.shape[1] > 1:
        logger.info("%s: %r is %s one row per sample: taking the argmax of each row as its class", where,
                    LABELS_KEY, "x".join(map(str, labels.shape)))
        labels = labels.argmax(axis=1)
    labels = labels.reshape(-1)
    if n is not None and labels.shape[0] != n:
        raise DataError(f"{where}: {LABELS_KEY!r} has {labels.shape[0]} entries for {n} samples; give one class "
                        f"index per sample (shape [{n}]) or one one-hot row per sample (shape [{n}, classes])")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{where}: {LABELS_KEY!r} holds non-integer values; give class indices")
    return labels.astype(np.int64)


def load_npz(path: str | Path, specs: Sequence[InputSpec], *, what: str = "data") -> Dataset:
    """Load and validate an ``.npz`` against the model's inputs (:func:`read_npz`, then validate).

    Raises:
        DataError: see :func:`read_npz` and :meth:`RawData.validate`.
    """
    return read_npz(path, what=what).validate(specs)


def random_dataset(specs: Sequence[InputSpec], samples: int, seed: int) -> Dataset:
    """Random data shaped like the inputs (dynamic axes become 1); only when none is given."""
    rng = np.random.default_rng(seed)
    arrays, stacked = {}, {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
        dtype = np.dtype(spec.dtype) if spec.dtype != "bool" else np.dtype(bool)
        if dtype.kind == "f":
            arr = rng.standard_normal((samples, *shape)).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, (samples, *shape)).astype(bool)
        else:
            arr = rng.integers(0, 2, (samples, *shape)).astype(dtype)
        arrays[spec.name] = arr
        stacked[spec.name] = True
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays.values())).hexdigest()
    return Dataset(arrays, list(specs), stacked, None, "random", digest)
