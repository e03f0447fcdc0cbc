"""Replace planned linears with real quantized modules, in place, on their own device."""

from __future__ import annotations

import logging

import torch
from torch import nn

from qra_plugin.backends import get_backend
from qra_plugin.modules import is_quantized_linear
from qra_plugin.plan import Plan

log = logging.getLogger("qra")


def model_compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations flow in: the first floating parameter's dtype."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _parent_and_child(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def quantize_model(model: nn.Module, plan: Plan, compute_dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
    """Quantize every module the plan gives fewer than 16 bits; return the new modules by name.

    Idempotent: a module that is already quantized is left alone (Axolotl may call hooks twice).
    Sets the model flags PEFT reads to choose its LoRA wrapper for bitsandbytes layers.
    """
    plan.check_model(model)
    dtype = compute_dtype or model_compute_dtype(model)
    replaced: dict[str, nn.Module] = {}
    for name, module_plan in plan.modules.items():
        if module_plan.bits >= 16:
            continue
        parent, child = _parent_and_child(model, name)
        current = getattr(parent, child)
        backend = get_backend(module_plan.backend)
        flag = backend.model_flags.get(module_plan.bits)
        if flag:  # also for a module quantized before this call: PEFT reads the flag to pick its wrapper
            setattr(model, flag, True)
        if is_quantized_linear(current):
            continue
        if not isinstance(current, nn.Linear):
            raise TypeError(f"{name} is {type(current).__name__}, expected nn.Linear")
        new = backend.quantize(current, module_plan, dtype)
        setattr(parent, child, new)
        replaced[name] = new
    if "hqq" in plan.backends_used():
        # transformers/PEFT read this to skip the fp32 upcast that prepare_model_for_kbit_training does.
        model.hqq_quantized = True
    model.qra_plan = plan
    log.info("qra: quantized %d modules (%s)", len(replaced), plan.summary())
    return replaced
