"""Where work that fans out runs: in this process (the default) or as Ray tasks.

Sweep levels, accuracy-control candidates and search candidates are each a pure function
``fn(item, shared) -> result`` mapped over a list of items. ``shared`` holds what every
item needs and what is large (model bytes, datasets, baseline outputs); ``item`` is small
(a level, a set of layer names). The callers never know where the work ran:

* :class:`InProcessExecutor` calls ``fn`` item by item, in order, in this process.
* :class:`RayExecutor` puts each value of ``shared`` in Ray's object store once
  (``ray.put``), submits one task per item that takes those object refs, and returns the
  results in the order of the items (``ray.get``). A task whose worker process dies
  (killed, out of memory, its node lost) is run again by Ray itself (``max_retries``);
  every retried task is logged and listed in :attr:`Executor.retried`. An exception the
  task raises is not retried: it is re-raised here as the task raised it, as soon as it
  happens (the tasks still pending are cancelled), so an error a user can act on keeps its
  exit code.

A map may be given ``stop``, asked before each item starts (a wall-clock budget, say):
once it answers true no further item starts and the results of the items started so far,
a prefix of the items in their order, are returned. In process it is asked before each
call; on Ray it is asked before each submission, and tasks are then submitted a cluster's
worth of CPUs at a time so that there is something left not to submit (a task already
running finishes).

``fn`` must be a module-level function (Ray pickles it by reference: every worker needs the
``compressor`` package installed) and deterministic given its inputs: seeds travel in
``shared`` or ``item``, so both executors give the same results.

Ray is an optional extra (``pip install 'compressor[ray]'``); asking for it without the
package is a :class:`~compressor.errors.UsageError` (exit 2). Which executor a command uses:
:func:`make_executor` (``--ray [ADDRESS]``).
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from compressor.errors import CompressorError, UsageError

__all__ = ["Executor", "InProcessExecutor", "RayExecutor", "ExecutorError", "make_executor", "RAY_INSTALL",
           "usable_cpus"]

logger = logging.getLogger(__name__)

#: What to run when ``--ray`` is asked for without the package.
RAY_INSTALL = "pip install 'compressor[ray]'"

TaskFn = Callable[[Any, Mapping[str, Any]], Any]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS says, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ExecutorError(CompressorError):
    """A task could not be completed by the executor (its worker kept dying): exit 1."""


class Executor(abc.ABC):
    """Maps a function over items, in process or elsewhere; a context manager.

    Attributes:
        name: ``in-process`` or ``ray``.
        retried: ``(index, label, attempts)`` of each task that had to be run again.
    """

    name: str = ""

    def __init__(self) -> None:
        self.retried: list[tuple[int, str, int]] = []

    @abc.abstractmethod
    def map(self, fn: TaskFn, items: Sequence[Any], *, shared: Mapping[str, Any] | None = None,
            labels: Sequence[str] | None = None, progress: Callable[[int], Any] | None = None,
            stop: Callable[[], bool] | None = None) -> list[Any]:
        """``[fn(item, shared) for item in items]``, wherever the executor runs them.

        Args:
            fn: A module-level function of ``(item, shared)``.
            items: One task each.
            shared: Inputs every task reads (large ones: sent once).
            labels: A name per item for messages (default: its index).
            progress: Called with ``1`` as each task completes.
            stop: Asked before each item starts; once it answers true no more start, and
                only the results of the items started (a prefix of ``items``) are returned.
        """

    def close(self) -> None:
        """Release what the executor started (nothing, in process)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class InProcessExecutor(Executor):
    """Runs every item here, one after the other (today's behaviour)."""

    name = "in-process"

    def map(self, fn: TaskFn, items: Sequence[Any], *, shared: Mapping[str, Any] | None = None,
            labels: Sequence[str] | None = None, progress: Callable[[int], Any] | None = None,
            stop: Callable[[], bool] | None = None) -> list[Any]:
        shared = dict(shared or {})
        results = []
        for item in items:
            if stop is not None and stop():
                break
            results.append(fn(item, shared))
            if progress:
                progress(1)
        return results


def _run_task(fn: TaskFn, index: int, item: Any, keys: list[str], attempts: Any, *values: Any) -> Any:
    """The body of every Ray task: count the attempt, then ``fn(item, shared)``.

    Ray resolves object refs passed as top-level arguments, so ``shared``'s values arrive
    as ``values`` (in the order of ``keys``) and are read from the object store, not re-sent.
    """
    import ray

    ray.get(attempts.start.remote(index))  # recorded before the work: a death after it counts
    return fn(item, dict(zip(keys, values)))


class _Attempts:
    """Ray actor: how many times each task of one ``map`` started (a retry starts it again)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def start(self, index: int) -> None:
        self.counts[index] = self.counts.get(index, 0) + 1

    def get(self) -> dict[int, int]:
        return dict(self.counts)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


class RayExecutor(Executor):
    """Runs each item as a Ray task (see the module docstring).

    Args:
        address: ``local`` starts a Ray instance on this machine for this run (shut down by
            :meth:`close`); anything else is handed to ``ray.init(address=...)`` (``auto``,
            ``HOST:PORT`` of a running cluster's head, ``ray://HOST:10001``). When Ray is
            already initialized in this process, that session is used as it is.
        num_cpus: CPUs of a ``local`` instance (default: the CPUs this process may use).
        max_retries: How many times Ray re-runs a task whose worker died.
        task_cpus: CPUs each task reserves (bounds how many run at once on a node).

    Raises:
        UsageError: Ray is not installed (here), or the cluster cannot be reached (at the
            first :meth:`map`).
    """

    name = "ray"

    def __init__(self, address: str = "local", *, num_cpus: int | None = None, max_retries: int = 3,
                 task_cpus: float = 1) -> None:
        super().__init__()
        self.ray = _import_ray()
        self.address = address
        self.max_retries = max_retries
        self.task_cpus = task_cpus
        self.num_cpus = num_cpus
        self._owned = False
        self._connected = False

    def _connect(self) -> None:
        """Initialize Ray at the first :meth:`map` (bad input fails first, without waiting for it)."""
        if self._connected:
            return
        self._connected = True
        if self.ray.is_initialized():
            logger.info("ray: using the Ray session already initialized in this process")
            return
        try:
            if self.address == "local":
                cpus = self.num_cpus or usable_cpus()
                self.ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                              log_to_driver=False)
            else:
                self.ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UsageError(f"--ray {self.address}: cannot connect to a Ray cluster there "
                             f"({str(err).splitlines()[0]}); give the head's HOST:PORT, 'auto' on a cluster node, "
                             "or 'local'") from None
        self._owned = True
        logger.info("ray: %s, %g CPUs in the cluster", "local instance" if self.address == "local" else self.address,
                    self.ray.cluster_resources().get("CPU", 0))

    def map(self, fn: TaskFn, items: Sequence[Any], *, shared: Mapping[str, Any] | None = None,
            labels: Sequence[str] | None = None, progress: Callable[[int], Any] | None = None,
            stop: Callable[[], bool] | None = None) -> list[Any]:
        ray = self.ray
        if not items:
            return []
        self._connect()
        labels = list(labels) if labels is not None else [str(i) for i in range(len(items))]
        keys = list(shared or {})
        refs = [ray.put(shared[k]) for k in keys]  # once, whatever the number of tasks
        attempts = ray.remote(num_cpus=0)(_Attempts).remote()
        task = ray.remote(_run_task).options(num_cpus=self.task_cpus, max_retries=self.max_retries,
                                             retry_exceptions=False)
        # Without ``stop`` every task is submitted at once; with it, a cluster's worth at a time,
        # each submission asked first (module docstring).
        window = len(items) if stop is None else max(1, int(ray.cluster_resources().get("CPU", 1) // self.task_cpus))
        futures: list[Any] = []
        pending: list[Any] = []
        stopped = False

        def submit() -> None:
            nonlocal stopped
            while not stopped and len(futures) < len(items) and len(pending) < window:
                if stop is not None and stop():
                    stopped = True
                    logger.info("ray: stopped submitting after %d of %d tasks", len(futures), len(items))
                    return
                index = len(futures)
                futures.append(task.remote(fn, index, items[index], keys, attempts, *refs))
                pending.append(futures[-1])

        finished: dict[Any, Any] = {}
        try:
            submit()
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:  # a task's error surfaces as soon as it happens, not after the rest
                    finished[ref] = ray.get(ref)
                if progress:
                    progress(len(done))
                submit()
            results = [finished[ref] for ref in futures]
        except ray.exceptions.RayTaskError as err:
            for ref in pending:  # the run fails: the other tasks' work is wasted
                ray.cancel(ref)
            cause = getattr(err, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None  # the task's own error, with its exit code
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError) as err:
            raise ExecutorError(f"ray: a task's worker died {self.max_retries + 1} times; giving up "
                                f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
        finally:
            counts = self._counts(attempts)
            ray.kill(attempts)
        for index, count in sorted(counts.items()):
            if count > 1:
                self.retried.append((index, labels[index], count))
                logger.warning("ray: task %d of %d (%s) was retried: its worker died, it ran %d times", index + 1,
                               len(items), labels[index], count)
        return results

    def _counts(self, attempts: Any) -> dict[int, int]:
        try:
            return self.ray.get(attempts.get.remote(), timeout=30)
        except Exception as err:  # the actor's own process died: the results stand, the count is lost
            logger.warning("ray: cannot tell which tasks were retried (%s)", type(err).__name__)
            return {}

    def close(self) -> None:
        if self._owned and self.ray.is_initialized():
            self.ray.shutdown()
        self._owned = False


def make_executor(ray: str | None) -> Executor:
    """The executor ``--ray`` asks for.

    Args:
        ray: ``None`` (no ``--ray``): in process. ``""`` (``--ray`` without a value): the
            ``RAY_ADDRESS`` environment variable if set, else ``local``. Otherwise an address
            as :class:`RayExecutor` takes it.

    Raises:
        UsageError: Ray is asked for and not installed, or not reachable.
    """
    if ray is None:
        return InProcessExecutor()
    address = ray or os.environ.get("RAY_ADDRESS") or "local"
    return RayExecutor(address)
