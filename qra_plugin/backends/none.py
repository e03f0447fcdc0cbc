"""16 bits: the original ``nn.Linear``, kept in the model's dtype. The reference every backend is measured
against, and the one layer every sharding mode (ZeRO-3, FSDP1/2) and Axolotl's LoRA kernels accept."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from qra_plugin.backends import Backend

if TYPE_CHECKING:
    from qra_plugin.modules import LinearSpec
    from qra_plugin.plan import ModulePlan


def quantize(linear: nn.Linear, plan: ModulePlan, compute_dtype: torch.dtype) -> nn.Module:
    return linear


def stored_bytes(spec: LinearSpec, plan: ModulePlan, compute_dtype: torch.dtype) -> int:
    return (spec.numel + (spec.out_features if spec.bias else 0)) * compute_dtype.itemsize


BACKEND = Backend(
    name="none",
    bits=frozenset({16}),
    quantize=quantize,
    stored_bytes=stored_bytes,
    owns=lambda module: False,
    shardable=lambda bits, half_precision: True,
    flat_shardable=lambda bits, half_precision: True,
    axolotl_kernels=True,
    summary="unquantized Linear in the model dtype",
)
