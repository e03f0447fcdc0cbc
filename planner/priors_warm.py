"""AutoQRA's warm start: map the priors to initial configs (high I_q → more bits, high I_r → more rank).

Each config comes from one draw of the mapping: scores are perturbed with Gumbel noise of a
temperature, mapped linearly around a centre level with a spread (the "threshold" and "sharpness" of
the mapping), then repaired to fit the budget by downgrading the least important choice first. The
first config is the noiseless mapping; later ones get hotter and shift their centre and the bits/rank
trade-off, so the population covers the budget frontier instead of n copies of one plan.

Works with any ``space`` that has ``.bits`` and ``.ranks`` (sorted) and ``.n_units`` (duck typing, so it
does not depend on ``planner.space``); block-level priors are broadcast onto module units when the space
exposes ``.unit_blocks``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qra_plugin.errors import QRAError

Config = tuple[tuple[int, int], ...]


def _minmax(values: np.ndarray) -> np.ndarray:
    span = float(values.max() - values.min())
    return np.full_like(values, 0.5) if span < 1e-12 else (values - values.min()) / span


def _per_unit(values: Sequence[float], space: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) == space.n_units:
        return arr
    blocks = getattr(space, "unit_blocks", None)
    if blocks is not None and len(arr) == max(blocks) + 1:
        return arr[np.asarray(blocks)]
    raise QRAError(f"priors have {len(arr)} units but the search space has {space.n_units}: re-run qra profile")


def prior_scores(priors: Any, space: Any) -> tuple[np.ndarray, np.ndarray]:
    """(bits importance, rank importance) per unit in [0, 1]: mean log-normalised I_q over the profiled
    widths, and log-normalised I_r."""
    iq = np.mean([priors.normalised_iq(int(b)) for b in priors.I_q], axis=0)
    return _minmax(_per_unit(iq, space)), _minmax(_per_unit(priors.normalised_ir(), space))


def _map(scores: np.ndarray, levels: int, centre: float, spread: float) -> np.ndarray:
    """Indices into ``levels`` choices: ``centre`` (in [0, 1] of the index range) ± spread·(score − ½)."""
    top = levels - 1
    return np.clip(np.rint(top * (centre + spread * (scores - 0.5))), 0, top).astype(np.int64)


def _repair(
    idx: np.ndarray,
    q: np.ndarray,
    r: np.ndarray,
    rank_weight: float,
    to_config: Callable[[np.ndarray], Config],
    fits: Callable[[Config], bool],
) -> Config | None:
    """Downgrade one step at a time — the choice whose loss matters least — until the config fits.

    A step's cost is the unit's importance times how many steps it already lost (plus a floor), so
    repeated cuts spread over the unimportant units instead of sending one unit to the bottom at once.
    """
    idx = idx.copy()
    start = idx.copy()
    while not fits(config := to_config(idx)):
        best: tuple[float, int, int] | None = None
        for u in range(len(idx)):
            for kind, score, weight in ((0, q[u], 1.0 - rank_weight), (1, r[u], rank_weight)):
                if idx[u, kind] == 0:
                    continue
                cost = (score + 0.05) * weight * (1 + start[u, kind] - idx[u, kind])
                if best is None or cost < best[0]:
                    best = (cost, u, kind)
        if best is None:
            return None
        idx[best[1], best[2]] -= 1
    return config


def warm_start(priors: Any, space: Any, fits: Callable[[Config], bool], n: int, seed: int) -> list[Config]:
    """``n`` distinct budget-feasible configs from the priors (fewer only if the space has no more).

    Deterministic for a seed. Raises QRAError when not even the lowest bits and rank fit the budget.
    """
    bits, ranks = list(space.bits), list(space.ranks)
    n_units = int(space.n_units)
    lowest: Config = tuple((bits[0], ranks[0]) for _ in range(n_units))
    if not fits(lowest):
        raise QRAError(f"the budget is too small: even {bits[0]} bits with rank {ranks[0]} everywhere does not fit")
    q, r = prior_scores(priors, space)
    rng = np.random.default_rng(seed)

    def to_config(idx: np.ndarray) -> Config:
        return tuple((bits[int(b)], ranks[int(k)]) for b, k in idx)

    configs: list[Config] = []
    seen: set[Config] = set()
    for attempt in range(10 * n + 10):
        if len(configs) >= n:
            break
        if attempt == 0:
            tau, centre_b, centre_r, spread, rank_weight = 0.0, 1.0, 1.0, 1.0, 0.5
        else:
            heat = min(1.0, attempt / max(n - 1, 1))
            tau = 0.05 + 0.45 * heat
            centre_b, centre_r = rng.uniform(0.5, 1.0, size=2)
            spread = rng.uniform(0.5, 2.0)
            rank_weight = rng.uniform(0.2, 0.8)
        q_t = _minmax(q + tau * rng.gumbel(size=n_units)) if tau else q
        r_t = _minmax(r + tau * rng.gumbel(size=n_units)) if tau else r
        idx = np.stack([_map(q_t, len(bits), centre_b, spread), _map(r_t, len(ranks), centre_r, spread)], axis=1)
        config = _repair(idx, q_t, r_t, rank_weight, to_config, fits)
        if config is not None and config not in seen:
            seen.add(config)
            configs.append(config)
    return configs
