"""The ``compress`` command line.

    compress MODEL --recipe NAME|PATH [--target onnx|openvino|qnn-htp|tensorrt] [--target-cpu host|avx2|vnni]
             [--input NAME=SHAPE ...]
             [--calib X.npz] [--eval X.npz] [--train X.npz] [--max-drop D] [-o OUTDIR]
    compress recipes
    compress inspect MODEL [--input NAME=SHAPE ...]
    compress sweep MODEL --pass NAME --levels L1,L2,... --eval X.npz [--max-drop D] [-o OUTDIR]
    compress search MODEL --calib X.npz --eval X.npz --max-drop D [--grid YAML] [--budget-minutes M] [-o OUTDIR]

Each command that reads a model takes the model-source flags: --trust-pickle,
--import MODULE, --model-class MODULE:NAME, --model-kwargs YAML.

Exit codes: 0 success, 1 internal error, 2 bad usage or input, 3 accuracy gate failed
(artifact still written), 4 model not supported by the target.

This module holds the command handlers and :func:`main` (the one place that prints and
maps the typed errors to exit codes); the parsers are in :mod:`compressor.cli_args`, what
is printed is formatted in :mod:`compressor.cli_report`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compressor import strict_json
from compressor.cli_args import (
    compress_parser,
    inspect_parser,
    model_source,
    recipes_parser,
    search_parser,
    setup_logging,
    sweep_parser,
    writable,
    yaml_mapping,
)
from compressor.cli_report import gate_failure, inspect_text, search_text, summary, sweep_text, write_junit
from compressor.errors import (
    EXIT_GATE_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    CompressorError,
)

__all__ = ["main"]

logger = logging.getLogger("compressor.cli")

SUBCOMMANDS = ("recipes", "inspect", "sweep", "search")


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
    args = compress_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    writable(args.junit, "--junit")
    writable(args.dump_passes, "--dump-passes", folder=True)
    from compressor.executor import make_executor
    from compressor.flow.compress import compress
    from compressor.targets import check_target_cpu

    check_target_cpu(args.target, args.target_cpu)  # before Ray starts

    def on_pass(index: int, p: Any) -> None:
        logger.info("[%d] running %s", index + 1, p.name)

    try:
        with make_executor(args.ray) as executor:
            result = compress(args.model, recipe=args.recipe, outdir=args.output, target=args.target,
                              target_cpu=args.target_cpu,
                              inputs=args.input, freeze=args.freeze, calib=args.calib, eval_data=args.eval_data,
                              max_drop=args.max_drop,
                              train=args.train,
                              **model_source(args), dump_passes=args.dump_passes,
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
        logger.error("%s", gate_failure(result.manifest))
        return EXIT_GATE_FAILED
    return EXIT_OK


def _cmd_recipes(argv: Sequence[str]) -> int:
    from compressor.targets import get_target

    args = recipes_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from compressor.cli_report import recipes_table

    print(recipes_table(None if args.target is None else get_target(args.target)))
    return EXIT_OK


def _cmd_inspect(argv: Sequence[str]) -> int:
    args = inspect_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from compressor.flow.inspect import inspect_model
    from compressor.inputs import parse_input_overrides

    report = inspect_model(Path(args.model), input_overrides=parse_input_overrides(args.input), **model_source(args))
    print(strict_json.dumps(report) if args.json else inspect_text(args.model, report))
    return EXIT_OK


def _cmd_sweep(argv: Sequence[str]) -> int:
    args = sweep_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from compressor.executor import make_executor
    from compressor.flow.sweep import sweep
    from compressor.targets import check_target_cpu

    check_target_cpu(args.target, args.target_cpu)  # before Ray starts

    options = yaml_mapping("--options", args.options, "{mask: wanda}") if args.options else {}
    recover = None
    if args.recover is not None:
        from compressor.recover.sweep_levels import recover_config

        recover = recover_config(yaml_mapping("--recover", args.recover, "{steps: 100}"))
    with make_executor(args.ray) as executor:
        result = sweep(args.model, pass_name=args.pass_name, levels=args.levels, eval_data=args.eval_data,
                       outdir=args.output, calib=args.calib, target=args.target, max_drop=args.max_drop,
                       target_cpu=args.target_cpu,
                       options=options, inputs=args.input, freeze=args.freeze, metric=args.metric,
                       **model_source(args),
                       latency_runs=args.latency_runs, progress=_bar, executor=executor, recover=recover,
                       train=args.train, on_level=lambda i, text: logger.info("[%d] %s at %s", i + 1, args.pass_name, text))
    print(sweep_text(result))
    gate_failed = result.knee is None and (not result.recovered or result.recovered_knee is None)
    return EXIT_GATE_FAILED if result.max_drop is not None and gate_failed else EXIT_OK


def _cmd_search(argv: Sequence[str]) -> int:
    args = search_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from compressor.executor import make_executor
    from compressor.flow.search import search
    from compressor.targets import check_target_cpu

    check_target_cpu(args.target, args.target_cpu)  # before Ray starts
    grid = yaml_mapping("--grid", args.grid, "{sparsity: [0, 0.5]}") if args.grid else None
    with make_executor(args.ray) as executor:
        result = search(args.model, calib=args.calib, eval_data=args.eval_data, max_drop=args.max_drop,
                        outdir=args.output, target=args.target, target_cpu=args.target_cpu, grid=grid,
                        latency_runs=args.latency_runs,
                        executor=executor, progress=_bar, budget_minutes=args.budget_minutes, inputs=args.input,
                        freeze=args.freeze, **model_source(args))
    print(search_text(result, args.max_drop))
    return EXIT_GATE_FAILED if result.best is None else EXIT_OK


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
    # -v alone or in a group of short flags (-vv, -qv): argparse reads them all as --verbose
    verbose = any(a == "--verbose" or (re.fullmatch(r"-[qv]+", a) and "v" in a) for a in argv)
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
        if verbose and err.exit_code == EXIT_INTERNAL:  # a user's mistake (2, 3, 4) is its one line, even with -v
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
