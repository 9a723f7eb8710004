"""Calibration and evaluation data: ``.npz`` files keyed by input name.

Each array's first axis counts samples. Two layouts are accepted per input:

1. the array has the input's rank: samples are stacked along the model's batch axis
   (``images: (1000, 1, 8, 8)`` for an input ``N x 1 x 8 x 8``), fed in batches;
2. the array has one axis more than the input: each sample is one whole input tensor
   (``x: (5, 3, 4)`` for an input ``3 x 4``), fed one at a time.

An eval file may add ``labels`` (one integer class per sample); then the metric is top-1.
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

__all__ = ["Dataset", "load_npz", "random_dataset", "LABELS_KEY", "MASK_INPUT"]

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

    def usable(self, batch_size: int | None = None) -> int:
        """How many samples :meth:`batches` feeds (a static batch axis drops the remainder)."""
        return sum(next(iter(f.values())).shape[0] if not all(self.stacked.values()) else 1 for f in self.batches(batch_size))

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


def load_npz(path: str | Path, specs: Sequence[InputSpec], *, what: str = "data") -> Dataset:
    """Load and validate an ``.npz`` against the model's inputs.

    Raises:
        DataError: unreadable file, keys that do not match the inputs, wrong shapes or
            dtypes, differing sample counts, or non-finite floats.
    """
    path = Path(path)
    where = f"{what} {path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{where}: not a readable .npz file ({err})") from None
    names = [s.name for s in specs]
    keys = set(raw) - {LABELS_KEY}
    missing, extra = [n for n in names if n not in keys], sorted(keys - set(names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unexpected {', '.join(map(repr, extra))}")
        raise DataError(f"{where}: keys do not match the model's inputs ({'; '.join(parts)}); "
                        f"the model's inputs are {', '.join(map(repr, names))}"
                        f"{' (plus optional ' + repr(LABELS_KEY) + ')' if what == 'eval' else ''}")
    arrays, stacked = {}, {}
    for spec in specs:
        arr = raw[spec.name]
        stacked[spec.name] = _check_array(spec, arr, where)
        arrays[spec.name] = arr.astype(np.dtype(spec.dtype), copy=False) if spec.dtype != "bool" else arr.astype(bool)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{where}: {spec.name!r} holds {bad} non-finite values (NaN or inf); clean the data")
    counts = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: inputs hold different sample counts {counts}; every array's first axis counts samples")
    labels = raw.get(LABELS_KEY)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        n = next(iter(counts.values()))
        if labels.shape[0] != n:
            raise DataError(f"{where}: {LABELS_KEY!r} has {labels.shape[0]} entries for {n} samples")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    logger.info("%s: %d samples from %s", what, next(iter(counts.values()), 0), path)
    return Dataset(arrays, list(specs), stacked, labels, str(path), digest)


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
