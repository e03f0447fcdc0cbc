"""One short LoRA run of a qra plan: one process, FSDP2, or DeepSpeed ZeRO-2/3 (tests/test_sharded.py).

    python tests/sharded_worker.py --mode single ...                     # the whole global batch in one process
    torchrun --nproc-per-node 2 tests/sharded_worker.py --mode fsdp2 ...   # torch fully_shard on gloo
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/sharded_worker.py --mode ddp ...
    accelerate launch --use_deepspeed --deepspeed_config_file ds.json tests/sharded_worker.py --mode zero3 ...

Every rank gets an equal slice of the same global batch of full-length rows (no padding), so the mean of the
ranks' mean token losses is the global batch's mean token loss and the averaged gradient is its gradient: a
sharded step computes what the single-process step computes, up to the order of floating-point sums.
Each rank writes ``rank{N}.json`` (losses, how much of each HQQ weight it holds); rank 0 saves the adapter
once and the logits of a probe batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qra_plugin import Plan, apply_plan

#: modes the launcher configures and ``Accelerator.prepare`` applies
ACCELERATE_MODES = ("ddp", "zero1", "zero2", "zero3", "accelerate-fsdp2")
VOCAB_FLOOR = 4  # token ids below this are bos/eos/pad in planner.tiny's vocabulary


def global_batches(steps: int, batch: int, seq: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(VOCAB_FLOOR, vocab, (steps, batch, seq), generator=generator)


def probe_ids(vocab: int) -> torch.Tensor:
    return torch.randint(VOCAB_FLOOR, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


def device() -> torch.device:
    """This rank's GPU on a machine with 2 GPUs or more (HQQ quantizes on the layer's device), else the CPU;
    the single-process reference follows the same rule, so both sides use the same kernels."""
    if torch.cuda.device_count() >= 2:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build(model_dir: str, plan_path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device())
    model.config.use_cache = False
    return apply_plan(model, Plan.load(plan_path))


def hqq_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m).__name__ == "HQQLinear"}


def hqq_digest(model: nn.Module) -> str:
    """A hash of every HQQ layer's packed weight, scale and zero: equal digests, equal quantized layers."""
    digest = hashlib.sha256()
    for name, layer in hqq_layers(model).items():
        for tensor in (layer.W_q, layer.meta["scale"], layer.meta["zero"]):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shard_of(weight: torch.Tensor) -> dict:
    """How many elements of a packed weight this rank holds of how many, its dtype, whether it trains."""
    if hasattr(weight, "ds_tensor"):  # ZeRO-3: this rank's partition
        held, full, dtype = weight.ds_tensor.numel(), int(weight.ds_numel), weight.ds_tensor.dtype
    else:  # FSDP2: a DTensor sharded on dim 0; otherwise the whole tensor
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        held, full, dtype = local.numel(), weight.numel(), local.dtype
    return {"held": held, "full": full, "dtype": str(dtype), "requires_grad": weight.requires_grad}


def hqq_shards(model: nn.Module) -> dict[str, dict]:
    """``shard_of`` each HQQ layer's packed weight."""
    return {name: shard_of(layer.W_q) for name, layer in hqq_layers(model).items()}


def nf4_shards(model: nn.Module) -> dict[str, dict]:
    """``shard_of`` each bitsandbytes nf4 layer's packed weight."""
    import bitsandbytes as bnb

    return {name: shard_of(m.weight) for name, m in model.named_modules() if type(m) is bnb.nn.Linear4bit}


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this rank stores: ZeRO-3's partition, a DTensor's local shard, or the tensor."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    return t.to_local() if hasattr(t, "to_local") else t


def held_bytes(peft_model: nn.Module, optimizer: Any) -> dict[str, int]:
    """What this rank stores after a step, from the real tensors (CPU has no allocator peak): weights
    (parameters' local shards, HQQ's hidden scale/zero, buffers), LoRA parameters, and optimizer states."""
    from planner.fidelity.meter import storage_bytes
    from qra_plugin.backends import owner

    frozen = [_local(p) for p in peft_model.parameters() if not p.requires_grad]
    hidden = [t for m in peft_model.modules() if (b := owner(m)) is not None for t in b.hidden_tensors(m)]
    lora = [_local(p) for p in peft_model.parameters() if p.requires_grad]
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate's wrapper, then DeepSpeed's ZeRO optimizer, then torch's
        inner = inner.optimizer
    states = [_local(t) for state in inner.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    buffers = list(peft_model.buffers())
    # the tensors the optimizer steps: the LoRA shards themselves, or DeepSpeed's own fp32 partition copies
    own = {t.untyped_storage().data_ptr() for t in lora}
    stepped = [_local(p) for g in inner.param_groups for p in g["params"]]
    return {
        "weights": storage_bytes(frozen + hidden + buffers),
        "lora_params": storage_bytes(lora),
        "master_params": storage_bytes([t for t in stepped if t.untyped_storage().data_ptr() not in own]),
        "optimizer_states": storage_bytes(states),
    }


def lora_state(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """The full LoRA tensors (gathered from their shards), by the PEFT model's own names."""
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    if mode == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in named}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("single", "fsdp2", *ACCELERATE_MODES), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="load and train in")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    peft_model = build(args.model, args.plan, getattr(torch, args.dtype))
    vocab = peft_model.config.vocab_size
    quantized = hqq_digest(peft_model)  # before any sharding: what this rank's own quantization produced
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    model = shard_fsdp2(peft_model) if args.mode == "fsdp2" else peft_model
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP2: this rank's LoRA shards
    optimizer, backward = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0), None
    distributed_type = None
    if args.mode in ACCELERATE_MODES:  # DeepSpeed wraps this torch AdamW (no compiled DeepSpeed op needed)
        from accelerate import Accelerator

        accelerator = Accelerator()
        distributed_type = str(accelerator.distributed_type)
        model, optimizer = accelerator.prepare(peft_model, optimizer)
        backward = accelerator.backward

    per_rank = args.global_batch // world
    losses, started = [], time.perf_counter()
    for batch in global_batches(args.steps, args.global_batch, args.seq, vocab):
        ids = batch[rank * per_rank : (rank + 1) * per_rank].to(device())
        loss = model(input_ids=ids, labels=ids).loss
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(mean_over_ranks(loss.detach(), world))

    seconds = time.perf_counter() - started
    held = held_bytes(peft_model, optimizer)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids(vocab).to(device())).logits.cpu()
    state = lora_state(peft_model, args.mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"rank": rank, "world_size": world, "losses": losses, "hqq_shards": hqq_shards(peft_model)}
    summary["nf4_shards"] = nf4_shards(peft_model)
    summary["hqq_digest"], summary["held"] = quantized, held
    summary["step_s"] = seconds / args.steps
    summary["engine"], summary["distributed_type"] = type(model).__name__, distributed_type
    summary["device"] = str(device())
    if hasattr(model, "zero_optimization_stage"):
        summary["zero_stage"] = model.zero_optimization_stage()
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    if rank == 0:
        torch.save(logits, out / "probe_logits.pt")
        peft_model.save_pretrained(out / "adapter", state_dict=state)
        Plan.load(args.plan).save(out / "adapter" / "qra_plan.yaml")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        loss = loss.clone()
        torch.distributed.all_reduce(loss)
        loss /= world
    return float(loss)


def shard_fsdp2(peft_model: nn.Module) -> nn.Module:
    """Each decoder layer its own FSDP2 unit, the rest (embeddings, norm) in the root unit, on a gloo group."""
    from torch.distributed.fsdp import fully_shard

    torch.distributed.init_process_group("nccl" if device().type == "cuda" else "gloo")
    for layer in peft_model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft_model)
    return peft_model


if __name__ == "__main__":
    main()
