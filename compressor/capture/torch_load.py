"""``torch.load`` as the user's working directory sees it: their classes, checkpoints, state_dicts.

``torch.save`` writes a pickle. What it holds decides what :func:`load_module` returns:

* an ``nn.Module`` (``torch.save(model)``): refused unless ``trust_pickle`` (unpickling can
  run code); then loaded with ``weights_only=False``. A checkpoint dict holding the module
  under one of :data:`CHECKPOINT_KEYS` is taken too.
* a state_dict (``torch.save(model.state_dict())``), also inside a checkpoint dict under
  one of :data:`CHECKPOINT_KEYS`, with or without DataParallel's ``module.`` prefix: loaded
  into the module ``model_class`` (``MODULE:NAME``: a class, or a function returning the
  module) builds from ``model_kwargs``; a missing or unexpected key is an error naming it.

The user's code. Model classes live next to the training script or the model, so while the
model is loaded and exported (:func:`user_code`) the working directory and the model
file's folder come first on ``sys.path`` (as ``python train.py`` or ``torch.load`` run there
see them), the ``--import`` modules are imported, no bytecode is written into those
folders, and afterwards ``sys.path`` is restored and the modules imported from them are
forgotten (a second capture from another folder gets its own ``mynet``). A class pickled
from a script's ``__main__`` (``AttributeError: Can't get attribute 'Net' on <module
'__main__'>`` from ``torch.load``) is looked up in the ``--import`` modules; without one
that defines it the error names the two fixes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import pickle
import re
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from compressor.capture.common import _SAVE_PT2, _WHAT_TO_SAVE, _quiet, _summary
from compressor.errors import CaptureError, UsageError

__all__ = ["CHECKPOINT_KEYS", "load_module", "user_code"]

logger = logging.getLogger(__name__)

#: Keys under which training loops save the state_dict (or the module) in a checkpoint dict.
CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict")
_FEW = 4  # keys named in a mismatch message


def load_module(path: Path, *, trust_pickle: bool, imported: Sequence[types.ModuleType] = (),
                model_class: str | None = None, model_kwargs: Mapping[str, Any] | None = None
                ) -> tuple[Any, str, list[str]]:
    """The ``nn.Module`` a ``torch.save`` file holds or its state_dict fills; call inside :func:`user_code`.

    Args:
        path: The ``.pt``/``.pth`` file (not a torch.export or TorchScript archive).
        trust_pickle: Allow unpickling full modules (``weights_only=False``).
        imported: The ``--import`` modules (where ``__main__`` classes are looked up).
        model_class: ``MODULE:NAME`` building the module a state_dict loads into.
        model_kwargs: Keyword arguments of ``NAME``.

    Returns:
        The module (in eval mode), the source format (``pickle`` or ``state_dict``), and
        notes on what was decided.

    Raises:
        CaptureError: unreadable, untrusted, a class that cannot be found, a factory that
            fails, or weights that do not fit.
    """
    import torch

    obj = _load(path, trust_pickle, imported)
    inner, key = _unwrap(obj)
    within = f" under {key!r}" if key else ""
    if isinstance(inner, torch.nn.Module):
        if model_class:
            logger.warning("%s holds a whole %s%s; --model-class %s is not used", path, type(inner).__name__,
                           within, model_class)
        return inner.eval(), "pickle", [
            f"unpickled a full {type(inner).__name__}{within} with --trust-pickle (weights_only=False)"]
    if _is_state_dict(inner):
        if not model_class:
            here = ", ".join(f"{stem}:{cls}" for stem, cls in _module_classes(_here(path))[:_FEW])
            raise CaptureError(f"{path}: a state_dict (weights only, no graph); pass --model-class MODULE:CLASS naming "
                               "the nn.Module class (or a function returning one) these weights belong to"
                               + (f" (defined here: {here})" if here else "") + ", e.g. --model-class mynet:Net for "
                               "class Net in mynet.py in the working directory, and --model-kwargs '{hidden: 8}' for "
                               "its constructor arguments; or " + _SAVE_PT2)
        kwargs = dict(model_kwargs or {})
        module = _build(model_class, kwargs)
        stripped = _load_weights(path, module, inner, model_class)
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        return module.eval(), "state_dict", [
            f"built {model_class}({args}) and loaded {len(inner)} tensors from the state_dict{within}"
            + (" (the DataParallel 'module.' prefix stripped)" if stripped else "")]
    if _holds_tensors(obj):
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise CaptureError(f"{path}: a checkpoint dict (keys {keys}) with no state_dict under "
                           f"{', '.join(map(repr, CHECKPOINT_KEYS))}; save model.state_dict() on its own or under one "
                           f"of those keys, or {_SAVE_PT2}")
    raise CaptureError(f"{path}: holds a {type(obj).__name__}, not a model; {_SAVE_PT2}")


def _load(path: Path, trust_pickle: bool, imported: Sequence[types.ModuleType]) -> Any:
    """``torch.load``: weights only, or (``trust_pickle``) everything the pickle names."""
    import torch

    with _quiet():
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Unsupported global" not in str(err):
                raise CaptureError(f"{path}: not a PyTorch file ({_summary(err)}); {_WHAT_TO_SAVE}") from None
            if not trust_pickle:
                found = re.search(r"GLOBAL (\S+)", str(err))
                what = f" (it refers to {found[1]})" if found else ""
                raise CaptureError(f"{path}: a full pickle{what}, which can run arbitrary code when loaded; pass "
                                   f"--trust-pickle only if you trust its source, or better {_SAVE_PT2}") from None
        except Exception as err:
            logger.debug("torch.load failed", exc_info=True)
            raise CaptureError(f"{path}: not a PyTorch file ({_summary(err)}); {_WHAT_TO_SAVE}") from None
    logger.warning("%s: unpickling with weights_only=False (--trust-pickle): this can run code", path)
    missing: list[tuple[str, str]] = []
    with _quiet():
        try:
            return torch.load(str(path), map_location="cpu", weights_only=False,
                              pickle_module=_pickle_module(imported, missing))
        except (AttributeError, ImportError) as err:
            logger.debug("torch.load(weights_only=False) failed", exc_info=True)
            if missing:
                raise CaptureError(_unfound_class(path, *missing[-1], imported, err)) from None
            raise CaptureError(f"{path}: the pickle needs something that cannot be imported here ({_summary(err)}); "
                               f"{_SAVE_PT2}") from None
        except Exception as err:
            logger.debug("torch.load(weights_only=False) failed", exc_info=True)
            raise CaptureError(f"{path}: not a PyTorch file ({_summary(err)}); {_WHAT_TO_SAVE}") from None


# -- the user's code ------------------------------------------------------------------------------

@contextlib.contextmanager
def user_code(path: Path, imports: Sequence[str] = ()) -> Iterator[list[types.ModuleType]]:
    """The working directory and ``path``'s folder first on ``sys.path``, ``imports`` imported.

    Yields the imported modules. On exit ``sys.path`` and ``sys.dont_write_bytecode`` are
    restored, and the modules found in the added folders (those whose top-level module was
    first imported from there, with their submodules) are dropped from ``sys.modules``;
    packages found through other path entries stay, even where those lie inside the folders
    (a ``.venv`` in the working directory).

    Raises:
        CaptureError: a module of ``imports`` fails to import (named, with its error).
    """
    on_path = {str(Path(p or ".").resolve()) for p in sys.path}
    folders = dict.fromkeys(str(p.resolve()) for p in _here(path))
    added = [f for f in folders if f not in on_path]
    before = set(sys.modules)
    sys.path[:0] = added
    bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    importlib.invalidate_caches()  # the files may be newer than the import system's directory cache
    try:
        yield [_import(name, f"--import {name}: cannot import it") for name in imports]
    finally:
        for folder in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)
        sys.dont_write_bytecode = bytecode
        new = set(sys.modules) - before
        found_here = {name for name in new if "." not in name and _found_in(sys.modules[name]) & set(added)}
        for name in new:
            if name.partition(".")[0] in found_here:
                del sys.modules[name]


def _found_in(module: types.ModuleType) -> set[str]:
    """The folders a top-level module was found in: the ``sys.path`` entries it came from."""
    package_dirs = list(getattr(module, "__path__", None) or [])
    if package_dirs:
        return {str(Path(d).resolve().parent) for d in package_dirs}
    file = getattr(module, "__file__", None)
    return {str(Path(file).resolve().parent)} if file else set()


def _import(name: str, what: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except (Exception, SystemExit) as err:  # a script without a __main__ guard may sys.exit
        logger.debug("importing %s failed", name, exc_info=True)
        missing = err.name if isinstance(err, ModuleNotFoundError) else None
        if missing and (name + ".").startswith(missing + "."):
            hint = (f"it must be a module in the working directory ({Path.cwd()}), in the model's folder, or "
                    "installed")
        elif missing:
            hint = f"{name} imports {missing}, which is not installed: install the package that provides it"
        else:
            hint = ('it fails when imported: fix it, and keep code that should not run on import under '
                    '`if __name__ == "__main__":`')
        raise CaptureError(f"{what} ({_summary(err)}); {hint}") from None


def _pickle_module(imported: Sequence[types.ModuleType], missing: list[tuple[str, str]]) -> types.ModuleType:
    """``pickle`` whose Unpickler finds ``__main__`` classes in ``imported`` and records what it cannot find."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "__main__" and not hasattr(sys.modules["__main__"], name.split(".")[0]):
                for mod in imported:
                    with contextlib.suppress(AttributeError):
                        return functools.reduce(getattr, name.split("."), mod)
            try:
                return super().find_class(module, name)
            except (AttributeError, ImportError):
                missing.append((module, name))
                raise

    module = types.ModuleType("pickle")
    module.__dict__.update({k: v for k, v in vars(pickle).items() if not k.startswith("__")})
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    return module


def _module_classes(folders: Sequence[Path]) -> list[tuple[str, str]]:
    """``(file stem, class name)`` of the top-level ``class X(...Module...)`` in the ``.py`` files of ``folders``."""
    pattern = re.compile(r"^class\s+(\w+)\s*\(([^)]*)\)", re.MULTILINE)
    found = []
    for folder in dict.fromkeys(folders):
        for file in sorted(folder.glob("*.py")):
            with contextlib.suppress(OSError):
                if file.stat().st_size < 2**20:
                    found += [(file.stem, m[1]) for m in pattern.finditer(file.read_text(errors="replace"))
                              if "Module" in m[2]]
    return found


def _here(path: Path) -> list[Path]:
    """The folders the user's modules are imported from: the working directory and the model's."""
    return [Path.cwd(), path.resolve().parent]


def _unfound_class(path: Path, module: str, name: str, imported: Sequence[types.ModuleType],
                   err: BaseException) -> str:
    """What to do about a class the pickle names but this process cannot find."""
    if module == "__main__":
        script = next((stem for stem, cls in _module_classes(_here(path)) if cls == name), None)
        which = (f"{script}.py here defines class {name}" if script
                 else f"SCRIPT.py being the script that defines class {name}")
        names = ", ".join(m.__name__ for m in imported)
        searched = (f" (the --import module{'s' if len(imported) > 1 else ''} {names} "
                    f"define{'' if len(imported) > 1 else 's'} no {name})" if imported else "")
        return (f"{path}: the pickled class {name} was defined in the script that saved the model "
                f"(__main__.{name}){searched}, so nothing here defines it; fix: (1) move class {name} into a module "
                f"next to that script, e.g. mynet.py, `from mynet import {name}` there, and save the model again; "
                f"or (2) pass --import {script or 'SCRIPT'} ({which}) and keep its training code under "
                '`if __name__ == "__main__":`')
    top = module.split(".")[0]
    if isinstance(err, ModuleNotFoundError) and err.name and (module + ".").startswith(err.name + "."):
        return (f"{path}: the pickle needs class {module}.{name}, but no module {module} can be imported from the "
                f"working directory, the model's folder or the installed packages; run compress in the folder that "
                f"holds {top}.py (or the {top} package), or install the package that provides it")
    if isinstance(err, ImportError):
        return (f"{path}: the pickle needs class {module}.{name}, and importing {module} failed ({_summary(err)}); "
                "install what it needs")
    found = getattr(sys.modules.get(module), "__file__", module)
    return (f"{path}: the pickle needs class {module}.{name}, but module {module} ({found}) has no {name}: it was "
            "renamed or moved since the model was saved; restore it, or save model.state_dict() and load it with "
            "--model-class")


def _build(spec: str, kwargs: Mapping[str, Any]) -> Any:
    """The module ``spec`` (``MODULE:NAME``) builds: ``NAME(**kwargs)``."""
    import torch

    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise UsageError(f"--model-class {spec!r}: expected MODULE:NAME, e.g. mynet:Net for class Net in mynet.py "
                         "(or a function returning the model, e.g. torchvision.models:resnet18)")
    module = _import(module_name, f"--model-class {spec}: cannot import {module_name}")
    try:
        factory = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        classes = sorted(n for n, v in vars(module).items() if isinstance(v, type)
                         and issubclass(v, torch.nn.Module) and v.__module__ == module.__name__)
        raise CaptureError(f"--model-class {spec}: module {module_name} ({getattr(module, '__file__', 'built-in')}) "
                           f"has no {attr!r}; its nn.Module classes: {', '.join(classes) or 'none'}") from None
    call = f"{attr}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    if not callable(factory):
        raise CaptureError(f"--model-class {spec}: {attr} is a {type(factory).__name__}, not a class or function")
    try:
        built = factory(**kwargs)
    except Exception as err:
        logger.debug("%s failed", call, exc_info=True)
        try:
            signature = f"{attr}({', '.join(map(str, inspect.signature(factory).parameters.values()))})"
        except (TypeError, ValueError):
            signature = "unknown"
        raise CaptureError(f"--model-class {spec}: {call} failed ({_summary(err)}); its signature is {signature}: "
                           "check --model-kwargs") from None
    if not isinstance(built, torch.nn.Module):
        raise CaptureError(f"--model-class {spec}: {call} returned a {type(built).__name__}, not a torch.nn.Module; "
                           "name the model's class, or a function that returns the model")
    return built


# -- state_dicts and checkpoints ------------------------------------------------------------------

def _is_state_dict(obj: Any) -> bool:
    import torch

    return (isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())
            and all(isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
                    for k, v in obj.items()))


def _holds_tensors(obj: Any) -> bool:
    """A state_dict, or a checkpoint dict holding one somewhere."""
    import torch
    return isinstance(obj, Mapping) and any(
        isinstance(v, torch.Tensor) or _holds_tensors(v) for v in obj.values())


def _unwrap(obj: Any) -> tuple[Any, str | None]:
    """The module or state_dict a checkpoint dict holds under one of :data:`CHECKPOINT_KEYS`, and the key."""
    import torch

    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), torch.nn.Module) or _is_state_dict(obj.get(key)):
                return obj[key], key
    return obj, None


def _few(keys: Sequence[str]) -> str:
    return ", ".join(keys[:_FEW]) + (f" (+{len(keys) - _FEW} more)" if len(keys) > _FEW else "")


def _load_weights(path: Path, module: Any, weights: Mapping[str, Any], spec: str) -> bool:
    """``load_state_dict`` that names what does not fit; returns whether a ``module.`` prefix was stripped."""
    stripped = all(k.startswith("module.") for k in weights)
    if stripped:  # saved from a DataParallel/DistributedDataParallel wrapper
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    try:
        result = module.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shapes that differ raise even when not strict
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise CaptureError(f"{path}: the state_dict does not fit {spec}: {lines[1] if len(lines) > 1 else lines[0]}; "
                           "check --model-kwargs builds the model the weights were saved from") from None
    parts = [f"{kind} {_few(keys)}" for kind, keys in (("missing", result.missing_keys),
                                                        ("unexpected", result.unexpected_keys)) if keys]
    if parts:
        raise CaptureError(f"{path}: the state_dict does not fit {spec}: {'; '.join(parts)}; check --model-class "
                           "names the class these weights were saved from (and --model-kwargs its arguments)")
    return stripped

