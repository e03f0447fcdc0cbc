"""The confirm fidelity: before a plan is chosen, re-score the search's best high-fidelity plans and its
zero-evaluation starts with a longer run (``fidelity.confirm``, ``search.confirm_top``).

Why: a short run scores where a plan *starts* as much as how it *learns*. With an error-aware init a 4-bit
block starts ahead of an 8-bit one and an 8-step score rewards that; 40 steps later the 8-bit plan has caught up
and passed it (benchmarks/results/adapter_init.json, uniform-4 budget: the search's 4-bit mix 2.3473 vs the error
table's plan 2.4261 at 8 steps; 2.3486 vs 2.3132 at 40 steps on the same selection rows; the test split agrees).
A few longer runs of the finalists decide instead; the Pareto front keeps the high-fidelity scores.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from planner.config import QRAConfig
from planner.search.pareto import Point, best_for_budget, prefer_free
from planner.search.space import Allocation, allocation_key

#: the zero-evaluation allocation a search with each init must beat: the one the fast path (``qra baseline``) gives
FAST_PATH = {"error": "table_alloc", "zero": "greedy_priors"}


def finalists(points: list[Point], free: dict[str, Allocation], budget: int, top: int, init: str) -> list[Allocation]:
    """The ``top`` best fitting plans at the high fidelity, the best free allocation there and the fast path's."""
    fitting = sorted((p for p in points if p.memory <= budget), key=lambda p: (p.score, p.memory, p.config))
    free_configs = set(free.values())
    chosen = [p.config for p in fitting[:top]]
    chosen += [p.config for p in fitting if p.config in free_configs][:1]
    fast = free.get(FAST_PATH.get(init, ""))
    chosen += [fast] if fast is not None and any(p.config == fast for p in fitting) else []
    return list(dict.fromkeys(chosen))


def choose(
    points: list[Point],
    confirmed: dict[Allocation, float | None],
    free: dict[str, Allocation],
    high_best: Point,
    min_gain: float,
    steps: int,
) -> tuple[Point, dict[str, Any]]:
    """The finalist with the lowest confirm score (a free allocation when the best beats it by no more than
    ``min_gain``), and what the report says about the choice. All confirm runs failed: the high best stays."""
    by_config = {p.config: p for p in points}
    name_of: dict[Allocation, str] = {}
    for name, c in free.items():  # two free allocations can coincide: the first name (greedy, ilp, table, uniform)
        name_of.setdefault(c, name)
    scored = {c: s for c, s in confirmed.items() if s is not None}
    # the high fidelity's choice rule (pareto.best_for_budget, prefer_free) on confirm scores; finalists all fit
    at_confirm = [replace(by_config[c], score=s) for c, s in scored.items()]
    fits = max((p.memory for p in at_confirm), default=0)
    top = best_for_budget(at_confirm, fits)
    best = prefer_free(free, at_confirm, top, fits, min_gain)[0].config if top is not None else high_best.config
    free_scored = {c: s for c, s in scored.items() if c in name_of}
    best_free = min(free_scored, key=lambda c: (free_scored[c], c)) if free_scored else None
    rows = [
        {
            "config": allocation_key(c),
            "free_allocation": name_of.get(c),
            "high": by_config[c].score,
            "confirm": s,
        }
        for c, s in confirmed.items()
    ]
    return by_config[best], {
        "steps": steps,
        "finalists": rows,
        "high_best": allocation_key(high_best.config),
        "changed_choice": best != high_best.config,
        "score": scored.get(best),
        "best_free_allocation": name_of.get(best_free) if best_free is not None else None,
        "gain_over_best_free": round(free_scored[best_free] - scored[best], 6) if best_free is not None else None,
    }


def verdict(summary: dict[str, Any]) -> str:
    """One line for the log: what the longer runs changed and how the plan stands against the free starts."""
    confirm = summary["confirm"]
    if confirm["score"] is None:
        return "[red]every confirm run failed[/red]: the plan is the high-fidelity best"
    head = (
        f"confirm ({confirm['steps']} steps, {len(confirm['finalists'])} finalists): "
        + ("[yellow]the longer runs changed the choice[/yellow]; " if confirm["changed_choice"] else "")
        + f"chosen plan {confirm['score']:.4f}"
    )
    if summary["best_is_free_allocation"]:
        return f"{head}: the {summary['best_is_free_allocation']} allocation, which needs no evaluation, is the plan"
    if confirm["gain_over_best_free"] is None:
        return head
    return f"{head}, {confirm['gain_over_best_free']:+.4f} nats over {confirm['best_free_allocation']} (one seed)"


def unconfirmed_note(cfg: QRAConfig) -> str | None:
    """An error-init search without a confirm fidelity is the case the short runs get wrong: say so up front."""
    if cfg.adapter.init != "error" or cfg.fidelity.confirm is not None:
        return None
    return (
        f"adapter.init: error without fidelity.confirm: {cfg.fidelity.high.steps}-step scores overrate plans whose "
        "4-bit blocks start from the error init; set fidelity.confirm (e.g. 5x the high steps) or use the fast path "
        "(qra baseline table_alloc)"
    )
