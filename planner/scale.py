"""The LoRA scale a plan gives each module, from the setting (``lora_r``, ``lora_alpha``) the user tuned for.

A user picks a learning rate for their ``lora_r`` / ``lora_alpha``. When the planner gives a module another
rank, ``alpha_rule`` decides what that module keeps (``adapter.alpha_rule``):

- ``sqrt`` (the default; rsLoRA-style): alpha = lora_alpha·√(rank/lora_r), i.e. scale ∝ 1/√rank, which keeps
  the update size lora_r gave at every rank.
- ``rank`` (rounds 1–2's plans): alpha/rank stays lora_alpha/lora_r — the same scale at every rank. An Adam
  update of scale·B·A grows like scale·√rank, so low ranks learn more slowly.
- ``fixed``: alpha = lora_alpha at every rank (scale ∝ 1/rank; PEFT's behaviour when only ``r`` changes).

``sqrt`` became the default when the tuned protocol measured it (``benchmarks/results/adapter_init.json``:
the error table's plan, each rule at its own tuned rate, sqrt − rank −0.0055 ± 0.0008 nats, t −6.8, p 0.02,
n 3). At rank = lora_r the rules agree, so a uniform r16 plan is the same plan under either.
"""

from __future__ import annotations

import math

from qra_plugin.plan import Plan

ALPHA_RULES = ("rank", "sqrt", "fixed")


def module_alpha(rank: int, rule: str, lora_r: int = 16, lora_alpha: float = 32.0) -> float | None:
    """The alpha of a module at ``rank``; None when it is the plan default 2·rank (the plan hash is unchanged)."""
    if rule not in ALPHA_RULES:
        raise ValueError(f"alpha_rule must be one of {', '.join(ALPHA_RULES)}, not {rule!r}")
    if rank <= 0:
        return None
    if rule == "rank":
        alpha = lora_alpha * rank / lora_r
    elif rule == "sqrt":
        alpha = lora_alpha * math.sqrt(rank / lora_r)
    else:
        alpha = lora_alpha
    return None if math.isclose(alpha, 2.0 * rank, rel_tol=1e-12) else float(alpha)


def with_alpha_rule(plan: Plan, rule: str, lora_r: int = 16, lora_alpha: float = 32.0) -> Plan:
    """``plan`` with every adapter's alpha set by ``rule`` (modules that keep the default stay as they are)."""
    modules = {
        name: m.model_copy(update={"alpha": module_alpha(m.rank, rule, lora_r, lora_alpha)})
        for name, m in plan.modules.items()
    }
    return plan.model_copy(update={"modules": modules})
