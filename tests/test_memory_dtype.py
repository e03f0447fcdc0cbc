"""bf16 training priced as it runs: weights and HQQ metadata in the compute dtype, LoRA adapters in fp32 (PEFT's
default ``autocast_adapter_dtype``) with fp32 gradients and optimizer states, activations and TRL's chunked loss
as autograd and the allocator really hold them (tiny Llama / Qwen2 built in code, real HQQ / bitsandbytes / PEFT)."""

from __future__ import annotations

import pytest
import torch

from planner.memory import estimate, trace_activations, uniform_plan
from planner.memory.loss import TRL_CHUNK_TOKENS, _chunk_upcast
from planner.model_info import load_model_info
from planner.settings import TrainingSettings
from planner.tiny import build_tiny_model
from qra_plugin import apply_plan
from qra_plugin.errors import QRAError
from tests.test_memory import STATIC, measured_static, mixed_plan, saved_activation_bytes


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_bnb_8bit"])
def test_bf16_static_parts_equal_the_real_tensors(arch: str, optimizer: str) -> None:
    """Every static part of a bf16 model with a mixed plan applied, to the byte (the model's dtype is the default)."""
    model = build_tiny_model(arch, seed=2, layers=3, hidden=128, dtype=torch.bfloat16)
    info = load_model_info(model)
    assert info.dtype == torch.bfloat16
    plan = mixed_plan(model, info, offset=1 if arch == "qwen2" else 0)
    pred = estimate(info, plan, TrainingSettings(batch=1, seq_len=8, optimizer=optimizer, precision=info.dtype))
    meas = measured_static(model, plan, optimizer, batch=1, seq=8)
    assert {key: getattr(pred, key) for key in STATIC} == meas
    assert pred.settings["compute_dtype"] == "bfloat16"


def test_bf16_adapters_are_fp32_and_priced_so() -> None:
    """PEFT 0.20 upcasts bf16 adapters to fp32 (``cast_adapter_dtype``): LoRA bytes are 4 per parameter, HQQ's
    scale/zero and the unquantized parameters 2 per element; the fp32 model of the same plan differs only there."""
    model = build_tiny_model("llama", seed=0, layers=2, hidden=64, dtype=torch.bfloat16)
    info = load_model_info(model)
    plan = uniform_plan(info, 4, 8)
    lora = [p for n, p in apply_plan(model, plan).named_parameters() if "lora_" in n]
    assert lora and {p.dtype for p in lora} == {torch.float32}
    bf16 = estimate(info, plan, TrainingSettings(batch=1, seq_len=8, precision=info.dtype))
    fp32 = estimate(info, plan, TrainingSettings(batch=1, seq_len=8, precision=torch.float32))
    assert bf16.lora_params == fp32.lora_params == 4 * sum(p.numel() for p in lora)
    assert bf16.optimizer_states == fp32.optimizer_states
    assert bf16.unquantized_weights < fp32.unquantized_weights  # bf16 embeddings and norms (fp32 rotary buffers)
    assert bf16.quantized_weights < fp32.quantized_weights  # scales and zeros in bf16


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_saved_activations_equal_autograd(arch: str) -> None:
    """Below fp32 each LoRA saves its own fp32 copy of the input and a quantized layer saves the bf16 input (but
    not in the first block's attention, whose input needs no grad, unless the layer has a bias: HQQ's bias still
    requires grad); the trace keeps every recorded storage alive so a freed id is never taken for another's."""
    model = build_tiny_model(arch, seed=0, layers=3, hidden=128, dtype=torch.bfloat16)
    info = load_model_info(model)
    plan = mixed_plan(model, info)
    pred = estimate(info, plan, TrainingSettings(batch=2, seq_len=32, precision=info.dtype))
    head = trace_activations(info, 2, 32, torch.bfloat16).head_saved
    assert pred.activations + head == saved_activation_bytes(model, plan, 2, 32)


def _chunked_loss_peak(tokens_per_row: int, rows: int, hidden: int, vocab: int, dtype: torch.dtype) -> int:
    """Allocator-level peak of TRL's chunked NLL (forward + backward) over a frozen output weight, above what
    was held before it ran."""
    from torch.profiler import ProfilerActivity, profile
    from trl.trainer.sft_trainer import _chunked_cross_entropy_loss

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=gen).to(dtype)
    leaf = torch.randn(rows, tokens_per_row, hidden, generator=gen).to(dtype).requires_grad_()
    hidden_states = leaf * 1
    labels = torch.randint(0, vocab, (rows, tokens_per_row), generator=gen)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _chunked_cross_entropy_loss(hidden_states, weight, TRL_CHUNK_TOKENS, labels=labels)[0].backward()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("rows", [2, 8])  # 254 labelled tokens (one chunk) and 1016 (four chunks)
def test_bf16_chunked_loss_buffers_match_trls_allocations(rows: int) -> None:
    """The chunked-loss formula below fp32 (gathered bf16 hidden states + int64 order/labels, four fp32 chunk x
    vocab buffers, and ``_chunk_upcast``) against the allocator's peak, within 32 KiB (the chunk's fp32 copy the
    old rule priced is 256 KiB here)."""
    hidden, vocab, e = 256, 4096, 2
    tokens = rows * 128 - rows
    chunk = min(TRL_CHUNK_TOKENS, tokens)
    predicted = tokens * (hidden * e + 16) + 4 * chunk * vocab * 4 + _chunk_upcast(tokens, chunk, hidden, vocab, e)
    measured = _chunked_loss_peak(128, rows, hidden, vocab, torch.bfloat16)
    assert abs(predicted - measured) <= 32 * 1024, (predicted, measured)


def test_bf16_adapters_without_peft_autocast_are_priced_in_bf16() -> None:
    """``autocast_adapter_dtype=False`` (Axolotl's ``peft_autocast_adapter_dtype: false``) keeps the adapters in
    bf16 (fp32 on bitsandbytes int8, whose weight is no float): parameters, gradients and AdamW states."""
    from peft import get_peft_model

    from qra_plugin.lora import lora_config
    from qra_plugin.quantize import quantize_model
    from qra_plugin.weight_memory import memory_report, storage_bytes
    from tests.test_memory import optimizer_for

    model = build_tiny_model("llama", seed=3, layers=3, hidden=128, dtype=torch.bfloat16)
    info = load_model_info(model)
    plan = mixed_plan(model, info)
    pred = estimate(
        info, plan, TrainingSettings(batch=2, seq_len=32, adapter_precision=torch.bfloat16, precision=info.dtype)
    )
    quantize_model(model, plan)
    peft_model = get_peft_model(model, lora_config(plan), autocast_adapter_dtype=False)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    int8 = {n for n, mp in plan.modules.items() if mp.bits == 8 and mp.backend == "bnb" and mp.rank}
    for name, p in peft_model.named_parameters():  # PEFT casts to a float base weight's dtype only
        if p.requires_grad:
            assert p.dtype == (
                torch.float32 if name.split(".lora_")[0].removeprefix("base_model.model.") in int8 else torch.bfloat16
            )
    assert int8
    opt = optimizer_for("adamw_torch", params)
    ids = torch.randint(4, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    states = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    assert pred.lora_params == memory_report(peft_model).lora_bytes
    assert pred.lora_grads == storage_bytes([p.grad for p in params])
    assert pred.optimizer_states == storage_bytes(states)
    fp32_adapters = estimate(info, plan, TrainingSettings(batch=2, seq_len=32, precision=info.dtype))
    assert pred.lora_params < fp32_adapters.lora_params and pred.activations < fp32_adapters.activations
    with pytest.raises(QRAError, match="float32 or the model's dtype"):
        estimate(
            info, plan, TrainingSettings(batch=2, seq_len=32, adapter_precision=torch.float16, precision=info.dtype)
        )


def test_bf16_adapters_without_peft_autocast_save_what_autograd_saves() -> None:
    from peft import get_peft_model

    from qra_plugin.lora import lora_config
    from qra_plugin.quantize import quantize_model

    model = build_tiny_model("qwen2", seed=0, layers=3, hidden=128, dtype=torch.bfloat16)
    info = load_model_info(model)
    plan = mixed_plan(model, info)
    pred = estimate(
        info, plan, TrainingSettings(batch=2, seq_len=32, adapter_precision=torch.bfloat16, precision=info.dtype)
    )
    head = trace_activations(info, 2, 32, torch.bfloat16, torch.bfloat16).head_saved
    quantize_model(model, plan)
    peft_model = get_peft_model(model, lora_config(plan), autocast_adapter_dtype=False)
    assert pred.activations + head == _saved_bytes(peft_model.train(), 2, 32)


def _saved_bytes(peft_model: torch.nn.Module, batch: int, seq: int) -> int:
    """``tests.test_memory.saved_activation_bytes`` for a model already wrapped by PEFT."""
    from qra_plugin.weight_memory import module_tensors

    held = {t.untyped_storage().data_ptr() for t in [*peft_model.parameters(), *peft_model.buffers()]}
    for module in peft_model.modules():
        held.update(t.untyped_storage().data_ptr() for t in module_tensors(module))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in held:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(4, 200, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peft_model(input_ids=ids, labels=ids)
    return sum(saved.values())
