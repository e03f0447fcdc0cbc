"""Training memory per rank on N ranks: which parts of a single-device breakdown each sharding divides by N.

              weights   LoRA params   LoRA grads   optimizer states   activations/logits
    ddp       whole     whole         whole + DDP's bucket copy        whole              per-rank batch
    zero1     whole     whole         whole        / N                per-rank batch
    zero2     whole     whole         / N          / N                per-rank batch
    zero3     / N       / N           / N          / N                per-rank batch
    fsdp2     / N       / N           / N          / N                per-rank batch

DeepSpeed ZeRO-1/2 also steps its own fp32 copy of this rank's partition of the trainable parameters
(``single_partition_of_fp32_groups``), even when training in fp32: ``master_params`` = LoRA params / N; ZeRO-3
makes that copy (``fp32_partitioned_groups_flat``) only when its partitions are not fp32 already (bf16/fp16).

Under zero3/fsdp2 what the sharding cannot see stays whole on every rank: HQQ's scale/zero (a plain dict
on the layer) and buffers. Before a block runs its weights are gathered: the peak adds the gathered block
and the next one being prefetched (FSDP2's default; ZeRO-3's prefetch bucket is of the same order), each
less the rank's own shard. ``batch`` in the breakdown is the
per-rank micro batch, so activations are per rank already.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from planner.memory import MemoryBreakdown, base_module_bytes
from planner.model_info import ModelInfo, pruned_info
from qra_plugin.backends.hqq import DEFAULT_GROUP
from qra_plugin.errors import QRAError
from qra_plugin.plan import ModulePlan, Plan

SHARDINGS = ("ddp", "zero1", "zero2", "zero3", "fsdp2")
#: the layers gathered whole at once under zero3/fsdp2: the running block and the prefetched next one
GATHERED_BLOCKS = 2


def replicated_metadata(info: ModelInfo, plan: Plan, dtype: torch.dtype) -> int:
    """HQQ scale + zero (one each per group, compute dtype) of every planned module: not a parameter, so
    every rank keeps all of it (qra_plugin/backends/hqq.py)."""

    total = 0
    for spec in info.linears:
        mp = plan.modules.get(spec.name)
        if mp is not None and mp.backend == "hqq" and mp.bits < 16:
            total += 2 * (spec.numel // (mp.group_size or DEFAULT_GROUP[mp.bits])) * dtype.itemsize
    return total


def _fp32_copy(sharding: str, dtype: torch.dtype) -> bool:
    """Whether DeepSpeed keeps a separate fp32 partition of the trainable parameters to step."""
    return sharding in ("zero1", "zero2") or (sharding == "zero3" and dtype != torch.float32)


def _block_bytes(info: ModelInfo, plan: Plan, dtype: torch.dtype) -> list[int]:
    blocks = [0] * info.n_blocks
    for spec in info.linears:
        blocks[spec.block] += base_module_bytes(spec, plan.modules.get(spec.name) or ModulePlan(bits=16), dtype)
    return blocks


def per_rank(
    info: ModelInfo, plan: Plan, breakdown: MemoryBreakdown, *, world_size: int, sharding: str
) -> dict[str, Any]:
    """The bytes one of ``world_size`` ranks holds under ``sharding``, part by part, and its peak."""
    if sharding not in SHARDINGS:
        raise QRAError(f"--sharding must be one of {', '.join(SHARDINGS)}, not {sharding!r}")
    if world_size < 1:
        raise QRAError(f"--world-size must be >= 1 (got {world_size})")
    n, b = world_size, breakdown
    dtype = getattr(torch, b.settings.get("compute_dtype", "float32"))
    info = pruned_info(info, plan)
    weights = b.quantized_weights + b.unquantized_weights
    replicated = replicated_metadata(info, plan, dtype) + sum(
        t.numel * t.dtype.itemsize for t in info.others if t.is_buffer
    )
    shards_weights = sharding in ("zero3", "fsdp2")
    parts = {
        "weights": math.ceil((weights - replicated) / n) + replicated if shards_weights else weights,
        "replicated_weights": replicated if shards_weights else weights,
        "lora_params": math.ceil(b.lora_params / n) if shards_weights else b.lora_params,
        "master_params": math.ceil(b.lora_params / n) if _fp32_copy(sharding, dtype) else 0,
        "lora_grads": b.lora_grads if sharding in ("ddp", "zero1") else math.ceil(b.lora_grads / n),
        "grad_buckets": b.lora_grads if sharding == "ddp" and n > 1 else 0,
        "optimizer_states": b.optimizer_states if sharding == "ddp" else math.ceil(b.optimizer_states / n),
        "activations": b.activations,
        "logits_loss": b.logits_loss,
        "recompute": b.recompute,
    }
    blocks = sorted(_block_bytes(info, plan, dtype), reverse=True)[:GATHERED_BLOCKS]
    gathered = sum(math.ceil(x * (n - 1) / n) for x in blocks) if shards_weights and n > 1 else 0
    parts["all_gather_peak"] = gathered
    static = sum(parts[k] for k in ("weights", "lora_params", "master_params", "optimizer_states", "grad_buckets"))
    phases = {
        "loss": parts["activations"] + parts["logits_loss"] + gathered,
        "recompute": parts["activations"] + parts["recompute"] + parts["lora_grads"] + gathered,
        "optimizer": parts["lora_grads"],
    }
    phase = max(phases, key=lambda k: phases[k])
    return {"sharding": sharding, "world_size": n, **parts, "peak_phase": phase, "total": static + phases[phase]}


def rank_budget_bytes(
    info: ModelInfo, plan: Plan, breakdown: MemoryBreakdown, *, world_size: int, sharding: str, kind: str
) -> int:
    """What a budget of ``kind`` (``planner.memory.BUDGET_KINDS``) counts on one of ``world_size`` ranks.

    ``peak``: the rank's peak (``per_rank``'s total). ``weights``: its weights and LoRA parameters.
    ``plan``: what scales with the plan on that rank — its share of the planned linears (HQQ scale/zero stay
    whole on every rank), LoRA, DeepSpeed's fp32 copy, gradients, DDP's bucket copy and optimizer states.
    On one rank without DeepSpeed each equals the single-device number.
    """
    rank = per_rank(info, plan, breakdown, world_size=world_size, sharding=sharding)
    if kind == "peak":
        return int(rank["total"])
    if kind == "weights":
        return int(rank["weights"] + rank["lora_params"])
    planned = breakdown.planned_weights
    if sharding in ("zero3", "fsdp2"):
        dtype = getattr(torch, breakdown.settings.get("compute_dtype", "float32"))
        kept = replicated_metadata(pruned_info(info, plan), plan, dtype)
        planned = math.ceil((planned - kept) / world_size) + kept
    scaled = ("lora_params", "master_params", "lora_grads", "grad_buckets", "optimizer_states")
    return int(planned + sum(rank[k] for k in scaled))


def is_single_device(train: Any) -> bool:
    """Training settings (``TrainingSettings``, or a train section) that price one device: no ranks, no sharding."""
    return getattr(train, "world_size", 1) == 1 and getattr(train, "sharding", None) in (None, "ddp")


def check_space_shards(train: Any, bits_choices: Any, backend: str, dtype: torch.dtype) -> None:
    """Refuse, in one line, a search space holding bit-widths its backend cannot shard under the train section's
    zero3/fsdp2 (``qra_plugin.distributed.check_sharding``, which the training job runs on the plan too)."""
    from qra_plugin.distributed import check_modules

    used = {(bits, backend) for bits in bits_choices if bits < 16}
    half = dtype in (torch.bfloat16, torch.float16)
    check_modules(used, sharding=getattr(train, "sharding", None), half_precision=half)
