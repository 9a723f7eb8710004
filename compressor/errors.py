"""Typed errors and the CLI exit codes they map to.

Exit codes (the contract CI relies on):

* 0 success
* 1 an unexpected internal error
* 2 bad usage or bad input (unreadable model, invalid recipe, data that does not
  match the model's inputs)
* 3 the accuracy gate failed (the artifact is still written, ``gate.passed: false``)
* 4 the model is not supported by the target (the message names each offending node)
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "first_line",
    "EXIT_INTERNAL",
    "EXIT_BAD_INPUT",
    "EXIT_GATE_FAILED",
    "EXIT_UNSUPPORTED",
    "CompressorError",
    "UsageError",
    "CaptureError",
    "RecipeError",
    "DataError",
    "OptionsError",
    "UnsupportedByTarget",
    "UnsupportedModel",
    "InvalidModel",
    "AccuracyGateFailed",
    "PipelineError",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_UNSUPPORTED = 4


class CompressorError(Exception):
    """Base of every error a user can act on; ``exit_code`` is what the CLI returns."""

    exit_code: int = EXIT_INTERNAL


class UsageError(CompressorError):
    """The command line itself is wrong (bad flag value, missing argument)."""

    exit_code = EXIT_BAD_INPUT


class CaptureError(CompressorError):
    """The model file cannot be read or turned into ONNX."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(CompressorError):
    """A recipe is invalid: names the file, the key and the valid choices."""

    exit_code = EXIT_BAD_INPUT


class OptionsError(RecipeError):
    """A pass got an unknown option or an option of the wrong type."""


class DataError(CompressorError):
    """Calibration or evaluation data does not match the model's inputs."""

    exit_code = EXIT_BAD_INPUT


class UnsupportedByTarget(CompressorError):
    """The model uses something the target cannot run.

    Attributes:
        offenders: ``(node name, reason)`` pairs, one per offending node.
    """

    exit_code = EXIT_UNSUPPORTED

    def __init__(self, target: str, offenders: list[tuple[str, str]]):
        self.target = target
        self.offenders = list(offenders)
        shown = "; ".join(f"{node}: {why}" for node, why in self.offenders[:5])
        more = f" (+{len(self.offenders) - 5} more)" if len(self.offenders) > 5 else ""
        super().__init__(
            f"target {target!r} cannot run this model: {shown}{more}"
        )


class UnsupportedModel(CompressorError):
    """The model uses something compressor cannot bring to any target (e.g. an op ONNX's
    version converter cannot upgrade).

    Attributes:
        offenders: ``(node name, reason)`` pairs, one per offending node.
    """

    exit_code = EXIT_UNSUPPORTED

    def __init__(self, what: str, offenders: list[tuple[str, str]]):
        self.offenders = list(offenders)
        shown = "; ".join(f"{node}: {why}" for node, why in self.offenders[:5])
        more = f" (+{len(self.offenders) - 5} more)" if len(self.offenders) > 5 else ""
        super().__init__(f"{what}: {shown}{more}")


class InvalidModel(CompressorError):
    """The model cannot be compressed as the recipe asks (bad input): it is quantized
    already, or a weight to quantize holds NaN/inf."""

    exit_code = EXIT_BAD_INPUT


class AccuracyGateFailed(CompressorError):
    """The accuracy drop stayed above the budget (the artifact is still written)."""

    exit_code = EXIT_GATE_FAILED


class PipelineError(CompressorError):
    """A pass failed; names the pass and the passes that ran before it.

    Keeps the exit code of the underlying error when it is a :class:`CompressorError`
    (a pass that finds the model unsupported still exits 4), else exits 1.
    """

    def __init__(self, pass_name: str, done: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.done = list(done)
        self.cause = cause
        if isinstance(cause, CompressorError):
            self.exit_code = cause.exit_code
        before = ", ".join(done) if done else "none"
        super().__init__(f"pass {pass_name!r} failed ({type(cause).__name__}: {cause}); passes already run: {before}")


def first_line(err: BaseException) -> str:
    """The first line of a backend error, without ONNX Runtime's status prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split("] : ", 1)[-1] if text.startswith("[ONNXRuntimeError]") else text
    text = text.removeprefix("1 : FAIL : ")
    return text if len(text) <= 300 else text[:297] + "..."
