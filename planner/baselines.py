"""What a user would otherwise do, under the same budget and evaluation count as ``qra search``.

Every method returns a :class:`BaselineResult` with the chosen config. Methods that evaluate (random, TPE)
spend exactly ``evaluations`` high-fidelity runs through the same ``evaluate(configs, level)`` function
the search uses (real SFT runs, cached in the store); the others (uniform, ILP, greedy priors) choose
without evaluating and are scored afterwards like any plan.

Infeasible points: random and TPE *repair* them (the same budget repair the search uses, with flat
importance so no prior knowledge leaks in) instead of penalising them, so every evaluation buys a
feasible plan — a penalty would waste TPE's small budget on points that can never be the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from planner.evolution import Importance, repair
from planner.space import BudgetCost, Config, SearchSpace
from qra_plugin.errors import QRAError

Evaluate = Callable[[list[Config], str], list[float | None]]
METHODS = ("uniform", "random", "tpe", "ilp", "greedy_priors")


@dataclass
class BaselineResult:
    method: str
    config: Config
    score: float | None = None
    evaluations: int = 0
    history: list[tuple[Config, float | None]] = field(default_factory=list)


def flat_importance(space: SearchSpace) -> Importance:
    """Importance with no knowledge: every unit equal, loss grows as bits fall and rank shrinks."""
    n = space.n_units
    top = max(space.bits)
    quant = {b: np.full(n, (top - b) / max(top - min(space.bits), 1)) for b in set(space.bits) | {8, 16}}
    return Importance(quant=quant, plasticity=np.ones(n))


def uniform_under_budget(space: SearchSpace, cost: BudgetCost, budget: int, rank: int | None = None) -> Config:
    """The best uniform plan that fits: most bits first, then most rank (or the given rank)."""
    ranks = [rank] if rank is not None else sorted(space.ranks, reverse=True)
    for b in sorted(space.bits, reverse=True):
        for r in ranks:
            config = space.uniform(b, r)
            if cost(config) <= budget:
                return config
    raise QRAError("no uniform plan in the search space fits the budget")


def greedy_priors(space: SearchSpace, cost: BudgetCost, budget: int, importance: Importance) -> Config:
    """Importance-only allocation: start from the richest config and downgrade by least importance per byte."""
    config = repair(space, space.uniform(max(space.bits), max(space.ranks)), cost, budget, importance)
    if config is None:
        raise QRAError("the budget is below the cheapest config of the search space")
    return config


def ilp(space: SearchSpace, cost: BudgetCost, budget: int, importance: Importance, rank: int) -> Config:
    """LQ-LoRA-style ILP: choose bits per unit minimising summed I_q subject to the budget, uniform rank.

    Memory is linear in per-unit choices up to small cross terms (activations do not depend on bits), so
    the ILP uses the per-unit marginal bytes; if the exact memory model then says the answer is over
    budget, the ILP is re-solved with the budget tightened by the overshoot.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    bits = list(space.bits)
    n, k = space.n_units, len(bits)
    objective = np.array([importance.quant[b][u] for u in range(n) for b in bits])
    weights = np.array([cost.marginal[u][(b, rank)] for u in range(n) for b in bits], dtype=np.float64)
    one_per_unit = np.kron(np.eye(n), np.ones(k))
    reference = cost(space.uniform(max(space.bits), max(space.ranks)))
    slack = 0
    for _ in range(20):
        limit = budget - reference - slack
        result = milp(
            c=objective,
            constraints=[LinearConstraint(one_per_unit, 1, 1), LinearConstraint(weights[None, :], -np.inf, limit)],
            integrality=np.ones(n * k),
            bounds=Bounds(0, 1),
        )
        if result.x is None:
            raise QRAError(f"ILP found no bit allocation at rank {rank} within the budget")
        choice = result.x.reshape(n, k).argmax(axis=1)
        config = tuple((bits[i], rank) for i in choice)
        over = cost(config) - budget
        if over <= 0:
            return config
        slack += over
    raise QRAError("ILP could not meet the exact budget after 20 tightenings")


def random_search(
    space: SearchSpace, cost: BudgetCost, budget: int, evaluate: Evaluate, evaluations: int, seed: int
) -> BaselineResult:
    """Uniformly random configs, repaired to the budget, each scored at the high fidelity."""
    rng = np.random.default_rng(seed)
    flat = flat_importance(space)
    configs: list[Config] = []
    while len(configs) < evaluations:
        repaired = repair(space, space.sample(rng), cost, budget, flat)
        if repaired is not None and repaired not in configs:
            configs.append(repaired)
    scores = evaluate(configs, "high")
    return _best("random", list(zip(configs, scores, strict=True)))


def tpe(
    space: SearchSpace, cost: BudgetCost, budget: int, evaluate: Evaluate, evaluations: int, seed: int
) -> BaselineResult:
    """hyperopt TPE over the same per-unit choices; proposals are repaired to the budget before scoring."""
    from hyperopt import STATUS_FAIL, STATUS_OK, Trials, fmin, hp
    from hyperopt import tpe as tpe_algo

    flat = flat_importance(space)
    domain = {
        f"u{u}": hp.choice(f"u{u}", [(b, r) for b in space.bits for r in space.ranks]) for u in range(space.n_units)
    }
    history: list[tuple[Config, float | None]] = []
    seen: dict[Config, float | None] = {}

    def objective(point: dict) -> dict:
        proposal = tuple(tuple(point[f"u{u}"]) for u in range(space.n_units))
        config = repair(space, proposal, cost, budget, flat)
        if config is None:
            return {"status": STATUS_FAIL}
        if config not in seen:
            seen[config] = evaluate([config], "high")[0]
            history.append((config, seen[config]))
        score = seen[config]
        return {"status": STATUS_OK, "loss": score} if score is not None else {"status": STATUS_FAIL}

    fmin(
        objective,
        domain,
        algo=tpe_algo.suggest,
        max_evals=evaluations,
        trials=Trials(),
        rstate=np.random.default_rng(seed),
        show_progressbar=False,
    )
    return _best("tpe", history)


def choose(
    method: str,
    space: SearchSpace,
    cost: BudgetCost,
    budget: int,
    evaluate: Evaluate,
    *,
    importance: Importance | None = None,
    evaluations: int = 8,
    rank: int = 16,
    bits: int | None = None,
    seed: int = 0,
    score_choice: bool = True,
) -> BaselineResult:
    """Run one baseline method; score its choice at the high fidelity unless ``score_choice`` is False
    (uniform/ILP/greedy choose without evaluating; a benchmark that fine-tunes the choice anyway skips it)."""
    if method == "random":
        return random_search(space, cost, budget, evaluate, evaluations, seed)
    if method == "tpe":
        return tpe(space, cost, budget, evaluate, evaluations, seed)
    if method == "uniform":
        config = space.uniform(bits, rank) if bits is not None else uniform_under_budget(space, cost, budget, rank)
    elif method in ("ilp", "greedy_priors"):
        if importance is None:
            raise QRAError(f"baseline {method!r} needs the priors (run qra profile first)")
        config = (
            ilp(space, cost, budget, importance, rank)
            if method == "ilp"
            else greedy_priors(space, cost, budget, importance)
        )
    else:
        raise QRAError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if not score_choice:
        return BaselineResult(method, config, None, 0, [])
    score = evaluate([config], "high")[0]
    return BaselineResult(method, config, score, 1, [(config, score)])


def _best(method: str, history: Sequence[tuple[Config, float | None]]) -> BaselineResult:
    scored = [(s, i) for i, (_, s) in enumerate(history) if s is not None]
    if not scored:
        raise QRAError(f"baseline {method!r}: every evaluation failed")
    _, index = min(scored)
    config, score = history[index]
    return BaselineResult(method, config, score, len(history), list(history))
