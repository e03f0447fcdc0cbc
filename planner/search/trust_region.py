"""Stage 2: TuRBO-style trust-region Bayesian optimisation at the high fidelity.

Around the best feasible config found so far, the region holds every config within L1 distance
``length`` in ordinal choice indices (``length`` one-step moves). The region doubles after
``success_tol`` consecutive improvements, halves after ``failure_tol`` consecutive misses, and when it
collapses below one step the search restarts at the best feasible config not yet used as a centre.
A BoTorch ``SingleTaskGP`` on the ordinal encoding models the high-fidelity score; candidates are the
centre's feasible neighbours plus random feasible walks inside the region, ranked by analytic
``LogExpectedImprovement``. BoTorch supplies the model and the acquisition; this module only decides
where to look. Pure logic: ``evaluate(configs, "high")`` is handed in by the orchestrator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from planner.search.space import Allocation, SearchSpace
from planner.search.surrogate import fit_gp

Evaluate = Callable[[list[Allocation], str], list[float | None]]


@dataclass
class TRSettings:
    iterations: int = 6
    batch: int = 1
    length_init: int = 4
    length_min: int = 1
    length_max: int = 16
    success_tol: int = 2
    failure_tol: int = 2
    n_candidates: int = 256
    seed: int = 0
    #: stop after this many iterations in a row that beat the stage's starting best by no more than
    #: ``min_gain`` nats (0: run every iteration) — evaluations that cannot beat the seed noise are not spent
    patience: int = 0
    min_gain: float = 0.0
    #: also propose two-step trades (one coordinate up, another down) inside the region
    trades: bool = False


@dataclass
class TRState:
    """The trust region: its centre, length (in one-step moves) and success/failure counters."""

    centre: Allocation
    length: int
    successes: int = 0
    failures: int = 0
    restarts: int = 0
    used_centres: list[Allocation] = field(default_factory=list)

    def update(self, improved: bool, settings: TRSettings) -> None:
        """Grow after enough successes, shrink after enough failures (TuRBO's rule)."""
        if improved:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1
        if self.successes >= settings.success_tol:
            self.length = min(2 * self.length, settings.length_max)
            self.successes = 0
        if self.failures >= settings.failure_tol:
            self.length //= 2
            self.failures = 0

    def collapsed(self, settings: TRSettings) -> bool:
        return self.length < settings.length_min


@dataclass
class Stage2Result:
    history: dict[Allocation, float | None]
    evaluated: list[dict[str, Any]]
    best: Allocation | None
    restarts: int
    #: the iteration stage 2 stopped at for lack of gain (None: it ran every iteration)
    stopped_early_at: int | None = None


def region_candidates(
    space: SearchSpace,
    centre: Allocation,
    length: int,
    fits: Callable[[Allocation], bool],
    exclude: Mapping[Allocation, Any] | set[Allocation],
    rng: np.random.Generator,
    n: int,
    with_trades: bool = False,
) -> list[Allocation]:
    """Feasible, not yet evaluated configs within ``length`` one-step moves of ``centre`` (sorted, unique)."""
    found: set[Allocation] = set()
    if length >= 1:
        found.update(space.neighbours(centre))
    sizes = np.array(space.sizes)
    base = space.indices(centre)
    for _ in range(n):
        idx = base.copy()
        for _step in range(int(rng.integers(1, max(length, 1) + 1))):
            u, d = int(rng.integers(0, space.n_units)), int(rng.integers(0, space.n_axes))
            v = idx[u, d] + (1 if rng.random() < 0.5 else -1)
            if 0 <= v < sizes[d]:
                idx[u, d] = v
        found.add(space.from_indices(idx))
    if with_trades and length >= 2:
        found.update(trades(space, centre, rng, n))
    out = [c for c in found if c not in exclude and c != centre and space.distance(c, centre) <= length]
    out = [c for c in sorted(out) if fits(c)]
    return out


def trades(space: SearchSpace, centre: Allocation, rng: np.random.Generator, n: int) -> set[Allocation]:
    """Up to ``n`` two-step moves that raise one coordinate and lower another (rank for bits, bits for rank,
    one unit's channels for another's): under a binding budget a single step up never fits, a trade can."""
    base = space.indices(centre)
    sizes = np.array(space.sizes)
    ups = [(u, d) for u in range(space.n_units) for d in range(space.n_axes) if base[u, d] < sizes[d] - 1]
    downs = [(u, d) for u in range(space.n_units) for d in range(space.n_axes) if base[u, d] > 0]
    out: set[Allocation] = set()
    if not ups or not downs:
        return out
    for _ in range(n):
        (ua, da), (ub, db) = ups[int(rng.integers(len(ups)))], downs[int(rng.integers(len(downs)))]
        if (ua, da) == (ub, db):
            continue
        idx = base.copy()
        idx[ua, da] += 1
        idx[ub, db] -= 1
        out.add(space.from_indices(idx))
    return out


def propose(
    space: SearchSpace, history: Mapping[Allocation, float | None], candidates: Sequence[Allocation], k: int, seed: int
) -> list[Allocation]:
    """The ``k`` candidates of highest log expected improvement under a GP on the finished evaluations."""
    from botorch.acquisition.analytic import LogExpectedImprovement

    done = [(c, s) for c, s in sorted(history.items(), key=lambda kv: kv[0]) if s is not None]
    if len(done) < 2 or len(candidates) <= k:
        return list(candidates)[:k]
    x = np.stack([space.encode(c) for c, _ in done])
    y = -np.array([s for _, s in done], dtype=np.float64)  # BoTorch maximises
    model = fit_gp(x, y, seed)
    acq = LogExpectedImprovement(model, best_f=float(y.max()))
    xc = torch.as_tensor(np.stack([space.encode(c) for c in candidates]), dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        values = acq(xc).numpy()
    order = sorted(range(len(candidates)), key=lambda i: (-round(float(values[i]), 9), i))
    return [candidates[i] for i in order[:k]]


def run_stage2(
    space: SearchSpace,
    fits: Callable[[Allocation], bool],
    memory: Callable[[Allocation], int],
    evaluate: Evaluate,
    history: Mapping[Allocation, float | None],
    settings: TRSettings,
    progress: Callable[[str], None] | None = None,
) -> Stage2Result:
    """Refine the best feasible high-fidelity configs with trust-region BO; return every evaluation."""
    say = progress or (lambda _msg: None)
    rng = np.random.default_rng(settings.seed)
    hist: dict[Allocation, float | None] = dict(history)
    evaluated: list[dict[str, Any]] = []

    def ranked() -> list[Allocation]:
        ok = [c for c, s in hist.items() if s is not None and fits(c)]
        return sorted(ok, key=lambda c: (hist[c], memory(c), c))

    start = ranked()
    if not start:
        say("stage 2 skipped: no feasible high-fidelity result from stage 1")
        return Stage2Result(hist, evaluated, None, 0)
    length0 = min(settings.length_init, settings.length_max)
    state = TRState(centre=start[0], length=length0, used_centres=[start[0]])
    start_best, no_gain, stopped = hist[start[0]], 0, None
    for it in range(settings.iterations):
        if settings.patience and no_gain >= settings.patience:
            stopped = it
            say(
                f"stage 2 stopped after {it} iterations: none beat the best start by more than {settings.min_gain} nats"
            )
            break
        cands = region_candidates(
            space, state.centre, state.length, fits, hist, rng, settings.n_candidates, settings.trades
        )
        if not cands:
            state.length = 0  # nothing left to try here: treat as a collapse
        else:
            chosen = propose(space, hist, cands, settings.batch, settings.seed + it)
            best_before = hist[ranked()[0]]
            scores = evaluate(chosen, "high")
            for c, s in zip(chosen, scores, strict=True):
                hist[c] = s
                evaluated.append(
                    {"iteration": it, "config": c, "score": s, "length": state.length, "restart": state.restarts}
                )
            finite = [s for s in scores if s is not None]
            improved = bool(finite) and min(finite) < best_before - 1e-3 * abs(best_before)  # type: ignore[operator]
            state.update(improved, settings)
            order = ranked()
            gained = bool(finite) and min(finite) < start_best - settings.min_gain  # type: ignore[operator]
            no_gain = 0 if gained else no_gain + 1
            if improved and order:
                state.centre = order[0]
            say(f"stage 2 iteration {it}: length {state.length}, best {hist[order[0]]:.4f}")
        if state.collapsed(settings):
            fresh = [c for c in ranked() if c not in state.used_centres]
            state.centre = fresh[0] if fresh else ranked()[0]
            state.used_centres.append(state.centre)
            state.length, state.successes, state.failures = length0, 0, 0
            state.restarts += 1
            say(f"stage 2: trust region collapsed, restart #{state.restarts}")
    order = ranked()
    return Stage2Result(hist, evaluated, order[0] if order else None, state.restarts, stopped)
