"""Structured pruning from a plan on tiny Llama / Qwen2 / Mistral / Gemma built in code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qra_plugin import Plan, apply_plan, load_for_inference
from qra_plugin.errors import QRAError
from qra_plugin.plan import BlockPruning
from qra_plugin.prune import block_layouts, head_geometry, prune_model

ARCHS = ("llama", "qwen2", "mistral", "gemma")


def _model(arch: str, seed: int = 0, **over) -> nn.Module:
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    kinds = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig}
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(kinds[arch](**{**common, **over}), dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    return model.eval()


def _pruned_plan(model: nn.Module, kv: int = 2, bits: int = 16) -> Plan:
    plan = Plan.uniform(model, bits=bits, rank=4)
    pruning = {0: BlockPruning(mlp_keep=[0, 3, 5, 7, 20, 47], kv_keep=[1]), 2: BlockPruning(mlp_keep=list(range(24)))}
    return plan.model_copy(update={"pruning": pruning})


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 9, 17, 33, 2, 70, 11]])


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_equals_removing_those_channels_and_heads_from_the_dense_model(arch):
    """Dropping MLP channels = zeroing their down-projection columns; dropping a KV group = zeroing the
    output-projection columns of its query heads. Both give the same logits as the pruned model."""
    dense, pruned = _model(arch), _model(arch)
    plan = _pruned_plan(dense)
    prune_model(pruned, plan)
    geo = head_geometry(dense.config)
    layouts = block_layouts(dense, geo)
    blocks = dense.model.layers
    with torch.no_grad():
        for index, keep in plan.pruning.items():
            layout, block = layouts[index], blocks[index]
            down = block.get_submodule(layout.mlp_out).weight
            drop = [c for c in range(geo.intermediate) if c not in keep.mlp_keep]
            down[:, drop] = 0
            if keep.kv_keep is not None:
                kept_q = {h * geo.group + r for h in keep.kv_keep for r in range(geo.group)}
                cols = [h * geo.head_dim + j for h in range(geo.heads) if h not in kept_q for j in range(geo.head_dim)]
                block.get_submodule(layout.attn_out).weight[:, cols] = 0
        expected = dense(_ids()).logits
        got = pruned(_ids()).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    layer0 = pruned.model.layers[0]
    assert layer0.get_submodule(layouts[0].mlp_out).in_features == 6
    assert layer0.get_submodule(layouts[0].q[0]).out_features == 2 * 8  # one KV group keeps its 2 query heads
    assert layouts[0].attn_out.endswith("o_proj") and set(layouts[0].mlp_in) == {"mlp.gate_proj", "mlp.up_proj"}


def test_keeping_everything_changes_nothing_and_mha_keeps_q_k_v_alike():
    dense, pruned = _model("llama", num_key_value_heads=4), _model("llama", num_key_value_heads=4)
    plan = Plan.uniform(dense, bits=16, rank=4).model_copy(
        update={"pruning": {1: BlockPruning(mlp_keep=list(range(48)), kv_keep=[0, 1, 2, 3])}}
    )
    prune_model(pruned, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(_ids()).logits, dense(_ids()).logits)
    half = _model("llama", num_key_value_heads=4)
    prune_model(half, plan.model_copy(update={"pruning": {1: BlockPruning(kv_keep=[0, 3])}}))
    attn = half.model.layers[1].self_attn
    assert attn.q_proj.out_features == attn.k_proj.out_features == attn.v_proj.out_features == 16


@pytest.mark.parametrize("arch", ("llama", "qwen2"))
def test_pruned_quantized_plan_trains_saves_and_reloads_with_identical_logits(arch, tmp_path):
    model = _model(arch)
    model.save_pretrained(tmp_path / "base")
    plan = _pruned_plan(model, bits=4)
    peft = apply_plan(model, plan)
    assert type(peft.base_model.model.model.layers[0].mlp.down_proj.base_layer).__name__ == "HQQLinear"
    assert peft.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight.shape == (4, 6)
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft.train()
    for _ in range(2):
        loss = peft(input_ids=_ids(), labels=_ids()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft.eval()
    peft.save_pretrained(tmp_path / "adapter")
    plan.save(tmp_path / "plan.yaml")
    with torch.no_grad():
        trained = peft(_ids()).logits
        reloaded = load_for_inference(tmp_path / "base", tmp_path / "plan.yaml", tmp_path / "adapter")(_ids()).logits
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=0)


def test_plan_round_trip_and_unpruned_plans_are_unchanged(tmp_path):
    model = _model("llama")
    plain = Plan.uniform(model, bits=4, rank=8)
    assert "pruning" not in plain.to_dict()  # plans and their hashes are as before pruning existed
    pruned = _pruned_plan(model)
    assert pruned.content_hash() != plain.content_hash()
    assert Plan.load(pruned.save(tmp_path / "p.yaml")) == pruned
    assert Plan.load(pruned.save(tmp_path / "p.json")).content_hash() == pruned.content_hash()
    with pytest.raises(QRAError, match="mlp_keep must be a non-empty, sorted list"):
        Plan.parse({**plain.to_dict(), "pruning": {0: {"mlp_keep": [3, 1]}}})
    with pytest.raises(QRAError, match="outside the 2 key/value heads"):
        prune_model(_model("llama"), plain.model_copy(update={"pruning": {0: BlockPruning(kv_keep=[2])}}))
    twice = _model("llama")
    prune_model(twice, pruned)
    prune_model(twice, pruned)  # idempotent, as Axolotl may call its hooks twice
    assert twice.model.layers[0].mlp.down_proj.in_features == 6


@pytest.mark.parametrize("arch", ("llama", "qwen2"))
def test_memory_model_prices_a_pruned_quantized_plan_as_its_real_tensors(arch):
    """Every static part exactly, and the saved activations within 2 %, on the pruned shapes."""
    from planner.memory import estimate
    from planner.model_info import load_model_info
    from planner.settings import TrainingSettings
    from planner.tiny import build_tiny_model
    from tests.test_memory import STATIC, measured_static, mixed_plan, saved_activation_bytes

    model = build_tiny_model(arch, seed=0, layers=3, hidden=128)
    info = load_model_info(model)
    keep = {0: BlockPruning(mlp_keep=list(range(0, 256, 3)), kv_keep=[0]), 2: BlockPruning(kv_keep=[1])}
    plan = mixed_plan(model, info).model_copy(update={"pruning": keep})
    pred = estimate(info, plan, TrainingSettings(batch=2, seq_len=32))
    unpruned = estimate(info, mixed_plan(model, info), TrainingSettings(batch=2, seq_len=32))
    assert pred.quantized_weights < unpruned.quantized_weights and pred.activations < unpruned.activations
    measured = measured_static(build_tiny_model(arch, seed=0, layers=3, hidden=128), plan, "adamw_torch")
    assert {k: getattr(pred, k) for k in STATIC} == measured
    saved = saved_activation_bytes(build_tiny_model(arch, seed=0, layers=3, hidden=128), plan, 2, 32)
    from planner.memory import trace_activations
    from planner.model_info import pruned_info

    head = trace_activations(pruned_info(info, plan), 2, 32, torch.float32).head_saved
    assert abs(pred.activations + head - saved) <= 0.02 * saved, (pred.activations + head, saved)


@pytest.mark.parametrize("grad_checkpointing", (False, True))
def test_per_block_memory_composed_from_uniform_prunings_equals_tracing_the_mixed_model(grad_checkpointing):
    """Blocks pruned differently are priced from one trace per distinct kept count; the total equals the
    trace of the mixed model itself, part for part."""
    from dataclasses import asdict

    from planner.memory import estimate, trace_activations
    from planner.memory.activations import meta_model_for_trace
    from planner.model_info import info_from_model, load_model_info, pruned_info
    from planner.settings import TrainingSettings
    from planner.tiny import build_tiny_model
    from qra_plugin.prune import prune_blocks
    from tests.test_memory import mixed_plan

    model = build_tiny_model("qwen2", seed=0, layers=3, hidden=128)
    info = load_model_info(model)
    keep = {0: BlockPruning(mlp_keep=list(range(0, 256, 3)), kv_keep=[0]), 1: BlockPruning(mlp_keep=list(range(64)))}
    plan = mixed_plan(model, info).model_copy(update={"pruning": keep})
    composed = pruned_info(info, plan)
    assert composed.block_sources is not None and len({id(s) for s in composed.block_sources}) == 3
    meta = meta_model_for_trace(info, info.dtype)
    prune_blocks(meta, keep)
    meta.qra_source_fingerprint = info.fingerprint
    direct = info_from_model(meta)
    direct.config, direct.pruning = info.config, keep  # traced as one model
    assert composed.linears == direct.linears
    assert trace_activations(composed, 2, 32, torch.float32).blocks_saved == (
        trace_activations(direct, 2, 32, torch.float32).blocks_saved
    )
    job = TrainingSettings(batch=2, seq_len=32, grad_checkpointing=grad_checkpointing)
    got = estimate(info, plan, job)
    from planner.memory import breakdown

    # the same arithmetic on the directly traced model
    want = breakdown._estimate(direct, plan, trace_activations(direct, 2, 32, torch.float32), job)  # noqa: SLF001
    assert asdict(got) == asdict(want)


def test_rankadaptor_search_plans_bits_and_ranks_for_a_pruned_model(tmp_path):
    """``space.prune: [0.25]``: every candidate is pruned by the same kept indices (from the channel
    importance on calibration data), the budget is priced on the pruned shapes, and the plan trains."""
    import yaml

    from planner.config import QRAConfig
    from planner.fidelity.contract import EvalTask
    from planner.fidelity.sft import run_fidelity
    from planner.orchestration.search_run import run_search
    from planner.orchestration.setup import SearchSetup
    from tests.test_search import _write_config

    small = {"population": 2, "generations": 1, "offspring": 1, "promote": 1, "tr_iterations": 0}
    path = _write_config(tmp_path / "cfg.yaml", search=small, space={"prune": [0.25], "bits": [4, 8]})
    cfg = QRAConfig.load(path)
    result = run_search(cfg, tmp_path / "out", seed=0, progress=False)
    plan = Plan.load(tmp_path / "out" / "plan.yaml")
    assert len(plan.pruning) == 4  # every block of the tiny Llama: 128 -> 96 MLP channels, 2 -> 2 KV groups
    assert all(len(p.mlp_keep) == 96 and p.kv_keep is None for p in plan.pruning.values())
    setup = SearchSetup.build(cfg)
    unpruned = SearchSetup.build(cfg.model_copy(update={"space": cfg.space.model_copy(update={"prune": [0.0]})}))
    config = setup.space.uniform(4, 16)
    assert setup.cost(config) < unpruned.cost(config)  # pruned shapes in the byte count
    assert result.best_memory <= result.budget_bytes
    ok = run_fidelity(EvalTask(plan=plan, level="low", seed=0, config=cfg, tag="t"))
    same_unpruned = unpruned.space.to_plan(result.best)  # the searched bits and ranks on the unpruned model
    dense = run_fidelity(EvalTask(plan=same_unpruned, level="low", seed=0, config=cfg, tag="t"))
    assert ok.status == "ok" and ok.weight_bytes < dense.weight_bytes
    with pytest.raises(ValueError, match="space.unit: block"):
        QRAConfig.model_validate({**yaml.safe_load(path.read_text()), "space": {"prune": [0, 0.25], "unit": "module"}})


def test_pruning_axis_orders_cheapest_first_and_keys_round_trip():
    from planner.config import QRAConfig
    from planner.model_info import load_model_info
    from planner.priors.pruning import channel_importance
    from planner.search.space import SearchSpace, allocation_key, parse_allocation_key
    from planner.tiny import build_tiny_model

    model = build_tiny_model("llama", seed=0, layers=3, hidden=64)
    info = load_model_info(model)
    channels = channel_importance(model, torch.randint(0, 100, (2, 16)))
    cfg = QRAConfig.model_validate({"model": {"path": "tiny"}, "space": {"prune": [0.5, 0, 0.25], "bits": [4, 8]}})
    assert cfg.profile.prune_ratios == [0.25, 0.5]  # a searched ratio brings its prior
    space = SearchSpace.from_config(cfg, info, channels=channels)
    assert space.prune == (0.5, 0.25, 0.0) and space.dim == 3 * 3
    config = ((4, 4, 0.5), (8, 16, 0.0), (4, 8, 0.25))
    assert parse_allocation_key(allocation_key(config)) == config and space.decode(space.encode(config)) == config
    plan = space.to_plan(config)
    assert sorted(plan.pruning) == [0, 2]  # block 1 keeps everything
    assert len(plan.pruning[0].mlp_keep) == round(len(channels.mlp[0]) * 0.5)
    assert space.uniform(4, 8) == ((4, 8, 0.0),) * 3 and not space.to_plan(space.uniform(4, 8)).pruning
    assert {len(n) for n in space.neighbours(config)} == {3} and len(space.neighbours(config)) == 3 + 4 + 5


def test_joint_search_chooses_each_blocks_pruning_with_its_bits_and_rank(tmp_path):
    """``space.prune: [0, 0.25, 0.5]``: the priors measure I_p, the search evaluates plans pruned differently
    per block, the written plan stays in the unpruned uniform-4 budget and trains."""
    from planner.config import QRAConfig
    from planner.fidelity.contract import EvalTask
    from planner.fidelity.sft import run_fidelity
    from planner.orchestration.search_run import run_search
    from planner.orchestration.setup import SearchSetup
    from planner.priors.profile import Priors
    from planner.search.space import parse_allocation_key
    from tests.test_search import _write_config

    small = {"population": 4, "generations": 1, "offspring": 2, "promote": 1, "tr_iterations": 1}
    path = _write_config(tmp_path / "cfg.yaml", search=small, space={"prune": [0, 0.25, 0.5], "bits": [4, 8]})
    cfg = QRAConfig.load(path)
    result = run_search(cfg, tmp_path / "out", seed=0, progress=False)
    priors = Priors.load(tmp_path / "out" / "priors.json")
    assert sorted(priors.I_p) == [0.25, 0.5] and all(len(v) == 4 for v in priors.I_p.values())
    setup = SearchSetup.build(cfg)
    evaluated = [parse_allocation_key(row["config"]) for row in result.trace]
    ratios_seen = {u[2] for c in evaluated for u in c}
    assert len(ratios_seen) >= 2, ratios_seen  # pruning really is a searched coordinate
    plan = Plan.load(tmp_path / "out" / "plan.yaml")
    assert plan == setup.space.to_plan(result.best).model_copy(update={"meta": plan.meta})
    assert result.best_memory == setup.cost(result.best) <= result.budget_bytes
    ok = run_fidelity(EvalTask(plan=plan, level="low", seed=0, config=cfg, tag="t"))
    assert ok.status == "ok"
