"""The Ray half of ``tests/test_executor.py``, run by it inside ``unshare -n`` (loopback only).

    python tests/ray_session.py OUTDIR MODEL.onnx EVAL.npz CALIB.npz COSINE_EVAL.npz

One local Ray instance (2 CPUs) serves every check, because starting one takes many
seconds; the results go to ``OUTDIR/result.json`` for the tests to judge:

* a sweep through :class:`RayExecutor` (``OUTDIR/ray/sweep.csv``), with the ``ray.put``
  calls counted;
* the same sweep with the task of level index 1 killing its own worker (SIGKILL) on the
  first attempt (``OUTDIR/crash/sweep.csv``, the retries the executor reported);
* an error a task raises (``UsageError``) coming back as that error, at once (the other
  task, which would sleep two minutes, is cancelled);
* ``int8`` with ``--max-drop 0`` on cosine fidelity: accuracy control's ranking on Ray;
* the ``onnx`` and ``openvino`` targets built for ``--target-cpu avx2``, sent to a task: what
  the worker's copies say (their deployment CPU and weight grid);
* ``compress search`` on a small grid (``OUTDIR/search/search.json``), and again with a
  wall-clock budget read from a clock that ticks a minute per read
  (``OUTDIR/search-budget/search.json``: which candidates ran, as in process), and once
  more on cosine fidelity at ``max_drop`` 0, where the candidate task gives layers back
  (``OUTDIR/search-control/search.json``).

``COMPRESSOR_CACHE`` is set to ``OUTDIR/cache`` before Ray starts, so its workers, which
inherit the driver's environment then, rank into a fresh cache too.

Never run it outside a network namespace of its own: Ray listens on every interface.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LEVELS = "0.2,0.5,0.8"
GRID = {"calibrator": ["minmax", "percentile"], "sparsity": [0, 0.5]}
CONTROL_GRID = {"calibrator": ["minmax"], "sparsity": [0]}
BUDGET_MINUTES = 3.5  # read at 0, 60 and 120 s (two prefixes), 180 s (candidate 0 starts), 240 s (spent)


def ticking_clock(seconds: float = 60.0) -> Any:
    """A clock that advances ``seconds`` each time it is read (the search reads it before each task)."""
    now = [-seconds]

    def clock() -> float:
        now[0] += seconds
        return now[0]
    return clock
CRASH_INDEX = 1


class CrashOnce:
    """Wraps a task: the item with index ``index`` kills its worker the first time it runs."""

    def __init__(self, fn: Any, marker: Path, index: int) -> None:
        self.fn, self.marker, self.index = fn, marker, index

    def __call__(self, item: Any, shared: Mapping[str, Any]) -> Any:
        if item[0] == self.index and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would
        return self.fn(item, shared)


def raise_usage(item: Any, shared: Mapping[str, Any]) -> None:
    """Item 7 fails at once; any other sleeps long (it is cancelled when 7 fails)."""
    import time

    from compressor.errors import UsageError

    if item != 7:
        time.sleep(120)
    raise UsageError(f"bad item {item}")


def target_in_worker(item: Any, shared: Mapping[str, Any]) -> dict[str, Any]:
    """The deployment CPU and weight bits of the target ``shared[item]``, as the worker's copy has them."""
    target = shared[item]
    return {"deployment_cpu": target.describe()["deployment_cpu"],
            "bits": {op: q.weights.bits for op, q in target.capabilities.quantizable.items() if q.weights is not None}}


def main(out: Path, model: str, eval_data: str, calib: str, cosine_eval: str) -> None:
    import ray

    from compressor.errors import UsageError
    from compressor.executor import RayExecutor
    from compressor.flow.compress import compress
    from compressor.flow.search import search
    from compressor.flow.sweep import sweep

    os.environ["COMPRESSOR_CACHE"] = str(out / "cache")  # ranked here, on Ray, not read from a cache
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    result: dict[str, Any] = {"node_ip": ray.util.get_node_ip_address()}
    try:
        if result["node_ip"] != "127.0.0.1":
            raise SystemExit(f"Ray reports node IP {result['node_ip']}: not in a loopback-only namespace")
        executor = RayExecutor()  # takes the session initialized above
        puts = []
        real_put = ray.put
        ray.put = lambda value, **kw: (puts.append(type(value).__name__), real_put(value, **kw))[1]
        try:
            sweep(model, pass_name="prune-magnitude", levels=LEVELS, eval_data=eval_data, outdir=out / "ray",
                  latency_runs=0, executor=executor)
        finally:
            ray.put = real_put
        result["puts"] = puts

        class Crashing(RayExecutor):
            def map(self, fn, items, **kw):  # type: ignore[no-untyped-def]
                return super().map(CrashOnce(fn, out / "crashed", CRASH_INDEX), items, **kw)

        crashing = Crashing()
        sweep(model, pass_name="prune-magnitude", levels=LEVELS, eval_data=eval_data, outdir=out / "crash",
              latency_runs=0, executor=crashing)
        result["killed_pid"] = int((out / "crashed").read_text())
        result["retried"] = crashing.retried

        started = time.perf_counter()
        try:
            executor.map(raise_usage, [7, 8])
        except UsageError as err:
            result["task_error"] = [type(err).__name__, str(err)]
        result["task_error_seconds"] = time.perf_counter() - started

        from compressor.targets import get_target

        result["target_in_worker"] = executor.map(target_in_worker, ["onnx", "openvino"], shared={
            name: get_target(name, "avx2") for name in ("onnx", "openvino")})

        control = compress(model, recipe="int8", outdir=out / "int8", calib=calib, eval_data=cosine_eval,
                           max_drop=0.0, latency_runs=1, executor=executor)
        result["ranking"] = control.manifest["accuracy_control"]["ranking"]
        result["ranking_cached"] = control.manifest["accuracy_control"]["ranking_cached"]
        result["given_back"] = control.manifest["accuracy_control"]["layers"]

        search(model, calib=calib, eval_data=eval_data, max_drop=0.01, outdir=out / "search", grid=GRID,
               latency_runs=1, executor=executor)
        search(model, calib=calib, eval_data=eval_data, max_drop=0.01, outdir=out / "search-budget", grid=GRID,
               latency_runs=1, executor=executor, budget_minutes=BUDGET_MINUTES, clock=ticking_clock())
        search(model, calib=calib, eval_data=cosine_eval, max_drop=0.0, outdir=out / "search-control",
               grid=CONTROL_GRID, latency_runs=1, executor=executor)
    finally:
        (out / "result.json").write_text(json.dumps(result))
        ray.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:6])
