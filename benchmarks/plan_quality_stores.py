"""Summarize a plan-quality working directory from its stores, also when the run was cut short.

``plan_quality.py`` writes its table only after a budget's final fine-tunes; when a device lease ends
first, the SQLite stores and traces still hold every finished evaluation. This reads them and reports,
per budget: each method's best search-time score (one seed, the recipe's high fidelity), the budget's
uniform plan at the same fidelity, and the memory model's error against what every evaluation measured
(``torch.cuda.max_memory_allocated`` on a GPU), plus optimizer-step times.

  python -m benchmarks.plan_quality_stores WORKDIR --out benchmarks/results/plan_quality_gpu_partial.json
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
from pathlib import Path
from typing import Any

from qra_plugin.io import write_json_atomic


def store_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in con.execute("SELECT * FROM evaluations WHERE status = 'ok'")]
    finally:
        con.close()
    for r in rows:
        extra = json.loads(r.get("result_json") or "{}")
        r["train_s"] = extra.get("train_s")
    return rows


def memory_errors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Relative error (predicted − measured) / measured over evaluations, per fidelity level."""
    out: dict[str, Any] = {}
    for level in sorted({r["level"] for r in rows}):
        errs = [
            (r["memory_predicted"] - r["memory_measured"]) / r["memory_measured"]
            for r in rows
            if r["level"] == level and r.get("memory_predicted") and r.get("memory_measured")
        ]
        offsets = [
            r["memory_predicted"] - r["memory_measured"]
            for r in rows
            if r["level"] == level and r.get("memory_predicted") and r.get("memory_measured")
        ]
        if errs:
            out[level] = {
                "n": len(errs),
                "rel_error_min": round(min(errs), 4),
                "rel_error_max": round(max(errs), 4),
                "rel_error_mean": round(statistics.fmean(errs), 4),
                "offset_mib_mean": round(statistics.fmean(offsets) / 2**20, 1),
                "offset_mib_sd": round(statistics.stdev(offsets) / 2**20, 2) if len(offsets) > 1 else 0.0,
            }
    return out


def step_times(rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for level in sorted({r["level"] for r in rows}):
        per_step = [r["train_s"] / r["steps"] for r in rows if r["level"] == level and r.get("train_s") and r["steps"]]
        if per_step:
            out[level] = round(statistics.median(per_step), 4)
    return out


def budget(directory: Path) -> dict[str, Any]:
    rows = store_rows(directory / "qra" / "store.sqlite") + store_rows(directory / "baselines" / "store.sqlite")
    methods: dict[str, Any] = {}
    trace_path = directory / "qra" / "trace.json"
    if trace_path.is_file():
        trace = json.loads(trace_path.read_text())
        methods["qra"] = {
            "search_score": trace["best_score"],
            "evaluations": len(trace["evaluations"]),
            "search_steps": trace["search_steps"],
            "memory_predicted": trace["best_memory"],
            "planner_s_per_proposal": trace.get("planner_s_per_proposal"),
            "surrogate_spearman": trace.get("surrogate_spearman"),
            "screening_spearman": trace.get("screening_spearman"),
            "plan": trace["best"],
        }
        methods["uniform (the budget's own plan)"] = {
            "search_score": trace.get("baseline_score"),
            "plan": trace["baseline"],
        }
    for result in sorted((directory / "baselines").glob("*/result.json")):
        r = json.loads(result.read_text())
        methods[r["method"]] = {
            "search_score": r["score"],
            "evaluations": r["evaluations"],
            "memory_predicted": r["memory_bytes"],
            "plan": r["config"],
        }
    return {
        "methods": methods,
        "memory_model_vs_measured": memory_errors(rows),
        "median_step_s": step_times(rows),
        "evaluations_finished": len(rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", default="", help="free text stored with the summary (what cut the run short)")
    args = parser.parse_args(argv)
    budgets = {d.name: budget(d) for d in sorted(args.workdir.iterdir()) if (d / "qra").is_dir()}
    if not budgets:
        print(f"error: no budget directories with a qra/ search under {args.workdir}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, {"note": args.note, "budgets": budgets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
