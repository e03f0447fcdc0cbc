"""Measured training memory of a fidelity run on CPU, from the real tensors (CUDA uses its allocator peak).

CPU has no allocator peak to read, and RSS in a reused worker mostly reflects earlier runs, so we
count what training holds: weights (quantized storage + LoRA), one grad per trainable parameter,
the optimizer states, and the peak of tensors autograd saves for backward within one step.
"""

from __future__ import annotations

from typing import Any

import torch

from qra_plugin.weight_memory import memory_report


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class ActivationMeter:
    """Peak bytes of tensors saved for backward in one step (parameters and buffers excluded)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.exclude |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.peak = 0
        self._seen: set[int] = set()
        self._bytes = 0

    def step(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Context manager for one training step."""
        self._seen, self._bytes = set(), 0
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.exclude and ptr not in self._seen:
                self._seen.add(ptr)
                self._bytes += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self._bytes)
        return t


def state_bytes(model: torch.nn.Module, optimizer: Any = None) -> int:
    """Weights (incl. quantized storage and LoRA) + one grad per trainable param + optimizer states."""

    weights = memory_report(model).total_bytes
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + grads + (optimizer_state_bytes(optimizer) if optimizer is not None else 0)


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors holding ``t``'s memory: itself, or the inner tensors of a tensor subclass (torchao's
    quantized optimizer states keep ``codes``, ``scale`` and ``qmap`` behind a wrapper with no storage)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    names, _ = t.__tensor_flatten__()
    return [inner for name in names for inner in _plain_tensors(getattr(t, name))]


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in ``optimizer.state``, each storage once (bitsandbytes shares its quantile maps
    between parameters)."""
    states: list[torch.Tensor] = []
    for state in optimizer.state.values():
        states += [p for v in state.values() if isinstance(v, torch.Tensor) for p in _plain_tensors(v)]
    return storage_bytes(states)


def plan_scaled_bytes(model: torch.nn.Module, optimizer: Any) -> int:
    """Measured counterpart of ``MemoryBreakdown.plan_scaled``: planned linears as stored + LoRA parameters
    + one gradient per LoRA parameter + the optimizer's states (real tensors, counted once per storage)."""

    report = memory_report(model)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return report.planned_bytes + report.lora_bytes + grads + optimizer_state_bytes(optimizer)
