"""Stage 1 mechanics on a cheap real objective: HQQ quantization error of a tiny model's real weights.

The objective (``QuantErrorObjective``) quantizes every block's real weight matrices with HQQ at each
bit-width and measures how much of the residual a rank-r correction (its truncated SVD, what a LoRA
adapter of that rank can at best absorb) leaves: real numbers from real tensors, cheap enough to test
the optimiser's logic. The search itself is tested with real SFT fidelities in test_search.py.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from planner.config import ModelSection, SpaceSection, TinyModel
from planner.loading import load_model
from planner.search.allocation import Importance, repair
from planner.search.evolution import Stage1Settings, crossover, mutate, nondominated_sort, run_stage1, select
from planner.search.space import Allocation, BudgetCost, SearchSpace
from qra_plugin.modules import quantizable_linears
from qra_plugin.plan import fingerprint

LAYERS = 4


@lru_cache(maxsize=1)
def _tables() -> tuple[SearchSpace, dict, dict]:
    """Per block and (bits, rank): residual error after rank-r correction (high) and after rank r//4 (low)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = load_model(ModelSection(tiny=TinyModel(layers=LAYERS, hidden=64, seed=3)))
    specs = quantizable_linears(model)
    space = SearchSpace.from_parts(SpaceSection(), fingerprint(model), specs)
    modules = dict(model.named_modules())
    high: dict = {}
    low: dict = {}
    for block in range(LAYERS):
        weights = [modules[s.name].weight.detach().float().clone() for s in specs if s.block == block]
        for bits in space.bits:
            residuals = []
            for w in weights:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data.copy_(w)
                q = HQQLinear(
                    lin,
                    BaseQuantizeConfig(nbits=bits, group_size=16 if bits < 4 else 64),
                    compute_dtype=torch.float32,
                    device="cpu",
                )
                residuals.append((w - q.dequantize().float()).double())
            svals = [torch.linalg.svdvals(r) ** 2 for r in residuals]
            norm = float(sum((w.double() ** 2).sum() for w in weights))
            for rank in space.ranks:
                high[(block, bits, rank)] = float(sum(s[rank:].sum() for s in svals)) / norm
                low[(block, bits, rank)] = float(sum(s[rank // 4 :].sum() for s in svals)) / norm
    return space, high, low


class QuantErrorObjective:
    """evaluate(configs, level) over the real error tables; counts calls per level."""

    def __init__(self, fail: set[Allocation] | None = None) -> None:
        self.space, self.high, self.low = _tables()
        self.calls: dict[str, list[Allocation]] = {"low": [], "high": []}
        self.fail = fail or set()

    def score(self, config: Allocation, level: str) -> float:
        table = self.high if level == "high" else self.low
        return 100 * sum(table[(u, b, r)] for u, (b, r) in enumerate(config))

    def __call__(self, configs: list[Allocation], level: str) -> list[float | None]:
        self.calls[level] += configs
        return [None if c in self.fail else self.score(c, level) for c in configs]


def _cost(space: SearchSpace) -> BudgetCost:
    numel = space.unit_numel()

    def total(c: Allocation) -> int:  # weight bytes (+ HQQ scale/zero per group) + fp32 LoRA with grads and Adam
        return int(sum(n * b / 8 + n / 64 * 4 + r * 128 * 7 * 16 for n, (b, r) in zip(numel, c, strict=True)))

    return BudgetCost(space, total)


def _importance(space: SearchSpace) -> Importance:
    _, high, _ = _tables()
    iq = {b: [high[(u, b, space.ranks[0])] for u in range(space.n_units)] for b in (2, 3, 4)}
    ir = [high[(u, 2, space.ranks[0])] - high[(u, 2, space.ranks[-1])] for u in range(space.n_units)]
    return Importance.from_arrays(space, iq, ir)


def test_importance_interpolates_and_broadcasts() -> None:
    space, _, _ = _tables()
    imp = Importance.from_arrays(space, {2: [4, 3, 2, 1], 4: [2, 1, 1, 0]}, [1, 2, 3, 4])
    assert imp.quant[2].max() == 1.0 and (imp.quant[8] == 0).all()
    assert np.allclose(imp.quant[3], (imp.quant[2] + imp.quant[4]) / 2)
    assert imp.plasticity.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert imp.bit_penalty(0, 4, 2) > imp.bit_penalty(3, 4, 2)


def test_repair_fits_and_downgrades_least_important_first() -> None:
    space, _, _ = _tables()
    cost = _cost(space)
    imp = Importance.from_arrays(space, {2: [0.0, 0.0, 0.0, 10.0], 3: [0, 0, 0, 5.0], 4: [0, 0, 0, 1.0]}, [1, 1, 1, 1])
    top = space.uniform(8, 32)
    budget = cost(space.uniform(4, 16))
    fixed = repair(space, top, cost, budget, imp)
    assert fixed is not None and cost(fixed) <= budget
    assert fixed[3][0] > min(b for b, _ in fixed[:3])  # the only bit-sensitive unit keeps the most bits
    assert repair(space, top, cost, cost(top), imp) == top  # already fits: unchanged
    assert repair(space, top, cost, cost(space.uniform(2, 4)) - 1, imp) is None  # nothing fits


def test_mutation_and_crossover_stay_in_space() -> None:
    space, _, _ = _tables()
    imp = _importance(space)
    rng = np.random.default_rng(0)
    a, b = space.uniform(2, 4), space.uniform(8, 32)
    for _ in range(40):
        m = mutate(space, a, imp, rng)
        space.check(m)
        assert m != a
        child = crossover(a, b, rng)
        assert all(child[u] in (a[u], b[u]) for u in range(space.n_units))


def test_constrained_nondominated_sort_and_select() -> None:
    scores = [1.0, 2.0, 0.5, None, 3.0, 0.1]
    memory = [10, 5, 20, 1, 30, 100]
    ranks = nondominated_sort(scores, memory, budget=50)
    assert ranks[0] == ranks[1] == ranks[2] == 0  # the feasible front
    assert ranks[4] == 1  # dominated by 0
    assert ranks[5] > ranks[4] and ranks[3] > ranks[5]  # over budget, then failed
    assert sorted(select([(i,) for i in range(6)], scores, memory, 50, 3)) == [0, 1, 2]


def test_stage1_improves_respects_budget_and_is_deterministic() -> None:
    space, _, _ = _tables()
    cost = _cost(space)
    imp = _importance(space)
    budget = cost(space.uniform(4, 16))
    settings = Stage1Settings(population=6, generations=3, offspring=5, promote=2, seed=7)
    warm = [space.uniform(4, 16), space.uniform(8, 8)]
    obj = QuantErrorObjective()
    res = run_stage1(space, imp, cost, budget, obj, settings, warm)
    assert len(obj.calls["low"]) == 6 + 3 * 5 and len(set(obj.calls["low"])) == len(obj.calls["low"])
    assert len(obj.calls["high"]) == 2 * 4 and set(obj.calls["high"]) <= set(obj.calls["low"])
    assert all(cost(c) <= budget for c in obj.calls["low"])
    best = min(r.high for r in res.high_points())
    assert best < obj.score(space.uniform(4, 16), "high")  # beats the uniform 4-bit r16 plan at the same budget
    assert res.surrogate_spearman is not None and res.screening_spearman is not None
    obj2 = QuantErrorObjective()
    res2 = run_stage1(space, imp, cost, budget, obj2, settings, warm)
    assert obj2.calls == obj.calls and res2.population == res.population


def test_stage1_survives_failed_candidates() -> None:
    space, _, _ = _tables()
    cost = _cost(space)
    bad = space.uniform(4, 16)
    obj = QuantErrorObjective(fail={bad})
    settings = Stage1Settings(population=4, generations=1, offspring=3, promote=2, seed=0)
    res = run_stage1(space, _importance(space), cost, cost(bad), obj, settings, [bad])
    assert res.records[bad].low_done and res.records[bad].low is None
    assert res.high_points()


def test_stage1_raises_when_nothing_fits() -> None:
    from qra_plugin.errors import QRAError

    space, _, _ = _tables()
    cost = _cost(space)
    with pytest.raises(QRAError, match="fits the budget"):
        run_stage1(space, _importance(space), cost, 10, QuantErrorObjective(), Stage1Settings(population=2), [])


def test_screening_and_promotion_models_decide_what_is_evaluated(monkeypatch) -> None:
    """Bypass the performance model (a model that ranks backwards) and stage 1 evaluates other configs, and
    worse ones: the screening and promotion decisions come from the model, and its ranking helps."""
    from planner.search import surrogate

    space, _, _ = _tables()
    cost, imp = _cost(space), _importance(space)
    budget = cost(space.uniform(4, 16))
    settings = Stage1Settings(
        population=6, generations=2, offspring=4, promote=2, screen_factor=4, seed=11, features="prior"
    )
    warm = [space.uniform(4, 16), space.uniform(8, 8)]
    honest = QuantErrorObjective()
    run_stage1(space, imp, cost, budget, honest, settings, warm)
    predict = surrogate.PerformanceModel.predict

    def backwards(self, configs, low):
        mean, std = predict(self, configs, low)
        return -mean, std

    monkeypatch.setattr(surrogate.PerformanceModel, "predict", backwards)
    bypassed = QuantErrorObjective()
    run_stage1(space, imp, cost, budget, bypassed, settings, warm)
    first = settings.population  # the first population is evaluated before any model exists
    assert honest.calls["low"][:first] == bypassed.calls["low"][:first]
    assert honest.calls["low"][first:] != bypassed.calls["low"][first:]
    assert honest.calls["high"] != bypassed.calls["high"]

    def mean_true(calls: list[Allocation]) -> float:
        return float(np.mean([honest.score(c, "high") for c in calls]))

    assert mean_true(honest.calls["low"][first:]) < mean_true(bypassed.calls["low"][first:])
