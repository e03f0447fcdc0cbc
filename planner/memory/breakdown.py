"""Predict the peak training memory of a plan, part by part, and compare plans with a budget.

Weights per module come from each backend's ``stored_bytes`` (``planner.memory.weights``); the
architecture-dependent activations are traced once in a ``FakeTensorMode`` (``planner.memory.activations``).
Plan-dependent activation parts are added per module: each LoRA adapter saves its
input (once per distinct input tensor) and its rank-``r`` hidden; an HQQ layer (PyTorch backend) saves its
dequantized weight for the backward matmul; a bitsandbytes int8 layer on CPU saves its input.
The loss part follows the loss the trainer runs (``loss_buffers``, ``TrainingSettings.loss_path``): transformers' model
loss (Axolotl's trainer) saves an fp32 log-softmax of the full logits and its backward holds two more fp32
``batch x seq x vocab`` buffers; TRL's default chunked NLL keeps a gathered copy of the hidden states and four
fp32 ``256 x vocab`` buffers of one chunk; Liger / cut cross-entropy keep hidden-sized buffers.

The peak is the largest of the moments of a step (``MemoryBreakdown.peak_phase``): the start of the
backward (activations + logits buffers), the recompute of one block under gradient checkpointing, and
the optimizer step (all LoRA gradients). ``benchmarks/memory_accuracy.py`` compares it with the
allocator-level peak of real training steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from planner.memory.activations import ActivationTrace, trace_activations
from planner.memory.loss import loss_buffers
from planner.memory.optimizers import optimizer_states, optimizer_tensor_bytes
from planner.memory.weights import LORA_DTYPE, base_module_bytes, elem, lora_numel
from planner.model_info import ModelInfo, pruned_info
from planner.settings import TrainingSettings
from qra_plugin.errors import QRAError
from qra_plugin.modules import LinearSpec
from qra_plugin.plan import ModulePlan, Plan

#: the parts of a breakdown a person reads, in the order of a step (``qra estimate`` and the report show them)
PART_LABELS = (
    ("quantized_weights", "quantized weights (+ metadata)"),
    ("unquantized_weights", "unquantized weights"),
    ("lora_params", "LoRA parameters"),
    ("lora_grads", "LoRA gradients"),
    ("optimizer_states", "optimizer states"),
    ("activations", "activations"),
    ("logits_loss", "logits / loss buffers"),
)


@dataclass
class MemoryBreakdown:
    """Predicted training memory in bytes, part by part.

    ``total`` is the predicted peak, not the sum of the parts: LoRA gradients only appear once the backward
    reaches the adapters, after the logits buffers are gone; ``peak_phase`` says which moment peaks
    (``loss``, ``recompute`` under gradient checkpointing, or ``optimizer``). ``activations`` is what is
    held after the forward; ``recompute`` is one block rebuilt during a checkpointed backward.
    """

    quantized_weights: int
    unquantized_weights: int
    lora_params: int
    lora_grads: int
    optimizer_states: int
    activations: int
    logits_loss: int
    total: int
    recompute: int = 0
    peak_phase: str = "loss"
    #: base-layer bytes of the planned linears, whatever their bits (part of quantized + unquantized)
    planned_weights: int = 0
    quantized_by_backend: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        """Weight-only bytes (what the papers' budgets count): quantized + unquantized + LoRA."""
        return self.quantized_weights + self.unquantized_weights + self.lora_params

    @property
    def plan_scaled(self) -> int:
        """The bytes that scale with the plan (the paper-style budget): planned linears as stored (weights +
        quantization metadata) + LoRA parameters + their gradients + their optimizer states. Embeddings,
        norms and activations are left out: no plan changes them."""
        return self.planned_weights + self.lora_params + self.lora_grads + self.optimizer_states

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weights"] = self.weights
        data["plan_scaled"] = self.plan_scaled
        return data


@dataclass(frozen=True)
class _ModuleCost:
    base: int  # base layer bytes
    is_quantized: bool
    lora: int  # LoRA parameter bytes
    optim: int  # optimizer bytes
    act_extra: int  # activation bytes this module adds besides its (shared) input
    saves_input: bool  # whether the module makes autograd keep its input when that input requires grad
    saves_input_always: bool = False  # ... and even when it does not (a grad-requiring bias records the node)


_COSTS: dict[tuple[Any, ...], _ModuleCost] = {}


def _module_cost(
    spec: LinearSpec,
    mp: ModulePlan,
    trace: ActivationTrace | None,
    tokens: int,
    optimizer: str,
    dtype: torch.dtype,
    adapter_dtype: torch.dtype = LORA_DTYPE,
) -> _ModuleCost:
    key = (spec, mp, tokens, optimizer, dtype, trace is None, adapter_dtype)
    cost = _COSTS.get(key)
    if cost is not None:
        return cost
    quantized = mp.bits < 16
    base = base_module_bytes(spec, mp, dtype)
    lora_elem = elem(module_adapter_dtype(mp, adapter_dtype))
    lora = lora_numel(spec, mp.rank) * lora_elem
    optim = optimizer_tensor_bytes(optimizer, _lora_shapes(spec, mp.rank), lora_elem)
    extra = 0
    saves_input = False
    if mp.rank > 0:
        extra += tokens * mp.rank * lora_elem  # lora_A output, saved by lora_B
    if quantized and (mp.backend == "hqq" or mp.bits == 8):
        # HQQLinear trains through HQQMatmulNoCacheMul and bnb int8 through MatMul8bitFp (CPU): both keep
        # their input, not a dequantized weight (shared with the LoRA's saved input unless dtypes differ)
        saves_input = True
    # HQQLinear keeps ``linear.bias.clone()``, which still requires grad (its graph leads to the replaced
    # layer's bias): its autograd node is recorded, and its input saved, even where the input needs no grad
    always = quantized and mp.backend == "hqq" and spec.bias
    cost = _ModuleCost(base, quantized, lora, optim, extra, saves_input, always)
    _COSTS[key] = cost
    return cost


def module_adapter_dtype(mp: ModulePlan, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype PEFT gives one module's adapter: ``adapter_dtype``, except that without its fp32 upcast PEFT
    casts a new adapter to the base weight's dtype only when that is a float (bitsandbytes int8: no, fp32)."""
    return LORA_DTYPE if mp.bits == 8 and mp.backend == "bnb" else adapter_dtype


def _lora_shapes(spec: LinearSpec, rank: int) -> list[tuple[int, int]]:
    """The trainable tensors of one adapter: ``lora_A`` (rank x in) and ``lora_B`` (out x rank); none at rank 0."""
    return [(rank, spec.in_features), (spec.out_features, rank)] if rank else []


def estimate(info: ModelInfo, plan: Plan, settings: TrainingSettings) -> MemoryBreakdown:
    """Predict every part of the training memory of ``plan`` on ``info``'s model under ``settings``.

    ``settings.precision`` is the dtype the model is loaded and trained in (``info`` may have been read in
    another: its shapes are what count); ``loss_path``: the loss the trainer runs; accumulation > 1 keeps the
    LoRA gradients through every micro-step; ``adapter_precision``: the LoRA weights' dtype (fp32 under PEFT's
    default ``autocast_adapter_dtype=True``), which their gradients and optimizer states follow.
    """
    info = pruned_info(info, plan)  # pruned shapes in every part: weights, LoRA, activations
    if plan.fingerprint != info.fingerprint:
        raise QRAError(f"plan is for {plan.fingerprint.describe()}, not for this model ({info.fingerprint.describe()})")
    unknown = sorted(set(plan.modules) - {s.name for s in info.linears})
    if unknown:
        raise QRAError(f"plan names {len(unknown)} module(s) this model does not have, e.g. {unknown[0]}")
    return _estimate(info, plan, _trace(info, settings), settings)


def _trace(info: ModelInfo, settings: TrainingSettings) -> ActivationTrace:
    return trace_activations(info, settings.batch, settings.seq_len, settings.dtype, settings.adapter_dtype)


def _estimate(
    info: ModelInfo, plan: Plan, trace: ActivationTrace | None, settings: TrainingSettings
) -> MemoryBreakdown:
    """The breakdown under ``settings``; without a ``trace``, weights, LoRA and optimizer states only."""
    optimizer, dtype, adapter_dtype = settings.optimizer, settings.dtype, settings.adapter_dtype
    tokens = settings.tokens if trace is not None else 0
    sums = _sum_modules(info, plan, trace, tokens, optimizer, dtype, adapter_dtype)
    quantized, unquantized, planned, lora, optim = sums.quantized, sums.unquantized, sums.planned, sums.lora, sums.optim
    by_backend, block_extra, block_inputs = sums.by_backend, sums.block_extra, sums.block_inputs
    unquantized += info.other_bytes(dtype)
    # buffers one optimizer shares between all its parameters (bitsandbytes' quantile maps), held once
    numels = [r * c for spec in info.linears for r, c in _lora_shapes(spec, _rank(plan, spec))]
    optim += optimizer_states(optimizer).shared_bytes(numels)
    lora_bytes = lora
    activations, logits, recompute = _activation_parts(
        info, trace, block_extra, block_inputs, settings.grad_checkpointing, settings.loss_path, dtype
    )
    # accumulated gradients live through the next forward
    held_grads = lora_bytes if settings.gradient_accumulation_steps > 1 else 0
    static = quantized + unquantized + lora_bytes + optim
    # Peak = the largest of the moments that follow each other in a step (gradients are None until the
    # backward reaches the adapters, by then the logits buffers are freed):
    phases = {
        "loss": activations + logits + held_grads,  # end of forward / start of backward
        "recompute": activations + recompute + lora_bytes,  # gradient checkpointing: one block rebuilt
        "optimizer": lora_bytes,  # all gradients, activations freed
    }
    phase = max(phases, key=lambda k: phases[k])
    total = static + phases[phase]
    return MemoryBreakdown(
        quantized_weights=quantized,
        unquantized_weights=unquantized,
        lora_params=lora_bytes,
        lora_grads=lora_bytes,
        optimizer_states=optim,
        activations=activations,
        logits_loss=logits,
        total=total,
        recompute=recompute,
        peak_phase=phase,
        quantized_by_backend=by_backend,
        planned_weights=planned,
        settings={
            "optimizer": optimizer,
            "grad_checkpointing": settings.grad_checkpointing,
            "compute_dtype": settings.precision,
            "adapter_dtype": settings.adapter_precision,
            "loss_path": settings.loss_path,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        },
    )


@dataclass
class _ModuleSums:
    """Per-module costs summed over the model, and the plan-dependent activations per block."""

    quantized: int
    unquantized: int
    planned: int
    lora: int
    optim: int
    by_backend: dict[str, int]
    block_extra: list[int]
    block_inputs: list[dict[Any, int]]


def _sum_modules(
    info: ModelInfo,
    plan: Plan,
    trace: ActivationTrace | None,
    tokens: int,
    optimizer: str,
    dtype: torch.dtype,
    adapter_dtype: torch.dtype,
) -> _ModuleSums:
    quantized = unquantized = planned = lora = optim = 0
    by_backend: dict[str, int] = {}
    block_extra = [0] * info.n_blocks
    block_inputs: list[dict[int, int]] = [{} for _ in range(info.n_blocks)]
    for spec in info.linears:
        mp = plan.modules.get(spec.name)
        if mp is None:
            mp = ModulePlan(bits=16, rank=0)
        cost = _module_cost(spec, mp, trace, tokens, optimizer, dtype, adapter_dtype)
        planned += cost.base
        if cost.is_quantized:
            quantized += cost.base
            tag = f"{mp.backend}{mp.bits}"
            by_backend[tag] = by_backend.get(tag, 0) + cost.base
        else:
            unquantized += cost.base
        lora += cost.lora
        optim += cost.optim
        if trace is not None:
            block_extra[spec.block] += cost.act_extra
            if mp.rank > 0 and module_adapter_dtype(mp, adapter_dtype) != adapter_dtype:
                # an fp32 adapter on a traced bf16 one: lora_A saves its own fp32 copy of the input
                copy = trace.input_bytes[spec.name] * elem(LORA_DTYPE) // elem(dtype)
                block_inputs[spec.block][("fp32 input", spec.name)] = copy
            elif mp.rank > 0:
                # what lora_A saves: the module input (shared by sibling adapters) or, when the base dtype
                # differs from the adapters', the module's own cast copy
                for key, nbytes in trace.lora_saved[spec.name]:
                    if key not in trace.base_keys:
                        block_inputs[spec.block][key] = nbytes
            # a quantized layer's autograd function saves its input only when one of its inputs requires grad
            # (not in the first block's attention, whose input comes from the frozen embedding, unless a bias does)
            needs_grad = trace.input_grad[spec.name] or cost.saves_input_always
            if cost.saves_input and needs_grad and not trace.input_saved[spec.name]:
                block_inputs[spec.block][trace.input_key[spec.name]] = trace.input_bytes[spec.name]
    return _ModuleSums(quantized, unquantized, planned, lora, optim, by_backend, block_extra, block_inputs)


def _rank(plan: Plan, spec: LinearSpec) -> int:
    mp = plan.modules.get(spec.name)
    return mp.rank if mp is not None else 0


def _activation_parts(
    info: ModelInfo,
    trace: ActivationTrace | None,
    block_extra: list[int],
    block_inputs: list[dict[int, int]],
    grad_checkpointing: bool,
    loss_path: str = "trl_chunked",
    dtype: torch.dtype = torch.float32,
) -> tuple[int, int, int]:
    """(held after the forward, logits/loss buffers, one recomputed block) in bytes; zeros without a trace."""
    if trace is None:
        return 0, 0, 0
    per_block = [trace.blocks_saved[i] + block_extra[i] + sum(block_inputs[i].values()) for i in range(info.n_blocks)]
    recompute = 0
    if grad_checkpointing:  # every block keeps only its input; backward recomputes one block at a time
        activations = trace.pre_saved + info.n_blocks * trace.block_input
        recompute = max(per_block)
    else:
        activations = trace.pre_saved + sum(per_block)
    return activations, loss_buffers(info, trace, loss_path, dtype), recompute


#: what a budget counts: ``peak`` (predicted peak training memory), ``plan`` (what scales with the plan:
#: planned weights + metadata + LoRA + its gradients and optimizer states), ``weights`` (all weights + LoRA)
BUDGET_KINDS = ("peak", "plan", "weights")


def plan_bytes(info: ModelInfo, plan: Plan, settings: TrainingSettings, kind: str = "peak") -> int:
    """The number a budget of ``kind`` is compared with under ``settings``; with ``world_size`` > 1 or a
    ``sharding`` other than DDP, one rank's bytes (``planner.sharding``).
    Fast after the first call for a given (model, batch, seq_len): module costs and the trace are cached."""
    if kind not in BUDGET_KINDS:
        raise QRAError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, not {kind!r}")
    from planner.sharding import is_single_device, rank_budget_bytes

    whole, info = info, pruned_info(info, plan)
    result = _estimate(info, plan, _trace(info, settings) if kind == "peak" else None, settings)
    if not is_single_device(settings):  # a per-rank budget: ``world_size`` ranks under ``sharding``
        ranks, sharding = settings.world_size, settings.sharding or "ddp"
        return rank_budget_bytes(whole, plan, result, world_size=ranks, sharding=sharding, kind=kind)
    return result.weights if kind == "weights" else result.plan_scaled if kind == "plan" else result.total


def uniform_plan(info: ModelInfo, bits: int, rank: int, backend: str = "hqq") -> Plan:
    """Every block at (bits, rank): the reference of relative budgets."""
    return Plan.from_block_pairs(info.fingerprint, info.linears, [(bits, rank)] * info.n_blocks, backend)


def min_plan_bytes(
    info: ModelInfo,
    settings: TrainingSettings,
    bits_choices: Sequence[int],
    rank_choices: Sequence[int],
    backend: str = "hqq",
    kind: str = "peak",
) -> int:
    """Bytes of the cheapest block plan in the space. Block costs are independent (the base activations
    are shared), so the cheapest plan takes the cheapest (bits, rank) in every block: the cheapest
    uniform plan, because all blocks price a pair the same way up to their shapes."""
    if not bits_choices or not rank_choices:
        raise QRAError("the search space needs at least one bit-width and one rank")
    best: int | None = None
    for bits in bits_choices:
        for rank in rank_choices:
            cost = plan_bytes(info, uniform_plan(info, bits, rank, backend), settings, kind)
            best = cost if best is None else min(best, cost)
    assert best is not None
    return best
