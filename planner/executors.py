"""Run evaluations: in this process, in one reusable child process, or as Ray tasks.

Every executor reads finished evaluations from the store instead of recomputing them, writes each
new result the moment it finishes (a SIGKILL loses at most the evaluation in flight), and turns an
exception, a dead child, a timeout or a non-finite loss into a ``failed`` result so the search goes on.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal

from planner.fidelity.contract import EvalKey, EvalResult, EvalTask, one_line, timeout_scale
from planner.fidelity.quantized import directory_in_use
from planner.fidelity.sft import run_fidelity
from planner.fidelity.worker import call_one, serve
from planner.store import Store
from qra_plugin.errors import QRAError

Evaluate = Callable[[EvalTask], EvalResult]
OnResult = Callable[[EvalTask, EvalResult, bool], None]  # (task, result, came_from_store)


def checked(result: EvalResult) -> EvalResult:
    """An ``ok`` result must carry a finite eval loss; anything else is a failure with a reason."""
    if result.status == "ok" and (result.eval_loss is None or not math.isfinite(result.eval_loss)):
        return result.model_copy(update={"status": "failed", "eval_loss": None, "error": "non-finite eval loss"})
    return result


class _StoreBacked:
    """Shared bookkeeping: skip finished keys, deduplicate, record each result as soon as it exists."""

    def __init__(self, store: Store, evaluate: Evaluate, timeout_s: float, on_result: OnResult | None) -> None:
        self.store = store
        self.evaluate = evaluate
        self.timeout_s = float(timeout_s)
        self.on_result = on_result
        self._results: dict[EvalKey, EvalResult] = {}

    def timeout_for(self, task: EvalTask) -> float:
        """``timeout_s`` is sized for a high-fidelity run; a longer level (confirm) gets it scaled by its steps."""
        return self.timeout_s * timeout_scale(task.config, task.level)

    def run(self, tasks: Sequence[EvalTask]) -> list[EvalResult]:
        """Results in the order of ``tasks``; finished keys come from the store, never recomputed."""
        self._results = {}
        pending: list[EvalTask] = []
        pending_keys: set[EvalKey] = set()
        for task in tasks:
            key = task.key
            if key in self._results or key in pending_keys:
                continue
            cached = self.store.get(key)
            if cached is not None:
                self._results[key] = cached
                if self.on_result:
                    self.on_result(task, cached, True)
            else:
                pending.append(task)
                pending_keys.add(key)
        if pending:
            self._run_pending(pending)
        return [self._results[t.key] for t in tasks]

    def _finish(self, task: EvalTask, result: EvalResult) -> None:
        result = checked(result)
        self.store.put(task, result)
        self._results[task.key] = result
        if self.on_result:
            self.on_result(task, result, False)

    def _from_reply(self, reply: tuple[str, Any], wall_s: float) -> EvalResult:
        status, payload = reply
        if status == "ok":
            return payload
        return EvalResult.failed(str(payload), wall_s=wall_s)

    def _run_pending(self, tasks: list[EvalTask]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers; the executor can still be used afterwards (they restart on demand)."""

    def __enter__(self) -> _StoreBacked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessExecutor(_StoreBacked):
    """Evaluations in this process, one by one (tests, debugging). No timeout and no crash isolation."""

    def __init__(self, *args: Any, layer_cache: Path | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.layer_cache = layer_cache

    def _run_pending(self, tasks: list[EvalTask]) -> None:

        for task in tasks:
            self.store.mark_running(task)
            start = time.perf_counter()
            with directory_in_use(self.layer_cache):
                reply = call_one(self.evaluate, task)
            self._finish(task, self._from_reply(reply, time.perf_counter() - start))


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"evaluation worker was killed by {name}{hint}"
    return f"evaluation worker died with exit code {exitcode}"


class _ChildWorker:
    """One spawned child serving evaluations over a pipe, restarted after a crash or a timeout."""

    def __init__(self, layer_cache: Path | None = None) -> None:
        self.layer_cache = layer_cache
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None

    def call(self, evaluate: Evaluate, task: EvalTask, timeout_s: float) -> tuple[str, Any]:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send((evaluate, task))
        except (AttributeError, TypeError, ValueError) as exc:  # not picklable: the caller's bug, recorded
            return "error", one_line(f"cannot send the evaluation to the worker: {exc}")
        except (BrokenPipeError, OSError):
            return "error", self._dead()
        if not self._conn.poll(timeout_s):
            self.stop(kill=True)
            return "error", f"timed out after {timeout_s:g} s"
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            return "error", self._dead()

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=serve, args=(child, self.layer_cache), name="qra-fidelity-worker", daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent

    def _dead(self) -> str:
        self._proc.join(timeout=10)
        reason = _death_reason(self._proc.exitcode)
        self.stop(kill=True)
        return reason

    def stop(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        if kill:
            self._proc.kill()
        else:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)
        self._conn.close()
        self._proc = self._conn = None


class SubprocessExecutor(_StoreBacked):
    """Evaluations in long-lived spawned children: imports and cached weights are paid once per child,
    and a crash, OOM kill or hang in a candidate ends only its child (recreated for the next one).

    ``workers`` > 1 runs that many children side by side (one GPU shared by several small evaluations,
    or several CPU evaluations of a batch); results are stored from this thread as each one finishes.
    """

    def __init__(self, *args: Any, workers: int = 1, layer_cache: Path | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._workers = [_ChildWorker(layer_cache) for _ in range(max(1, int(workers)))]

    def _run_pending(self, tasks: list[EvalTask]) -> None:
        if len(self._workers) == 1 or len(tasks) == 1:
            for task in tasks:
                task = self._alone(task)
                self.store.mark_running(task)
                start = time.perf_counter()
                reply = self._workers[0].call(self.evaluate, task, self.timeout_for(task))
                self._finish(task, self._from_reply(reply, time.perf_counter() - start))
            return

        idle = list(self._workers)
        queue = list(tasks)
        with ThreadPoolExecutor(max_workers=len(self._workers), thread_name_prefix="qra-eval") as pool:
            inflight: dict[Any, tuple[EvalTask, _ChildWorker, float]] = {}
            while queue or inflight:
                while queue and idle:
                    task, worker = queue.pop(0), idle.pop(0)
                    self.store.mark_running(task)
                    future = pool.submit(worker.call, self.evaluate, task, self.timeout_for(task))
                    inflight[future] = (task, worker, time.perf_counter())
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for future in done:
                    task, worker, start = inflight.pop(future)
                    idle.append(worker)
                    self._finish(task, self._from_reply(future.result(), time.perf_counter() - start))

    @property
    def slots(self) -> int:
        """How many evaluations run side by side."""
        return len(self._workers)

    def _alone(self, task: EvalTask) -> EvalTask:
        """A run with the other workers idle takes their threads too (``fidelity.torch_threads`` × workers):
        on CPU several single-thread runs side by side beat one multi-thread run, a lone one does not. Thread
        counts are not in the recipe, so its result is stored under the same key."""
        threads = task.config.fidelity.torch_threads
        if len(self._workers) == 1 or not threads:
            return task
        fidelity = task.config.fidelity.model_copy(update={"torch_threads": threads * len(self._workers)})
        return task.model_copy(update={"config": task.config.model_copy(update={"fidelity": fidelity})})

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()


class RayExecutor(_StoreBacked):
    """Each evaluation a Ray task with one CPU and its GPU share, against a local or a cluster Ray.

    At most as many tasks are in flight as the cluster can run at once, so ``timeout_s`` (counted
    from submission) measures running time. Cluster workers must have qra installed.
    """

    def __init__(self, *args: Any, address: str | None = None, gpus_per_eval: float = 0.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.address = address
        self.gpus_per_eval = float(gpus_per_eval)

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise QRAError("the ray executor needs Ray: pip install 'qra[ray]'") from None
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(include_dashboard=False, log_to_driver=False)
            except ConnectionError as exc:
                raise QRAError(f"cannot connect to Ray at {self.address or 'a local instance'}: {exc}") from None
        return ray

    def _slots(self, ray: Any) -> int:
        resources = ray.cluster_resources()
        slots = max(1, int(resources.get("CPU", 1)))
        if self.gpus_per_eval > 0:
            gpus = float(resources.get("GPU", 0))
            if gpus < self.gpus_per_eval:
                raise QRAError(f"Ray cluster has {gpus:g} GPUs, each evaluation asks for {self.gpus_per_eval:g}")
            slots = min(slots, int(gpus / self.gpus_per_eval))
        return slots

    def _run_pending(self, tasks: list[EvalTask]) -> None:
        ray = self._ray()
        remote = ray.remote(num_cpus=1, num_gpus=self.gpus_per_eval, max_retries=0)(call_one)
        slots = self._slots(ray)
        queue = list(tasks)
        inflight: dict[Any, tuple[EvalTask, float]] = {}
        while queue or inflight:
            while queue and len(inflight) < slots:
                task = queue.pop(0)
                self.store.mark_running(task)
                inflight[remote.remote(self.evaluate, task)] = (task, time.perf_counter())
            now = time.perf_counter()
            wait_s = max(0.05, min(start + self.timeout_for(task) - now for task, start in inflight.values()))
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait_s)
            for ref in ready:
                task, start = inflight.pop(ref)
                try:
                    reply = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a dead worker or task error is a failed candidate
                    reply = ("error", one_line(f"ray task failed: {type(exc).__name__}: {exc}"))
                self._finish(task, self._from_reply(reply, time.perf_counter() - start))
            now = time.perf_counter()
            for ref, (task, start) in list(inflight.items()):
                if now - start > (limit := self.timeout_for(task)):
                    ray.cancel(ref, force=True)
                    del inflight[ref]
                    self._finish(task, EvalResult.failed(f"timed out after {limit:g} s", now - start))


def make_executor(
    kind: Literal["local", "ray"],
    *,
    subprocess: bool,
    store: Store,
    evaluate: Evaluate = run_fidelity,
    ray_address: str | None = None,
    gpus_per_eval: float = 0.0,
    timeout_s: float = 3600.0,
    on_result: OnResult | None = None,
    workers: int = 1,
    layer_cache: Path | None = None,
) -> _StoreBacked:
    """The executor a config asks for. ``evaluate`` must be a picklable top-level function for the
    subprocess and ray paths; ``workers``: parallel children of the local subprocess executor;
    ``on_result(task, result, from_store)`` is called for every result; ``layer_cache``: the directory the
    local executors' evaluations share quantized layers through (Ray workers keep theirs in memory)."""
    if kind == "local":
        if subprocess:
            return SubprocessExecutor(store, evaluate, timeout_s, on_result, workers=workers, layer_cache=layer_cache)
        if workers > 1:
            raise QRAError("fidelity.workers > 1 needs fidelity.subprocess: true")
        return InProcessExecutor(store, evaluate, timeout_s, on_result, layer_cache=layer_cache)
    if kind == "ray":
        return RayExecutor(store, evaluate, timeout_s, on_result, address=ray_address, gpus_per_eval=gpus_per_eval)
    raise QRAError(f"unknown executor {kind!r}: use 'local' or 'ray'")
