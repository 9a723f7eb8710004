"""The ``compress`` command line's arguments: one parser per command, the flags they share, their checks.

A bad flag is a :class:`~compressor.errors.UsageError` (exit 2, one line naming the flag),
never argparse's usage dump and ``SystemExit(2)``. The handlers that run each command
and print its output are in :mod:`compressor.cli`; what they print is formatted in
:mod:`compressor.cli_report`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from compressor import __version__
from compressor.errors import UsageError

__all__ = ["Parser", "compress_parser", "recipes_parser", "inspect_parser", "sweep_parser", "search_parser",
           "at_least", "writable", "model_source", "yaml_mapping", "setup_logging"]

#: ``--input``'s help: the spellings :func:`compressor.inputs.parse_input_overrides` takes.
INPUT_HELP = ("fix an input's shape, e.g. images=1x1x8x8 (? keeps an axis dynamic; optionally :dtype, e.g. "
              "ids=1x128:int64); a rank-0 (scalar) input is NAME=scalar, e.g. sr=scalar:int64; repeatable")

FREEZE_HELP = ("make an input a constant of the model, e.g. sr=16000 (V1,V2,... for a 1-D input): the artifact has "
               "no such input and what depends on it alone folds away (an If on it); data may leave its column out, "
               "or keep it if every sample holds that value; repeatable")


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 2, one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def at_least(minimum: int) -> Any:
    """argparse type: an integer >= ``minimum`` (a bad value is exit 2 through ``Parser.error``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def writable(path: Path | None, flag: str, folder: bool = False) -> None:
    """Refuse, before any work, an output path the tool could not write at the end.

    Raises:
        UsageError: names the flag, the path and the OS's reason.
    """
    if path is None:
        return
    target = path if folder else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot create {target} ({err.strerror or err}); choose a writable "
                         "location") from None
    if not os.access(target, os.W_OK):
        raise UsageError(f"{flag} {path}: {target} is not writable; choose a writable location")
    if not folder:
        try:  # the file is written at the end (with the error, if the run fails): it must open now
            with open(path, "a"):
                pass
        except OSError as err:
            raise UsageError(f"{flag} {path}: cannot write it ({err.strerror or err}); choose a writable "
                             "location") from None


def _add_model_source(p: argparse.ArgumentParser) -> None:
    """The flags that say how a torch file is loaded (every command that reads a model)."""
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a fully pickled torch module (it can run code: only for files you trust)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: it defines the classes the pickle names (a script's own classes: "
                        "--import train); repeatable")
    p.add_argument("--model-class", metavar="MODULE:NAME",
                   help="for a state_dict file: the nn.Module class, or a function returning the model, "
                        "e.g. mynet:Net (the working directory and the model's folder are on the import path)")
    p.add_argument("--model-kwargs", metavar="YAML", help="keyword arguments of --model-class, e.g. '{hidden: 8}'")


def model_source(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of capture that the model-source flags set."""
    kwargs = None if args.model_kwargs is None else yaml_mapping("--model-kwargs", args.model_kwargs, "{hidden: 8}")
    return {"trust_pickle": args.trust_pickle, "imports": args.imports, "model_class": args.model_class,
            "model_kwargs": kwargs}


def yaml_mapping(flag: str, text: str, example: str) -> dict[str, Any]:
    """A flag's YAML (or JSON) mapping.

    Raises:
        UsageError: not YAML, or not a mapping.
    """
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UsageError(f"{flag} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a mapping such as '{example}', got {text!r}")
    return value


def _add_ray(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help=f"run on Ray ({what}): 'local' starts one here, HOST:PORT or 'auto' joins a cluster; "
                        "without a value, $RAY_ADDRESS or local (needs: pip install 'compressor[ray]')")


def _add_target_cpu(p: argparse.ArgumentParser) -> None:
    from compressor.targets import CPU_TARGETS, TARGET_CPUS

    p.add_argument("--target-cpu", default="host", choices=TARGET_CPUS,
                   help=f"the x86 CPU the artifact will run on ({', '.join(CPU_TARGETS)} targets), which picks "
                        "the int8 grid: avx2 (no VNNI: 7-bit weights where its int8 kernels saturate), "
                        "vnni (AVX-512 VNNI or AVX-VNNI: 8-bit), amx (AMX int8 tiles: 8-bit, and openvino's "
                        "activations signed, without zero points), host (default: this machine's CPU)")


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and the traceback of an internal error (exit 1); a bad input is still "
                        "one error line")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("--version", action="version", version=f"compressor {__version__}")


def setup_logging(verbose: bool, quiet: bool) -> None:
    """Log records of ``compressor.*`` to stderr: DEBUG with ``-v``, WARNING with ``-q``, else INFO."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("compressor").setLevel(level)


def compress_parser() -> argparse.ArgumentParser:
    """``compress MODEL --recipe ...``."""
    from compressor.targets import TARGETS

    p = Parser(prog="compress", description="Compress a trained model into a measured artifact for a backend.",
               epilog="Other commands: 'compress recipes' lists built-in recipes; 'compress inspect MODEL' "
                      "describes a model. Exit codes: 0 ok, 1 internal error, 2 bad input, 3 accuracy gate "
                      "failed, 4 unsupported by target.")
    p.add_argument("model", help="model file: .onnx, .pt2 (torch.export), TorchScript .pt, torch.save .pt/.pth, "
                                 "or a Hugging Face model folder")
    p.add_argument("--recipe", required=True, help="built-in recipe name (see 'compress recipes') or a .yaml path")
    p.add_argument("--target", default="onnx", choices=sorted(TARGETS), help="backend to lower for (default: onnx)")
    _add_target_cpu(p)
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE", help=INPUT_HELP)
    p.add_argument("--freeze", action="append", default=[], metavar="NAME=VALUE", help=FREEZE_HELP)
    p.add_argument("--calib", type=Path, help=".npz of calibration samples, one array per input")
    p.add_argument("--eval", type=Path, dest="eval_data", help=".npz of evaluation samples (+ optional 'labels')")
    p.add_argument("--train", type=Path, help=".npz of training samples for a recipe's recover: stage (as --calib; "
                   "optional 'labels'); without it the stage trains on --calib")
    p.add_argument("--max-drop", type=float, help="accuracy budget: fail (exit 3) when the metric drops more")
    p.add_argument("-o", "--output", type=Path, default=Path("out"), help="artifact folder (default: out/)")
    _add_model_source(p)
    p.add_argument("--dump-passes", type=Path, metavar="DIR", help="write the model after each pass into DIR")
    p.add_argument("--junit", type=Path, metavar="PATH", help="write the accuracy gate as a JUnit XML test case")
    p.add_argument("--latency-runs", type=at_least(1), default=20, help="timed runs for the latency figures (default 20)")
    _add_ray(p, "accuracy control ranks each layer in a Ray task")
    _add_verbosity(p)
    return p


def recipes_parser() -> argparse.ArgumentParser:
    """``compress recipes [--target T]``."""
    from compressor.targets import TARGETS

    p = Parser(prog="compress recipes", description="List the built-in recipes.")
    p.add_argument("--target", choices=sorted(TARGETS),
                   help="also list each recipe's passes on this target, with those the target adds marked '+'")
    _add_verbosity(p)
    return p


def inspect_parser() -> argparse.ArgumentParser:
    """``compress inspect MODEL``."""
    p = Parser(prog="compress inspect", description="Describe a model: inputs, outputs, ops, parameters, "
                                                    "and which built-in passes would change it.")
    p.add_argument("model")
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE", help=INPUT_HELP)
    _add_model_source(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_verbosity(p)
    return p


def sweep_parser() -> argparse.ArgumentParser:
    """``compress sweep MODEL --pass NAME --levels ...``."""
    from compressor.flow.sweep import SWEEPABLE
    from compressor.targets import TARGETS

    p = Parser(prog="compress sweep",
               description="Run one sparsity pass at several levels and measure each against the baseline: "
                           "a table, sweep.csv/json and a plot (sweep.png), and the largest level within "
                           "--max-drop (the essential-sparsity knee).",
               epilog="Levels: " + "; ".join(f"{k}: {v}" for k, v in SWEEPABLE.items())
                      + ". Exit codes: 0 ok, 2 bad input, 3 no level within --max-drop.")
    p.add_argument("model", help="model file (as for 'compress')")
    p.add_argument("--pass", dest="pass_name", required=True, choices=sorted(SWEEPABLE), help="the pass to sweep")
    p.add_argument("--levels", required=True, help="comma-separated levels, e.g. 0.1,0.2,0.5 or 1:4,2:4,3:4")
    p.add_argument("--eval", type=Path, dest="eval_data", required=True,
                   help=".npz of evaluation samples (+ optional 'labels')")
    p.add_argument("--calib", type=Path, help=".npz of calibration samples (Wanda/SparseGPT masks, bias correction)")
    p.add_argument("--target", default="onnx", choices=sorted(TARGETS), help="backend to evaluate in (default: onnx)")
    _add_target_cpu(p)
    p.add_argument("--max-drop", type=float, help="accuracy budget: the knee is the largest level within it")
    p.add_argument("--options", default=None, metavar="YAML",
                   help="more options of the pass, the same at every level, e.g. '{mask: wanda}'")
    p.add_argument("--metric", default="auto", choices=("auto", "top1", "cosine"))
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE", help=INPUT_HELP)
    p.add_argument("--freeze", action="append", default=[], metavar="NAME=VALUE", help=FREEZE_HELP)
    p.add_argument("-o", "--output", type=Path, default=Path("sweep-out"),
                   help="folder for sweep.csv, sweep.json, sweep.png (default: sweep-out/)")
    p.add_argument("--latency-runs", type=at_least(0), default=10, help="timed runs per level (0: no latency)")
    p.add_argument("--recover", nargs="?", const="{}", default=None, metavar="YAML",
                   help="each level again, fine-tuned by the recovery stage (options as a recipe's recover:, e.g. "
                        "'{steps: 100}'); both curves on the plot")
    p.add_argument("--train", type=Path, help=".npz of training samples for --recover (default: --calib)")
    _add_model_source(p)
    _add_ray(p, "each level is a Ray task")
    _add_verbosity(p)
    return p


def search_parser() -> argparse.ArgumentParser:
    """``compress search MODEL --calib ... --eval ... --max-drop D``."""
    from compressor.targets import TARGETS

    p = Parser(prog="compress search",
               description="Try a grid of recipe options (calibrator, SmoothQuant alpha, pruning sparsity before "
                           "int8, accuracy control): the Pareto front of latency vs metric, search.csv/json/png, "
                           "and the best candidate within --max-drop written to OUTDIR/best.",
               epilog="Exit codes: 0 ok, 2 bad input, 3 no candidate within --max-drop.")
    p.add_argument("model", help="model file (as for 'compress')")
    p.add_argument("--calib", type=Path, required=True, help=".npz of calibration samples")
    p.add_argument("--eval", type=Path, dest="eval_data", required=True, help=".npz of evaluation samples")
    p.add_argument("--max-drop", type=float, required=True, help="accuracy budget")
    p.add_argument("--target", default="onnx", choices=sorted(TARGETS))
    _add_target_cpu(p)
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE", help=INPUT_HELP)
    p.add_argument("--freeze", action="append", default=[], metavar="NAME=VALUE", help=FREEZE_HELP)
    _add_model_source(p)
    p.add_argument("--grid", default=None, metavar="YAML",
                   help="grid values, e.g. '{calibrator: [minmax, mse], alpha: [null], sparsity: [0, 0.2], "
                        "accuracy_control: [true]}' (accuracy_control: a candidate over --max-drop gives back its "
                        "most sensitive layers; default true)")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="wall-clock budget: candidates not started after M minutes are not run (grid order); the "
                        "best of those that ran is still written")
    p.add_argument("-o", "--output", type=Path, default=Path("search-out"))
    p.add_argument("--latency-runs", type=at_least(1), default=10)
    _add_ray(p, "each candidate is a Ray task")
    _add_verbosity(p)
    return p
