"""The pruning benchmark script end to end on its tiny recipe: the schema the issue names, budgets, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_plan_quality_benchmark import _rows, run_tiny

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
FIELDS = {"final_eval_loss_mean", "final_eval_loss_sd", "seeds", "memory_predicted", "params_kept_fraction"}


def _run(out: Path, results: Path) -> None:
    run_tiny("benchmarks.pruning", out, results, timeout=2400)


@pytest.mark.benchmark
def test_tiny_pruning_benchmark_compares_pruned_and_unpruned_plans_at_one_memory(tmp_path):
    out, results = tmp_path / "work", tmp_path / "pruning.json"
    _run(out, results)
    data = json.loads(results.read_text())
    assert data["command"].startswith("python -m benchmarks.pruning") and data["reduction"] == 0.25
    assert data["protocol"]["splits_disjoint"] is True and data["protocol"]["final_eval_split"] == "test"
    methods = data["methods"]
    assert {"uniform_prune_lora", "rankadaptor", "qra_prune", "qra", "uniform_unpruned"} <= set(methods)
    for name, m in methods.items():
        assert set(m) >= FIELDS, name
        assert len(m["seeds"]) == 2 and m["final_eval_loss_mean"] is not None, name
        assert m["memory_predicted"] <= data["budget_bytes"] and m["within_budget"], name
    # the budget is the pruned uniform plan's memory; both fixed-pruning methods prune every block by 25 %
    assert methods["uniform_prune_lora"]["memory_predicted"] == data["budget_bytes"]
    for name in ("uniform_prune_lora", "rankadaptor"):
        assert methods[name]["mlp_pruned_by_block"] == [0.25] * 4 and methods[name]["params_kept_fraction"] < 0.9
    assert methods["qra"]["params_kept_fraction"] == methods["uniform_unpruned"]["params_kept_fraction"] == 1.0
    assert methods["rankadaptor"]["bits"] == [4] and methods["rankadaptor"]["evaluations"] > 0
    assert set(methods["qra_prune"]["mlp_pruned_by_block"]) <= {0.0, 0.125, 0.25, 0.375, 0.5}
    assert "| qra_prune |" in results.with_suffix(".md").read_text()
    paired = data["differences"]["rankadaptor-uniform_prune_lora"]  # a search against the plan it starts from
    assert set(paired) == {"eval_loss", "accuracy"} and paired["eval_loss"]["test"] == "paired t"
    assert paired["eval_loss"]["seeds"] == [0, 1] and paired["eval_loss"]["se"] is not None  # the same plan: se 0

    before = _rows(out)
    _run(out, results)  # every search and final is found in the stores
    assert _rows(out) == before
    again = json.loads(results.read_text())["methods"]
    assert {m: v["final_eval_loss_mean"] for m, v in again.items()} == {
        m: v["final_eval_loss_mean"] for m, v in methods.items()
    }


def test_committed_result_is_the_paired_reread_of_its_finals(tmp_path):
    """Paired by seed, RankAdaptor − uniform ranks stays unresolved (t −4.22, p 0.052) and no accuracy difference
    resolves (qra_prune − uniform_unpruned was "resolved" at 2 s.e.); --reread rebuilds the committed file."""
    from benchmarks.pruning import reread

    committed = json.loads((RESULTS / "pruning.json").read_text())
    rank = committed["differences"]["rankadaptor-uniform_prune_lora"]["eval_loss"]
    assert not rank["resolved"] and rank["p"] == pytest.approx(0.052, abs=1e-3)
    assert not any(d["accuracy"]["resolved"] for d in committed["differences"].values())
    stale = {k: v for k, v in committed.items() if k not in ("differences", "statistics")}
    copy = tmp_path / "pruning.json"
    copy.write_text(json.dumps(stale))
    assert reread(copy) == committed
    assert copy.with_suffix(".md").read_text() == (RESULTS / "pruning.md").read_text()
