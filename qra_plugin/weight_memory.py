"""Measured bytes: what the tensors of each module really hold after quantization and LoRA."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from qra_plugin.modules import quantizable_linears


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """All tensors a (possibly quantized) base layer holds, excluding LoRA adapters: parameters, buffers and
    what its backend keeps elsewhere (``Backend.hidden_tensors``: HQQ's meta dict, bnb's QuantState, int8 scales)."""
    from qra_plugin.backends import owner

    tensors = [t for name, t in list(module.named_parameters()) + list(module.named_buffers()) if "lora_" not in name]
    backend = owner(module)
    return tensors + (backend.hidden_tensors(module) if backend is not None else [])


def storage_bytes(tensors: list[torch.Tensor], seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared storages counted once)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


@dataclass
class ModuleMemory:
    name: str
    kind: str
    bytes: int
    bf16_bytes: int
    lora_bytes: int


@dataclass
class MemoryReport:
    """Measured weight memory: planned modules, everything else, LoRA adapters."""

    modules: list[ModuleMemory] = field(default_factory=list)
    planned_bytes: int = 0
    planned_bf16_bytes: int = 0
    other_bytes: int = 0
    lora_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.planned_bytes + self.other_bytes + self.lora_bytes

    @property
    def planned_ratio_vs_bf16(self) -> float:
        return self.planned_bytes / max(1, self.planned_bf16_bytes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_bytes"] = self.total_bytes
        data["planned_ratio_vs_bf16"] = self.planned_ratio_vs_bf16
        return data

    def summary(self) -> str:
        mib = 1024**2
        return (
            f"planned linears {self.planned_bytes / mib:.2f} MiB ({self.planned_ratio_vs_bf16:.3f}× bf16), "
            f"other weights {self.other_bytes / mib:.2f} MiB, LoRA {self.lora_bytes / mib:.2f} MiB, "
            f"total {self.total_bytes / mib:.2f} MiB"
        )


def memory_report(model: nn.Module) -> MemoryReport:
    """Bytes actually held per quantizable module, by the rest of the model, and by LoRA adapters."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    report = MemoryReport()
    seen: set[int] = set()
    for spec in quantizable_linears(base):
        module = base.get_submodule(spec.name)
        layer = getattr(module, "base_layer", module)
        lora = [p for n, p in module.named_parameters() if "lora_" in n]
        weight_bytes = storage_bytes(module_tensors(layer), seen)
        lora_bytes = storage_bytes(lora, seen)
        bf16 = 2 * (spec.numel + (spec.out_features if spec.bias else 0))
        report.modules.append(ModuleMemory(spec.name, type(layer).__name__, weight_bytes, bf16, lora_bytes))
        report.planned_bytes += weight_bytes
        report.planned_bf16_bytes += bf16
        report.lora_bytes += lora_bytes
    rest = [t for n, t in list(base.named_parameters()) + list(base.named_buffers()) if "lora_" not in n]
    report.other_bytes = storage_bytes(rest, seen)
    return report
