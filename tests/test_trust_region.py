"""Stage 2 mechanics on the real HQQ quantization-error objective of test_evolution."""

from __future__ import annotations

import numpy as np

from planner.search.trust_region import TRSettings, TRState, propose, region_candidates, run_stage2, trades
from tests.test_evolution import QuantErrorObjective, _cost


def test_state_grows_shrinks_and_collapses() -> None:
    s = TRSettings(length_init=4, length_max=8, success_tol=2, failure_tol=2)
    st = TRState(centre=((4, 16),), length=4)
    st.update(True, s)
    assert st.length == 4
    st.update(True, s)
    assert st.length == 8  # two successes double it
    st.update(True, s)
    st.update(True, s)
    assert st.length == 8  # capped
    for _ in range(6):
        st.update(False, s)
    assert st.length == 1 and not st.collapsed(s)
    st.update(False, s)
    st.update(False, s)
    assert st.length == 0 and st.collapsed(s)


def test_region_candidates_are_feasible_new_and_inside() -> None:
    obj = QuantErrorObjective()
    space, cost = obj.space, _cost(obj.space)
    centre = space.uniform(4, 16)
    budget = cost(centre)
    seen = {space.uniform(4, 8): 1.0}
    rng = np.random.default_rng(0)
    cands = region_candidates(space, centre, 3, lambda c: cost(c) <= budget, seen, rng, 200)
    assert cands and len(set(cands)) == len(cands)
    assert all(1 <= space.distance(c, centre) <= 3 and cost(c) <= budget for c in cands)
    assert space.uniform(4, 8) not in cands and centre not in cands
    one = region_candidates(space, centre, 1, lambda c: True, {}, rng, 50)
    assert sorted(one) == sorted(space.neighbours(centre))


def test_propose_prefers_candidates_the_gp_expects_to_improve() -> None:
    obj = QuantErrorObjective()
    space = obj.space
    rng = np.random.default_rng(3)
    history = {c: obj.score(c, "high") for c in (space.sample(rng) for _ in range(14))}
    pool = [space.sample(rng) for _ in range(40)]
    picked = propose(space, history, pool, 5, seed=0)
    assert len(picked) == 5 and set(picked) <= set(pool)
    scores = sorted(obj.score(c, "high") for c in pool)
    picked_mean = np.mean([obj.score(c, "high") for c in picked])
    assert picked_mean < np.mean(scores)  # better than a random pick from the pool
    assert propose(space, history, pool, 5, seed=0) == picked  # deterministic


def test_stage2_improves_on_its_start_within_budget() -> None:
    obj = QuantErrorObjective()
    space, cost = obj.space, _cost(obj.space)
    budget = cost(space.uniform(4, 16))
    start = space.uniform(4, 16)
    history = {start: obj.score(start, "high"), space.uniform(4, 8): obj.score(space.uniform(4, 8), "high")}
    settings = TRSettings(iterations=8, batch=1, length_init=2, length_max=8, n_candidates=128, seed=1)
    res = run_stage2(space, lambda c: cost(c) <= budget, cost, obj, history, settings)
    assert len(res.evaluated) == 8 and len(obj.calls["high"]) == 8
    assert all(cost(c) <= budget for c in obj.calls["high"])
    assert res.best is not None and res.history[res.best] < history[start]
    obj2 = QuantErrorObjective()
    res2 = run_stage2(space, lambda c: cost(c) <= budget, cost, obj2, history, settings)
    assert obj2.calls == obj.calls and res2.best == res.best


def test_stage2_records_failures_and_continues() -> None:
    obj = QuantErrorObjective()
    space, cost = obj.space, _cost(obj.space)
    start = space.uniform(4, 16)
    budget = cost(start)
    obj.fail = set(space.neighbours(start))  # every one-step move "crashes"
    settings = TRSettings(iterations=4, length_init=1, length_max=4, n_candidates=16, seed=0)
    res = run_stage2(space, lambda c: cost(c) <= budget, cost, obj, {start: obj.score(start, "high")}, settings)
    assert len(res.evaluated) == 4 and all(e["score"] is None for e in res.evaluated)
    assert res.best == start and res.restarts >= 1


def test_trades_raise_one_coordinate_and_lower_another_and_fit_a_binding_budget() -> None:
    obj = QuantErrorObjective()
    space, cost = obj.space, _cost(obj.space)
    centre = space.uniform(4, 16)
    budget = cost(centre)  # binding: every single step up is over it
    fits = lambda c: cost(c) <= budget  # noqa: E731
    assert not any(fits(c) for c in space.neighbours(centre) if cost(c) > cost(centre))
    rng = np.random.default_rng(0)
    made = trades(space, centre, rng, 64)
    assert made and all(space.distance(c, centre) == 2 for c in made)
    for c in made:
        delta = space.indices(c) - space.indices(centre)
        assert sorted(delta[delta != 0].tolist()) == [-1, 1]
    with_trades = region_candidates(space, centre, 2, fits, {}, np.random.default_rng(0), 16, with_trades=True)
    without = region_candidates(space, centre, 2, fits, {}, np.random.default_rng(0), 16)
    assert set(without) < set(with_trades)  # the trades add feasible candidates the walks missed


def test_stage2_stops_when_no_iteration_beats_its_start_by_the_noise() -> None:
    obj = QuantErrorObjective()
    space, cost = obj.space, _cost(obj.space)
    start = space.uniform(4, 16)
    budget = cost(start)
    history = {start: obj.score(start, "high")}
    settings = TRSettings(iterations=8, length_init=2, n_candidates=32, seed=0, patience=2, min_gain=10.0)
    res = run_stage2(space, lambda c: cost(c) <= budget, cost, obj, history, settings)
    assert res.stopped_early_at == 2 and len(res.evaluated) == 2  # no gain can exceed 10 nats
    default = run_stage2(space, lambda c: cost(c) <= budget, cost, QuantErrorObjective(), history,
                         TRSettings(iterations=4, length_init=2, n_candidates=32, seed=0))  # fmt: skip
    assert default.stopped_early_at is None and len(default.evaluated) == 4  # patience 0: every iteration runs
