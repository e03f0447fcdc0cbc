"""A PEFT ``LoraConfig`` that gives each planned module its own rank and alpha."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from qra_plugin.errors import QRAError
from qra_plugin.plan import Plan


def default_rank(plan: Plan) -> int:
    """The most common non-zero rank: it becomes ``r`` so the patterns stay short."""
    ranks = [m.rank for m in plan.modules.values() if m.rank > 0]
    if not ranks:
        raise QRAError("plan gives every module rank 0: there is nothing to fine-tune")
    return max(set(ranks), key=lambda r: (ranks.count(r), r))


def rank_alpha_patterns(plan: Plan) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern`` keyed by full module names (PEFT anchors them at a '.').

    Listing every targeted module (not only the ones that differ from ``r``) makes the saved
    adapter_config.json a complete record of the plan's ranks.
    """
    r = default_rank(plan)
    default_alpha = 2.0 * r
    rank_pattern = {name: m.rank for name, m in plan.modules.items() if m.rank > 0}
    alpha_pattern = {name: m.lora_alpha for name, m in plan.modules.items() if m.rank > 0}
    return {"r": r, "lora_alpha": default_alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def lora_config(plan: Plan, task_type: str = "CAUSAL_LM", **overrides: Any) -> LoraConfig:
    """LoraConfig targeting exactly the plan's rank>0 modules, with per-module rank and alpha."""
    kwargs: dict[str, Any] = {
        **rank_alpha_patterns(plan),
        "target_modules": plan.lora_targets(),
        "lora_dropout": plan.lora_dropout,
        "bias": "none",
        "task_type": task_type,
    }
    kwargs.update(overrides)
    return LoraConfig(**kwargs)
