"""Bytes per planned module: the base layer as its backend stores it and the LoRA adapter (optimizer states:
``planner.memory.optimizers``).

Backends declare their own byte counts (``qra_plugin.backends.*.stored_bytes``, checked against the real
layers in ``tests/test_memory.py``); LoRA adapters are fp32 (PEFT 0.20's ``cast_adapter_dtype`` upcasts
bf16/fp16 adapters under its default ``autocast_adapter_dtype=True``, which qra's runs and Axolotl keep) and
their gradients and optimizer states match them; ``TrainingSettings.adapter_precision`` prices the other case.
"""

from __future__ import annotations

import torch

from qra_plugin.backends import get_backend
from qra_plugin.errors import QRAError
from qra_plugin.modules import LinearSpec
from qra_plugin.plan import ModulePlan

#: PEFT keeps adapters in fp32 (``autocast_adapter_dtype=True``), whatever the base dtype.
LORA_DTYPE = torch.float32


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
