"""The ``compress`` command line.

    compress MODEL --recipe NAME|PATH [--target onnx|openvino|qnn-htp|tensorrt] [--input NAME=SHAPE ...]
             [--calib X.npz] [--eval X.npz] [--train X.npz] [--max-drop D] [-o OUTDIR]
    compress recipes
    compress inspect MODEL [--input NAME=SHAPE ...]
    compress sweep MODEL --pass NAME --levels L1,L2,... --eval X.npz [--max-drop D] [-o OUTDIR]
    compress search MODEL --calib X.npz --eval X.npz --max-drop D [--grid YAML] [--budget-minutes M] [-o OUTDIR]

Each command that reads a model takes the model-source flags: --trust-pickle,
--import MODULE, --model-class MODULE:NAME, --model-kwargs YAML.

Exit codes: 0 success, 1 internal error, 2 bad usage or input, 3 accuracy gate failed
(artifact still written), 4 model not supported by the target.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compressor import __version__, strict_json
from compressor.cli_report import summary, table, write_junit
from compressor.errors import (
    EXIT_GATE_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    CompressorError,
    UsageError,
)

__all__ = ["main"]

logger = logging.getLogger("compressor.cli")

SUBCOMMANDS = ("recipes", "inspect", "sweep", "search")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 2, one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _compress_parser() -> argparse.ArgumentParser:
    from compressor.targets import TARGETS

    p = _Parser(prog="compress", description="Compress a trained model into a measured artifact for a backend.",
                epilog="Other commands: 'compress recipes' lists built-in recipes; 'compress inspect MODEL' "
                       "describes a model. Exit codes: 0 ok, 1 internal error, 2 bad input, 3 accuracy gate "
                       "failed, 4 unsupported by target.")
    p.add_argument("model", help="model file: .onnx, .pt2 (torch.export), TorchScript .pt, torch.save .pt/.pth, "
                                 "or a Hugging Face model folder")
    p.add_argument("--recipe", required=True, help="built-in recipe name (see 'compress recipes') or a .yaml path")
    p.add_argument("--target", default="onnx", choices=sorted(TARGETS), help="backend to lower for (default: onnx)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE",
                   help="fix an input's shape, e.g. images=1x1x8x8 (optionally :dtype); repeatable")
    p.add_argument("--calib", type=Path, help=".npz of calibration samples, one array per input")
    p.add_argument("--eval", type=Path, dest="eval_data", help=".npz of evaluation samples (+ optional 'labels')")
    p.add_argument("--train", type=Path, help=".npz of training samples for a recipe's recover: stage (as --calib; "
                   "optional 'labels'); without it the stage trains on --calib")
    p.add_argument("--max-drop", type=float, help="accuracy budget: fail (exit 3) when the metric drops more")
    p.add_argument("-o", "--output", type=Path, default=Path("out"), help="artifact folder (default: out/)")
    _add_model_source(p)
    p.add_argument("--dump-passes", type=Path, metavar="DIR", help="write the model after each pass into DIR")
    p.add_argument("--junit", type=Path, metavar="PATH", help="write the accuracy gate as a JUnit XML test case")
    p.add_argument("--latency-runs", type=_at_least(1), default=20, help="timed runs for the latency figures (default 20)")
    _add_ray(p, "accuracy control ranks each layer in a Ray task")
    _add_verbosity(p)
    return p


def _at_least(minimum: int) -> Any:
    """argparse type: an integer >= ``minimum`` (a bad value is exit 2 through ``_Parser.error``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _writable(path: Path | None, flag: str, folder: bool = False) -> None:
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


def _model_source(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of capture that :func:`_add_model_source`'s flags set."""
    kwargs = None if args.model_kwargs is None else _yaml_mapping("--model-kwargs", args.model_kwargs, "{hidden: 8}")
    return {"trust_pickle": args.trust_pickle, "imports": args.imports, "model_class": args.model_class,
            "model_kwargs": kwargs}


def _yaml_mapping(flag: str, text: str, example: str) -> dict[str, Any]:
    """A flag's YAML (or JSON) mapping."""
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


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("--version", action="version", version=f"compressor {__version__}")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("compressor").setLevel(level)


def _bar(desc: str, total: int | None, unit: str = "batch") -> Any:
    """A tqdm bar on stderr that draws only on a terminal (CI logs get no bar noise).

    The size comes from ``shutil.get_terminal_size`` (which falls back to 80x24): tqdm's
    own probe reads 0x0 on a terminal that reports no size (``script``, a fresh pty) and
    then draws nothing at all.
    """
    import shutil

    from tqdm import tqdm

    size = shutil.get_terminal_size()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, disable=None,
                ncols=size.columns, nrows=size.lines)


def _cmd_compress(argv: Sequence[str]) -> int:
    args = _compress_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    _writable(args.junit, "--junit")
    _writable(args.dump_passes, "--dump-passes", folder=True)
    from compressor.executor import make_executor
    from compressor.flow.compress import compress

    def on_pass(index: int, p: Any) -> None:
        logger.info("[%d] running %s", index + 1, p.name)

    try:
        with make_executor(args.ray) as executor:
            result = compress(args.model, recipe=args.recipe, outdir=args.output, target=args.target,
                              inputs=args.input, calib=args.calib, eval_data=args.eval_data, max_drop=args.max_drop,
                              train=args.train,
                              **_model_source(args), dump_passes=args.dump_passes,
                              latency_runs=args.latency_runs, progress=_bar, on_pass=on_pass, executor=executor)
    except CompressorError as err:
        if args.junit:
            write_junit(args.junit, None, str(err))
        raise
    if args.junit:
        write_junit(args.junit, result.manifest, None)
    print(summary(result.manifest))
    print(f"\nartifact: {result.outdir}")
    if result.gate_passed is False:
        gate = result.manifest["gate"]
        if not result.manifest["evaluation"]["verified"]:
            logger.error("accuracy gate failed: %s; pass --calib or --eval with real samples "
                         "(artifact written, gate.passed: false)", gate["reason"])
        elif "reason" in gate:
            logger.error("accuracy gate failed: drop %.6f > max_drop %s: %s (artifact written, gate.passed: false)",
                         result.manifest["accuracy_drop"], gate["max_drop"], gate["reason"])
        else:
            logger.error("accuracy gate failed: drop %.6f > max_drop %s (artifact written, gate.passed: false)",
                         result.manifest["accuracy_drop"], gate["max_drop"])
        return EXIT_GATE_FAILED
    return EXIT_OK


def _cmd_recipes(argv: Sequence[str]) -> int:
    from compressor.targets import TARGETS, get_target

    p = _Parser(prog="compress recipes", description="List the built-in recipes.")
    p.add_argument("--target", choices=sorted(TARGETS),
                   help="also list each recipe's passes on this target, with those the target adds marked '+'")
    _add_verbosity(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    from compressor.cli_report import recipes_table

    print(recipes_table(None if args.target is None else get_target(args.target)))
    return EXIT_OK


def _cmd_inspect(argv: Sequence[str]) -> int:
    p = _Parser(prog="compress inspect", description="Describe a model: inputs, outputs, ops, parameters, "
                                                     "and which built-in passes would change it.")
    p.add_argument("model")
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE")
    _add_model_source(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_verbosity(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    from compressor.flow.inspect import inspect_model
    from compressor.inputs import parse_input_overrides

    report = inspect_model(Path(args.model), input_overrides=parse_input_overrides(args.input), **_model_source(args))
    if args.json:
        print(strict_json.dumps(report))
        return EXIT_OK
    print(f"model: {args.model} ({report['format']}, opset {report['opset']}, "
          f"{report['parameters']:,} parameters, {report['nodes']} nodes)\n")
    print(table([("input", v["name"], v["shape"], v["dtype"]) for v in report["inputs"]]
                 + [("output", v["name"], v["shape"], v["dtype"]) for v in report["outputs"]],
                 ["kind", "name", "shape", "dtype"]))
    print()
    print(table(sorted(report["ops"].items(), key=lambda kv: (-kv[1], kv[0])), ["op", "count"]))
    print()
    print(table([(n, v["would_change"], v["detail"]) for n, v in report["passes"].items()],
                 ["pass", "would change", "detail"]))
    return EXIT_OK


def _cmd_sweep(argv: Sequence[str]) -> int:
    from compressor.flow.sweep import SWEEPABLE
    from compressor.targets import TARGETS

    p = _Parser(prog="compress sweep",
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
    p.add_argument("--max-drop", type=float, help="accuracy budget: the knee is the largest level within it")
    p.add_argument("--options", default=None, metavar="YAML",
                   help="more options of the pass, the same at every level, e.g. '{mask: wanda}'")
    p.add_argument("--metric", default="auto", choices=("auto", "top1", "cosine"))
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE")
    p.add_argument("-o", "--output", type=Path, default=Path("sweep-out"),
                   help="folder for sweep.csv, sweep.json, sweep.png (default: sweep-out/)")
    p.add_argument("--latency-runs", type=_at_least(0), default=10, help="timed runs per level (0: no latency)")
    p.add_argument("--recover", nargs="?", const="{}", default=None, metavar="YAML",
                   help="each level again, fine-tuned by the recovery stage (options as a recipe's recover:, e.g. "
                        "'{steps: 100}'); both curves on the plot")
    p.add_argument("--train", type=Path, help=".npz of training samples for --recover (default: --calib)")
    _add_model_source(p)
    _add_ray(p, "each level is a Ray task")
    _add_verbosity(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    from compressor.executor import make_executor
    from compressor.flow.sweep import format_table, sweep

    options = _yaml_mapping("--options", args.options, "{mask: wanda}") if args.options else {}
    recover = None
    if args.recover is not None:
        from compressor.recover.sweep_levels import recover_config

        recover = recover_config(_yaml_mapping("--recover", args.recover, "{steps: 100}"))
    with make_executor(args.ray) as executor:
        result = sweep(args.model, pass_name=args.pass_name, levels=args.levels, eval_data=args.eval_data,
                       outdir=args.output, calib=args.calib, target=args.target, max_drop=args.max_drop,
                       options=options, inputs=args.input, metric=args.metric, **_model_source(args),
                       latency_runs=args.latency_runs, progress=_bar, executor=executor, recover=recover,
                       train=args.train, on_level=lambda i, text: logger.info("[%d] %s at %s", i + 1, args.pass_name, text))
    print(format_table(result))
    print()
    if result.max_drop is not None:
        if result.knee is not None:
            print(f"knee (largest level within max drop {result.max_drop:g}): {result.knee.level} "
                  f"(sparsity {result.knee.sparsity:.3f}, {result.metric} {result.knee.metric:.4f}, "
                  f"drop {result.knee.drop:.4f})")
        else:
            print(f"knee: none; no level is within max drop {result.max_drop:g}")
        if result.recovered:
            knee = result.recovered_knee
            print(f"knee recovered: {knee.level} (sparsity {knee.sparsity:.3f}, {result.metric} {knee.metric:.4f}, "
                  f"drop {knee.drop:.4f})" if knee is not None else "knee recovered: none within max drop")
    files = ", ".join(str(path) for path in result.files.values())
    print(f"written: {files}")
    if "png" not in result.files:
        print("no plot: matplotlib is not installed (pip install matplotlib); the curve is in sweep.csv")
    gate_failed = result.knee is None and (not result.recovered or result.recovered_knee is None)
    return EXIT_GATE_FAILED if result.max_drop is not None and gate_failed else EXIT_OK


def _cmd_search(argv: Sequence[str]) -> int:
    from compressor.targets import TARGETS

    p = _Parser(prog="compress search",
                description="Try a grid of recipe options (calibrator, SmoothQuant alpha, pruning sparsity before "
                            "int8, accuracy control): the Pareto front of latency vs metric, search.csv/json/png, "
                            "and the best candidate within --max-drop written to OUTDIR/best.",
                epilog="Exit codes: 0 ok, 2 bad input, 3 no candidate within --max-drop.")
    p.add_argument("model", help="model file (as for 'compress')")
    p.add_argument("--calib", type=Path, required=True, help=".npz of calibration samples")
    p.add_argument("--eval", type=Path, dest="eval_data", required=True, help=".npz of evaluation samples")
    p.add_argument("--max-drop", type=float, required=True, help="accuracy budget")
    p.add_argument("--target", default="onnx", choices=sorted(TARGETS))
    p.add_argument("--grid", default=None, metavar="YAML",
                   help="grid values, e.g. '{calibrator: [minmax, mse], alpha: [null], sparsity: [0, 0.2], "
                        "accuracy_control: [true]}' (accuracy_control: a candidate over --max-drop gives back its "
                        "most sensitive layers; default true)")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="wall-clock budget: candidates not started after M minutes are not run (grid order); the "
                        "best of those that ran is still written")
    p.add_argument("-o", "--output", type=Path, default=Path("search-out"))
    p.add_argument("--latency-runs", type=_at_least(1), default=10)
    _add_ray(p, "each candidate is a Ray task")
    _add_verbosity(p)
    args = p.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    from compressor.executor import make_executor
    from compressor.flow.search import format_search_table, search

    grid = _yaml_mapping("--grid", args.grid, "{sparsity: [0, 0.5]}") if args.grid else None
    with make_executor(args.ray) as executor:
        result = search(args.model, calib=args.calib, eval_data=args.eval_data, max_drop=args.max_drop,
                        outdir=args.output, target=args.target, grid=grid, latency_runs=args.latency_runs,
                        executor=executor, progress=_bar, budget_minutes=args.budget_minutes)
    print(format_search_table(result))
    print()
    if result.budget_minutes is not None:
        print(f"budget: {result.budget_minutes:g} min; {result.ran} of {len(result.candidates)} candidates ran, "
              f"{result.not_run} not run")
    print(f"written: {', '.join(str(path) for path in result.files.values())}")
    if "png" not in result.files:
        print("no plot: matplotlib is not installed (pip install matplotlib); the candidates are in search.csv")
    if result.best is None:
        print(f"best: none; no candidate is within max drop {args.max_drop:g}")
        return EXIT_GATE_FAILED
    print(f"best: candidate {result.best.index} {result.best.options} -> {result.files['best']}")
    return EXIT_OK


#: What a shell reports for a writer killed by SIGPIPE (128 + 13); Python raises instead.
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout without a file descriptor (tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``compress``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        if argv and argv[0] == "recipes":
            return _cmd_recipes(argv[1:])
        if argv and argv[0] == "inspect":
            return _cmd_inspect(argv[1:])
        if argv and argv[0] == "sweep":
            return _cmd_sweep(argv[1:])
        if argv and argv[0] == "search":
            return _cmd_search(argv[1:])
        return _cmd_compress(argv)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    except CompressorError as err:
        message = str(err).replace("\n", " ")
        print(f"error: {message}", file=sys.stderr)
        for node, why in getattr(err, "offenders", [])[5:] if len(getattr(err, "offenders", [])) > 5 else []:
            print(f"  {node}: {why}", file=sys.stderr)  # the rest of the offending nodes, one per line
        if verbose:
            traceback.print_exc()
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `compress recipes | head`: the reader left; not an error of ours
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as err:  # an unexpected internal error: still one line unless -v
        print(f"error: internal error ({type(err).__name__}: {err}); rerun with -v for the traceback and "
              "please report it", file=sys.stderr)
        if verbose:
            traceback.print_exc()
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
