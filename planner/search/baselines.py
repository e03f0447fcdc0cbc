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
from functools import partial

import numpy as np

from planner.search.allocation import (
    Importance,
    flat_importance,
    greedy_priors,
    ilp,
    repair,
    table_allocation,
    uniform_under_budget,
)
from planner.search.space import Allocation, BudgetCost, SearchSpace
from qra_plugin.errors import QRAError

Evaluate = Callable[[list[Allocation], str], list[float | None]]
#: ``table_alloc``: the error table's allocation (bits and rank priced together, adapters from the quantization
#: error), the zero-evaluation plan
METHODS = ("uniform", "random", "tpe", "ilp", "greedy_priors", "table_alloc")
#: random search gives up looking for new distinct configs after this many draws per evaluation asked for
RANDOM_DRAWS_PER_EVALUATION = 50


@dataclass
class BaselineResult:
    method: str
    config: Allocation
    score: float | None = None
    evaluations: int = 0
    history: list[tuple[Allocation, float | None]] = field(default_factory=list)


def random_search(
    space: SearchSpace, cost: BudgetCost, budget: int, evaluate: Evaluate, evaluations: int, seed: int
) -> BaselineResult:
    """Uniformly random configs, repaired to the budget, each scored at the high fidelity.

    A space (or a budget) may hold fewer distinct feasible configs than ``evaluations``: drawing stops after
    ``RANDOM_DRAWS_PER_EVALUATION`` draws per wanted config, and the distinct ones found are all evaluated."""
    rng = np.random.default_rng(seed)
    flat = flat_importance(space)
    configs: list[Allocation] = []
    for _ in range(RANDOM_DRAWS_PER_EVALUATION * evaluations):
        if len(configs) == evaluations:
            break
        repaired = repair(space, space.sample(rng), cost, budget, flat)
        if repaired is not None and repaired not in configs:
            configs.append(repaired)
    if not configs:
        raise QRAError("baseline 'random': no sampled config fits the budget")
    scores = evaluate(configs, "high")
    return _best("random", list(zip(configs, scores, strict=True)))


def tpe_startup(evaluations: int) -> int:
    """Random start-up trials before TPE models anything: a third of the budget (at least 2). hyperopt's
    default is 20, so with a budget of ~12 evaluations "TPE" would be random search throughout."""
    return max(2, evaluations // 3)


def tpe(
    space: SearchSpace, cost: BudgetCost, budget: int, evaluate: Evaluate, evaluations: int, seed: int
) -> BaselineResult:
    """hyperopt TPE over the same per-unit choices; proposals are repaired to the budget before scoring.
    The first ``tpe_startup(evaluations)`` trials are random, the rest come from TPE's density model."""

    from hyperopt import STATUS_FAIL, STATUS_OK, Trials, fmin, hp
    from hyperopt import tpe as tpe_algo

    flat = flat_importance(space)
    domain = {f"u{u}": hp.choice(f"u{u}", space.choices()) for u in range(space.n_units)}
    history: list[tuple[Allocation, float | None]] = []
    seen: dict[Allocation, float | None] = {}

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
        algo=partial(tpe_algo.suggest, n_startup_jobs=tpe_startup(evaluations)),
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
    table: dict[tuple[int, int, int], float] | None = None,
    evaluations: int = 8,
    rank: int | None = None,
    bits: int | None = None,
    seed: int = 0,
    score_choice: bool = True,
) -> BaselineResult:
    """Run one baseline method; score its choice at the high fidelity unless ``score_choice`` is False
    (uniform/ILP/greedy/table_alloc choose without evaluating; a benchmark that fine-tunes the choice anyway
    skips it)."""
    if method == "random":
        return random_search(space, cost, budget, evaluate, evaluations, seed)
    if method == "tpe":
        return tpe(space, cost, budget, evaluate, evaluations, seed)
    rank = default_rank(space) if rank is None else rank
    if method in ("uniform", "ilp") and rank not in space.ranks:
        raise QRAError(f"rank {rank} is not in the search space's ranks {list(space.ranks)}: pass --rank")
    if method == "uniform" and bits is not None and bits not in space.bits:
        raise QRAError(f"bits {bits} is not in the search space's bits {list(space.bits)}: pass --bits")
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
    elif method == "table_alloc":
        if table is None:
            raise QRAError("baseline 'table_alloc' needs the error table (planner.priors.error_table)")
        config = table_allocation(space, cost, budget, table)
    else:
        raise QRAError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if not score_choice:
        return BaselineResult(method, config, None, 0, [])
    score = evaluate([config], "high")[0]
    return BaselineResult(method, config, score, 1, [(config, score)])


def default_rank(space: SearchSpace) -> int:
    """The uniform rank of ``uniform`` / ``ilp`` when none is given: 16 (the QLoRA default) if the space has
    it, else the space's largest rank below it, else its smallest adapter (rank 0 only if nothing else)."""
    positive = [r for r in space.ranks if r > 0]
    below = [r for r in positive if r <= 16]
    return max(below) if below else min(positive, default=0)


def _best(method: str, history: Sequence[tuple[Allocation, float | None]]) -> BaselineResult:
    scored = [(s, i) for i, (_, s) in enumerate(history) if s is not None]
    if not scored:
        raise QRAError(f"baseline {method!r}: every evaluation failed")
    _, index = min(scored)
    config, score = history[index]
    return BaselineResult(method, config, score, len(history), list(history))
