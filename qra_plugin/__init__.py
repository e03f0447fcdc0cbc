"""qra_plugin: apply a per-module (bits, LoRA rank) plan in Axolotl, TRL and accelerate.

The runtime half of qra. It never imports ``planner``. ``QRAPlugin`` (needs axolotl) and
``QRACallback`` (needs transformers) load lazily so a plain ``import qra_plugin`` stays light.
"""

from __future__ import annotations

from typing import Any

from qra_plugin.apply import apply_plan, load_for_inference
from qra_plugin.errors import QRAError
from qra_plugin.lora import lora_config
from qra_plugin.memory_report import MemoryReport, memory_report
from qra_plugin.plan import Fingerprint, ModulePlan, Plan, fingerprint
from qra_plugin.quantize import quantize_model

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


def __getattr__(name: str) -> Any:
    if name == "QRAPlugin":
        from qra_plugin.axolotl import QRAPlugin

        return QRAPlugin
    if name == "QRACallback":
        from qra_plugin.trl import QRACallback

        return QRACallback
    raise AttributeError(f"module 'qra_plugin' has no attribute {name!r}")
