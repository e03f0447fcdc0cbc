"""The plan-quality benchmark script end to end on its tiny recipe: the committed command's schema and resume."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {
    "final_eval_loss_mean",
    "final_eval_loss_sd",
    "final_eval_losses",
    "final_accuracy_mean",
    "final_accuracy_sd",
    "seeds",
    "G",
    "G_accuracy",
    "memory_predicted",
    "memory_measured",
    "search_cost",
    "search_cost_with_priors",
    "evaluations",
    "search_steps",
    "wall_s",
}


def _rows(out: Path) -> int:
    total = 0
    for db in out.rglob("*.sqlite"):
        con = sqlite3.connect(db)
        total += con.execute("SELECT COUNT(*) FROM evaluations WHERE status = 'ok'").fetchone()[0]
        con.close()
    return total


def run_tiny(module: str, out: Path, results: Path, timeout: int = 1500) -> None:
    """Run a benchmark script (``benchmarks.<name>``) on its tiny recipe; fail with the end of its stderr."""
    cmd = [sys.executable, "-m", module, "--recipe", "tiny", "--out", str(out), "--results", str(results)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run(out: Path, results: Path) -> None:
    run_tiny("benchmarks.plan_quality", out, results)


@pytest.mark.benchmark
def test_tiny_recipe_writes_the_schema_and_resumes_without_recomputing(tmp_path):
    out, results = tmp_path / "work", tmp_path / "plan_quality.json"
    _run(out, results)
    data = json.loads(results.read_text())
    assert data["complete"] is True and data["command"].startswith("python -m benchmarks.plan_quality")
    assert set(data["budgets"]) == {"uniform4_r16", "uniform3_r16"}
    proto = data["protocol"]
    assert proto["splits_disjoint"] is True and proto["final_eval_split"] == "test"
    assert proto["final_steps"] >= 5 * proto["high_steps"] and proto["tpe_startup"] >= 2
    assert proto["final_steps"] * 4 >= proto["split_rows"]["train"]  # at least one epoch (batch 4)
    for name, budget in data["budgets"].items():
        assert budget["budget_kind"] == "plan"
        methods = budget["methods"]
        assert {"qra", "unquantized_r16", name, "random", "tpe", "ilp", "greedy_priors"} <= set(methods)
        for method, m in methods.items():
            assert set(m) >= REQUIRED, method
            assert len(m["seeds"]) == 2 and m["final_eval_loss_mean"] is not None
            assert m["final_accuracy_mean"] is not None  # the topic task has exact answers
            # the same quantity on both sides: planned modules + LoRA + grads + optimizer states
            assert m["memory_measured"] > 0 and m["memory_error"] == 0.0, method
        # the priors' cost is what the profile measured (a cache hit in a resumed or --parallel run is ~0 s),
        # converted to optimizer steps at the uniform plan's step time; methods without priors pay none
        step_s, finals = methods[name]["step_s"], data["protocol"]["final_steps"]
        for method in ("ilp", "greedy_priors"):
            priced = (methods[method]["search_steps"] + data["priors_measured_s"] / step_s) / finals
            assert data["priors_measured_s"] > 0
            assert methods[method]["search_cost_with_priors"] == pytest.approx(priced, abs=1e-3), method
        assert methods[name]["search_cost_with_priors"] == methods[name]["search_cost"] == 0
        for method in ("qra", "random", "tpe", "ilp", "greedy_priors", name):
            assert methods[method]["within_budget"], method
        # random and TPE get the search's optimizer steps, spent at the high fidelity
        qra_steps = methods["qra"]["search_steps"]
        assert abs(methods["random"]["search_steps"] - qra_steps) <= 3  # rounded to whole high-fidelity runs
        assert methods["ilp"]["evaluations"] == methods["greedy_priors"]["evaluations"] == 0
    assert results.with_suffix(".md").read_text().count("| qra |") == 2
    assert results.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    before = _rows(out)
    _run(out, results)  # a re-run finds every search, baseline and fine-tune in the stores
    assert _rows(out) == before
    again = json.loads(results.read_text())
    for name in data["budgets"]:
        for method, m in data["budgets"][name]["methods"].items():
            assert again["budgets"][name]["methods"][method]["final_eval_loss_mean"] == m["final_eval_loss_mean"]

    # the fidelity ladder over the plans the finals fine-tuned: a real run per plan and step count, resumable
    ladder = tmp_path / "fidelity_correlation.json"
    cmd = [sys.executable, "-m", "benchmarks.fidelity_correlation", "--recipe", "tiny", "--benchmark", str(results),
           "--stores", str(out), "--steps", "0,2", "--out", str(tmp_path / "ladder"),
           "--results", str(ladder)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(ladder.read_text())["ladder"]
    assert [r["steps"] for r in rows] == [0, 2] and all(r["plans"] >= 5 for r in rows)
    assert all(r["spearman_final_loss"] is not None for r in rows)  # the plans' losses differ: a real ranking
    assert all(r["best_half"] >= 3 and "spearman_final_loss_best_half" in r for r in rows)
