"""Which plans a sharded training backend can run; each backend says what it allows (``Backend.shardable``).

FSDP1 rejects int8/uint8 weights inside a wrapped unit, FSDP2 only special-cases bitsandbytes
``Params4bit``, and ZeRO-3 skips ``zero.Init`` for quantized models (HQQ keeps scale/zero outside
registered tensors, so sharding cannot see them). Until proven otherwise on a GPU, a sharded run may
only use bf16/fp32 modules and bitsandbytes nf4 stored in the compute dtype (the QLoRA-FSDP layout).
DDP and ZeRO-0/1/2 replicate weights, so every plan works there (each rank quantizes on its device).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qra_plugin.backends import registry
from qra_plugin.errors import QRAError
from qra_plugin.plan import Plan

SHARDED_OK = "bf16/fp32 modules and bitsandbytes nf4 (bits 4, backend bnb) with bf16/fp16 compute"


def deepspeed_stage(deepspeed: str | dict[str, Any] | None) -> int | None:
    """ZeRO stage of a DeepSpeed config given as a path or dict (None when DeepSpeed is off)."""
    if not deepspeed:
        return None
    if isinstance(deepspeed, (str, Path)):
        path = Path(deepspeed)
        if not path.is_file():
            raise QRAError(f"DeepSpeed config not found: {path}")
        deepspeed = json.loads(path.read_text())
    return int((deepspeed.get("zero_optimization") or {}).get("stage", 0))


def check_sharding(plan: Plan, *, sharding: str | None, half_precision: bool) -> None:
    """Refuse, in one line, plans the sharding backend cannot hold. ``sharding``: None|"ddp"|"zero2"|"zero3"|"fsdp"."""
    if sharding not in ("zero3", "fsdp"):
        return
    backends = registry()
    used = {(m.bits, m.backend) for m in plan.modules.values()}
    bad = sorted((b, k) for b, k in used if not backends[k].shardable(b, True))
    if bad:
        shown = ", ".join(f"{b}-bit {k}" for b, k in bad)
        raise QRAError(f"{sharding} cannot shard {shown} modules; under {sharding} a plan may only use {SHARDED_OK}")
    needs_half = sorted((b, k) for b, k in used if not backends[k].shardable(b, half_precision))
    if needs_half:
        shown = ", ".join(f"{b}-bit {k}" for b, k in needs_half)
        raise QRAError(f"{sharding} with {shown} needs bf16 or fp16 training so it is stored in the compute dtype")
