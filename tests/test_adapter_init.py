"""Error-aware adapter init (issue 23): the closed form, its error table, the plan's init file, the runtime.

Real HQQ / bitsandbytes layers and real PEFT adapters on tiny Llama and Qwen2 models built in code.
"""

from __future__ import annotations

import copy
import json
import sqlite3

import pytest
import torch
import yaml

from planner.fidelity.quantized import quantized_layer
from planner.priors.adapter_init import adapter_pair, module_error_svd, plan_with_error_init, quantization_error
from planner.priors.moments import MOMENTS_FILE, cached_second_moments, second_moments
from planner.scale import module_alpha, with_alpha_rule
from planner.tiny import build_tiny_model
from qra_plugin import apply_plan, load_for_inference
from qra_plugin.adapter_init import read_init_tensors
from qra_plugin.errors import QRAError
from qra_plugin.plan import ModulePlan, Plan
from tests.launch import launch_env

#: Plan.uniform(tiny llama seed 0, 4 bits, r16).content_hash() before ``init`` existed (main 03b0d71)
UNIFORM4_R16_HASH = "478e220036b1b09b836a"


def _tokens(n: int = 8, seq: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


def _init_plan(model, plan: Plan, tokens: torch.Tensor, tmp_path) -> Plan:
    init = plan_with_error_init(model, plan, tokens, tmp_path / "plan.init.safetensors", plan_dir=tmp_path)
    init.save(tmp_path / "plan.yaml")
    return Plan.load(tmp_path / "plan.yaml")


# ---------------------------------------------------------------- the plan and its hash


def test_plan_without_init_hashes_as_before():
    model = build_tiny_model("llama", seed=0)
    plan = Plan.uniform(model, bits=4, rank=16)
    assert plan.content_hash() == UNIFORM4_R16_HASH
    explicit = Plan.parse(yaml.safe_load(yaml.safe_dump(plan.to_dict())))
    assert "init" not in yaml.safe_dump(plan.to_dict())
    zero = {n: {**m.model_dump(), "init": "zero"} for n, m in plan.modules.items()}
    assert Plan.parse({**plan.to_dict(), "modules": zero}).content_hash() == UNIFORM4_R16_HASH
    assert explicit.content_hash() == UNIFORM4_R16_HASH


def test_init_fields_enter_the_hash_but_the_file_location_does_not(tmp_path):
    model = build_tiny_model("llama", seed=0)
    plan = _init_plan(model, Plan.uniform(model, bits=4, rank=4), _tokens(), tmp_path)
    assert plan.content_hash() != UNIFORM4_R16_HASH
    assert all(m.init == "error" for m in plan.modules.values())
    moved = plan.model_copy(update={"init_file": "/elsewhere/x.safetensors"})
    other = plan.model_copy(update={"init_hash": "0" * 64})
    assert moved.content_hash() == plan.content_hash() != other.content_hash()
    with pytest.raises(QRAError, match="init_file and init_hash"):
        Plan.parse({k: v for k, v in plan.to_dict().items() if k != "init_hash"})
    candidate = Plan.parse({k: v for k, v in plan.to_dict().items() if k not in ("init_file", "init_hash")})
    with pytest.raises(QRAError, match="names no init_file"):  # a search candidate: only the planner applies it
        apply_plan(build_tiny_model("llama", seed=0), candidate)


# ---------------------------------------------------------------- the closed form


def test_leftover_is_the_measured_output_error_and_falls_with_rank():
    model = build_tiny_model("llama", seed=0).eval()
    name = "model.layers.1.mlp.down_proj"
    tokens = _tokens()
    inputs: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    moments = second_moments(model, tokens, [name])[name]
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).double()
    linear = model.get_submodule(name)
    mp = ModulePlan(bits=3, rank=8)
    svd, white = module_error_svd(linear, mp, moments, damping=0.01)
    leftover = svd.leftover()
    error = quantization_error(linear, quantized_layer(linear, mp, torch.float32, keep=False))
    scale = 2.0
    measured = []
    for rank in (1, 2, 4, 8, 16):
        a, b = adapter_pair(svd, white, rank, scale)
        residual = error - scale * b @ a
        measured.append(float((x @ residual.T).square().sum(dim=1).mean()))
        assert measured[-1] == pytest.approx(float(leftover[rank]), rel=1e-6)
    assert float((x @ error.T).square().sum(dim=1).mean()) == pytest.approx(float(leftover[0]), rel=1e-6)
    assert all(later < earlier for earlier, later in zip(measured, measured[1:], strict=False))
    assert measured[-1] < 0.5 * float(leftover[0])
    damped = svd.damped_leftover()
    assert torch.all(damped >= leftover - 1e-9) and torch.all(damped[:-1] > damped[1:])


def test_moments_share_inputs_and_are_cached(tmp_path):
    model = build_tiny_model("llama", seed=0).eval()
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + ["model.layers.0.mlp.gate_proj"]
    tokens = _tokens(4)
    moments = cached_second_moments(model, tokens, names, tmp_path)
    q, k, v, o, gate = (moments[n] for n in names)
    assert q is k is v and o is not q and gate is not q
    assert torch.allclose(q, q.T) and torch.linalg.eigvalsh(q).min() > -1e-9
    stamp = (tmp_path / MOMENTS_FILE).stat().st_mtime_ns
    again = cached_second_moments(model, tokens, names, tmp_path)
    assert (tmp_path / MOMENTS_FILE).stat().st_mtime_ns == stamp
    assert torch.allclose(again[names[0]], q, rtol=1e-6) and again[names[0]] is again[names[1]]
    cached_second_moments(model, _tokens(4, seed=1), names, tmp_path)
    assert (tmp_path / MOMENTS_FILE).stat().st_mtime_ns != stamp  # other calibration rows: recomputed


# ---------------------------------------------------------------- the runtime


@pytest.mark.parametrize(
    "mp", [ModulePlan(bits=3), ModulePlan(bits=4, backend="bnb"), ModulePlan(bits=8, backend="bnb")]
)
def test_dequantize_is_the_weight_the_layer_computes_with(mp):
    from planner.priors.adapter_init import dequantized
    from qra_plugin.backends import get_backend

    linear = torch.nn.Linear(64, 96, bias=False)
    layer = get_backend(mp.backend).quantize(copy.deepcopy(linear), mp, torch.float32)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ dequantized(layer).float().T, atol=1e-5)
    assert not torch.allclose(dequantized(layer).float(), linear.weight, atol=1e-5)  # it is quantized


@pytest.mark.parametrize(
    ("arch", "bits", "backend"),
    [("llama", 4, "hqq"), ("qwen2", 3, "hqq"), ("llama", 4, "bnb"), ("qwen2", 4, "bnb"), ("llama", 8, "bnb")],
)
def test_error_init_starts_closer_to_the_unquantized_model(tmp_path, arch, bits, backend):
    model = build_tiny_model(arch, seed=0).eval()
    tokens = _tokens()
    reference = _logits(model, tokens)
    zero_plan = Plan.uniform(model, bits=bits, rank=8, backend=backend)
    init_plan = _init_plan(model, zero_plan, tokens, tmp_path)
    zero = (_logits(apply_plan(copy.deepcopy(model), zero_plan), tokens) - reference).square().mean()
    init = (_logits(apply_plan(copy.deepcopy(model), init_plan), tokens) - reference).square().mean()
    assert init < 0.6 * zero, (float(init), float(zero))


def test_tampered_or_missing_init_file_is_refused(tmp_path):
    model = build_tiny_model("llama", seed=0)
    plan = _init_plan(model, Plan.uniform(model, bits=4, rank=4), _tokens(), tmp_path)
    path = tmp_path / "plan.init.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(QRAError, match="does not match the plan"):
        apply_plan(copy.deepcopy(model), plan)
    path.unlink()
    with pytest.raises(QRAError, match="not found"):
        apply_plan(copy.deepcopy(model), plan)


def test_relative_init_file_resolves_against_the_plan_directory(tmp_path, monkeypatch):
    model = build_tiny_model("llama", seed=0)
    plan = _init_plan(model, Plan.uniform(model, bits=4, rank=4), _tokens(), tmp_path)
    assert plan.init_file == "plan.init.safetensors"
    monkeypatch.chdir(tmp_path.parent)
    peft_model = apply_plan(copy.deepcopy(model), Plan.load(tmp_path / "plan.yaml"))
    module = peft_model.get_base_model().get_submodule("model.layers.0.mlp.up_proj")
    assert module.lora_B["default"].weight.abs().sum() > 0


def test_train_step_then_save_and_reload_reproduces_logits(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokens = _tokens(4)
    plan = _init_plan(base, Plan.uniform(base, bits=4, rank=4), tokens, tmp_path)
    model = apply_plan(AutoModelForCausalLM.from_pretrained(tiny_model_dir), plan).train()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    optimizer.step()
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "adapter")
    trained = _logits(model, tokens)
    reloaded = load_for_inference(tiny_model_dir, plan, tmp_path / "adapter")
    assert torch.allclose(_logits(reloaded, tokens), trained, atol=1e-5)


# ---------------------------------------------------------------- the LoRA scale rule


def test_alpha_rules_keep_the_users_setting():
    assert module_alpha(16, "rank") is None and module_alpha(4, "rank", 8, 32) == 16.0
    assert module_alpha(4, "sqrt") == pytest.approx(16.0) and module_alpha(64, "sqrt") == pytest.approx(64.0)
    assert module_alpha(4, "fixed") == 32.0 and module_alpha(0, "fixed") is None
    model = build_tiny_model("llama", seed=0)
    plan = Plan.uniform(model, bits=4, rank=4)
    assert with_alpha_rule(plan, "rank").content_hash() == plan.content_hash()
    sqrt = with_alpha_rule(plan, "sqrt")
    assert {m.lora_alpha / m.rank for m in sqrt.modules.values()} == {4.0}  # 32·√(4/16)/4: twice rank's scale


def test_save_plan_writes_the_init_file_beside_each_plan(tmp_path):
    from planner.config import QRAConfig
    from planner.loading import load_model
    from planner.priors.adapter_init import save_plan

    cfg = QRAConfig.model_validate(
        {
            "model": {"tiny": {"layers": 2}},
            "adapter": {"init": "error"},
            "profile": {"calibration_examples": 4, "seq_len": 32},
        }
    )
    model = load_model(cfg.model)
    paths = [tmp_path / "out" / "plan.yaml", tmp_path / "axolotl" / "qra_plan.yaml"]
    save_plan(cfg, Plan.uniform(model, bits=4, rank=4), paths, tmp_path / "out")
    assert (tmp_path / "out" / MOMENTS_FILE).is_file()
    plans = [Plan.load(p) for p in paths]
    assert [p.init_file for p in plans] == ["plan.init.safetensors", "qra_plan.init.safetensors"]
    assert plans[0].content_hash() == plans[1].content_hash()
    for plan in plans:
        assert apply_plan(copy.deepcopy(model), plan) is not None


def test_error_table_allocation_fits_and_prices_bits_with_rank():
    from planner.config import QRAConfig
    from planner.memory import Budget, plan_bytes
    from planner.model_info import load_model_info
    from planner.priors.adapter_init import error_table
    from planner.search.allocation import table_allocation
    from planner.search.space import BudgetCost, SearchSpace
    from planner.settings import TrainingSettings

    cfg = QRAConfig.model_validate(
        {"model": {"tiny": {"layers": 2}}, "budget": "uniform:4bit:r8", "space": {"bits": [3, 4, 8], "ranks": [4, 16]}}
    )
    info = load_model_info(cfg.model)
    budget = Budget.parse(cfg.budget)
    space = SearchSpace.from_config(cfg, info)
    settings = TrainingSettings.of(cfg)
    budget_bytes = int(budget.check_feasible(info, settings, space.bits, space.ranks, space.backend))
    cost = BudgetCost(space, lambda c: plan_bytes(info, space.to_plan(c), settings, budget.kind))
    model = build_tiny_model("llama", layers=2, seed=0).eval()
    moments = second_moments(model, _tokens(4), [s.name for s in space.specs])
    table = error_table(model, space, moments)
    for u in range(space.n_units):
        assert table[(u, 3, 4)] > table[(u, 4, 4)] > table[(u, 8, 4)] > 0  # fewer bits: more error
        assert table[(u, 4, 16)] < table[(u, 4, 4)]  # more rank repairs more of it
    config = table_allocation(space, cost, budget_bytes, table)
    assert cost(config) <= budget_bytes
    total = sum(table[(u, *c)] for u, c in enumerate(config))
    assert total <= sum(table[(u, 4, 4)] for u in range(space.n_units))  # no worse than uniform 4-bit r4


def test_axolotl_post_lora_load_starts_the_adapters_from_the_init_file(tmp_path):
    from axolotl.utils.dict import DictDefault
    from peft import get_peft_model

    from qra_plugin.axolotl.plugin import QRAPlugin
    from qra_plugin.lora import lora_config
    from qra_plugin.quantize import quantize_model

    model = build_tiny_model("llama", seed=0)
    plan = _init_plan(model, Plan.uniform(model, bits=4, rank=4), _tokens(), tmp_path)
    name = "model.layers.1.self_attn.v_proj"
    expected = read_init_tensors(plan)[f"{name}.lora_B"]
    for lora_model_dir, starts_from_file in ((None, True), (str(tmp_path), False)):
        quantized = copy.deepcopy(model)
        quantize_model(quantized, plan)
        peft_model = get_peft_model(quantized, lora_config(plan))
        cfg = DictDefault({"qra_plan": str(tmp_path / "plan.yaml"), "lora_model_dir": lora_model_dir})
        QRAPlugin().post_lora_load(cfg, peft_model)
        b = peft_model.get_base_model().get_submodule(name).lora_B["default"].weight
        assert torch.equal(b, expected) is starts_from_file  # a trained adapter being loaded is kept


def test_search_space_applies_the_alpha_rule():
    from planner.config import QRAConfig
    from planner.model_info import load_model_info
    from planner.search.space import SearchSpace

    def plan_for(adapter: dict) -> Plan:
        cfg = QRAConfig.model_validate({"model": {"tiny": {"layers": 2}}, "adapter": adapter})
        space = SearchSpace.from_config(cfg, load_model_info(cfg.model))
        return space.to_plan(((4, 4), (8, 16)))

    rank = plan_for({"alpha_rule": "rank"})
    assert all(m.alpha is None for m in rank.modules.values())  # rounds 1-2's plans, hash unchanged
    default = plan_for({})  # sqrt: a rank-4 module keeps the update size lora_r 16 / lora_alpha 32 gave
    assert {m.rank: m.lora_alpha for m in default.modules.values()} == {4: 16.0, 16: 32.0}
    assert default.content_hash() != rank.content_hash()


@pytest.mark.distributed
def test_two_ddp_ranks_start_from_the_init_file(tmp_path):
    """``accelerate launch`` (2 CPU processes) of the TRL example: each rank's ``apply_plan`` reads the init
    file named relative to the plan (the launch runs elsewhere), both train with the same losses, and the first
    loss is the init's, not the zero start's."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from planner.data.wiki import write_jsonl
    from planner.tiny import save_tiny_model

    root = Path(__file__).resolve().parents[1]
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    model_dir = save_tiny_model(tmp_path / "model", seed=0)
    data = write_jsonl(tmp_path / "train.jsonl", "train", 16, fmt="prompt-completion")
    model = build_tiny_model("llama", seed=0)
    (tmp_path / "zero").mkdir()
    Plan.uniform(model, bits=3, rank=4).save(tmp_path / "zero" / "plan.yaml")
    _init_plan(model, Plan.uniform(model, bits=3, rank=4), _tokens(), tmp_path / "init")
    env = launch_env(HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    first = {}
    for kind in ("zero", "init"):
        out = tmp_path / f"out_{kind}"
        cmd = [
            accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(root / "example_configs" / "train_trl.py"),
            "--model", str(model_dir), "--plan", str(tmp_path / kind / "plan.yaml"), "--data", str(data),
            "--batch", "2", "--out", str(out), "--steps", "2",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["losses"] == pytest.approx(ranks[1]["losses"], abs=1e-6)
        first[kind] = ranks[0]["losses"][0]
    assert first["init"] != pytest.approx(first["zero"], abs=1e-4)


@pytest.mark.slow
def test_smollm2_error_init_lowers_the_starting_loss(tmp_path):
    """The real model, its first four blocks at HQQ 3-bit r16 (the rest unquantized, to stay cheap): the init
    removes a real share of the starting loss the quantization adds on held-out wiki rows."""
    from benchmarks.adapter_init_probe import eval_loss, packed_rows
    from planner.config import DataSection, ModelSection
    from planner.loading import load_model, load_tokenizer
    from planner.priors.calibration import calibration_batch

    section = ModelSection(path="demo")
    model = load_model(section).eval()
    tokenizer = load_tokenizer(section)
    calib = calibration_batch(tokenizer, DataSection(), 8, 128)
    held_out = packed_rows(tokenizer, "selection", 8, 128)
    plan = Plan.from_blocks(model, [(3, 16)] * 4 + [(16, 16)] * 26)
    init_plan = _init_plan(model, plan, calib, tmp_path)
    unquantized = eval_loss(model, held_out)
    zero = eval_loss(apply_plan(copy.deepcopy(model), plan), held_out)
    init = eval_loss(apply_plan(copy.deepcopy(model), init_plan), held_out)
    assert zero - unquantized > 0.02, (unquantized, zero)
    assert init < zero - 0.3 * (zero - unquantized), (unquantized, zero, init)


def test_a_scale_override_keeps_the_starting_delta(tmp_path):
    """``use_rslora`` changes PEFT's scale to alpha/√r: B is rescaled so scale·B·A is the planner's delta."""
    model = build_tiny_model("llama", seed=0)
    tokens = _tokens()
    plan = _init_plan(model, Plan.uniform(model, bits=4, rank=4), tokens, tmp_path)
    plain = _logits(apply_plan(copy.deepcopy(model), plan), tokens)
    rslora = apply_plan(copy.deepcopy(model), plan, use_rslora=True)
    module = rslora.get_base_model().get_submodule("model.layers.0.self_attn.q_proj")
    assert module.scaling["default"] == pytest.approx(8 / 2)  # alpha 8 / √4, not 8 / 4
    assert torch.allclose(_logits(rslora, tokens), plain, atol=1e-5)


@pytest.mark.axolotl
def test_axolotl_train_starts_from_the_init_file(tmp_path, tiny_model_dir):
    """A real ``axolotl train`` with an init plan and a learning rate too small to move anything: the adapter
    it saves is the init file's (so the plugin's hook ran before training), and its plan copy still loads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.test_axolotl import _config, _run

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    (tmp_path / "plan").mkdir()
    plan = _init_plan(model, Plan.uniform(model, bits=3, rank=4), _tokens(), tmp_path / "plan")
    config = _config(tmp_path, tiny_model_dir, qra_plan=str(tmp_path / "plan" / "plan.yaml"), max_steps=1)
    config.write_text(config.read_text().replace("learning_rate: 0.001", "learning_rate: 1.0e-12"))
    proc = _run(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    expected = read_init_tensors(plan)
    name = "model.layers.1.mlp.down_proj"
    assert expected[f"{name}.lora_B"].abs().max() > 1e-3  # zero init would not pass the next line
    assert torch.allclose(saved[f"base_model.model.{name}.lora_B.weight"], expected[f"{name}.lora_B"], atol=1e-6)
    copied = Plan.load(tmp_path / "out" / "qra_plan.yaml")
    assert copied.content_hash() == plan.content_hash() and copied.init_path().is_file()


def test_the_cached_error_table_is_measured_again_for_another_damping_or_space(tmp_path):
    """``error_table.json`` is reused only under its own key: another damping or rank set measures again."""
    from planner.config import QRAConfig
    from planner.model_info import load_model_info
    from planner.priors.error_table import TABLE_FILE, cached_error_table
    from planner.search.space import SearchSpace

    raw = {"model": {"tiny": {"layers": 2}}, "space": {"bits": [3, 4], "ranks": [4, 8]}}
    cfg = QRAConfig.model_validate(raw)
    space = SearchSpace.from_config(cfg, load_model_info(cfg.model))
    first = cached_error_table(cfg, space, tmp_path)
    path = tmp_path / TABLE_FILE
    stamp = path.stat().st_mtime_ns
    assert cached_error_table(cfg, space, tmp_path) == first and path.stat().st_mtime_ns == stamp
    damped = QRAConfig.model_validate({**raw, "adapter": {"damping": 0.5}})
    again = cached_error_table(damped, space, tmp_path)
    assert again != first and path.stat().st_mtime_ns != stamp
    wider = QRAConfig.model_validate({**raw, "space": {"bits": [3, 4], "ranks": [4, 8, 16]}})
    assert (0, 4, 16) in cached_error_table(
        wider, SearchSpace.from_config(wider, load_model_info(wider.model)), tmp_path
    )


def test_the_benchmark_search_runs_at_the_rate_tuned_for_its_best_start():
    from benchmarks.harness.adapter_bench import best_start

    methods = {
        "uniform_init": {"lr": 5e-4, "tuning": {"0.0005": 2.4025, "0.002": 2.4963}},
        "table_alloc": {"lr": 2e-3, "tuning": {"0.001": 2.3487, "0.002": 2.3132}},
        "uniform": {"lr": 2e-3, "tuning": {"0.002": 2.4543}},
    }
    assert best_start(methods, "error") == "table_alloc"  # not the uniform plan's low rate
    assert best_start(methods, "zero") == "uniform"  # greedy_priors not run: the start that was
    with pytest.raises(ValueError, match="no tuned start"):
        best_start({"uniform": methods["uniform"]}, "error")


def test_the_benchmark_keeps_earlier_rows_of_its_results_file_paired_by_seed(tmp_path):
    from benchmarks.harness.adapter_bench import _earlier_result
    from planner.stats import paired

    row = {"final_eval_losses": {"0": 2.17, "1": 2.16, "2": 2.18}, "final_accuracies": {"0": 0.5, "1": 0.4, "2": 0.5}}
    result = {"command": "first", "protocol": {"recipe": "cpu", "optimizer": "adamw_torch"},
              "budgets": {"uniform4_r16": {"methods": {"all8_r4": row}}}}  # fmt: skip
    path = tmp_path / "adapter_init.json"
    path.write_text(json.dumps(result))
    earlier = _earlier_result(path, "cpu", "adamw_torch")
    assert earlier["commands"] == ["first"]
    kept = earlier["budgets"]["uniform4_r16"]["methods"]["all8_r4"]["final_eval_losses"]
    assert paired(kept, {0: 2.16, 1: 2.15, 2: 2.17}).n == 3  # a new row's int seeds pair with the file's
    assert _earlier_result(path, "cpu", "adamw_bnb_8bit") == {}  # another optimizer's rows are not this run's
    assert _earlier_result(tmp_path / "missing.json", "cpu", "adamw_torch") == {}


def test_a_confirm_search_starts_from_a_whole_copy_of_the_plain_searchs_store(tmp_path):
    from benchmarks.harness.adapter_bench import _copy_store
    from planner.store import Store

    plain, confirm = tmp_path / "qra-error-lr0.002", tmp_path / "qra-error-lr0.002-confirm40"
    plain.mkdir()
    with Store(plain / "store.sqlite") as store:
        rows = len(store.records())
    db = sqlite3.connect(plain / "store.sqlite")
    db.execute("CREATE TABLE marker (x)")
    db.execute("INSERT INTO marker VALUES (1)")
    db.commit()
    db.close()
    _copy_store(plain, confirm)
    copied = sqlite3.connect(confirm / "store.sqlite")
    assert copied.execute("SELECT x FROM marker").fetchall() == [(1,)] and not (confirm / "store.part").exists()
    copied.execute("DELETE FROM marker")
    copied.commit()
    copied.close()
    _copy_store(plain, confirm)  # a confirm search's own store (its longer runs) is never replaced
    with Store(confirm / "store.sqlite") as store:
        assert len(store.records()) == rows
    assert sqlite3.connect(confirm / "store.sqlite").execute("SELECT x FROM marker").fetchall() == []
    _copy_store(tmp_path / "none", tmp_path / "other")  # no plain search yet: nothing to copy
    assert not (tmp_path / "other").exists()
