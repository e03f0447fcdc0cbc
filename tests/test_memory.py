"""planner.memory against what real HQQ/bitsandbytes/PEFT/torch tensors hold (qra_plugin.weight_memory)."""

from __future__ import annotations

import tempfile

import pytest
import torch

from planner.config import ModelSection
from planner.memory import Budget, estimate, min_plan_bytes, parse_size, plan_bytes, uniform_plan
from planner.model_info import load_model_info
from planner.settings import TrainingSettings
from planner.tiny import build_tiny_model
from qra_plugin import apply_plan
from qra_plugin.errors import QRAError
from qra_plugin.plan import ModulePlan, Plan
from qra_plugin.weight_memory import memory_report, storage_bytes

#: every (bits, backend, axis) the plugin can build; HQQ 3-bit on axis 1 exercises the 10-per-int32 padding
COMBOS = [
    {"bits": 2, "backend": "hqq"},
    {"bits": 3, "backend": "hqq"},
    {"bits": 3, "backend": "hqq", "axis": 1},
    {"bits": 4, "backend": "hqq"},
    {"bits": 4, "backend": "hqq", "axis": 1},
    {"bits": 8, "backend": "hqq"},
    {"bits": 4, "backend": "bnb"},
    {"bits": 8, "backend": "bnb"},
    {"bits": 16, "backend": "none"},
]
RANKS = [4, 8, 16, 0, 2]


def mixed_plan(model: torch.nn.Module, info, offset: int = 0) -> Plan:
    """Module-level plan cycling through every combo and several ranks (rank 0 included)."""
    modules = {}
    for i, spec in enumerate(info.linears):
        combo = COMBOS[(i + offset) % len(COMBOS)]
        modules[spec.name] = ModulePlan(**combo, rank=RANKS[i % len(RANKS)])
    return Plan(fingerprint=info.fingerprint, modules=modules)


def optimizer_for(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer the HF Trainer would build for ``optim=name``."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, optim=name, use_cpu=True, report_to=[])
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls(params, **kwargs)


def measured_static(model: torch.nn.Module, plan: Plan, optimizer: str, batch: int = 2, seq: int = 16) -> dict:
    """Bytes held after apply_plan and one real optimizer step."""
    peft_model = apply_plan(model, plan)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = optimizer_for(optimizer, params)
    ids = torch.randint(4, 200, (batch, seq), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    report = memory_report(peft_model)
    quantized = sum(m.bytes for m in report.modules if plan.modules[m.name].bits < 16)
    states = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return {
        "quantized_weights": quantized,
        "unquantized_weights": report.planned_bytes - quantized + report.other_bytes,
        "lora_params": report.lora_bytes,
        "lora_grads": storage_bytes([p.grad for p in params if p.grad is not None]),
        "optimizer_states": storage_bytes(states),
    }


STATIC = ("quantized_weights", "unquantized_weights", "lora_params", "lora_grads", "optimizer_states")


def assert_static_close(pred, meas: dict, tol: float = 0.01) -> None:
    for key in STATIC:
        p, m = getattr(pred, key), meas[key]
        assert abs(p - m) <= tol * max(m, 1), f"{key}: predicted {p}, measured {m}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("optimizer", ["adamw_torch", "adafactor", "sgd"])
def test_static_parts_match_real_tensors(arch: str, optimizer: str) -> None:
    model = build_tiny_model(arch, seed=0, layers=3, hidden=64)
    info = load_model_info(model)
    plan = mixed_plan(model, info, offset=1 if arch == "qwen2" else 0)
    pred = estimate(info, plan, TrainingSettings(batch=2, seq_len=16, optimizer=optimizer))
    meas = measured_static(model, plan, optimizer)
    assert_static_close(pred, meas)
    assert pred.quantized_weights > 0 and pred.lora_params > 0
    if optimizer == "sgd":
        assert pred.optimizer_states == 0


def test_static_parts_bf16_storage() -> None:
    """bf16 models: HQQ scales/zeros and bnb nf4's packed storage follow the compute dtype; LoRA stays fp32."""
    model = build_tiny_model("llama", seed=1, layers=2, hidden=64, dtype=torch.bfloat16)
    info = load_model_info(model)
    plan = mixed_plan(model, info)
    pred = estimate(info, plan, TrainingSettings(batch=1, seq_len=8, precision=torch.bfloat16))
    meas = measured_static(model, plan, "adamw_torch", batch=1, seq=8)
    assert_static_close(pred, meas)


def test_every_combo_exact_per_module() -> None:
    """Each backend's byte formula is exact, module by module (not only in sum)."""
    from planner.memory import base_module_bytes

    model = build_tiny_model("qwen2", seed=0, layers=len(COMBOS), hidden=64)
    info = load_model_info(model)
    blocks = info.blocks()
    modules = {s.name: ModulePlan(**COMBOS[s.block], rank=4) for s in info.linears}
    plan = Plan(fingerprint=info.fingerprint, modules=modules)
    report = memory_report(apply_plan(model, plan))
    measured = {m.name: m.bytes for m in report.modules}
    for block in blocks:
        for spec in block:
            assert base_module_bytes(spec, plan.modules[spec.name], torch.float32) == measured[spec.name], spec.name


def saved_activation_bytes(model: torch.nn.Module, plan: Plan, batch: int, seq: int) -> int:
    """Bytes autograd really saves in one training forward (new storages only, weights excluded)."""
    from qra_plugin.weight_memory import module_tensors

    peft_model = apply_plan(model, plan)
    peft_model.train()
    held = {t.untyped_storage().data_ptr() for t in list(peft_model.parameters()) + list(peft_model.buffers())}
    for module in peft_model.modules():
        held.update(t.untyped_storage().data_ptr() for t in module_tensors(module))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in held:
            saved[key] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(4, 200, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peft_model(input_ids=ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_activations_match_autograd(arch: str) -> None:
    """Traced + per-module activation bytes = what autograd saves on the real quantized model (within 2%)."""
    from planner.memory import trace_activations

    model = build_tiny_model(arch, seed=0, layers=3, hidden=128)
    info = load_model_info(model)
    plan = mixed_plan(model, info)
    pred = estimate(info, plan, TrainingSettings(batch=2, seq_len=32))
    trace = trace_activations(info, 2, 32, torch.float32)
    predicted_saved = pred.activations + trace.head_saved  # head_saved: the loss's fp32 log-softmax
    measured = saved_activation_bytes(model, plan, 2, 32)
    assert abs(predicted_saved - measured) <= 0.02 * measured, (predicted_saved, measured)


def test_activations_scale_and_checkpointing() -> None:
    model = build_tiny_model("llama", seed=0, layers=4, hidden=64)
    info = load_model_info(model)
    plan = uniform_plan(info, 4, 8)
    a1 = estimate(info, plan, TrainingSettings(batch=1, seq_len=32))
    a2 = estimate(info, plan, TrainingSettings(batch=2, seq_len=32))
    assert 1.9 < a2.activations / a1.activations < 2.1
    gc = estimate(info, plan, TrainingSettings(batch=2, seq_len=32, grad_checkpointing=True))
    assert gc.activations < a2.activations
    assert gc.quantized_weights == a2.quantized_weights and gc.total < a2.total
    r32 = estimate(info, uniform_plan(info, 4, 32), TrainingSettings(batch=2, seq_len=32))
    assert r32.activations > a2.activations and r32.lora_params == 4 * a2.lora_params


def test_wrong_model_and_bad_optimizer() -> None:
    info = load_model_info(build_tiny_model("llama", layers=2))
    other = load_model_info(build_tiny_model("llama", layers=3))
    with pytest.raises(QRAError, match="plan is for"):
        estimate(info, uniform_plan(other, 4, 8), TrainingSettings(batch=1, seq_len=8))
    with pytest.raises(QRAError, match="unknown optimizer"):
        estimate(info, uniform_plan(info, 4, 8), TrainingSettings(batch=1, seq_len=8, optimizer="lamb9000"))


# ---------------------------------------------------------------- budgets
def test_parse_sizes() -> None:
    assert parse_size("22GiB") == 22 * 2**30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("800MiB") == 800 * 2**20
    assert parse_size("12345") == 12345
    for bad in ("22 parsecs", "", "GiB", "-3GB"):
        with pytest.raises(QRAError):
            parse_size(bad)


def test_budget_parse_kinds() -> None:
    b = Budget.parse("22GiB")
    assert (b.kind, b.bytes) == ("peak", 22 * 2**30)
    assert Budget.parse(1024).bytes == 1024
    w = Budget.parse("weights:500MiB")
    assert (w.kind, w.bytes) == ("weights", 500 * 2**20)
    r = Budget.parse("uniform:4bit:r16")
    assert (r.kind, r.uniform) == ("peak", (4, 16, "hqq"))
    assert Budget.parse("uniform:4bit-bnb:r16").uniform == (4, 16, "bnb")
    assert Budget.parse("weights:uniform:3bit:r8").kind == "weights"
    for bad in ("uniform:5bit:r16", "uniform:2bit-bnb:r8", "uniform:4bit", "lots", "0", 0, "weights:"):
        with pytest.raises(QRAError):
            Budget.parse(bad)


def test_budget_resolve_relative_and_infeasible() -> None:
    info = load_model_info(build_tiny_model("llama", layers=4, hidden=64))
    train = TrainingSettings(batch=2, seq_len=32)
    peak = Budget.parse("uniform:4bit:r16").resolve(info, train)
    assert peak == plan_bytes(info, uniform_plan(info, 4, 16), train, "peak")
    assert peak == estimate(info, uniform_plan(info, 4, 16), TrainingSettings(batch=2, seq_len=32)).total
    weights = Budget.parse("weights:uniform:4bit:r16").resolve(info, train)
    assert weights < peak
    bnb = Budget.parse("uniform:4bit-bnb:r16").resolve(info, train)
    assert bnb != peak
    minimum = min_plan_bytes(info, train, [2, 3, 4, 8], [4, 8, 16], "hqq", "peak")
    assert minimum < peak
    assert Budget.parse("uniform:4bit:r16").check_feasible(info, train, [2, 3, 4, 8], [4, 8, 16]) == peak
    with pytest.raises(QRAError, match=rf"cheapest plan.*\({minimum} bytes\)"):
        Budget.parse(str(minimum - 1)).check_feasible(info, train, [2, 3, 4, 8], [4, 8, 16])
    with pytest.raises(QRAError, match="weight memory"):
        Budget.parse("weights:1KiB").check_feasible(info, train, [2, 4], [4])


# ---------------------------------------------------------------- the real demo model
@pytest.mark.slow
def test_static_parts_smollm2() -> None:
    from planner.loading import load_model

    section = ModelSection(path="demo")
    info = load_model_info(section)
    assert info.n_blocks == 30 and len(info.linears) == 210 and info.tied_embeddings
    model = load_model(section)
    plan = mixed_plan(model, info)
    pred = estimate(info, plan, TrainingSettings(batch=1, seq_len=8))
    meas = measured_static(model, plan, "adamw_torch", batch=1, seq=8)
    assert_static_close(pred, meas)


@pytest.mark.parametrize("gc", [False, True])
def test_peak_matches_profiler_measurement(gc: bool, tmp_path) -> None:
    """Predicted peak vs the allocator-level measurement of the benchmark (one real training step)."""
    from benchmarks import memory_accuracy as bench
    from planner.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "m", "llama", layers=4, hidden=128, vocab_size=512)
    section = ModelSection(path=str(model_dir))
    info = load_model_info(section)
    cfg = {"blocks": [(4, 16), (8, 8), (3, 8), (2, 32)], "backend": "hqq", "batch": 2, "seq": 64, "gc": gc,
           "optimizer": "adamw_torch", "loss_path": "trl_chunked", "trainer": "sft"}  # fmt: skip
    pred, meas = bench.predict(info, cfg), bench.measure(section, cfg, info, seed=0)  # through TRL's SFTTrainer
    assert pred["static_bytes"] == pytest.approx(meas["static_bytes"], rel=0.01)
    assert pred["peak"] == pytest.approx(meas["peak"], rel=0.05)
