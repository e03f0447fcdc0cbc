"""Memory per rank (planner/sharding.py, ``qra estimate --world-size --sharding``) on tiny Llamas built in code."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from planner.memory import estimate
from planner.model_info import info_from_model, pruned_info
from planner.settings import TrainingSettings
from planner.sharding import SHARDINGS, per_rank, replicated_metadata
from planner.tiny import build_tiny_model
from qra_plugin import ModulePlan, Plan, apply_plan
from qra_plugin.errors import QRAError
from qra_plugin.plan import BlockPruning

CHOICES = [ModulePlan(bits=b, rank=r) for b, r in ((2, 4), (3, 0), (4, 12), (8, 4), (16, 8))]


def _mixed(model) -> Plan:
    base = Plan.uniform(model, bits=4, rank=8)
    modules = {name: CHOICES[i % len(CHOICES)] for i, name in enumerate(base.modules)}
    pruning = {1: BlockPruning(mlp_keep=list(range(0, 128, 2)), kv_keep=[1])}
    return Plan(fingerprint=base.fingerprint, modules=modules, pruning=pruning)


@pytest.fixture(scope="module")
def priced():
    model = build_tiny_model("llama", seed=0)
    plan = _mixed(model)
    info = info_from_model(model)
    return model, plan, info, estimate(info, plan, TrainingSettings(batch=2, seq_len=32))


def test_one_rank_is_the_single_device_breakdown_plus_deepspeeds_fp32_copy(priced):
    _, plan, info, breakdown = priced
    for sharding in SHARDINGS:
        rank = per_rank(info, plan, breakdown, world_size=1, sharding=sharding)
        copy = breakdown.lora_params if sharding in ("zero1", "zero2") else 0  # ZeRO-1/2 step their own fp32 copy
        assert rank["master_params"] == copy and rank["total"] == breakdown.total + copy


def test_each_sharding_divides_what_it_shards(priced):
    _, plan, info, b = priced
    ranks = {s: per_rank(info, plan, b, world_size=4, sharding=s) for s in SHARDINGS}
    assert ranks["ddp"]["grad_buckets"] == b.lora_grads and ranks["zero1"]["grad_buckets"] == 0
    assert ranks["ddp"]["optimizer_states"] == b.optimizer_states
    assert ranks["zero1"]["optimizer_states"] == math.ceil(b.optimizer_states / 4)
    assert ranks["zero1"]["lora_grads"] == b.lora_grads and ranks["zero2"]["lora_grads"] == math.ceil(b.lora_grads / 4)
    weights = b.quantized_weights + b.unquantized_weights
    for s in ("ddp", "zero1", "zero2"):
        assert ranks[s]["weights"] == weights and ranks[s]["all_gather_peak"] == 0
    for s in ("zero3", "fsdp2"):
        rep = ranks[s]["replicated_weights"]
        assert ranks[s]["weights"] == math.ceil((weights - rep) / 4) + rep and ranks[s]["all_gather_peak"] > 0
    ddp, zero1, zero2, zero3 = (ranks[s]["total"] for s in SHARDINGS[:4])
    assert ddp > zero1 >= zero2 > zero3  # zero2's sharded grads only lower a peak they are part of (not "loss")


def test_replicated_metadata_is_what_the_real_hqq_layers_keep_outside_parameters(priced):
    model, plan, info, _ = priced
    peft_model = apply_plan(model, plan)
    kept = sum(
        m.meta[k].numel() * m.meta[k].element_size()
        for m in peft_model.modules()
        if type(m).__name__ == "HQQLinear"
        for k in ("scale", "zero")
    )
    assert kept > 0 and replicated_metadata(pruned_info(info, plan), plan, torch.float32) == kept


def test_estimate_cli_reports_bytes_per_rank_and_refuses_an_unknown_sharding(tmp_path):
    from planner.cli import app

    runner = CliRunner()
    args = ["estimate", "--model", "demo", "--uniform", "4:16", "--world-size", "8", "--sharding", "zero3", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rank = data["per_rank"]
    assert rank["sharding"] == "zero3" and rank["world_size"] == 8 and 0 < rank["total"] < data["total"]
    assert all(isinstance(v, int) for k, v in rank.items() if k not in ("sharding", "peak_phase"))
    bad = runner.invoke(app, args[:-2] + ["zero4", "--json"])
    assert bad.exit_code != 0 and "--sharding must be one of" in str(bad.exception or bad.output)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "zero3"),
        ({"deepspeed": {"zero_optimization": {"stage": 1}}}, "zero1"),
        ({"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}, "fsdp2"),
        ({}, None),
    ],
)
def test_an_axolotl_yaml_names_its_sharding(tmp_path, keys, expected):
    import yaml

    from planner.axolotl.config import yaml_sharding

    if "deepspeed" in keys:
        (tmp_path / "ds.json").write_text(json.dumps(keys["deepspeed"]))
        keys = {"deepspeed": str(tmp_path / "ds.json")}
    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump({"base_model": "x", **keys}))
    assert yaml_sharding(yaml.safe_load(path.read_text()), path) == expected
    with pytest.raises(QRAError, match="FSDP1 is not priced"):
        yaml_sharding({"fsdp": ["full_shard"], "fsdp_config": {"fsdp_version": 1}}, path)
