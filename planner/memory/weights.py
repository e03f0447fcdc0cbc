"""Bytes per planned module: the base layer as its backend stores it, the LoRA adapter, its optimizer states.

Backends declare their own byte counts (``qra_plugin.backends.*.stored_bytes``, checked against the real
layers in ``tests/test_memory.py``); LoRA adapters are fp32 (PEFT upcasts bf16/fp16 adapters by
default) and their gradients match them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qra_plugin.backends import get_backend
from qra_plugin.errors import QRAError
from qra_plugin.modules import LinearSpec
from qra_plugin.plan import ModulePlan

#: PEFT keeps adapters in fp32 (``autocast_adapter_dtype=True``), whatever the base dtype.
LORA_DTYPE = torch.float32

#: Optimizer state bytes per trainable parameter tensor, by HF ``optim`` name (see ``_optimizer_bytes``).
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd")


def elem(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def base_module_bytes(spec: LinearSpec, plan: ModulePlan, compute_dtype: torch.dtype) -> int:
    """Bytes of a planned linear's base layer, as its backend stores it (``Backend.stored_bytes``)."""
    backend = "none" if plan.bits >= 16 else plan.backend
    try:
        stored_bytes = get_backend(backend).stored_bytes
    except KeyError:
        raise QRAError(f"{spec.name}: no backend stores {plan.bits}-bit weights as {plan.backend!r}") from None
    return stored_bytes(spec, plan, compute_dtype)


def lora_numel(spec: LinearSpec, rank: int) -> int:
    return rank * (spec.in_features + spec.out_features)


def optimizer_bytes(optimizer: str, shapes: Iterable[tuple[int, int]]) -> int:
    """Optimizer state bytes for fp32 trainable tensors of the given 2-D shapes, as torch/HF store them."""
    total = 0
    for rows, cols in shapes:
        if optimizer in ("adamw_torch", "adamw_torch_fused"):
            total += 2 * rows * cols * 4 + 4  # exp_avg, exp_avg_sq, fp32 ``step`` tensor
        elif optimizer == "adafactor":
            total += (rows + cols) * 4 + 4  # factored second moment + 0-dim RMS tensor (HF, beta1=None)
        elif optimizer == "sgd":
            total += 0
        else:
            raise QRAError(f"unknown optimizer {optimizer!r} (supported: {', '.join(OPTIMIZERS)})")
    return total
