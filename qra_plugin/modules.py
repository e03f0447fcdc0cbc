"""Find the decision units of a causal LM without naming any architecture.

The transformer blocks are the children of the longest ``nn.ModuleList`` in the model (``model.layers``
for Llama/Qwen2, ``transformer.h`` for GPT-2 style models); every ``nn.Linear`` inside a block is a
quantizable module. ``lm_head`` and embeddings live outside the blocks and stay unquantized.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LinearSpec:
    """A quantizable linear layer: where it is and what shape it has."""

    name: str
    block: int
    role: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


def _unwrap(model: nn.Module) -> nn.Module:
    """PEFT wraps the base model twice (``base_model.model``); names are relative to the base model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted name, ModuleList) of the transformer blocks: the longest ModuleList of modules."""
    model = _unwrap(model)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks")
    return best


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    """Shape of a linear layer, also once it was replaced by a quantized module (HQQ keeps it in meta)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if in_f is not None and out_f is not None:
        return int(in_f), int(out_f)
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict) and "shape" in meta:
        out_f, in_f = meta["shape"]
        return int(in_f), int(out_f)
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    """True for the quantized base layers a registered backend creates (``Backend.owns``)."""
    from qra_plugin.backends import owner

    return owner(module) is not None


def quantizable_linears(model: nn.Module) -> list[LinearSpec]:
    """Every linear inside a transformer block, in module order, with its block index and role.

    Works before and after quantization and LoRA injection: a PEFT wrapper is listed under its own
    name with the shape of its ``base_layer``, and nothing inside it is listed again.
    """
    model = _unwrap(model)
    blocks_name, blocks = find_blocks(model)
    specs: list[LinearSpec] = []
    for index, block in enumerate(blocks):
        taken: list[str] = []
        for sub_name, module in block.named_modules():
            if not sub_name or any(sub_name.startswith(p + ".") for p in taken):
                continue
            base = getattr(module, "base_layer", module)
            if not (isinstance(base, nn.Linear) or is_quantized_linear(base)):
                continue
            shape = _in_out(base)
            if shape is None:
                continue
            taken.append(sub_name)
            bias = getattr(base, "bias", None) is not None
            prefix = f"{blocks_name}.{index}" if blocks_name else str(index)
            specs.append(LinearSpec(f"{prefix}.{sub_name}", index, sub_name, shape[0], shape[1], bias))
    if not specs:
        raise ValueError(f"no linear layers found inside {type(model).__name__}'s blocks")
    return specs


def modules_hash(specs: list[LinearSpec]) -> str:
    """Stable hash of module names and shapes: two models with the same hash accept the same plans."""
    digest = hashlib.sha256()
    for spec in specs:
        digest.update(f"{spec.name}:{spec.out_features}x{spec.in_features};".encode())
    return digest.hexdigest()[:16]
