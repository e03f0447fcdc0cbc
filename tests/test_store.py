"""The SQLite store: records, resume after reopening, and survival of a SIGKILL mid-write."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from planner.config import QRAConfig
from planner.fidelity.contract import EvalResult, EvalTask
from planner.loading import load_meta_model
from planner.store import Store
from qra_plugin import Plan

CFG = QRAConfig.model_validate({"model": {"tiny": {"layers": 2, "hidden": 32, "vocab_size": 128}}})


@pytest.fixture(scope="module")
def plans() -> list[Plan]:
    meta = load_meta_model(CFG.model)
    return [Plan.uniform(meta, bits=b, rank=r) for b, r in [(2, 4), (4, 8), (8, 16)]]


def make_task(plan: Plan, level: str = "low", seed: int = 0, tag: str = "stage1") -> EvalTask:
    return EvalTask(plan=plan, level=level, seed=seed, config=CFG, tag=tag, memory_predicted=12345)


def ok_result(loss: float) -> EvalResult:
    return EvalResult(status="ok", eval_loss=loss, train_loss=loss + 0.1, memory_measured=999, wall_s=1.5, steps=4)


def test_put_get_records_and_reopen(tmp_path, plans):
    path = tmp_path / "store.sqlite"
    with Store(path) as store:
        t0, t1 = make_task(plans[0]), make_task(plans[1], level="high", seed=3)
        assert store.get(t0) is None
        store.mark_running(t0)
        assert store.get(t0.key) is None and [r["plan_hash"] for r in store.running()] == [t0.key[0]]
        store.put(t0, ok_result(2.5))
        store.put(t1, EvalResult.failed("RuntimeError: the plan is broken", wall_s=0.2))
        assert store.running() == []
    with Store(path) as store:  # a new process / run sees everything
        assert store.get(make_task(plans[0]).key) == ok_result(2.5)
        failed = store.get(make_task(plans[1], level="high", seed=3))
        assert failed.status == "failed" and failed.error == "RuntimeError: the plan is broken"
        assert store.get(make_task(plans[1], level="low", seed=3)) is None  # level is part of the key
        records = store.records()
        assert [(r["level"], r["seed"], r["status"]) for r in records] == [("low", 0, "ok"), ("high", 3, "failed")]
        first = records[0]
        assert first["tag"] == "stage1" and first["memory_predicted"] == 12345 and first["memory_measured"] == 999
        assert first["eval_loss"] == 2.5 and first["attempts"] == 1
        assert first["finished_at"] >= first["started_at"] >= first["created_at"] - 2.0
        assert Plan.model_validate(first["plan"]).content_hash() == first["plan_hash"]
        assert len(store) == 2
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_rerunning_a_started_evaluation_counts_attempts(tmp_path, plans):
    with Store(tmp_path / "s.sqlite") as store:
        t = make_task(plans[2])
        store.mark_running(t)
        store.mark_running(t)  # resumed after a kill
        store.put(t, ok_result(3.0))
        store.mark_running(t)  # a finished row is never turned back into running
        (row,) = store.records()
        assert row["attempts"] == 2 and row["status"] == "ok"


def test_survives_sigkill_between_writes(tmp_path, plans):
    """A process killed with SIGKILL right after finishing one evaluation and starting the next."""
    path = tmp_path / "killed.sqlite"
    script = textwrap.dedent(
        f"""
        import os, signal
        from planner.store import Store
        from planner.fidelity.contract import EvalResult, EvalTask
        tasks = [EvalTask.model_validate_json(line) for line in open({str(tmp_path / "tasks.jsonl")!r})]
        store = Store({str(path)!r})
        store.mark_running(tasks[0])
        store.put(tasks[0], EvalResult(status="ok", eval_loss=1.25, wall_s=0.1, steps=2))
        store.mark_running(tasks[1])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    tasks = [make_task(plans[0]), make_task(plans[1])]
    (tmp_path / "tasks.jsonl").write_text("\n".join(t.model_dump_json() for t in tasks) + "\n")
    proc = subprocess.run([sys.executable, "-c", script], env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    with Store(path) as store:
        assert store.get(tasks[0]).eval_loss == 1.25
        assert store.get(tasks[1]) is None
        assert [r["plan_hash"] for r in store.running()] == [tasks[1].key[0]]
        store.put(tasks[1], ok_result(2.0))  # the resumed run finishes it
        assert store.running() == [] and [r["status"] for r in store.records()] == ["ok", "ok"]
