"""Measured bytes: what the tensors of each module really hold after quantization and LoRA."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from qra_plugin.modules import quantizable_linears


def _tensors_in(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors hidden outside parameters/buffers: HQQ's ``meta`` dict, bnb's QuantState and int8 scales."""
    if depth > 4 or obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v, depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_in(v, depth + 1)]
    if type(obj).__name__ == "QuantState":
        return [
            t for k in ("absmax", "code", "offset", "state2") for t in _tensors_in(getattr(obj, k, None), depth + 1)
        ]
    return []


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """All tensors a (possibly quantized) base layer holds, excluding LoRA adapters."""
    tensors: list[torch.Tensor] = []
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if "lora_" not in name:
            tensors.append(t)
    tensors += _tensors_in(getattr(module, "meta", None))
    bias = getattr(module, "bias", None)  # HQQLinear keeps its bias as a plain tensor attribute
    if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter):
        tensors.append(bias)
    weight = getattr(module, "weight", None)
    if weight is not None:
        tensors += _tensors_in(getattr(weight, "quant_state", None))
        tensors += _tensors_in(getattr(weight, "SCB", None))
    state = getattr(module, "state", None)  # bnb int8 moves its scales here after the first forward
    tensors += _tensors_in(getattr(state, "SCB", None)) + _tensors_in(getattr(state, "CB", None))
    return tensors


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
