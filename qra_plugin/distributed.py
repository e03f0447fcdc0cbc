"""Which plans a sharded training backend can run; each backend says what it allows in its own file
(``Backend.shardable`` for ZeRO-3 and FSDP2, ``Backend.flat_shardable`` for FSDP1).

ZeRO-3 and FSDP2 shard each parameter on its own in its own dtype and gather it before its module runs:
HQQ 2/3/4/8-bit (its one parameter is the frozen packed weight; scale/zero stay replicated on every rank),
16-bit modules, and bitsandbytes nf4 (packed in bf16/fp16 or uint8; its quant state stays on the layer) all
train there — run for real on 2 CPU processes over gloo in tests/test_sharded.py, loss on every step equal to
one process's (nf4 in bf16: within bf16 rounding). bitsandbytes
int8 stays refused: its row scales are attributes of the parameter object, which a sharded copy drops.
FSDP1 flattens a unit into one float parameter, so it holds only float weights (16-bit, nf4 in bf16/fp16).
DDP and ZeRO-0/1/2 replicate weights, so every plan works there (each rank quantizes on its device).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qra_plugin.backends import registry
from qra_plugin.errors import QRAError
from qra_plugin.plan import Plan

SHARDED_OK = "16-bit modules, HQQ 2/3/4/8-bit and bitsandbytes nf4 (bits 4, backend bnb)"
FLAT_SHARDED_OK = "16-bit modules and bitsandbytes nf4 (bits 4, backend bnb) with bf16/fp16 compute"
SHARDING_MODES = (None, "ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp2", "fsdp1")


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
    """Refuse, in one line, plans the sharding backend cannot hold. ``sharding``: one of ``SHARDING_MODES``
    ("fsdp" is FSDP2, torch's ``fully_shard``; "fsdp1" the flat-parameter FSDP)."""
    if sharding not in SHARDING_MODES:
        raise QRAError(f"unknown sharding {sharding!r}; known: {', '.join(str(m) for m in SHARDING_MODES[1:])}")
    check_modules(
        {(m.bits, m.backend) for m in plan.modules.values()}, sharding=sharding, half_precision=half_precision
    )


def check_modules(used: set[tuple[int, str]], *, sharding: str | None, half_precision: bool) -> None:
    """``check_sharding`` on the (bits, backend) pairs a plan (or a search space) holds."""
    if sharding not in ("zero3", "fsdp", "fsdp2", "fsdp1"):
        return
    backends = registry()
    allowed = {k: (b.flat_shardable if sharding == "fsdp1" else b.shardable) for k, b in backends.items()}
    bad = sorted((b, k) for b, k in used if not allowed[k](b, True))
    if bad:
        shown = ", ".join(f"{b}-bit {k}" for b, k in bad)
        ok = FLAT_SHARDED_OK if sharding == "fsdp1" else SHARDED_OK
        raise QRAError(f"{sharding} cannot shard {shown} modules; under {sharding} a plan may only use {ok}")
    needs_half = sorted((b, k) for b, k in used if not allowed[k](b, half_precision))
    if needs_half:
        shown = ", ".join(f"{b}-bit {k}" for b, k in needs_half)
        raise QRAError(f"{sharding} with {shown} needs bf16 or fp16 training so it is stored in the compute dtype")


@contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Whole weights on every rank for a while, even under ZeRO-3's ``zero.Init``.

    transformers builds the model under ``zero.Init`` when a stage-3 DeepSpeed config is active (Axolotl's
    ``deepspeed:``): each parameter is then empty but for this rank's partition, and pruning or quantizing it
    would read nothing. Gathered here with ``modifier_rank=None``: every rank changes its own copy in the same
    deterministic way; the layers that replace them are plain parameters that the engine partitions later.
    """
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
