"""SQLite record of every evaluation, so a search resumes where it stopped and never pays twice.

One row per (plan hash, level, seed, recipe hash): rows of another recipe (other steps, lr, data,
weights, fidelity code) are kept side by side and never read for this one, and ``recipes`` holds each
recipe's JSON so a run can say what changed. WAL mode with autocommit: each finished evaluation is
durable the moment ``put`` returns, and a process killed with SIGKILL leaves a database that reopens
cleanly (its in-flight row stays ``running`` and is recomputed on the next run).

Failures are classified: a *transient* one (timeout, OOM, a killed worker) is retried once on a later
run, a *deterministic* one (the plan raised, non-finite loss) is final.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from planner.fidelity.contract import EvalKey, EvalResult, EvalTask, recipe

FINISHED = ("ok", "failed", "stopped")
#: a transient failure is recomputed until it has been attempted this often
MAX_TRANSIENT_ATTEMPTS = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plan_hash TEXT NOT NULL,
    level TEXT NOT NULL,
    seed INTEGER NOT NULL,
    recipe TEXT NOT NULL,
    tag TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    failure TEXT,
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
    UNIQUE (plan_hash, level, seed, recipe)
);
CREATE TABLE IF NOT EXISTS recipes (
    recipe TEXT PRIMARY KEY,
    level TEXT NOT NULL,
    recipe_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


def _key(key_or_task: EvalKey | EvalTask) -> EvalKey:
    if isinstance(key_or_task, EvalTask):
        return key_or_task.key
    plan_hash, level, seed, recipe_hash = key_or_task
    return (str(plan_hash), str(level), int(seed), str(recipe_hash))


class Store:
    """Every evaluation of a search: config (the plan), fidelity, seed, recipe, status, metrics, timings."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against process crashes in WAL mode
        self._retire_unkeyed_rows()
        self._db.executescript(_SCHEMA)
        self._known_recipes: set[str] = set()

    def _retire_unkeyed_rows(self) -> None:
        """A store from before recipe keys cannot say which recipe its rows ran: keep them, never reuse them."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(evaluations)").fetchall()}
        if cols and "recipe" not in cols:
            self._db.execute("ALTER TABLE evaluations RENAME TO evaluations_unkeyed")

    # ------------------------------------------------------------------ writes
    def _remember_recipe(self, task: EvalTask) -> None:
        recipe_hash = task.recipe_hash
        if recipe_hash in self._known_recipes:
            return
        body = json.dumps(recipe(task.config, task.level), sort_keys=True)
        self._db.execute(
            "INSERT OR IGNORE INTO recipes (recipe, level, recipe_json, created_at) VALUES (?, ?, ?, ?)",
            (recipe_hash, task.level, body, time.time()),
        )
        self._known_recipes.add(recipe_hash)

    def mark_running(self, task: EvalTask) -> None:
        """Record that ``task`` started (a row left ``running`` after a kill is recomputed on resume)."""
        self._remember_recipe(task)
        now = time.time()
        self._db.execute(
            """INSERT INTO evaluations (plan_hash, level, seed, recipe, tag, status, plan_json, memory_predicted,
                   attempts, created_at, started_at)
               VALUES (?, ?, ?, ?, ?, 'running', ?, ?, 1, ?, ?)
               ON CONFLICT (plan_hash, level, seed, recipe) DO UPDATE SET
                   status = 'running', attempts = attempts + 1, started_at = excluded.started_at
               WHERE status = 'running' OR (status = 'failed' AND failure = 'transient')""",
            (*task.key, task.tag, task.plan.model_dump_json(), task.memory_predicted, now, now),
        )

    def put(self, task: EvalTask, result: EvalResult) -> None:
        """Record a finished evaluation (insert, or finish the row ``mark_running`` created)."""
        self._remember_recipe(task)
        now = time.time()
        values = (
            result.status,
            result.failure if result.status == "failed" else None,
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
            """INSERT INTO evaluations (plan_hash, level, seed, recipe, tag, plan_json, memory_predicted, status,
                   failure, eval_loss, accuracy, train_loss, memory_measured, weight_bytes, steps, wall_s, error,
                   result_json, finished_at, attempts, created_at, started_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)
               ON CONFLICT (plan_hash, level, seed, recipe) DO UPDATE SET
                   status = excluded.status, failure = excluded.failure, eval_loss = excluded.eval_loss,
                   accuracy = excluded.accuracy, train_loss = excluded.train_loss,
                   memory_measured = excluded.memory_measured, weight_bytes = excluded.weight_bytes,
                   steps = excluded.steps, wall_s = excluded.wall_s, error = excluded.error,
                   result_json = excluded.result_json, finished_at = excluded.finished_at""",
            (*task.key, task.tag, task.plan.model_dump_json(), task.memory_predicted)
            + values
            + (now - result.wall_s, now - result.wall_s),
        )

    # ------------------------------------------------------------------ reads
    def get(self, key: EvalKey | EvalTask) -> EvalResult | None:
        """The finished result for a key; None if never run, still running, or a transient failure that
        has a retry left (so the caller recomputes it)."""
        row = self._db.execute(
            """SELECT status, failure, attempts, result_json FROM evaluations
               WHERE plan_hash = ? AND level = ? AND seed = ? AND recipe = ?""",
            _key(key),
        ).fetchone()
        if row is None or row["status"] not in FINISHED or not row["result_json"]:
            return None
        if row["status"] == "failed" and row["failure"] == "transient" and row["attempts"] < MAX_TRANSIENT_ATTEMPTS:
            return None
        return EvalResult.model_validate_json(row["result_json"])

    def records(self, recipe_hashes: set[str] | None = None) -> list[dict[str, Any]]:
        """Rows in insertion order as plain dicts (``plan`` parsed); only the given recipes if named."""
        rows = self._db.execute("SELECT * FROM evaluations ORDER BY id").fetchall()
        found = [self._as_dict(r) for r in rows]
        return found if recipe_hashes is None else [r for r in found if r["recipe"] in recipe_hashes]

    def running(self) -> list[dict[str, Any]]:
        """Rows started but never finished: the evaluation in flight when a previous run was killed."""
        rows = self._db.execute("SELECT * FROM evaluations WHERE status = 'running' ORDER BY id").fetchall()
        return [self._as_dict(r) for r in rows]

    def failure_counts(self, recipe_hashes: set[str] | None = None) -> dict[str, int]:
        """Failed rows by class: ``transient`` (retried once on resume) and ``deterministic`` (kept)."""
        counts = {"transient": 0, "deterministic": 0}
        for row in self.records(recipe_hashes):
            if row["status"] == "failed":
                counts[row["failure"] or "deterministic"] += 1
        return counts

    def other_recipes(self, level: str, recipe_hash: str) -> list[tuple[str, dict[str, Any], int]]:
        """(hash, recipe, stored rows) of the other recipes stored for ``level``: what a changed config left."""
        rows = self._db.execute(
            """SELECT r.recipe, r.recipe_json, COUNT(e.id) AS n FROM recipes r
               LEFT JOIN evaluations e ON e.recipe = r.recipe
               WHERE r.level = ? AND r.recipe != ? GROUP BY r.recipe ORDER BY r.created_at""",
            (level, recipe_hash),
        ).fetchall()
        return [(r["recipe"], json.loads(r["recipe_json"]), int(r["n"])) for r in rows]

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
