"""The performance model: (config features, low-fidelity score) → high-fidelity score.

Short SFT runs rank plans well but are biased by rank (low-rank plans start slower; STACK_NOTES), so
stage 1 does not promote on the low score alone: a BoTorch ``SingleTaskGP`` on the config's features
(per-unit ordinal bits and rank, mean bits, mean log-rank) plus the low-fidelity score learns the
correction from the configs that already have both scores. The same class without the low score is
the screening model that picks which offspring deserve a low-fidelity run. ``heldout_spearman``
reports how well it ranks configs it was not trained on (k-fold, a refit per fold).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from planner.search.space import Allocation, SearchSpace

log = logging.getLogger("qra")

#: GP fits done and failed in this process; the search reports the failures in its trace and report
FIT_STATS = {"fits": 0, "failed": 0}


def features(space: SearchSpace, configs: Sequence[Allocation]) -> np.ndarray:
    """Per-unit ordinal coordinates in [0, 1], then mean bits and mean log2(1 + rank) (and mean pruning
    ratio), each in [0, 1]."""
    enc = np.stack([space.encode(c) for c in configs]) if configs else np.zeros((0, space.dim))
    bits = np.array([[u[0] for u in c] for c in configs], dtype=np.float64).reshape(len(configs), -1)
    ranks = np.array([[u[1] for u in c] for c in configs], dtype=np.float64).reshape(len(configs), -1)
    lo_b, hi_b = space.bits[0], space.bits[-1]
    mean_bits = (bits.mean(axis=1) - lo_b) / max(hi_b - lo_b, 1) if configs else np.zeros(0)
    log_r = np.log2(1 + ranks)
    lo_r, hi_r = np.log2(1 + space.ranks[0]), np.log2(1 + space.ranks[-1])
    mean_rank = (log_r.mean(axis=1) - lo_r) / max(hi_r - lo_r, 1e-9) if configs else np.zeros(0)
    parts = [enc, mean_bits[:, None], mean_rank[:, None]]
    if space.prune:  # mean pruning ratio, scaled to [0, 1] of the offered range
        ratios = np.array([[u[2] for u in c] for c in configs], dtype=np.float64).reshape(len(configs), -1)
        lo_p, hi_p = min(space.prune), max(space.prune)
        parts.append(((ratios.mean(axis=1) - lo_p) / max(hi_p - lo_p, 1e-9))[:, None])
    return np.concatenate(parts, axis=1)


#: which inputs the performance model sees: per-unit ordinal coordinates + means (``ordinal``), the priors'
#: aggregates + means (``prior``: damage Σ I_q at the chosen bits, plasticity-weighted log-rank, pruning
#: damage), both, or the error table's starting error + the priors' aggregates (``table``)
FEATURE_SETS = ("ordinal", "prior", "both", "table")


def prior_features(space: SearchSpace, importance: Any, configs: Sequence[Allocation]) -> np.ndarray:
    """What the priors say about each config, in [0, 1]: mean quantization damage at the chosen bits, the
    plasticity-weighted share of the largest log-rank, mean pruning damage (pruned spaces); then the means."""
    n = space.n_units
    plast = importance.plasticity / max(float(importance.plasticity.sum()), 1e-12)
    span = np.log2(1 + space.ranks[-1]) or 1.0
    rows = []
    for c in configs:
        row = [
            sum(float(importance.quant[u_c[0]][u]) for u, u_c in enumerate(c)) / n,
            sum(float(plast[u]) * np.log2(1 + u_c[1]) / span for u, u_c in enumerate(c)),
        ]
        if space.prune:
            row.append(sum(float(importance.prune[u_c[2]][u]) for u, u_c in enumerate(c)) / n)
        rows.append(row)
    prior = np.array(rows, dtype=np.float64).reshape(len(configs), -1)
    means = features(space, configs)[:, space.dim :]
    return np.concatenate([prior, means], axis=1)


def table_features(space: SearchSpace, table: dict[tuple[int, int, int], float], configs: Sequence[Allocation]):
    """What the error table says of each config, in [0, 1]: the output error an error-aware init leaves, summed
    over units, as a share of the worst config's — linear, and on a log scale over six decades (8-bit units leave
    errors orders of magnitude below 3-bit ones)."""
    worst = sum(max(table[(u, b, r)] for b in space.bits for r in space.ranks) for u in range(space.n_units))
    shares = np.array(
        [sum(table[(u, int(c_u[0]), int(c_u[1]))] for u, c_u in enumerate(c)) / max(worst, 1e-30) for c in configs],
        dtype=np.float64,
    )
    logs = np.clip(np.log10(np.maximum(shares, 1e-6)) / 6 + 1, 0.0, 1.0)
    return np.stack([shares, logs], axis=1).reshape(len(configs), 2)


def fit_gp(x: np.ndarray, y: np.ndarray, seed: int):
    """A BoTorch SingleTaskGP (standardised outcome) fitted by marginal likelihood, in float64."""
    from botorch.exceptions.warnings import InputDataWarning, OptimizationWarning
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    tx = torch.as_tensor(x, dtype=torch.float64)
    ty = torch.as_tensor(np.asarray(y, dtype=np.float64).reshape(-1, 1))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputDataWarning)
            warnings.simplefilter("ignore", OptimizationWarning)
            warnings.simplefilter("ignore", UserWarning)
            model = SingleTaskGP(tx, ty, outcome_transform=Standardize(m=1))
            mll = ExactMarginalLogLikelihood(model.likelihood, model)
            FIT_STATS["fits"] += 1
            try:
                fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": 200}})
            except Exception as exc:  # noqa: BLE001 - botorch raises several types; every one is counted
                # the prior's hyperparameters still make a valid (if vaguer) GP: go on, but say so
                FIT_STATS["failed"] += 1
                log.warning(
                    "qra: GP fit failed on %d points (%s: %s); using prior hyperparameters",
                    len(tx),
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
    model.eval()
    return model


class PerformanceModel:
    """GP from config features (and optionally the low-fidelity score) to a target score (lower is better)."""

    def __init__(
        self, space: SearchSpace, use_low: bool, seed: int = 0, importance: Any = None, feature_set: str = "ordinal"
    ) -> None:
        if feature_set not in FEATURE_SETS or (feature_set != "ordinal" and importance is None):
            raise ValueError(f"feature_set must be one of {FEATURE_SETS}; 'prior' and 'both' need the importance")
        if feature_set == "table" and getattr(importance, "table", None) is None:
            raise ValueError("feature_set 'table' needs the importance with its error table")
        self.space = space
        self.use_low = use_low
        self.seed = seed
        self.importance, self.feature_set = importance, feature_set
        self._model = None
        self._low_range = (0.0, 1.0)

    def _features(self, configs: Sequence[Allocation]) -> np.ndarray:
        if self.feature_set == "ordinal":
            return features(self.space, configs)
        prior = prior_features(self.space, self.importance, configs)
        if self.feature_set == "prior":
            return prior
        if self.feature_set == "table":
            return np.concatenate([table_features(self.space, self.importance.table, configs), prior], axis=1)
        return np.concatenate([features(self.space, configs)[:, : self.space.dim], prior], axis=1)

    def _inputs(self, configs: Sequence[Allocation], lows: Sequence[float] | None) -> np.ndarray:
        x = self._features(configs)
        if not self.use_low:
            return x
        if lows is None:
            raise ValueError("this performance model needs the low-fidelity scores")
        lo, hi = self._low_range
        low = (np.asarray(lows, dtype=np.float64) - lo) / (hi - lo)
        return np.concatenate([x, low[:, None]], axis=1)

    def fit(
        self, configs: Sequence[Allocation], lows: Sequence[float] | None, targets: Sequence[float]
    ) -> PerformanceModel:
        if len(configs) < 2:
            raise ValueError("the performance model needs at least two training points")
        if self.use_low:
            arr = np.asarray(lows, dtype=np.float64)
            span = float(arr.max() - arr.min()) or 1.0
            self._low_range = (float(arr.min()), float(arr.min()) + span)
        self._model = fit_gp(self._inputs(configs, lows), np.asarray(targets, dtype=np.float64), self.seed)
        return self

    def predict(self, configs: Sequence[Allocation], lows: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of the target for each config."""
        if self._model is None:
            raise RuntimeError("fit the performance model first")
        x = torch.as_tensor(self._inputs(configs, lows), dtype=torch.float64)
        with torch.no_grad():
            post = self._model.posterior(x)
            mean = post.mean.reshape(-1).numpy()
            std = post.variance.clamp_min(0).sqrt().reshape(-1).numpy()
        return mean.copy(), std.copy()


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation, or None when it is undefined (fewer than 3 points or a constant side)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def heldout_spearman(
    space: SearchSpace,
    configs: Sequence[Allocation],
    lows: Sequence[float] | None,
    targets: Sequence[float],
    seed: int = 0,
    folds: int = 5,
    importance: Any = None,
    feature_set: str = "ordinal",
) -> float | None:
    """Held-out rank correlation by k-fold cross-validation (leave-one-out when n ≤ ``folds``).

    Each fold's points are predicted by a model refitted without them (hyperparameters included), and
    the pooled predictions are rank-correlated with the truth. ``lows=None`` evaluates the screening
    model (features only). None with fewer than four points. k is capped because every fold is a GP fit.
    """
    n = len(configs)
    if n < 4:
        return None
    k = min(n, folds)
    configs, targets = list(configs), list(targets)
    lows_l = list(lows) if lows is not None else None
    preds = [0.0] * n
    for f in range(k):
        held = [i for i in range(n) if i % k == f]
        keep = [i for i in range(n) if i % k != f]
        model = PerformanceModel(space, lows_l is not None, seed, importance, feature_set)
        model.fit(
            [configs[j] for j in keep],
            [lows_l[j] for j in keep] if lows_l is not None else None,
            [targets[j] for j in keep],
        )
        mean, _ = model.predict([configs[i] for i in held], [lows_l[i] for i in held] if lows_l is not None else None)
        for i, m in zip(held, mean, strict=True):
            preds[i] = float(m)
    return spearman(preds, targets)
