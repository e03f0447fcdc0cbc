"""SQLite record of every evaluation, so a search resumes where it stopped and never pays twice.

One row per (plan hash, fidelity level, seed). WAL mode with autocommit: each finished evaluation
is durable the moment ``put`` returns, and a process killed with SIGKILL leaves a database that
reopens cleanly (its in-flight row stays ``running`` and is recomputed on the next run).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from planner.fidelity import EvalKey, EvalResult, EvalTask

FINISHED = ("ok", "failed", "stopped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plan_hash TEXT NOT NULL,
    level TEXT NOT NULL,
    seed INTEGER NOT NULL,
    tag TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    plan_json TEXT NOT NULL,
    eval_loss REAL,
    accuracy REAL,
    train_loss REAL,
    memory_predicted INTEGER,
    memory_measured INTEGER,
    weight_bytes INTEGER,
    steps INTEGER,
    wall_s REAL,
    error TEXT,
    result_json TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    UNIQUE (plan_hash, level, seed)
);
"""


def _key(key_or_task: EvalKey | EvalTask) -> EvalKey:
    if isinstance(key_or_task, EvalTask):
        return key_or_task.key
    plan_hash, level, seed = key_or_task
    return (str(plan_hash), str(level), int(seed))


class Store:
    """Every evaluation of a search: config (the plan), fidelity, seed, status, metrics, memory, timings."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against process crashes in WAL mode
        self._db.executescript(_SCHEMA)

    # ------------------------------------------------------------------ writes
    def mark_running(self, task: EvalTask) -> None:
        """Record that ``task`` started (a row left ``running`` after a kill is recomputed on resume)."""
        now = time.time()
        plan_hash, level, seed = task.key
        self._db.execute(
            """INSERT INTO evaluations (plan_hash, level, seed, tag, status, plan_json, memory_predicted,
                   attempts, created_at, started_at)
               VALUES (?, ?, ?, ?, 'running', ?, ?, 1, ?, ?)
               ON CONFLICT (plan_hash, level, seed) DO UPDATE SET
                   status = 'running', attempts = attempts + 1, started_at = excluded.started_at
               WHERE status = 'running'""",
            (plan_hash, level, seed, task.tag, task.plan.model_dump_json(), task.memory_predicted, now, now),
        )

    def put(self, task: EvalTask, result: EvalResult) -> None:
        """Record a finished evaluation (insert, or finish the row ``mark_running`` created)."""
        now = time.time()
        plan_hash, level, seed = task.key
        values = (
            result.status,
            result.eval_loss,
            result.accuracy,
            result.train_loss,
            result.memory_measured,
            result.weight_bytes,
            result.steps,
            result.wall_s,
            result.error,
            result.model_dump_json(),
            now,
        )
        self._db.execute(
            """INSERT INTO evaluations (plan_hash, level, seed, tag, status, plan_json, memory_predicted,
                   eval_loss, accuracy, train_loss, memory_measured, weight_bytes, steps, wall_s, error,
                   result_json, finished_at, attempts, created_at, started_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)
               ON CONFLICT (plan_hash, level, seed) DO UPDATE SET
                   status = excluded.status, eval_loss = excluded.eval_loss, accuracy = excluded.accuracy,
                   train_loss = excluded.train_loss, memory_measured = excluded.memory_measured,
                   weight_bytes = excluded.weight_bytes, steps = excluded.steps, wall_s = excluded.wall_s,
                   error = excluded.error, result_json = excluded.result_json, finished_at = excluded.finished_at""",
            (plan_hash, level, seed, task.tag, values[0], task.plan.model_dump_json(), task.memory_predicted)
            + values[1:]
            + (now - result.wall_s, now - result.wall_s),
        )

    # ------------------------------------------------------------------ reads
    def get(self, key: EvalKey | EvalTask) -> EvalResult | None:
        """The finished result for a key (ok, failed or stopped); None if never run or still running."""
        row = self._db.execute(
            "SELECT status, result_json FROM evaluations WHERE plan_hash = ? AND level = ? AND seed = ?",
            _key(key),
        ).fetchone()
        if row is None or row["status"] not in FINISHED or not row["result_json"]:
            return None
        return EvalResult.model_validate_json(row["result_json"])

    def records(self) -> list[dict[str, Any]]:
        """Every row in insertion order, as plain dicts (``plan`` parsed from JSON, no raw result blob)."""
        rows = self._db.execute("SELECT * FROM evaluations ORDER BY id").fetchall()
        return [self._as_dict(r) for r in rows]

    def running(self) -> list[dict[str, Any]]:
        """Rows started but never finished: the evaluation in flight when a previous run was killed."""
        rows = self._db.execute("SELECT * FROM evaluations WHERE status = 'running' ORDER BY id").fetchall()
        return [self._as_dict(r) for r in rows]

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0])

    @staticmethod
    def _as_dict(row: sqlite3.Row) -> dict[str, Any]:
        data = dict(row)
        data["plan"] = json.loads(data.pop("plan_json"))
        result = data.pop("result_json")
        data["result"] = json.loads(result) if result else None
        return data

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
