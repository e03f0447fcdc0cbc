"""The real ``axolotl train`` CLI with the plugin and a plan on a tiny model and a local jsonl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from planner.data.wiki import write_alpaca_jsonl
from tests.conftest import mixed_plan
from tests.launch import launch_env

pytest.importorskip("axolotl")
pytestmark = pytest.mark.axolotl

AXOLOTL = shutil.which("axolotl") or str(Path(sys.executable).parent / "axolotl")


def _config(tmp_path: Path, model_dir: Path, **extra) -> Path:
    data = write_alpaca_jsonl(tmp_path / "train.jsonl", "train", 64)
    cfg = {
        "base_model": str(model_dir),
        "plugins": ["qra_plugin.QRAPlugin"],
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "datasets": [{"path": str(data), "type": "alpaca", "ds_type": "json"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "val_set_size": 0,
        "sequence_len": 256,
        "micro_batch_size": 2,
        "max_steps": 3,
        "optimizer": "adamw_torch",
        "learning_rate": 1e-3,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "flash_attention": False,
        "output_dir": str(tmp_path / "out"),
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        **extra,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path) -> subprocess.CompletedProcess:
    env = launch_env(HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1")
    # axolotl re-launches itself through `accelerate` found on PATH: make it this interpreter's
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([AXOLOTL, "train", str(config)], capture_output=True, text=True, env=env, timeout=900)


def test_axolotl_train_applies_plan_ranks_and_quantization(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    plan = mixed_plan(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    plan.save(tmp_path / "plan.yaml")
    # lora_target_linear would target every linear: the plan must win (rank-0 modules get no adapter)
    proc = _run(_config(tmp_path, tiny_model_dir, qra_plan=str(tmp_path / "plan.yaml"), lora_target_linear=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    adapter = json.loads((out / "adapter_config.json").read_text())
    planned = {n: m.rank for n, m in plan.modules.items() if m.rank > 0}
    assert adapter["rank_pattern"] == planned
    # PEFT may shorten a long list of full names to the minimal suffix set that selects the same modules
    targets = adapter["target_modules"]

    def targeted(name: str) -> bool:
        return any(name == t or name.endswith("." + t) for t in targets)

    assert {n for n in plan.modules if targeted(n)} == set(planned)
    assert adapter["alpha_pattern"] == {n: m.lora_alpha for n, m in plan.modules.items() if m.rank > 0}
    memory = json.loads((out / "qra_memory.json").read_text())
    kinds = {m["name"]: m["kind"] for m in memory["modules"]}
    assert kinds["model.layers.0.self_attn.q_proj"] == "HQQLinear"
    assert kinds["model.layers.0.self_attn.v_proj"] == "Linear4bit"
    assert kinds["model.layers.0.self_attn.o_proj"] == "Linear8bitLt"
    assert (out / "qra_plan.yaml").is_file()


def test_axolotl_missing_plan_file_is_a_clear_error(tmp_path, tiny_model_dir):
    proc = _run(_config(tmp_path, tiny_model_dir, qra_plan=str(tmp_path / "nope.yaml")))
    assert proc.returncode != 0
    assert "plan file not found" in proc.stdout + proc.stderr


def test_plugin_hooks_do_nothing_without_qra_plan(tiny_model):
    from axolotl.utils.dict import DictDefault

    from qra_plugin import QRAPlugin

    plugin = QRAPlugin()
    cfg = DictDefault({"lora_target_modules": ["q_proj"], "lora_target_linear": True})
    plugin.pre_model_load(cfg)
    plugin.pre_lora_load(cfg, tiny_model)
    assert plugin.get_lora_config_kwargs(cfg) == {}
    assert plugin.add_callbacks_pre_trainer(cfg, tiny_model) == []
    assert cfg["lora_target_modules"] == ["q_proj"] and cfg["lora_target_linear"] is True
    assert type(tiny_model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_sharded_backends_take_hqq_and_refuse_int8(tiny_model, tmp_path):
    from qra_plugin import ModulePlan, Plan, QRAError
    from qra_plugin.axolotl.plugin import sharding_of
    from qra_plugin.distributed import check_sharding

    mixed = mixed_plan(tiny_model)  # includes bnb int8, whose row scales a sharded parameter drops
    with pytest.raises(QRAError, match="zero3 cannot shard 8-bit bnb modules"):
        check_sharding(mixed, sharding="zero3", half_precision=True)
    with pytest.raises(QRAError, match="fsdp cannot shard 8-bit bnb"):
        check_sharding(mixed, sharding="fsdp", half_precision=True)
    check_sharding(mixed, sharding="zero2", half_precision=False)  # replicated weights: anything goes
    hqq = Plan.uniform(tiny_model, bits=4, rank=8)
    choices = [ModulePlan(bits=b, rank=r) for b, r in ((2, 4), (3, 0), (4, 8), (8, 16), (16, 8))]
    hqq = hqq.model_copy(update={"modules": {n: choices[i % 5] for i, n in enumerate(hqq.modules)}})
    for sharding in ("zero3", "fsdp", "fsdp2"):  # FSDP2 / ZeRO-3 shard HQQ (tests/test_sharded.py)
        check_sharding(hqq, sharding=sharding, half_precision=True)
        check_sharding(hqq, sharding=sharding, half_precision=False)
    with pytest.raises(QRAError, match="fsdp1 cannot shard 2-bit hqq, 3-bit hqq, 4-bit hqq, 8-bit hqq"):
        check_sharding(hqq, sharding="fsdp1", half_precision=True)
    with pytest.raises(QRAError, match="unknown sharding 'zero4'"):
        check_sharding(hqq, sharding="zero4", half_precision=True)
    assert sharding_of({"fsdp_config": {"fsdp_version": 2}}) == "fsdp"
    assert sharding_of({"fsdp": ["full_shard"], "fsdp_config": {}}) == "fsdp1"
    nf4 = Plan.uniform(tiny_model, bits=4, rank=8, backend="bnb")
    check_sharding(nf4, sharding="fsdp", half_precision=True)
    check_sharding(nf4, sharding="fsdp1", half_precision=True)
    check_sharding(nf4, sharding="zero3", half_precision=False)  # uint8-packed nf4 shards too (test_sharded.py)
    with pytest.raises(QRAError, match="needs bf16 or fp16"):
        check_sharding(nf4, sharding="fsdp1", half_precision=False)


def test_plugin_refuses_an_int8_plan_under_deepspeed_zero3_and_takes_hqq(tiny_model, tmp_path):
    from axolotl.utils.dict import DictDefault

    from qra_plugin import Plan, QRAError, QRAPlugin

    mixed_plan(tiny_model).save(tmp_path / "plan.yaml")  # includes bitsandbytes int8
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = DictDefault({"qra_plan": str(tmp_path / "plan.yaml"), "deepspeed": str(ds), "bf16": True})
    with pytest.raises(QRAError, match="zero3 cannot shard 8-bit bnb"):
        QRAPlugin().pre_model_load(cfg)
    Plan.uniform(tiny_model, bits=3, rank=8).save(tmp_path / "hqq.yaml")
    QRAPlugin().pre_model_load(DictDefault({**cfg, "qra_plan": str(tmp_path / "hqq.yaml"), "bf16": False}))
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    QRAPlugin().pre_model_load(cfg)  # ZeRO-2 replicates weights: accepted
    assert cfg["lora_target_linear"] is False and "model.layers.0.self_attn.k_proj" not in cfg["lora_target_modules"]


def test_register_expands_home_in_the_paths_a_user_types(tmp_path, monkeypatch):
    from qra_plugin.axolotl.plugin import QRAPlugin

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = {"base_model": "~/.cache/qra/model", "qra_plan": "~/plan.yaml", "tokenizer_config": "HuggingFaceTB/x"}
    QRAPlugin().register(cfg)
    assert cfg == {"base_model": f"{tmp_path}/.cache/qra/model", "qra_plan": f"{tmp_path}/plan.yaml",
                   "tokenizer_config": "HuggingFaceTB/x"}  # fmt: skip
    untouched = {"base_model": "~/m"}  # without qra_plan the plugin does nothing at all
    QRAPlugin().register(untouched)
    assert untouched == {"base_model": "~/m"}


def test_axolotl_train_prunes_before_quantizing_and_the_adapter_has_the_pruned_shapes(tmp_path, tiny_model_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qra_plugin.plan import BlockPruning

    plan = mixed_plan(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    kept = list(range(0, 128, 2))  # half of block 0's 128 MLP channels
    plan = plan.model_copy(update={"pruning": {0: BlockPruning(mlp_keep=kept, kv_keep=[1])}})
    plan.save(tmp_path / "plan.yaml")
    proc = _run(_config(tmp_path, tiny_model_dir, qra_plan=str(tmp_path / "plan.yaml")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as weights:
        shapes = {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}  # noqa: SIM118
    down_a = next(v for k, v in shapes.items() if "layers.0.mlp.down_proj.lora_A" in k)
    q_b = next(v for k, v in shapes.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    assert down_a[1] == len(kept) and q_b[0] == 2 * 16  # one KV group kept: its 2 query heads of 16 dims
    saved = yaml.safe_load((tmp_path / "out" / "qra_plan.yaml").read_text())
    assert saved["pruning"]["0"]["mlp_keep"] == kept  # the run dir keeps the plan it trained with
