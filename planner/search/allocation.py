"""Allocations from the priors: per-unit importance, the one budget repair, and the plans the priors
give without any evaluation (greedy importance-per-byte, the LQ-LoRA-style ILP, AutoQRA's warm starts).

The search starts from these; the baselines *are* these. Everything here is deterministic for a seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from planner.search.space import Allocation, BudgetCost, SearchSpace
from qra_plugin.errors import QRAError

Cost = BudgetCost  # exact bytes via __call__, per-unit move savings via .saving


# ---------------------------------------------------------------------------------------------- importance
@dataclass(frozen=True)
class Importance:
    """Per-unit importance from the priors, scaled to comparable units.

    ``quant[b][u]``: loss increase when unit ``u`` is quantized to ``b`` bits (0 at 16 bits), divided by
    the largest value over all bits and units; ``plasticity[u]``: the unit's LoRA gradient signal divided
    by its maximum. Bit choices the profile did not measure are interpolated (8 bits → 0 when unmeasured,
    as 8-bit HQQ is near lossless).
    """

    quant: dict[int, np.ndarray]
    plasticity: np.ndarray
    #: ratio -> per-unit loss increase when the unit is pruned by it, on ``quant``'s scale (searched pruning)
    prune: dict[float, np.ndarray] = field(default_factory=dict)
    #: (unit, bits, rank) -> the output error an error-aware init leaves (``planner.priors.error_table``), where
    #: the performance model reads it (``search.surrogate_features: table``)
    table: dict[tuple[int, int, int], float] | None = None

    @classmethod
    def from_arrays(
        cls,
        space: SearchSpace,
        iq: dict[int, Sequence[float]],
        ir: Sequence[float],
        ip: dict[float, Sequence[float]] | None = None,
    ) -> Importance:
        n = space.n_units
        raw = {int(b): np.clip(np.asarray(v, dtype=np.float64), 0.0, None) for b, v in iq.items()}
        raw = {b: _to_units(space, v) for b, v in raw.items()}
        raw.setdefault(16, np.zeros(n))
        raw.setdefault(8, np.zeros(n))
        known = sorted(raw)
        quant: dict[int, np.ndarray] = {}
        for b in sorted(set(space.bits) | set(known)):
            if b in raw:
                quant[b] = raw[b]
            else:  # interpolate between the nearest measured widths (or hold the end value)
                lo = max((k for k in known if k < b), default=known[0])
                hi = min((k for k in known if k > b), default=known[-1])
                w = 0.0 if hi == lo else (b - lo) / (hi - lo)
                quant[b] = (1 - w) * raw[lo] + w * raw[hi]
        prune = _prune_table(space, ip or {})
        scale = max(float(max(v.max() for v in [*quant.values(), *prune.values()])), 1e-12)
        quant = {b: v / scale for b, v in quant.items()}
        prune = {r: v / scale for r, v in prune.items()}
        ir_arr = _to_units(space, np.clip(np.asarray(ir, dtype=np.float64), 0.0, None))
        plasticity = ir_arr / max(float(ir_arr.max()), 1e-12)
        return cls(quant=quant, plasticity=plasticity, prune=prune)

    @classmethod
    def from_priors(cls, priors: Any, space: SearchSpace) -> Importance:
        """From ``planner.priors.Priors`` (``I_q``: bits → per-unit list, ``I_r``: per-unit list, ``I_p``:
        ratio → per-unit list, used where the space searches pruning)."""
        ip = {float(r): v for r, v in priors.I_p.items()} if space.prune else None
        return cls.from_arrays(space, {int(b): v for b, v in priors.I_q.items()}, priors.I_r, ip)

    def bits_importance(self) -> np.ndarray:
        """How much a unit suffers from low bits overall (sum over the measured widths)."""
        return np.sum([v for v in self.quant.values()], axis=0)

    def bit_penalty(self, unit: int, old: int, new: int) -> float:
        return float(self.quant[new][unit] - self.quant[old][unit])

    def rank_penalty(self, unit: int, old: int, new: int, max_rank: int) -> float:
        """Lost plasticity when a unit's rank drops, on a log scale of the rank."""
        span = np.log2(1 + max_rank) or 1.0
        return float(self.plasticity[unit] * (np.log2(1 + old) - np.log2(1 + new)) / span)

    def prune_penalty(self, unit: int, old: float, new: float) -> float:
        return float(self.prune[new][unit] - self.prune[old][unit])

    def step_penalty(self, space: SearchSpace, unit: int, axis: int, old: Any, new: Any) -> float:
        """Importance lost when one coordinate (0 bits, 1 rank, 2 pruning) of ``unit`` moves from old to new."""
        if axis == 0:
            return self.bit_penalty(unit, old, new)
        if axis == 1:
            return self.rank_penalty(unit, old, new, space.ranks[-1])
        return self.prune_penalty(unit, old, new)

    def prune_importance(self) -> np.ndarray:
        """How much a unit suffers from pruning overall (sum over the ratios)."""
        return np.sum(list(self.prune.values()), axis=0) if self.prune else np.zeros_like(self.plasticity)


def _prune_table(space: SearchSpace, ip: dict[float, Sequence[float]]) -> dict[float, np.ndarray]:
    """Per-unit pruning damage at every ratio the space offers: measured, else linear in the ratio between
    the nearest measured ones (0 damage at ratio 0; beyond the largest, proportional to it)."""
    if not space.prune:
        return {}
    if not any(r > 0 for r in space.prune) or not ip:
        if any(r > 0 for r in space.prune):
            raise QRAError("the priors have no pruning sensitivity (I_p): re-run qra profile with this space.prune")
        return {r: np.zeros(space.n_units) for r in space.prune}
    raw = {0.0: np.zeros(space.n_units)} | {
        float(r): _to_units(space, np.clip(np.asarray(v, dtype=np.float64), 0.0, None)) for r, v in ip.items()
    }
    known = sorted(raw)
    table = {}
    for r in space.prune:
        lo = max(k for k in known if k <= r)
        hi = min((k for k in known if k >= r), default=None)
        if hi is None:  # past the largest measured ratio
            table[r] = raw[lo] * r / lo
        else:
            w = 0.0 if hi == lo else (r - lo) / (hi - lo)
            table[r] = (1 - w) * raw[lo] + w * raw[hi]
    return table


def _to_units(space: SearchSpace, values: np.ndarray) -> np.ndarray:
    """Per-unit values; block-level priors are broadcast onto module units."""
    if len(values) == space.n_units:
        return values
    blocks = space.unit_blocks
    if len(values) == max(blocks) + 1:
        return values[np.asarray(blocks)]
    raise QRAError(f"priors have {len(values)} units but the search space has {space.n_units}: re-run qra profile")


def repair(
    space: SearchSpace, config: Allocation, cost: Cost, budget: int, importance: Importance
) -> Allocation | None:
    """Downgrade the cheapest-to-lose choice per byte saved until ``config`` fits; None if it never can.

    Each step tries every one-step downgrade (a unit's bits, rank or pruning) and takes the one with the least
    importance lost per byte saved, so important units keep their precision, capacity and channels.
    """
    current = tuple(config)
    current_cost = cost(current)
    while current_cost > budget:
        best: tuple[float, int, Allocation] | None = None
        for u, choice in enumerate(current):
            k = 0  # the move's place among this unit's possible moves (a deterministic tie-break)
            for axis, values in enumerate(space.axes):
                i = values.index(choice[axis])
                if i == 0:
                    continue
                moved = choice[:axis] + (values[i - 1],) + choice[axis + 1 :]
                penalty = importance.step_penalty(space, u, axis, choice[axis], values[i - 1])
                saved = cost.saving(u, choice, moved)
                key = (max(penalty, 0.0) / saved if saved > 0 else None, space.n_axes * u + k)
                k += 1
                if key[0] is not None and (best is None or key < (best[0], best[1])):
                    best = (key[0], key[1], current[:u] + (moved,) + current[u + 1 :])
        if best is None:
            return None
        current = best[2]
        current_cost = cost(current)
    return current


# ---------------------------------------------------------------------------------------------- allocations
def flat_importance(space: SearchSpace) -> Importance:
    """Importance with no knowledge: every unit equal, loss grows as bits fall and rank shrinks."""
    n = space.n_units
    top = max(space.bits)
    quant = {b: np.full(n, (top - b) / max(top - min(space.bits), 1)) for b in set(space.bits) | {8, 16}}
    prune = {r: np.full(n, r / max(space.prune)) for r in space.prune} if space.prune else {}
    return Importance(quant=quant, plasticity=np.ones(n), prune=prune)


def uniform_under_budget(space: SearchSpace, cost: BudgetCost, budget: int, rank: int | None = None) -> Allocation:
    """The best uniform plan that fits: most bits first, then most rank (or the given rank)."""
    ranks = [rank] if rank is not None else sorted(space.ranks, reverse=True)
    for b in sorted(space.bits, reverse=True):
        for r in ranks:
            config = space.uniform(b, r)
            if cost(config) <= budget:
                return config
    raise QRAError("no uniform plan in the search space fits the budget")


def greedy_priors(space: SearchSpace, cost: BudgetCost, budget: int, importance: Importance) -> Allocation:
    """Importance-only allocation: start from the richest config and downgrade by least importance per byte."""
    config = repair(space, space.richest(), cost, budget, importance)
    if config is None:
        raise QRAError("the budget is below the cheapest config of the search space")
    return config


def ilp(space: SearchSpace, cost: BudgetCost, budget: int, importance: Importance, rank: int) -> Allocation:
    """LQ-LoRA-style ILP: choose bits per unit minimising summed I_q subject to the budget, uniform rank.

    Memory is linear in per-unit choices up to small cross terms (activations do not depend on bits), so
    the ILP uses the per-unit marginal bytes; if the exact memory model then says the answer is over
    budget, the ILP is re-solved with the budget tightened by the overshoot.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    bits = list(space.bits)
    n, k = space.n_units, len(bits)
    objective = np.array([importance.quant[b][u] for u in range(n) for b in bits])
    weights = np.array([cost.marginal[u][space.choice(b, rank)] for u in range(n) for b in bits], dtype=np.float64)
    one_per_unit = np.kron(np.eye(n), np.ones(k))
    reference = cost(space.richest())
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
        config = tuple(space.choice(bits[i], rank) for i in choice)
        over = cost(config) - budget
        if over <= 0:
            return config
        slack += over
    raise QRAError("ILP could not meet the exact budget after 20 tightenings")


# ---------------------------------------------------------------------------------------------- warm starts
def _minmax(values: np.ndarray) -> np.ndarray:
    span = float(values.max() - values.min())
    return np.full_like(values, 0.5) if span < 1e-12 else (values - values.min()) / span


def prior_scores(importance: Importance) -> tuple[np.ndarray, np.ndarray]:
    """(bits importance, rank importance) per unit in [0, 1]: log-normalised summed I_q and I_r."""
    return _minmax(np.log1p(1e3 * importance.bits_importance())), _minmax(np.log1p(1e3 * importance.plasticity))


def _map(scores: np.ndarray, levels: int, centre: float, spread: float) -> np.ndarray:
    """Indices into ``levels`` choices: ``centre`` (in [0, 1] of the index range) ± spread·(score − ½)."""
    top = levels - 1
    return np.clip(np.rint(top * (centre + spread * (scores - 0.5))), 0, top).astype(np.int64)


def _draw_importance(
    space: SearchSpace, q: np.ndarray, r: np.ndarray, rank_weight: float, p: np.ndarray | None = None
) -> Importance:
    """An importance whose bit steps cost ``q``, rank steps ``r`` (in log-rank) and pruning steps ``p``,
    ranks weighted against the rest."""
    top = max(len(space.bits) - 1, 1)
    quant = {b: (1 - rank_weight) * (q + 0.05) * (top - i) / top for i, b in enumerate(space.bits)}
    quant.setdefault(16, np.zeros(space.n_units))
    prune = {}
    if space.prune and p is not None:
        top_p = max(len(space.prune) - 1, 1)
        prune = {x: (1 - rank_weight) * (p + 0.05) * (top_p - j) / top_p for j, x in enumerate(space.prune)}
    return Importance(quant=quant, plasticity=rank_weight * (r + 0.05), prune=prune)


def warm_start(
    importance: Importance, space: SearchSpace, cost: Cost, budget: int, n: int, seed: int
) -> list[Allocation]:
    """AutoQRA's warm start: ``n`` distinct budget-feasible configs mapped from the priors (high I_q → more
    bits, high I_r → more rank, high I_p → less pruning), fewer only if the space has no more.

    Each config is one draw of the mapping: scores get Gumbel noise of a temperature, are mapped around a
    centre level with a spread, then ``repair`` downgrades them into the budget. The first draw is the
    noiseless mapping; later ones get hotter and shift centre and bits/rank trade-off, so the population
    covers the budget frontier instead of n copies of one plan. Raises QRAError when nothing fits.
    """
    n_units = space.n_units
    if cost(space.cheapest()) > budget:
        low = space.cheapest()[0]
        pruned = f" pruned by {low[2]:g}" if space.prune else ""
        raise QRAError(
            f"the budget is too small: even {low[0]} bits with rank {low[1]}{pruned} everywhere does not fit"
        )
    q, r = prior_scores(importance)
    p = _minmax(np.log1p(1e3 * importance.prune_importance())) if space.prune else None
    rng = np.random.default_rng(seed)
    configs: list[Allocation] = []
    for attempt in range(10 * n + 10):
        if len(configs) >= n:
            break
        centre_p = 1.0
        if attempt == 0:
            tau, centre_b, centre_r, spread, rank_weight = 0.0, 1.0, 1.0, 1.0, 0.5
        else:
            tau = 0.05 + 0.45 * min(1.0, attempt / max(n - 1, 1))
            centre_b, centre_r = rng.uniform(0.5, 1.0, size=2)
            spread, rank_weight = rng.uniform(0.5, 2.0), rng.uniform(0.2, 0.8)
            if p is not None:
                centre_p = rng.uniform(0.3, 1.0)
        q_t = _minmax(q + tau * rng.gumbel(size=n_units)) if tau else q
        r_t = _minmax(r + tau * rng.gumbel(size=n_units)) if tau else r
        cols = [_map(q_t, len(space.bits), centre_b, spread), _map(r_t, len(space.ranks), centre_r, spread)]
        p_t = None
        if p is not None:
            p_t = _minmax(p + tau * rng.gumbel(size=n_units)) if tau else p
            cols.append(_map(p_t, len(space.prune), centre_p, spread))
        drafted = space.from_indices(np.stack(cols, axis=1))
        config = repair(space, drafted, cost, budget, _draw_importance(space, q_t, r_t, rank_weight, p_t))
        if config is not None and config not in configs:
            configs.append(config)
    return configs


def prior_allocations(
    space: SearchSpace, cost: Cost, budget: int, importance: Importance, rank: int
) -> list[Allocation]:
    """The two allocations the priors give for free: greedy importance-per-byte and the ILP at ``rank``.

    On SmolLM2 both beat a search that started without them (benchmarks/results/plan_quality_v1.json),
    so the population starts from them and the evaluations go into refining them, not into finding them.
    A budget that leaves no room for one of them still yields the other.
    """
    return list(named_prior_allocations(space, cost, budget, importance, rank).values())


def named_prior_allocations(
    space: SearchSpace, cost: Cost, budget: int, importance: Importance, rank: int
) -> dict[str, Allocation]:
    """``prior_allocations`` by name (``greedy_priors``, ``ilp``): what a search must beat to earn its cost."""
    found: dict[str, Allocation] = {}
    with contextlib.suppress(QRAError):
        found["greedy_priors"] = greedy_priors(space, cost, budget, importance)
    with contextlib.suppress(QRAError):
        found["ilp"] = ilp(space, cost, budget, importance, rank)
    return found


def table_allocation(
    space: SearchSpace, cost: BudgetCost, budget: int, table: dict[tuple[int, int, int], float]
) -> Allocation:
    """Zero-evaluation allocation from the error table (``planner.priors.adapter_init.error_table``): start from
    the richest config and take, one step at a time, the downgrade (a unit's bits or rank) that adds the least
    starting output error per byte saved, until the config fits. Bits and rank are priced together: a rank
    step's cost depends on the unit's bits (an 8-bit unit's adapter repairs almost nothing at the start)."""
    if space.prune:
        raise QRAError("the error-table allocation does not search pruning")
    current = space.richest()
    while cost(current) > budget:
        best: tuple[float, int, Allocation] | None = None
        for u, choice in enumerate(current):
            for axis, values in enumerate(space.axes):
                i = values.index(choice[axis])
                if i == 0:
                    continue
                moved = choice[:axis] + (values[i - 1],) + choice[axis + 1 :]
                saved = cost.saving(u, choice, moved)
                if saved <= 0:
                    continue
                added = table[(u, *moved[:2])] - table[(u, *choice[:2])]
                key = (max(added, 0.0) / saved, 2 * u + axis)
                if best is None or key < best[:2]:
                    best = (*key, current[:u] + (moved,) + current[u + 1 :])
        if best is None:
            raise QRAError("the budget is below the cheapest config of the search space")
        current = best[2]
    return current
