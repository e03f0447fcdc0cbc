"""The search-levers benchmark on its tiny recipe: variants next to the plan-quality references, one finals store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_plan_quality_benchmark import _rows, run_tiny

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@pytest.mark.benchmark
def test_tiny_levers_benchmark_compares_each_variant_with_greedy_priors_and_qra(tmp_path):
    out, results = tmp_path / "work", tmp_path / "search_levers.json"
    run_tiny("benchmarks.search_levers", out, results)
    data = json.loads(results.read_text())
    assert data["command"].startswith("python -m benchmarks.search_levers")
    assert data["protocol"]["splits_disjoint"] is True and data["variants"]["levers"]["tr_trades"] is True
    for budget in data["budgets"].values():
        methods = budget["methods"]
        assert set(methods) == {"greedy_priors", "qra", "qra_levers"}
        for m in methods.values():
            assert len(m["seeds"]) == 2 and m["final_eval_loss_mean"] is not None and m["within_budget"]
        levers = methods["qra_levers"]
        assert levers["evaluations"] > 0 and levers["search_cost_with_priors"] > levers["search_cost"] > 0
        assert levers["evaluation_time"]["setup_share"] is not None
        assert budget["differences"]["qra_levers-greedy_priors"]["eval_loss"] is not None
    before = _rows(out)
    run_tiny("benchmarks.search_levers", out, results)  # searches, references and finals all come from stores
    assert _rows(out) == before


def test_committed_result_is_the_paired_reread_of_its_finals(tmp_path):
    """The lever bundle − greedy_priors at uniform-4 is resolved paired by seed (issue 21: t −13.9, p 0.005; the
    independent 2 s.e. rule called it unresolved), and --reread rebuilds the committed file from its finals."""
    from benchmarks.search_levers import reread

    committed = json.loads((RESULTS / "search_levers.json").read_text())
    levers = committed["budgets"]["uniform4_r16"]["differences"]["qra_levers-greedy_priors"]["eval_loss"]
    assert levers["resolved"] and levers["t"] == pytest.approx(-13.89, abs=0.01) and levers["perm_p"] == 0.25
    stale = json.loads(json.dumps(committed))
    for budget in stale["budgets"].values():
        budget["differences"] = {}
    copy = tmp_path / "search_levers.json"
    copy.write_text(json.dumps(stale))
    assert reread(copy) == committed
    assert copy.with_suffix(".md").read_text() == (RESULTS / "search_levers.md").read_text()
