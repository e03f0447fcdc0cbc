"""The search: ``space`` (choices per unit, costs), ``evolution`` (stage 1), ``surrogate`` (performance
model), ``trust_region`` (stage 2), ``pareto`` (front and choice), ``setup`` (what every planner run
shares: budget, cost, store-backed executor) and ``run`` (``qra search``'s orchestration)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # lazy: planner.allocation imports planner.search.space
    if name in ("run_search", "SearchResult", "PLAN_FILE", "PARETO_FILE", "REPORT_FILE", "TRACE_FILE", "STORE_FILE"):
        from planner.search.run import run

        return getattr(run, name)
    if name in ("SearchSetup", "Evaluator"):
        from planner.search.run import setup

        return getattr(setup, name)
    raise AttributeError(f"module 'planner.search' has no attribute {name!r}")
