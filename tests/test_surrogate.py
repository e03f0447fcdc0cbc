"""Performance model on real numbers: HQQ quantization error of a tiny model's weights after a rank-r
correction (see test_evolution.QuantErrorObjective), low fidelity = a weaker rank-r//4 correction."""

from __future__ import annotations

import numpy as np

from planner.search.surrogate import PerformanceModel, features, heldout_spearman, spearman
from tests.test_evolution import QuantErrorObjective


def test_features_shape_and_range() -> None:
    space = QuantErrorObjective().space
    rng = np.random.default_rng(0)
    cs = [space.sample(rng) for _ in range(5)]
    f = features(space, cs)
    assert f.shape == (5, space.dim + 2) and f.min() >= 0 and f.max() <= 1


def test_model_with_low_score_predicts_unseen_high_scores() -> None:
    obj = QuantErrorObjective()
    space = obj.space
    rng = np.random.default_rng(0)
    train = [space.sample(rng) for _ in range(20)]
    test = [space.sample(rng) for _ in range(12)]
    model = PerformanceModel(space, use_low=True, seed=0).fit(train, obj(train, "low"), obj(train, "high"))
    lows = obj(test, "low")
    mean, std = model.predict(test, lows)
    assert mean.shape == std.shape == (12,) and (std >= 0).all()
    rho = spearman(list(mean), obj(test, "high"))
    assert rho is not None and rho > 0.7
    again, _ = (
        PerformanceModel(space, use_low=True, seed=0)
        .fit(train, obj(train, "low"), obj(train, "high"))
        .predict(test, lows)
    )
    assert np.allclose(mean, again)  # deterministic


def test_heldout_spearman_is_high_for_learnable_data_and_none_for_tiny_sets() -> None:
    obj = QuantErrorObjective()
    rng = np.random.default_rng(1)
    cs = [obj.space.sample(rng) for _ in range(12)]
    lo, hi = obj(cs, "low"), obj(cs, "high")
    rho = heldout_spearman(obj.space, cs, lo, hi, seed=0)
    assert rho is not None and rho > 0.6
    assert heldout_spearman(obj.space, cs[:3], lo[:3], hi[:3]) is None
    # screening (no low score to lean on) learns the low scores from the configs alone; at 12 configs its
    # held-out Spearman swings between draws (0.17-0.81), at 32 it held 0.84-0.94 over the draws tried
    draw = np.random.default_rng(2)
    more = [obj.space.sample(draw) for _ in range(32)]
    more_low = obj(more, "low")
    screen = heldout_spearman(obj.space, more, None, more_low, seed=0)
    shuffled = list(np.random.default_rng(5).permutation(more_low))  # the same values, no relation to configs
    scrambled = heldout_spearman(obj.space, more, None, shuffled, seed=0)
    assert screen is not None and screen > 0.6
    assert scrambled is not None and scrambled < 0.3


def test_table_features_carry_the_error_table_into_the_performance_model() -> None:
    from dataclasses import replace

    import pytest

    from planner.search.surrogate import table_features
    from tests.test_evolution import _importance

    obj = QuantErrorObjective()
    space = obj.space
    n = space.n_units
    worst = tuple((space.bits[0], space.ranks[0]) for _ in range(n))
    best = tuple((space.bits[-1], space.ranks[-1]) for _ in range(n))
    edges = table_features(space, obj.low, [worst, best])
    assert edges[0].tolist() == [1.0, 1.0] and edges[1, 0] < 0.05  # the worst config's share is all of it
    with pytest.raises(ValueError, match="error table"):
        PerformanceModel(space, False, 0, _importance(space), "table")
    # the weaker correction's table (rank r//4) as the feature, the full correction's error as the target: related,
    # not the same numbers. Three draws of 12 configs: ordinal screening read 0.24 / 0.85 / 0.25, the table 0.73 /
    # 0.87 / 0.71 (held-out Spearman)
    importance = replace(_importance(space), table=obj.low)
    for draw in (1, 2, 3):
        rng = np.random.default_rng(draw)
        cs = [space.sample(rng) for _ in range(12)]
        high = obj(cs, "high")
        rho = {f: heldout_spearman(space, cs, None, high, seed=0, importance=importance, feature_set=f)
               for f in ("ordinal", "table")}  # fmt: skip
        assert rho["table"] is not None and rho["table"] > 0.65, (draw, rho)
        assert rho["ordinal"] is not None and (rho["table"] > rho["ordinal"] or rho["ordinal"] > 0.8), (draw, rho)
