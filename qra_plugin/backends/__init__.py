"""The bits→backend dispatch table. Each backend lives in one file with ``quantize`` and ``stored_bytes``.

Adding a backend: one file here exposing a :class:`Backend`, one entry in ``BACKENDS`` and in
``qra_plugin.plan.BACKEND_BITS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from qra_plugin.plan import ModulePlan


class Quantizer(Protocol):
    def __call__(self, linear: nn.Linear, plan: ModulePlan, compute_dtype: torch.dtype) -> nn.Module: ...


@dataclass(frozen=True)
class Backend:
    name: str
    quantize: Quantizer
    #: attribute PEFT reads on the model to pick its LoRA wrapper (``is_loaded_in_4bit`` …), per bits
    model_flags: dict[int, str]


def get_backend(name: str) -> Backend:
    if name == "hqq":
        from qra_plugin.backends.hqq import BACKEND
    elif name == "bnb":
        from qra_plugin.backends.bnb import BACKEND
    else:
        raise KeyError(f"unknown backend {name!r}")
    return BACKEND
