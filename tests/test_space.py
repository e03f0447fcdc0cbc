"""SearchSpace: encoding round-trips, neighbours, sampling and plans on a real (meta-device) model."""

from __future__ import annotations

import numpy as np
import pytest

from planner.config import ModelSection, SpaceSection, TinyModel
from planner.loading import load_meta_model
from planner.search.space import BudgetCost, SearchSpace, allocation_key, parse_allocation_key
from qra_plugin.errors import QRAError
from qra_plugin.modules import quantizable_linears
from qra_plugin.plan import block_pairs, fingerprint


def _space(unit: str = "block", **kw) -> SearchSpace:
    model = load_meta_model(ModelSection(tiny=TinyModel(layers=3, hidden=64)))
    return SearchSpace.from_parts(SpaceSection(unit=unit, **kw), fingerprint(model), quantizable_linears(model))


def test_block_space_encodes_and_decodes_every_sample() -> None:
    space = _space()
    assert space.n_units == 3 and space.dim == 6
    rng = np.random.default_rng(0)
    for _ in range(50):
        c = space.sample(rng)
        x = space.encode(c)
        assert x.shape == (6,) and x.min() >= 0 and x.max() <= 1
        assert space.decode(x) == c
        assert parse_allocation_key(allocation_key(c)) == c
    assert space.encode(space.uniform(2, 4)).tolist() == [0.0] * 6
    assert space.encode(space.uniform(8, 32)).tolist() == [1.0] * 6


def test_neighbours_are_one_step_and_complete() -> None:
    space = _space()
    centre = space.uniform(4, 16)  # interior in both coordinates: 2 moves each way per coordinate
    nbrs = space.neighbours(centre)
    assert len(nbrs) == 3 * 2 * 2 and len(set(nbrs)) == len(nbrs)
    assert all(space.distance(centre, n) == 1 for n in nbrs)
    corner = space.uniform(2, 4)  # only upward moves exist
    assert len(space.neighbours(corner)) == 3 * 2


def test_to_plan_matches_config_per_block_and_per_module() -> None:
    space = _space()
    config = ((2, 4), (16 if 16 in space.bits else 8, 32), (4, 8))
    plan = space.to_plan(config, meta={"score": 1.0})
    assert block_pairs(plan) == list(config) and plan.meta["score"] == 1.0
    assert plan.fingerprint == space.fingerprint

    mspace = _space(unit="module", bits=[3, 4, 16], ranks=[0, 8])
    assert mspace.n_units == len(mspace.specs) == 21
    mconfig = mspace.sample(np.random.default_rng(1))
    mplan = mspace.to_plan(mconfig)
    for spec, (b, r) in zip(mspace.specs, mconfig, strict=True):
        assert (mplan.modules[spec.name].bits, mplan.modules[spec.name].rank) == (b, r)
        assert mplan.modules[spec.name].backend == ("none" if b == 16 else "hqq")


def test_bad_configs_raise_qra_error() -> None:
    space = _space()
    with pytest.raises(QRAError, match="3 \\(bits, rank\\) pairs"):
        space.encode(((4, 16),))
    with pytest.raises(QRAError, match="outside the space"):
        space.to_plan(((5, 16), (4, 16), (4, 16)))


def test_budget_cost_marginals_add_up_for_an_additive_total() -> None:
    space = _space()
    numel = space.unit_numel()

    def total(c):  # weight bytes + fp32 LoRA params/grads/Adam states for a 64-wide model
        return int(sum(n * b // 8 + r * 128 * 7 * 16 for n, (b, r) in zip(numel, c, strict=True)))

    cost = BudgetCost(space, total)
    a = space.uniform(8, 32)
    b = ((2, 4),) + a[1:]
    assert cost(a) - cost(b) == cost.saving(0, (8, 32), (2, 4)) > 0
