"""Start adapters from the plan's init file: the planner's error-aware A/B, copied in after PEFT made them.

The planner computes, per module with ``init: error``, an (A, B) that cancels most of the module's
quantization error on calibration inputs and writes them to one safetensors file whose sha256 the plan
holds. Here we only check that hash and copy the tensors: no calibration data is needed at train time,
and every rank of a distributed run loads the same file, so every rank starts from the same adapter.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from qra_plugin.errors import QRAError
from qra_plugin.plan import Plan

log = logging.getLogger("qra")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the hash a plan's ``init_hash`` holds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_init_tensors(plan: Plan) -> dict[str, torch.Tensor]:
    """The init file's tensors after checking they are the ones the plan was made with."""
    from safetensors.torch import load_file

    path = plan.init_path()
    if path is None:
        return {}
    if not path.is_file():
        raise QRAError(f"adapter init file not found: {path} (the plan's init_file)")
    actual = file_sha256(path)
    if actual != plan.init_hash:
        raise QRAError(
            f"adapter init file {path} does not match the plan (sha256 {actual[:16]}…, plan wants "
            f"{str(plan.init_hash)[:16]}…): it was edited or belongs to another plan"
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (not exported under one stable name)
        raise QRAError(f"adapter init file {path} is not a readable safetensors file ({exc})") from None


def _lora_layer(model: nn.Module, name: str) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        layer = base.get_submodule(name)
    except AttributeError:
        raise QRAError(f"adapter init names {name!r}, which the model does not have") from None
    if not hasattr(layer, "lora_A"):
        raise QRAError(f"adapter init names {name!r}, which has no LoRA adapter (rank 0 or not targeted)")
    return layer


def apply_adapter_init(
    model: nn.Module, plan: Plan, adapter: str = "default", tensors: dict[str, torch.Tensor] | None = None
) -> int:
    """Copy the init file's A/B (or the given ``tensors``, named the same: a planner's fidelity run computes
    them itself) into the PEFT adapter of every module whose plan says ``init: error``.

    B is rescaled when PEFT's scale differs from the plan's alpha/rank (e.g. a user override), so the
    starting delta scale·B·A is the one the planner computed. Returns how many modules were initialised.
    """
    wanted = [name for name, m in plan.modules.items() if m.init == "error" and m.rank > 0]
    if not wanted:
        return 0
    if tensors is None and plan.init_path() is None:
        raise QRAError(
            f"{len(wanted)} modules start from an error-aware init (init: error) but the plan names no init_file "
            "(a search candidate: qra search writes the file beside the plan it saves)"
        )
    tensors = read_init_tensors(plan) if tensors is None else tensors
    for name in wanted:
        a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if a is None or b is None:
            raise QRAError(f"adapter init file has no lora_A/lora_B for {name!r}")
        layer = _lora_layer(model, name)
        _copy_pair(layer, adapter, a, b, plan.modules[name].lora_alpha / plan.modules[name].rank, name)
    log.info("qra: %d adapters start from the plan's error-aware init", len(wanted))
    return len(wanted)


def _gathered(params: list[torch.Tensor]):
    """DeepSpeed ZeRO-3 partitions parameters as they are created: gather them to write the full tensors
    (every rank loaded the same file, so rank 0's copy is everyone's). Elsewhere: nothing to do."""
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _copy_pair(layer: nn.Module, adapter: str, a: torch.Tensor, b: torch.Tensor, scale: float, name: str) -> None:
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    with _gathered([lora_a, lora_b]):
        _copy_checked(layer, adapter, a, b, scale, name)


def _copy_checked(layer: nn.Module, adapter: str, a: torch.Tensor, b: torch.Tensor, scale: float, name: str) -> None:
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if tuple(a.shape) != tuple(lora_a.shape) or tuple(b.shape) != tuple(lora_b.shape):
        raise QRAError(
            f"adapter init for {name!r} has A {tuple(a.shape)} / B {tuple(b.shape)}, the adapter wants "
            f"{tuple(lora_a.shape)} / {tuple(lora_b.shape)}"
        )
    actual_scale = float(layer.scaling[adapter])
    with torch.no_grad():
        lora_a.copy_(a.to(device=lora_a.device, dtype=lora_a.dtype))
        lora_b.copy_((b.double() * (scale / actual_scale)).to(device=lora_b.device, dtype=lora_b.dtype))
