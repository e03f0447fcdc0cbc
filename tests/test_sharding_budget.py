"""Per-rank budgets in ``qra search``: ``train.world_size`` / ``train.sharding`` (an Axolotl YAML's
``deepspeed`` / ``fsdp`` keys + ``qra.world_size``) make every budget count one rank's bytes (planner/sharding.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from planner.config import QRAConfig
from planner.settings import TrainingSettings
from qra_plugin.errors import QRAError

TINY = Path(__file__).resolve().parents[1] / "example_configs" / "tiny-search.yaml"


def _cfg(**train) -> QRAConfig:
    data = yaml.safe_load(TINY.read_text())
    data["train"] = {**data["train"], **train}
    return QRAConfig.model_validate(data)


def _settings(**train) -> TrainingSettings:
    return TrainingSettings.of(_cfg(**train))


def _setup(cfg: QRAConfig):
    from planner.orchestration.setup import SearchSetup

    return SearchSetup.build(cfg)


def _flat(space):
    """Equal importance everywhere: the greedy allocation then only follows bytes."""
    from planner.search.allocation import Importance

    n = space.n_units
    return Importance.from_arrays(space, {b: np.ones(n) * (16 - b) for b in space.bits if b < 16}, np.ones(n))


def test_a_budget_too_small_for_one_device_plans_for_one_of_four_zero3_ranks():
    from planner.memory import estimate, min_plan_bytes
    from planner.model_info import load_model_info
    from planner.search.allocation import greedy_priors
    from planner.sharding import per_rank

    single, sharded = _cfg(), _cfg(world_size=4, sharding="zero3")
    info = load_model_info(single.model)
    bits, ranks = single.space.bits, single.space.ranks
    cheapest_alone = min_plan_bytes(info, TrainingSettings.of(single), bits, ranks)
    cheapest_rank = min_plan_bytes(info, TrainingSettings.of(sharded), bits, ranks)
    assert cheapest_rank < cheapest_alone
    budget = (cheapest_alone + cheapest_rank) // 2
    with pytest.raises(QRAError, match=r"cheapest plan.s peak training memory [0-9.]+ MiB"):
        _setup(single.model_copy(update={"budget": str(budget)}))
    with pytest.raises(QRAError, match=r"peak training memory per rank \(4 ranks, zero3\) [0-9.]+ MiB"):
        _setup(sharded.model_copy(update={"budget": str(cheapest_rank - 1)}))
    setup = _setup(sharded.model_copy(update={"budget": str(budget)}))
    assert setup.budget_bytes == budget
    chosen = greedy_priors(setup.space, setup.cost, setup.budget_bytes, _flat(setup.space))
    plan = setup.space.to_plan(chosen)
    priced = estimate(info, plan, setup.settings)  # the single-device breakdown, priced anew
    rank = per_rank(info, plan, priced, world_size=4, sharding="zero3")
    assert setup.cost(chosen) == rank["total"] <= budget < priced.total  # fits one of 4 ranks, not one device


@pytest.mark.parametrize("kind", ["peak", "plan", "weights"])
def test_one_rank_without_deepspeed_prices_what_one_device_does(kind):
    from planner.memory import plan_bytes, uniform_plan
    from planner.model_info import load_model_info

    cfg = _cfg()
    info = load_model_info(cfg.model)
    plan = uniform_plan(info, 4, 16)
    alone = plan_bytes(info, plan, TrainingSettings.of(cfg), kind)
    assert plan_bytes(info, plan, _settings(world_size=1, sharding="ddp"), kind) == alone
    assert plan_bytes(info, plan, _settings(world_size=1, sharding="zero3"), kind) == alone  # fp32: no copy
    assert plan_bytes(info, plan, _settings(world_size=4, sharding="zero3"), kind) < alone
    ddp = plan_bytes(info, plan, _settings(world_size=4, sharding="ddp"), kind)
    assert ddp == alone if kind == "weights" else ddp > alone  # DDP's bucket copy of the LoRA gradients


def test_ranks_and_sharding_leave_the_recipe_key_alone():
    from planner.fidelity.contract import recipe

    before = recipe(_cfg(), "low")
    assert "world_size" not in before["train"] and "sharding" not in before["train"]
    assert recipe(_cfg(world_size=8, sharding="fsdp2"), "low") == before


def test_a_space_the_sharding_cannot_hold_is_refused_in_one_line():
    cfg = _cfg(world_size=2, sharding="zero3")
    space = {**cfg.space.model_dump(), "backend": "bnb", "bits": [4, 8]}
    with pytest.raises(QRAError, match="zero3 cannot shard 8-bit bnb modules"):
        _setup(cfg.model_copy(update={"space": type(cfg.space).model_validate(space), "budget": "1GiB"}))


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"deepspeed": {"zero_optimization": {"stage": 0}}}, "ddp"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "zero2"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "zero3"),
        ({"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}, "fsdp2"),
        ({}, None),
    ],
)
def test_axolotl_keys_map_to_the_train_sections_sharding(tmp_path, keys, expected):
    from planner.axolotl.config import yaml_sharding

    if "deepspeed" in keys:
        (tmp_path / "ds.json").write_text(json.dumps(keys["deepspeed"]))
        keys = {"deepspeed": str(tmp_path / "ds.json")}
    assert yaml_sharding({"base_model": "x", **keys}) == expected


@pytest.mark.axolotl
def test_an_axolotl_yaml_under_zero3_searches_per_rank(tmp_path, tiny_model_dir):
    pytest.importorskip("axolotl")
    from planner.fidelity.contract import recipe
    from planner.run_config import load_run_config
    from tests.test_axolotl import _config

    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    alone = load_run_config(_config(tmp_path, tiny_model_dir), prepare_data=False).config
    config = _config(tmp_path, tiny_model_dir, deepspeed=str(ds), qra={"world_size": 4})
    cfg = load_run_config(config, prepare_data=False).config
    assert (cfg.train.sharding, cfg.train.world_size) == ("zero3", 4)
    # reading the YAML left this process unsharded (Axolotl's load_cfg would ready it for DeepSpeed)
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ and not torch.distributed.is_initialized()
    assert (alone.train.sharding, alone.train.world_size) == (None, 1)
    assert recipe(cfg, "low")["train"] == recipe(alone, "low")["train"]


def test_estimate_of_a_config_prices_the_rank_its_train_section_names(tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    data = yaml.safe_load(TINY.read_text())
    data["train"] = {**data["train"], "world_size": 4, "sharding": "zero3"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["estimate", str(tmp_path / "cfg.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    rank = json.loads(result.output)["per_rank"]
    assert (rank["sharding"], rank["world_size"]) == ("zero3", 4)
    flags = CliRunner().invoke(app, ["estimate", str(tmp_path / "cfg.yaml"), "--world-size", "2", "--json"])
    assert json.loads(flags.output)["per_rank"]["world_size"] == 2  # a flag wins over the config
