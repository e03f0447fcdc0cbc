"""Axolotl's own QLoRA example YAMLs (tests/fixtures/axolotl_qlora/), as written: ``adapter: qlora``,
``load_in_4bit: true``, 8-bit / paged / torchao optimizers. Only ``base_model`` and ``datasets`` are swapped for
local ones, the plugin lines are added; the plan takes over quantization and the budget is the job as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from planner.data.wiki import write_alpaca_jsonl
from tests.launch import launch_env
from tests.test_axolotl_planning import QRA_SECTION
from tests.test_estimate_cli import qra_inprocess

pytest.importorskip("axolotl")
pytestmark = pytest.mark.axolotl

FIXTURES = Path(__file__).parent / "fixtures" / "axolotl_qlora"
EXAMPLES = sorted(FIXTURES.glob("*.yml"))


def as_user_would(
    example: Path, tmp_path: Path, model_dir: Path, qra: dict | None = None, **cpu: object
) -> tuple[Path, dict]:
    """The example with ``base_model`` and ``datasets`` swapped for local ones and the plugin lines added
    (``qra_plan`` + a ``qra:`` section); ``cpu`` holds any further change a CPU run needs (said by the caller)."""
    raw = yaml.safe_load(example.read_text())
    data = write_alpaca_jsonl(tmp_path / "train.jsonl", "train", 64)
    raw["base_model"] = str(model_dir)
    raw["datasets"] = [{"path": str(data), "type": "alpaca", "ds_type": "json"}]
    raw["plugins"] = [*(raw.get("plugins") or []), "qra_plugin.QRAPlugin"]
    raw["qra_plan"] = str(tmp_path / "plan.yaml")
    raw["qra"] = qra or {}
    raw.update(cpu)
    path = tmp_path / example.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, raw


def test_the_fixtures_cover_every_optimizer_users_pick_and_are_qlora():
    optimizers = set()
    for example in EXAMPLES:
        raw = yaml.safe_load(example.read_text())
        assert raw["adapter"] == "qlora" and raw["load_in_4bit"] is True, example.name
        assert "axolotl-ai-cloud/axolotl examples/" in example.read_text().splitlines()[0]
        optimizers.add(raw["optimizer"])
    expected = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch_8bit"}
    assert optimizers >= expected | {"adamw_torch_4bit", "adamw_torch", "adamw_torch_fused"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_qra_estimate_prices_the_job_as_written(example, tmp_path, tiny_model_dir, capsys):
    """No plan yet and no qra.budget: the estimate is the YAML's own job (uniform nf4 at ``lora_r``, its
    optimizer, micro batch and sequence length)."""
    from planner.memory import estimate, uniform_plan
    from planner.model_info import load_model_info
    from planner.settings import TrainingSettings

    config, raw = as_user_would(example, tmp_path, tiny_model_dir)
    code, out, err = qra_inprocess(capsys, "estimate", str(config), "--json")
    assert code == 0, err[-2000:]
    got = json.loads(out)
    assert got["settings"]["optimizer"] == raw["optimizer"]
    assert got["quantized_by_backend"].keys() == {"bnb4"}
    dtype = got["settings"]["compute_dtype"]  # Axolotl resolves ``bf16: auto`` for this machine
    info = load_model_info(str(tiny_model_dir), dtype)
    job = estimate(
        info,
        uniform_plan(info, 4, int(raw["lora_r"]), "bnb"),
        TrainingSettings(
            batch=int(raw["micro_batch_size"]),
            seq_len=int(raw["sequence_len"]),
            optimizer=raw["optimizer"],
            grad_checkpointing=bool(raw.get("gradient_checkpointing")),
            loss_path="cce" if any("CutCrossEntropy" in p for p in raw["plugins"]) else "hf_full",
            gradient_accumulation_steps=int(raw.get("gradient_accumulation_steps") or 1),
            precision=info.dtype,
        ),
    )
    assert got["total"] == job.total and got["optimizer_states"] == job.optimizer_states


#: the tiny search of ``test_axolotl_planning`` without a budget: the budget is the job as written
TINY_QRA = {k: v for k, v in QRA_SECTION.items() if k != "budget"}
#: what a CPU run of these examples must change, and why: no bf16/fp16 training and no flash-attention kernels
#: on CPU (sdpa instead), and two steps instead of the examples' epochs (CI-sized)
CPU_RUN = {"bf16": False, "fp16": False, "attn_implementation": "sdpa", "max_steps": 2}


@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory):
    """The tiny Llama with room for the examples' 2048/4096-token packed rows (their ``sequence_len``, unchanged)."""
    from planner.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", max_position_embeddings=4096)


@pytest.mark.parametrize("name", ["llama3-qlora-1b.yml"])  # adamw_bnb_8bit: 48 of Axolotl's 104 QLoRA examples
def test_qra_search_then_axolotl_train_on_the_example(name, tmp_path, long_context_model_dir):
    """``qra search`` writes the plan under the job-as-written budget with fidelity runs on the YAML's optimizer;
    ``axolotl train`` on the same file loads the model unquantized, applies the plan once (no bitsandbytes
    4-bit layer besides the planned ones) and the adapter holds the planned ranks."""
    from safetensors import safe_open

    config, raw = as_user_would(FIXTURES / name, tmp_path, long_context_model_dir, TINY_QRA, **CPU_RUN)
    searched = _cli(tmp_path, "qra", "search", str(config), "--out", str(tmp_path / "run"), "--no-progress")
    assert searched.returncode == 0, searched.stderr[-3000:]
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert plan["meta"]["qra_search"]["budget"] == f"uniform:4bit-bnb:r{raw['lora_r']}"
    trained = _cli(tmp_path, "axolotl", "train", str(config))
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / raw["output_dir"]
    memory = json.loads((out / "qra_memory.json").read_text())  # the plugin's measured weights after loading
    kinds = {m["kind"] for m in memory["modules"]}
    assert "Linear4bit" not in kinds and "HQQLinear" in kinds, kinds  # quantized once, by the plan
    adapter = json.loads((out / "adapter_config.json").read_text())
    planned = {n: m["rank"] for n, m in plan["modules"].items() if m["rank"] > 0}
    assert adapter["rank_pattern"] == planned
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        ranks = {k.split(".lora_A")[0].removeprefix("base_model.model."): weights.get_slice(k).get_shape()[0]
                 for k in weights.keys() if ".lora_A" in k}  # noqa: SIM118  # fmt: skip
    assert ranks == planned


def _cli(cwd: Path, *args: str):
    """The real CLI, run where the example's relative ``output_dir`` / ``dataset_prepared_path`` should land."""
    import os
    import shutil
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = launch_env(HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # axolotl re-launches itself via accelerate
    exe = shutil.which(args[0], path=str(bin_dir)) or str(bin_dir / args[0])
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, env=env, timeout=1200, cwd=cwd)


def test_the_plugin_takes_over_quantization_only_with_a_plan(tmp_path, tiny_model_dir):
    """``register`` sees the raw YAML: with ``qra_plan`` the plan quantizes (Axolotl loads unquantized, LoRA
    kernels off for an HQQ plan); without it the QLoRA job is left exactly as written."""
    from transformers import AutoModelForCausalLM

    from qra_plugin import Plan
    from qra_plugin.axolotl.plugin import QRAPlugin

    Plan.uniform(AutoModelForCausalLM.from_pretrained(tiny_model_dir), bits=4, rank=8).save(tmp_path / "plan.yaml")
    for name in ("llama3-qlora-1b.yml", "glm47-flash-qlora.yml"):  # no kernel keys / quantized MoE experts
        written = yaml.safe_load((FIXTURES / name).read_text())
        untouched = dict(written)
        QRAPlugin().register(untouched)
        assert untouched == written
        cfg = {**written, "qra_plan": str(tmp_path / "plan.yaml")}
        QRAPlugin().register(cfg)
        assert (cfg["adapter"], cfg["load_in_4bit"], cfg.get("quantize_moe_experts", False)) == ("lora", False, False)
        assert [cfg[k] for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")] == [False] * 3


def test_an_optimizer_qra_does_not_price_is_one_line_naming_axolotls_key(tmp_path, tiny_model_dir, capsys):
    config, _ = as_user_would(FIXTURES / "llama3-qlora-1b.yml", tmp_path, tiny_model_dir, optimizer="optimi_adamw")
    code, _, err = qra_inprocess(capsys, "estimate", str(config))
    line = err.strip().splitlines()[-1]
    assert code == 2 and f"{config}: optimizer: unknown optimizer 'optimi_adamw' (supported: adamw_torch," in line
