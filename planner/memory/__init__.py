"""The memory model: ``weights`` (bytes per module, by backend), ``optimizers`` (state bytes by HF ``optim``
name), ``activations`` (traced once), ``loss`` (what the loss the trainer runs holds),
``breakdown`` (a plan's predicted peak, part by part) and ``budget`` (the budget language)."""

from planner.memory.activations import ActivationTrace, trace_activations
from planner.memory.breakdown import (
    BUDGET_KINDS,
    PART_LABELS,
    MemoryBreakdown,
    estimate,
    min_plan_bytes,
    plan_bytes,
    uniform_plan,
)
from planner.memory.budget import Budget, format_bytes, parse_size
from planner.memory.optimizers import OPTIMIZERS, optimizer_bytes, optimizer_states
from planner.memory.weights import LORA_DTYPE, base_module_bytes, lora_numel

__all__ = [
    "BUDGET_KINDS",
    "PART_LABELS",
    "LORA_DTYPE",
    "OPTIMIZERS",
    "ActivationTrace",
    "Budget",
    "MemoryBreakdown",
    "base_module_bytes",
    "estimate",
    "format_bytes",
    "lora_numel",
    "min_plan_bytes",
    "optimizer_bytes",
    "optimizer_states",
    "parse_size",
    "plan_bytes",
    "trace_activations",
    "uniform_plan",
]
