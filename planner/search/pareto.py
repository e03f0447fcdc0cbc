"""The quality/memory Pareto front of high-fidelity results, and the best plan for any budget.

One search serves several budgets: ``pareto.json`` lists every non-dominated (eval loss, bytes) plan,
so a user with a smaller or larger budget picks ``best_for_budget`` instead of searching again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.search.space import Allocation, SearchSpace, allocation_key
from qra_plugin.io import write_json_atomic


@dataclass(frozen=True)
class Point:
    """One finished high-fidelity evaluation: score (eval loss, lower is better) and predicted bytes."""

    config: Allocation
    score: float
    memory: int
    memory_measured: int | None = None
    stage: str = ""


def front(points: Sequence[Point]) -> list[Point]:
    """Non-dominated points on (score ↓, memory ↓), sorted by memory (ties: lower score, then config)."""
    ordered = sorted(points, key=lambda p: (p.memory, p.score, p.config))
    out: list[Point] = []
    best = float("inf")
    for p in ordered:
        if p.score < best:
            out.append(p)
            best = p.score
    return out


def best_for_budget(points: Sequence[Point], budget: int) -> Point | None:
    """The lowest-score point whose memory fits ``budget`` (ties: less memory), or None."""
    fitting = [p for p in points if p.memory <= budget]
    return min(fitting, key=lambda p: (p.score, p.memory, p.config)) if fitting else None


def write_pareto(
    path: str | Path,
    space: SearchSpace,
    points: Sequence[Point],
    budget: int,
    budget_text: str,
    kind: str,
    objective: str = "high-fidelity held-out eval loss",
) -> list[Point]:
    """Write ``pareto.json`` (front with full plans) atomically; return the front. ``objective``: what a score is."""
    pts = front(points)
    data: dict[str, Any] = {
        "budget": budget_text,
        "budget_bytes": budget,
        "budget_kind": kind,
        "objective": f"{objective} (lower is better)",
        "points": [
            {
                "score": p.score,
                "memory_bytes": p.memory,
                "memory_measured": p.memory_measured,
                "fits_budget": p.memory <= budget,
                "stage": p.stage,
                "config": allocation_key(p.config),
                "plan": space.to_plan(p.config).to_dict(),
            }
            for p in pts
        ],
    }
    write_json_atomic(path, data)
    return pts


def prefer_free(
    free: dict[str, Allocation], points: list[Point], best: Point, budget_bytes: int, min_gain: float
) -> tuple[Point, dict[str, Any] | None]:
    """With ``search.min_gain`` set (the seed noise of a high-fidelity score), a best plan that beats the best
    zero-evaluation allocation (``free``: the priors' greedy and ILP, the budget's uniform plan) by no more than
    that is noise: return the free allocation, which anyone can rebuild from the priors, and say which
    evaluated plan was set aside."""
    configs = set(free.values())
    top = best_for_budget([p for p in points if p.config in configs], budget_bytes)
    if top is None or best.config in configs or not within_noise(best.score, top.score, min_gain):
        return best, None
    return top, {"config": allocation_key(best.config), "score": best.score, "gain": round(top.score - best.score, 6)}


def within_noise(best_score: float, free_score: float, min_gain: float) -> bool:
    """Does a searched plan beat a free allocation by no more than ``min_gain`` (inclusive)? 0 turns it off."""
    return min_gain > 0 and free_score - best_score <= min_gain


def against_free(free: dict[str, Allocation], best: Point, history: dict[Allocation, float | None]) -> dict[str, Any]:
    """Did the evaluations earn their cost? The best plan against the allocations that cost no evaluation, at
    the high fidelity, one seed each."""
    scored = {name: history.get(c) for name, c in free.items() if history.get(c) is not None}
    origin = next((name for name, c in free.items() if c == best.config), None)
    best_free = min(scored.items(), key=lambda kv: kv[1]) if scored else None
    return {
        "free_allocation_scores": scored,
        "best_is_free_allocation": origin,
        "gain_over_best_free": round(best_free[1] - best.score, 6) if best_free else None,
        "best_free_allocation": best_free[0] if best_free else None,
    }
