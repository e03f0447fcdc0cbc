"""Stage 1: multi-fidelity evolution (AutoQRA's global search).

Pure search logic: it never trains anything itself. The orchestrator hands in ``evaluate(configs, level)``
(real SFT fidelities through the executor and store), ``cost(config)`` (bytes per ``planner.memory``) and
the budget. The population starts from the importance priors plus diverse random members; offspring come
from crossover and importance-guided mutation and are repaired into the budget; a screening model picks
which offspring are worth a low-fidelity run; every evaluated member gets the low fidelity; the
performance model (``planner.surrogate``) decides which ones are promoted to the high fidelity; survivors
are chosen by constrained non-dominated sorting on (low-fidelity score, memory).

Every random choice comes from one seeded generator, and scores are the only thing fed back, so the
same seed and the same (stored) evaluations replay the same search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from planner.search.allocation import Importance, repair
from planner.search.space import Allocation, BudgetCost, SearchSpace
from planner.search.surrogate import PerformanceModel, heldout_spearman
from qra_plugin.errors import QRAError

Evaluate = Callable[[list[Allocation], str], list[float | None]]
Cost = BudgetCost  # exact bytes via __call__, per-unit move savings via .saving


def mutate(
    space: SearchSpace, config: Allocation, importance: Importance, rng: np.random.Generator, rate: float | None = None
) -> Allocation:
    """Move some coordinates one step; important units tend to move up, unimportant ones down.

    The probability of an upward move is 0.2 + 0.6 × the unit's importance percentile (bits use the
    quantization sensitivity, ranks the plasticity). At least one coordinate always moves.
    """
    idx = space.indices(config)
    n = space.n_units
    rate = rate if rate is not None else 1.0 / n
    pct = (_percentile(importance.bits_importance()), _percentile(importance.plasticity))
    if space.prune:  # "up" on the pruning axis keeps more channels: units that suffer from pruning
        pct += (_percentile(importance.prune_importance()),)
    sizes, axes = space.sizes, space.n_axes
    mask = rng.random((n, axes)) < rate
    if not mask.any():
        mask[rng.integers(0, n), rng.integers(0, axes)] = True
    ups = rng.random((n, axes))
    for u, d in zip(*np.nonzero(mask), strict=True):
        if sizes[d] == 1:
            continue
        up = ups[u, d] < 0.2 + 0.6 * pct[d][u]
        v = idx[u, d] + (1 if up else -1)
        if not 0 <= v < sizes[d]:
            v = idx[u, d] - (1 if up else -1)
        idx[u, d] = v
    return space.from_indices(idx)


def crossover(a: Allocation, b: Allocation, rng: np.random.Generator) -> Allocation:
    """Uniform crossover by unit: each unit takes its whole (bits, rank) pair from one parent."""
    take_a = rng.random(len(a)) < 0.5
    return tuple(pa if t else pb for pa, pb, t in zip(a, b, take_a, strict=True))


def _percentile(values: np.ndarray) -> np.ndarray:
    if len(values) <= 1:
        return np.full(len(values), 0.5)
    order = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return order / (len(values) - 1)


# ---------------------------------------------------------------------------------------------- selection
def nondominated_sort(scores: Sequence[float | None], memory: Sequence[int], budget: int) -> list[int]:
    """Constrained non-domination rank of each point (0 = front) on (score ↓, memory ↓).

    Deb's rule: a feasible point (memory within budget and a finished evaluation) dominates every
    infeasible one; infeasible points are ordered by their violation (bytes over, failures last).
    """
    n = len(scores)

    def violation(i: int) -> float:
        if scores[i] is None or not np.isfinite(scores[i]):  # type: ignore[arg-type]
            return float("inf")
        return float(max(memory[i] - budget, 0))

    viol = [violation(i) for i in range(n)]

    def dominates(i: int, j: int) -> bool:
        if viol[i] == 0 and viol[j] > 0:
            return True
        if viol[i] > 0 or viol[j] > 0:
            return viol[i] < viol[j]
        si, sj = float(scores[i]), float(scores[j])  # type: ignore[arg-type]
        return si <= sj and memory[i] <= memory[j] and (si < sj or memory[i] < memory[j])

    rank = [0] * n
    remaining = set(range(n))
    level = 0
    while remaining:
        front = sorted(i for i in remaining if not any(dominates(j, i) for j in remaining if j != i))
        for i in front:
            rank[i] = level
        remaining -= set(front)
        level += 1
    return rank


def crowding(scores: Sequence[float], memory: Sequence[int]) -> np.ndarray:
    """NSGA-II crowding distance within one front (boundary points get infinity)."""
    n = len(scores)
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for values in (np.asarray(scores, dtype=np.float64), np.asarray(memory, dtype=np.float64)):
        order = np.argsort(values, kind="stable")
        span = values[order[-1]] - values[order[0]] or 1.0
        dist[order[0]] = dist[order[-1]] = np.inf
        for k in range(1, n - 1):
            dist[order[k]] += (values[order[k + 1]] - values[order[k - 1]]) / span
    return dist


def select(
    configs: Sequence[Allocation], scores: Sequence[float | None], memory: Sequence[int], budget: int, k: int
) -> list[int]:
    """Indices of the ``k`` survivors: by constrained front, then crowding distance, then index."""
    ranks = nondominated_sort(scores, memory, budget)
    chosen: list[int] = []
    for level in sorted(set(ranks)):
        front = [i for i in range(len(configs)) if ranks[i] == level]
        if len(chosen) + len(front) <= k:
            chosen += front
            continue
        finite = [float(scores[i]) if scores[i] is not None else 1e300 for i in front]
        dist = crowding(finite, [memory[i] for i in front])
        order = sorted(range(len(front)), key=lambda j: (-dist[j], front[j]))
        chosen += [front[j] for j in order[: k - len(chosen)]]
        break
    return chosen


# ---------------------------------------------------------------------------------------------- stage 1
@dataclass
class Stage1Settings:
    population: int = 12
    generations: int = 3
    offspring: int = 12
    promote: int = 4
    screen_factor: int = 3  # offspring drafted per offspring evaluated (the screening model picks)
    crossover_prob: float = 0.9
    seed: int = 0
    #: what the screening and promotion models see (``planner.search.surrogate.FEATURE_SETS``)
    features: str = "ordinal"


@dataclass
class Record:
    """Everything stage 1 knows about one config."""

    config: Allocation
    memory: int
    low: float | None = None
    high: float | None = None
    low_done: bool = False
    high_done: bool = False
    generation: int = 0
    origin: str = "random"


@dataclass
class Stage1Result:
    records: dict[Allocation, Record]
    population: list[Allocation]
    surrogate_spearman: float | None
    screening_spearman: float | None
    generations: list[dict[str, Any]] = field(default_factory=list)

    def high_points(self) -> list[Record]:
        return [r for r in self.records.values() if r.high_done and r.high is not None]


def run_stage1(
    space: SearchSpace,
    importance: Importance,
    cost: Cost,
    budget: int,
    evaluate: Evaluate,
    settings: Stage1Settings,
    warm: Sequence[Allocation] = (),
    progress: Callable[[str], None] | None = None,
) -> Stage1Result:
    """Evolve a population under the budget; return every evaluated config with its scores."""
    rng = np.random.default_rng(settings.seed)
    say = progress or (lambda _msg: None)
    records: dict[Allocation, Record] = {}

    def record(config: Allocation, gen: int, origin: str) -> Record:
        if config not in records:
            records[config] = Record(config, cost(config), generation=gen, origin=origin)
        return records[config]

    population = []
    for c, origin in _initial_population(space, importance, cost, budget, warm, settings.population, rng):
        population.append(c)
        record(c, 0, origin)
    _evaluate_low(population, records, evaluate)
    models = _Models(space, importance, settings.features)
    _promote(models, records, evaluate, settings.promote, settings.seed, say)
    say(f"stage 1 generation 0: {len(population)} evaluated at low fidelity")
    screening_rho: float | None = None
    trace = [_generation_summary(0, records, population)]

    for gen in range(1, settings.generations + 1):
        scores = [records[c].low for c in population]
        mem = [records[c].memory for c in population]
        ranks = nondominated_sort(scores, mem, budget)
        drafts: list[Allocation] = []
        for _ in range(50 * settings.offspring):
            if len(drafts) >= settings.screen_factor * settings.offspring:
                break
            p1 = population[_tournament(ranks, rng)]
            p2 = population[_tournament(ranks, rng)]
            child = crossover(p1, p2, rng) if rng.random() < settings.crossover_prob else p1
            child = mutate(space, child, importance, rng)
            fixed = repair(space, child, cost, budget, importance)
            if fixed is not None and fixed not in records and fixed not in drafts:
                drafts.append(fixed)
        chosen = _screen(models, records, drafts, settings.offspring, settings.seed + gen)
        for c in chosen:
            record(c, gen, "offspring")
        _evaluate_low(chosen, records, evaluate)
        merged = population + [c for c in chosen if c not in population]
        keep = select(
            merged, [records[c].low for c in merged], [records[c].memory for c in merged], budget, settings.population
        )
        population = [merged[i] for i in sorted(keep)]
        _promote(models, records, evaluate, settings.promote, settings.seed + gen, say)
        trace.append(_generation_summary(gen, records, population))
        say(f"stage 1 generation {gen}: {len(chosen)} offspring evaluated, best low {trace[-1]['best_low']}")

    high = [r for r in records.values() if r.high_done and r.high is not None and r.low is not None]
    kinds = {"importance": importance, "feature_set": settings.features}
    rho = heldout_spearman(
        space, [r.config for r in high], [r.low for r in high], [r.high for r in high], settings.seed, **kinds
    )
    low_pts = [r for r in records.values() if r.low is not None]
    if len(low_pts) >= 5:
        screening_rho = heldout_spearman(
            space, [r.config for r in low_pts], None, [r.low for r in low_pts], settings.seed, **kinds
        )
    return Stage1Result(records, population, rho, screening_rho, trace)


def _initial_population(
    space: SearchSpace,
    importance: Importance,
    cost: Cost,
    budget: int,
    warm: Sequence[Allocation],
    size: int,
    rng: np.random.Generator,
) -> list[tuple[Allocation, str]]:
    """Repaired warm starts first, then the most diverse of many random members, as (config, origin)."""
    chosen: list[tuple[Allocation, str]] = []
    for c in warm:
        fixed = repair(space, tuple(c), cost, budget, importance)
        if fixed is not None and all(fixed != o for o, _ in chosen) and len(chosen) < size:
            chosen.append((fixed, "prior"))
    pool: list[Allocation] = []
    for _ in range(8 * size):
        fixed = repair(space, space.sample(rng), cost, budget, importance)
        if fixed is not None and all(fixed != o for o, _ in chosen) and fixed not in pool:
            pool.append(fixed)
    while len(chosen) < size and pool:
        pick = _farthest(space, [c for c, _ in chosen], pool)
        chosen.append((pool.pop(pick), "random"))
    if not chosen:
        raise QRAError("no configuration of the search space fits the budget")
    return chosen


def _farthest(space: SearchSpace, chosen: Sequence[Allocation], pool: Sequence[Allocation]) -> int:
    """Index in ``pool`` of the member farthest (min L1 distance) from everything chosen so far."""
    if not chosen:
        return 0
    dists = [min(space.distance(p, c) for c in chosen) for p in pool]
    return int(np.argmax(dists))


def _tournament(ranks: Sequence[int], rng: np.random.Generator) -> int:
    a, b = rng.integers(0, len(ranks), size=2)
    return int(a if (ranks[a], a) <= (ranks[b], b) else b)


def _evaluate_low(configs: Sequence[Allocation], records: dict[Allocation, Record], evaluate: Evaluate) -> None:
    todo = [c for c in configs if not records[c].low_done]
    if not todo:
        return
    for c, score in zip(todo, evaluate(list(todo), "low"), strict=True):
        records[c].low, records[c].low_done = score, True


@dataclass(frozen=True)
class _Models:
    """How stage 1 builds its performance models: the space, the priors and which features they see."""

    space: SearchSpace
    importance: Importance
    features: str

    def new(self, use_low: bool, seed: int) -> PerformanceModel:
        return PerformanceModel(self.space, use_low, seed, self.importance, self.features)


def _screen(
    models: _Models, records: dict[Allocation, Record], drafts: list[Allocation], k: int, seed: int
) -> list[Allocation]:
    """Pick ``k`` drafts to evaluate: lowest lower-confidence bound of the low-fidelity screening model."""
    if len(drafts) <= k:
        return drafts
    known = [r for r in records.values() if r.low is not None]
    if len(known) < 3:
        return drafts[:k]
    model = models.new(use_low=False, seed=seed).fit([r.config for r in known], None, [r.low for r in known])
    mean, std = model.predict(drafts, None)
    lcb = mean - std
    order = sorted(range(len(drafts)), key=lambda i: (round(float(lcb[i]), 9), i))
    return [drafts[i] for i in order[:k]]


def _promote(
    models: _Models,
    records: dict[Allocation, Record],
    evaluate: Evaluate,
    k: int,
    seed: int,
    say: Callable[[str], None],
) -> None:
    """Send the ``k`` most promising low-fidelity configs to the high fidelity.

    With at least three high-fidelity results the performance model (features + low score → high
    score) ranks candidates by predicted high score; before that the low score ranks them.
    """
    cands = [r for r in records.values() if r.low is not None and not r.high_done]
    if not cands:
        return
    done = [r for r in records.values() if r.high is not None and r.low is not None]
    if len(done) >= 3:
        model = models.new(use_low=True, seed=seed)
        model.fit([r.config for r in done], [r.low for r in done], [r.high for r in done])
        mean, _ = model.predict([r.config for r in cands], [r.low for r in cands])
        keys = [round(float(m), 9) for m in mean]
    else:
        keys = [float(r.low) for r in cands]  # type: ignore[arg-type]
    order = sorted(range(len(cands)), key=lambda i: (keys[i], cands[i].memory, i))
    chosen = [cands[i].config for i in order[:k]]
    for c, score in zip(chosen, evaluate(chosen, "high"), strict=True):
        records[c].high, records[c].high_done = score, True
    say(f"promoted {len(chosen)} to high fidelity")


def _generation_summary(
    gen: int, records: dict[Allocation, Record], population: Sequence[Allocation]
) -> dict[str, Any]:
    lows = [records[c].low for c in population if records[c].low is not None]
    highs = [r.high for r in records.values() if r.high is not None]
    return {
        "generation": gen,
        "population": len(population),
        "evaluated_low": sum(r.low_done for r in records.values()),
        "evaluated_high": sum(r.high_done for r in records.values()),
        "best_low": min(lows) if lows else None,
        "best_high": min(highs) if highs else None,
    }
