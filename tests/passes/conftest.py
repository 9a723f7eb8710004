"""Fixtures for the pass tests; makes ``tests.ortutil`` importable under plain ``pytest``."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


@pytest.fixture(scope="session")
def light_resnet50_path() -> Path:
    """ONNX's test copy of ResNet-50 (weights built by ConstantOfShape, 53 BatchNorms)."""
    path = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not shipped with this onnx build")
    return path
