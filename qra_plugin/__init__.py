"""qra_plugin: apply a per-module (bits, LoRA rank) plan in Axolotl, TRL and accelerate.

The runtime half of qra. It never imports ``planner``. Names load lazily so ``import qra_plugin``
(which Axolotl does for every config that lists the plugin) does not pull torch/PEFT/axolotl early.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Fingerprint": "qra_plugin.plan",
    "ModulePlan": "qra_plugin.plan",
    "Plan": "qra_plugin.plan",
    "fingerprint": "qra_plugin.plan",
    "QRAError": "qra_plugin.errors",
    "apply_plan": "qra_plugin.apply",
    "load_for_inference": "qra_plugin.apply",
    "lora_config": "qra_plugin.lora",
    "MemoryReport": "qra_plugin.weight_memory",
    "memory_report": "qra_plugin.weight_memory",
    "quantize_model": "qra_plugin.quantize",
    "QRAPlugin": "qra_plugin.axolotl.plugin",
    "QRACallback": "qra_plugin.trl",
}
__all__ = [
    "Fingerprint",
    "MemoryReport",
    "ModulePlan",
    "Plan",
    "QRACallback",
    "QRAError",
    "QRAPlugin",
    "apply_plan",
    "fingerprint",
    "load_for_inference",
    "lora_config",
    "memory_report",
    "quantize_model",
]

if TYPE_CHECKING:
    from qra_plugin.apply import apply_plan, load_for_inference
    from qra_plugin.axolotl.plugin import QRAPlugin
    from qra_plugin.errors import QRAError
    from qra_plugin.lora import lora_config
    from qra_plugin.plan import Fingerprint, ModulePlan, Plan, fingerprint
    from qra_plugin.quantize import quantize_model
    from qra_plugin.trl import QRACallback
    from qra_plugin.weight_memory import MemoryReport, memory_report


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qra_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
