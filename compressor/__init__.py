"""compressor: model compression with an ahead-of-time export pipeline.

capture → ``onnx_ir.Model`` → :class:`~compressor.pass_manager.PassManager` (recipe passes)
→ ``Target.lower`` → artifact folder with a measured ``manifest.json``.
"""

from __future__ import annotations

import logging

__all__ = ["__version__"]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
