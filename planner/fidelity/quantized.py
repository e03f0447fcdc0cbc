"""Quantize each (module, bits, backend, group size, axis) once per worker and reuse it across candidates.

HQQ and bitsandbytes quantization is deterministic, so a copy of a cached layer is exactly the layer a
fresh quantization makes: scores do not change, and every later evaluation skips the quantization work
for the choices it shares with earlier ones. CPU only: on CUDA the cache would sit in device memory and
count in the measured peak (and HQQ's scale/zero dict does not follow ``.to()``), so there every
evaluation quantizes for itself.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qra_plugin.backends import get_backend
from qra_plugin.plan import Plan

_CACHE: dict[tuple, nn.Module] = {}
#: lookups that found / did not find a layer in this process (the fidelity run reports them)
STATS = {"hits": 0, "misses": 0}


def prequantize(model: nn.Module, plan: Plan, model_key: str, dtype: torch.dtype) -> None:
    """Put a quantized layer for every planned module below 16 bits into ``model`` (a private copy of the
    base model), from the cache when this worker quantized the same choice before.

    A pruned plan prunes ``model`` first; a layer's key then holds what its block keeps, so a slice is reused
    only for the same kept channels (candidates of a pruning search share most blocks' choices)."""
    from qra_plugin.modules import quantizable_linears
    from qra_plugin.prune import prune_model

    block_of = {s.name: s.block for s in quantizable_linears(model)} if plan.pruning else {}
    prune_model(model, plan)
    for name, mp in plan.modules.items():
        if mp.bits >= 16:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear) or linear.weight.device.type != "cpu":
            continue
        kept = plan.pruning.get(block_of.get(name, -1))
        key = (model_key, name, mp.bits, mp.backend, mp.group_size, mp.axis, str(dtype))
        key += (kept.model_dump_json(),) if kept is not None else ()
        layer = _CACHE.get(key)
        if layer is None:
            STATS["misses"] += 1
            layer = _CACHE[key] = get_backend(mp.backend).quantize(linear, mp, dtype)
        else:
            STATS["hits"] += 1
        setattr(parent, child, copy.deepcopy(layer))
