"""Executors on real tiny SFT fidelities: store reuse, resume after SIGKILL, failures recorded, Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planner.config import QRAConfig
from planner.executors import make_executor
from planner.fidelity.contract import EvalResult, EvalTask
from planner.fidelity.sft import run_fidelity
from planner.loading import load_meta_model
from planner.store import Store
from qra_plugin import Plan

CFG = QRAConfig.model_validate(
    {
        "name": "tiny-executors",
        "model": {"tiny": {"layers": 2, "hidden": 64, "vocab_size": 512}},
        "data": {"train_examples": 16},
        "train": {"batch": 4, "seq_len": 64, "lr": 5e-3},
        "fidelity": {"low": {"steps": 2, "eval_examples": 8}, "torch_threads": 1},
    }
)
BAD_BITS = 3  # the injected evaluates below misbehave only for the uniform 3-bit plan
evaluated: list[tuple] = []


def make_tasks(*bits: int, seed: int = 0) -> list[EvalTask]:
    meta = load_meta_model(CFG.model)
    return [
        EvalTask(plan=Plan.uniform(meta, bits=b, rank=4), level="low", seed=seed, config=CFG, tag="t") for b in bits
    ]


def _is_bad(task: EvalTask) -> bool:
    return {m.bits for m in task.plan.modules.values()} == {BAD_BITS}


def counting_evaluate(task: EvalTask) -> EvalResult:
    evaluated.append(task.key)
    return run_fidelity(task)


def raising_evaluate(task: EvalTask) -> EvalResult:
    if _is_bad(task):
        raise RuntimeError("injected failure for the 3-bit plan")
    return run_fidelity(task)


def misbehaving_evaluate(task: EvalTask) -> EvalResult:
    """Raises for 3-bit, kills its process for 2-bit, hangs for 16-bit plans; real fidelity otherwise."""
    bits = {m.bits for m in task.plan.modules.values()}
    if bits == {3}:
        raise RuntimeError("injected failure for the 3-bit plan")
    if bits == {2}:
        os._exit(3)  # the child dies without a word, like a segfault or an OOM kill
    if bits == {16}:
        time.sleep(600)
    return run_fidelity(task)


def killing_evaluate(task: EvalTask) -> EvalResult:
    """Used by the resume test's driver process: the whole search process is SIGKILLed mid-evaluation."""
    if _is_bad(task):
        os.kill(os.getpid(), signal.SIGKILL)
    return run_fidelity(task)


def test_in_process_reuses_store_and_records_failures(tmp_path):
    evaluated.clear()
    tasks = make_tasks(4, BAD_BITS, 8)
    seen: list[tuple[str, bool]] = []
    with Store(tmp_path / "store.sqlite") as store:
        ex = make_executor(
            "local",
            subprocess=False,
            store=store,
            evaluate=raising_evaluate,
            on_result=lambda t, r, c: seen.append((r.status, c)),
        )
        results = ex.run(tasks + tasks[:1])  # a duplicate key is evaluated once
        assert [r.status for r in results] == ["ok", "failed", "ok", "ok"]
        assert results[3] == results[0]
        assert "injected failure for the 3-bit plan" in results[1].error and "RuntimeError" in results[1].error
        assert seen == [("ok", False), ("failed", False), ("ok", False)]
        rows = store.records()
        assert [r["status"] for r in rows] == ["ok", "failed", "ok"] and rows[1]["error"] == results[1].error

        again = make_executor("local", subprocess=False, store=store, evaluate=counting_evaluate)
        assert again.run(tasks) == results[:3]
        assert evaluated == []  # nothing finished is ever recomputed, failures included
        (new,) = again.run(make_tasks(4, seed=1))
        assert evaluated == [make_tasks(4, seed=1)[0].key] and new.status == "ok"


def test_subprocess_worker_survives_errors_crashes_and_timeouts(tmp_path):
    ok4, raise3, crash2, hang16, ok8 = make_tasks(4, 3, 2, 16, 8)
    with Store(tmp_path / "store.sqlite") as store:
        ex = make_executor("local", subprocess=True, store=store, evaluate=misbehaving_evaluate, timeout_s=300)
        with ex:
            first, raised = ex.run([ok4, raise3])
            pid = ex._workers[0]._proc.pid
            assert first.status == "ok" and first.steps == 2
            assert raised.status == "failed" and "RuntimeError: injected failure for the 3-bit plan" in raised.error
            assert ex._workers[0]._proc.pid == pid  # an exception does not cost the worker its warm caches

            ex.timeout_s = 8
            (hung,) = ex.run([hang16])
            assert hung.status == "failed" and hung.error == "timed out after 8 s"
            with pytest.raises(ProcessLookupError):  # the hung worker was killed, not left running
                os.kill(pid, 0)
            ex.timeout_s = 300

            (crashed,) = ex.run([crash2])  # runs in a fresh worker: the hung one was killed
            assert crashed.status == "failed" and crashed.error == "evaluation worker died with exit code 3"
            (fine,) = ex.run([ok8])  # and a fresh worker again after the crash
            assert fine.status == "ok"
        assert [r["status"] for r in store.records()] == ["ok", "failed", "failed", "failed", "ok"]
        assert [r["failure"] for r in store.records()] == [None, "deterministic", "transient", "transient", None]
        assert ex._workers[0]._proc is None  # closed

        # on resume the timeout and the dead worker are retried once; the plan that raised is not
        evaluated.clear()
        again = make_executor("local", subprocess=False, store=store, evaluate=counting_evaluate)
        statuses = [r.status for r in again.run([ok4, raise3, crash2, hang16, ok8])]
        assert statuses == ["ok", "failed", "ok", "ok", "ok"]
        assert sorted(evaluated) == sorted([crash2.key, hang16.key])
        evaluated.clear()
        again.run([ok4, raise3, crash2, hang16, ok8])
        assert evaluated == []

    # the worker computes the same score as an in-process run (one deterministic fidelity)
    assert fine.eval_loss == run_fidelity(ok8).eval_loss


def test_parallel_workers_run_a_batch_side_by_side_and_store_every_result(tmp_path):
    ok4, raise3, crash2, ok8 = make_tasks(4, 3, 2, 8)
    with Store(tmp_path / "store.sqlite") as store:
        ex = make_executor("local", subprocess=True, store=store, evaluate=misbehaving_evaluate, workers=2)
        with ex:
            results = ex.run([ok4, raise3, crash2, ok8, ok4])
            pids = {w._proc.pid for w in ex._workers if w._proc is not None}
        assert [r.status for r in results] == ["ok", "failed", "failed", "ok", "ok"]
        assert results[4] == results[0]  # duplicates still run once
        assert "injected failure" in results[1].error and "exit code 3" in results[2].error
        assert len(pids) == 2  # two children served the batch (one restarted after the crash)
        assert sorted(r["status"] for r in store.records()) == ["failed", "failed", "ok", "ok"]
    # side by side changes nothing about a score
    assert results[3].eval_loss == run_fidelity(ok8).eval_loss


def test_resume_after_sigkill_recomputes_only_the_evaluation_in_flight(tmp_path):
    store_path = tmp_path / "store.sqlite"
    tasks = make_tasks(4, 8, BAD_BITS, 2)
    tests_dir, store_file = str(Path(__file__).parent), str(store_path)
    driver = (
        f"import sys; sys.path.insert(0, {tests_dir!r}); import test_executors as t; "
        "from planner.store import Store; from planner.executors import make_executor; "
        f"make_executor('local', subprocess=False, store=Store({store_file!r}), evaluate=t.killing_evaluate)"
        ".run(t.make_tasks(4, 8, t.BAD_BITS, 2))"
    )
    proc = subprocess.run([sys.executable, "-c", driver], env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    with Store(store_path) as store:
        assert [r["status"] for r in store.records()] == ["ok", "ok", "running"]
        evaluated.clear()
        results = make_executor("local", subprocess=False, store=store, evaluate=counting_evaluate).run(tasks)
        assert evaluated == [tasks[2].key, tasks[3].key]  # the one in flight, then the one never started
        assert [r.status for r in results] == ["ok"] * 4
        assert [r["status"] for r in store.records()] == ["ok"] * 4
        assert store.records()[2]["attempts"] == 2


def test_unknown_executor_is_a_user_error(tmp_path):
    from qra_plugin.errors import QRAError

    with pytest.raises(QRAError, match="unknown executor"):
        make_executor("slurm", subprocess=True, store=Store(tmp_path / "s.sqlite"))


def test_ray_executor_runs_real_fidelities_on_local_ray(tmp_path):
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tasks = make_tasks(4, BAD_BITS)
        with Store(tmp_path / "store.sqlite") as store:
            ex = make_executor("ray", subprocess=True, store=store, evaluate=raising_evaluate, timeout_s=300)
            results = ex.run(tasks)
            assert [r.status for r in results] == ["ok", "failed"], [r.error for r in results]
            assert results[0].steps == 2 and results[0].eval_loss > 0
            assert "injected failure for the 3-bit plan" in results[1].error
            assert [r["status"] for r in store.records()] == ["ok", "failed"]
            assert ex.run(tasks) == results  # resumed from the store, nothing re-submitted
    finally:
        ray.shutdown()


def test_a_lone_run_on_parallel_workers_takes_the_idle_workers_threads_under_the_same_key(tmp_path):
    """Two 1-thread CPU workers side by side beat one 2-thread run, a lone run does not: it gets 2 threads."""
    (ok4,) = make_tasks(4)
    with Store(tmp_path / "store.sqlite") as store:
        ex = make_executor("local", subprocess=True, store=store, evaluate=counting_evaluate, workers=2)
        alone = ex._alone(ok4)
        assert (ok4.config.fidelity.torch_threads, alone.config.fidelity.torch_threads) == (1, 2)
        assert alone.key == ok4.key  # thread counts are not in the recipe
        with ex:
            (result,) = ex.run([ok4])
        assert result.status == "ok" and [r["status"] for r in store.records()] == ["ok"]
    one = make_executor("local", subprocess=True, store=Store(tmp_path / "one.sqlite"), evaluate=counting_evaluate)
    assert one._alone(ok4) is ok4  # a single worker keeps the configured threads


def test_a_confirm_run_gets_the_timeout_scaled_by_its_steps(tmp_path):
    """``fidelity.timeout_s`` is sized for a high-fidelity run: a 5x longer confirm run may take 5x as long."""
    cfg = CFG.model_copy(deep=True)
    cfg.fidelity.confirm = cfg.fidelity.high.model_copy(update={"steps": 5 * cfg.fidelity.high.steps})
    plan = make_tasks(4)[0].plan
    confirm, high = (EvalTask(plan=plan, level=lv, seed=0, config=cfg) for lv in ("confirm", "high"))
    with Store(tmp_path / "store.sqlite") as store:
        ex = make_executor("local", subprocess=False, store=store, evaluate=counting_evaluate, timeout_s=100)
        assert (ex.timeout_for(high), ex.timeout_for(confirm)) == (100.0, 500.0)
        assert ex.timeout_for(make_tasks(4)[0]) == 100.0  # low: the configured timeout
