"""Fault figures: kill -9 during the tiny search, a fuzz of malformed inputs, and a changed-recipe resume.

    python -m benchmarks.reliability            # ~15-25 min on 2 cores; writes benchmarks/results/reliability.json

* **kills**: one clean ``qra search example_configs/tiny-search.yaml`` gives the reference plan. Then the same
  search on a fresh ``--out`` is SIGKILLed at ``--kills`` random moments spread over the whole search (seeded:
  after a random number of stored evaluations plus a random 0-3 s, so mostly mid-evaluation), resumed after
  each, and finally resumed to the end. Per resume: how many evaluations finished before the kill were run
  again (must be 0) and how many were recomputed at all (the one in flight: ≤ 1); the final plan vs the clean one.
* **fuzz**: ``--fuzz`` generated malformed inputs (plans, configs, budgets, jsonl data), each fed to the real CLI
  in this process (``planner.cli.main``); each must end with exit status ≠ 0 and one stderr line, no
  traceback, and no new file in the output directory it was given.
* **changed_recipe**: the clean run's ``--out`` re-run with ``fidelity.high.steps`` 6 → 7: no high-fidelity score
  of the old recipe may be reused (every high evaluation of the new trace ran 7 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import ROOT
from benchmarks.harness.fuzz import TINY, fuzz

RESULT = ROOT / "benchmarks" / "results" / "reliability.json"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "planner.cli", *args]


def _rows(store: Path) -> list[dict[str, Any]]:
    if not store.is_file():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM evaluations ORDER BY id")]
        except sqlite3.OperationalError:
            return []


def _finished(store: Path) -> int:
    return sum(r["status"] != "running" for r in _rows(store))


def _search(cfg: Path, out: Path, kill_at_rows: int | None = None, extra_s: float = 0.0) -> tuple[int | None, float]:
    """Run ``qra search``; SIGKILL its process group ``extra_s`` after the store holds ``kill_at_rows`` finished
    evaluations (so kills land all over the search, mostly mid-evaluation). (exit code or None, wall s)."""
    start = time.perf_counter()
    cmd = _cli("search", str(cfg), "--out", str(out), "--seed", "0", "--no-progress")
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    if kill_at_rows is None:
        proc.wait(timeout=1800)
        return proc.returncode, time.perf_counter() - start
    while proc.poll() is None and _finished(out / "store.sqlite") < kill_at_rows:
        time.sleep(0.1)
    time.sleep(extra_s)
    if proc.poll() is not None:
        return proc.returncode, time.perf_counter() - start
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return None, time.perf_counter() - start


def _plan_hash(out: Path) -> str:
    from qra_plugin.plan import Plan

    return Plan.load(out / "plan.yaml").content_hash()


def kills(work: Path, n_kills: int, seed: int) -> dict[str, Any]:
    ref = work / "clean"
    code, clean_s = _search(TINY, ref)
    assert code == 0, "the clean tiny search failed"
    total = len(_rows(ref / "store.sqlite"))
    rng = random.Random(seed)
    # kill moments: n distinct evaluation counts spread over the clean run, each plus a random delay
    moments = sorted(rng.sample(range(0, total - 1), min(n_kills, total - 1)))
    out = work / "killed"
    resumes = []
    for target in [*moments, None]:
        before = {r["id"]: r for r in _rows(out / "store.sqlite")}
        extra = rng.uniform(0.0, 3.0)
        code, wall = _search(TINY, out, target, extra)
        after = _rows(out / "store.sqlite")
        redone_finished = sum(
            1 for r in after if r["id"] in before and before[r["id"]]["status"] != "running"
            and r["attempts"] != before[r["id"]]["attempts"]
        )  # fmt: skip
        recomputed = sum(1 for r in after if r["id"] in before and r["attempts"] != before[r["id"]]["attempts"])
        resumes.append({"kill_after_rows": target, "extra_s": round(extra, 2) if target is not None else None,
                        "wall_s": round(wall, 1), "exit": code, "rows": len(after), "recomputed": recomputed,
                        "finished_rows_rerun": redone_finished})  # fmt: skip
    identical = (out / "plan.yaml").is_file() and _plan_hash(out) == _plan_hash(ref)
    return {
        "count": sum(r["exit"] is None for r in resumes),
        "identical_plans": identical,
        "max_recomputed": max(r["recomputed"] for r in resumes),
        "finished_rows_rerun": sum(r["finished_rows_rerun"] for r in resumes),
        "clean_wall_s": round(clean_s, 1),
        "clean_evaluations": total,
        "resumes": resumes,
        "reference_out": str(ref),
    }


def changed_recipe(ref: Path, work: Path) -> dict[str, Any]:
    data = yaml.safe_load(TINY.read_text())
    data["fidelity"]["high"]["steps"] = 7
    cfg = work / "tiny-high7.yaml"
    cfg.write_text(yaml.safe_dump(data))
    code, wall = _search(cfg, ref)
    assert code == 0, "the changed-recipe resume failed"
    trace = json.loads((ref / "trace.json").read_text())["evaluations"]
    high = [r for r in trace if r["level"] == "high"]
    stale = [r for r in high if r["status"] == "ok" and r["steps"] != 7]
    return {"reused": bool(stale), "high_evaluations": len(high), "high_with_7_steps": len(high) - len(stale),
            "wall_s": round(wall, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--fuzz", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    from planner.quiet import quiet_libraries

    quiet_libraries()

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="qra-reliability-") as tmp:
        work = Path(tmp)
        fuzz_result = fuzz(work / "fuzz", args.fuzz, args.seed)
        kill_result = kills(work, args.kills, args.seed)
        recipe_result = changed_recipe(Path(kill_result.pop("reference_out")), work)
    command = "python -m benchmarks.reliability" + "".join(
        f" --{k} {v}" for k, v in (("kills", args.kills), ("fuzz", args.fuzz), ("seed", args.seed))
        if v != parser.get_default(k)
    )  # fmt: skip
    result = {
        "command": command,
        "kills": kill_result,
        "fuzz": fuzz_result,
        "changed_recipe": recipe_result,
        "wall_s": round(time.time() - started, 1),
    }
    from qra_plugin.io import write_json_atomic

    write_json_atomic(args.out, result)
    summary = {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, list | dict)} for k, v in result.items()
               if isinstance(v, dict)}  # fmt: skip
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
