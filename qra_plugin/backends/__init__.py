"""Quantization backends: one file each (after PEFT's ``tuners/lora/{bnb,hqq}.py``), one registry.

A backend file declares everything about its backend as one :class:`Backend` named ``BACKEND``: the
bits it stores, its default group size and axis, ``quantize``, the bytes a quantized layer holds
(``stored_bytes``, which the planner's memory model uses), how to recognise its layer (``owns``), the
tensors it hides outside parameters and buffers (for the weight meter), whether ZeRO-3/FSDP2/FSDP1 can shard it
and whether Axolotl's Triton LoRA kernels accept it. Every module in this package that defines
``BACKEND`` is registered, so adding a backend (torchao int4, GPTQ) is one new file plus its test; the
plan schema, config checks, budget parser, memory model, weight meter, sharding rules and the Axolotl
plugin all read this registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qra_plugin.modules import LinearSpec
    from qra_plugin.plan import ModulePlan


@dataclass(frozen=True)
class Backend:
    name: str
    #: bit-widths this backend can store
    bits: frozenset[int]
    #: ``quantize(linear, module_plan, compute_dtype) -> nn.Module`` on the linear's own device
    quantize: Callable[[nn.Linear, ModulePlan, torch.dtype], nn.Module]
    #: ``stored_bytes(spec, module_plan, compute_dtype) -> int``: exactly what the quantized layer holds
    stored_bytes: Callable[[LinearSpec, ModulePlan, torch.dtype], int]
    #: ``owns(module) -> bool``: is this one of the backend's layers
    owns: Callable[[nn.Module], bool]
    #: ``hidden_tensors(module) -> list[Tensor]``: tensors kept outside parameters/buffers (scales, codes)
    hidden_tensors: Callable[[nn.Module], list[Any]] = lambda module: []
    #: ``shardable(bits, half_precision) -> bool``: can ZeRO-3/FSDP2 shard this layer (each parameter sharded
    #: on its own, in its own dtype)
    shardable: Callable[[int, bool], bool] = lambda bits, half: False
    #: ``flat_shardable(bits, half_precision) -> bool``: can FSDP1 shard it (FSDP1 flattens a unit's
    #: parameters into one flat parameter of one float dtype)
    flat_shardable: Callable[[int, bool], bool] = lambda bits, half: False
    #: whether Axolotl's Triton LoRA kernels (lora_mlp/qkv/o_kernel) handle this base layer
    axolotl_kernels: bool = False
    #: default group size per bits (None: the backend has no group size)
    default_group: dict[int, int] = field(default_factory=dict)
    default_axis: int = 0
    #: attribute PEFT reads on the model to pick its LoRA wrapper (``is_loaded_in_4bit`` …), per bits
    model_flags: dict[int, str] = field(default_factory=dict)
    #: ``check(module_plan) -> str | None``: what is wrong with a module plan for this backend, if anything
    check: Callable[[ModulePlan], str | None] = lambda plan: None
    #: whether a quantized layer survives ``torch.save``/``torch.load`` intact (a planner may store it on disk)
    picklable: bool = False
    #: ``restored(module)``: make a layer loaded by ``torch.load`` usable in a process that never built one
    restored: Callable[[nn.Module], None] = lambda module: None
    #: ``reuse_dequantized(module)``: make a frozen layer compute with one dequantized copy of its weight for
    #: the rest of its life instead of dequantizing at every forward — the same tensor each time, so the same
    #: results bit for bit, for the memory of that copy (None: the backend has no such path)
    reuse_dequantized: Callable[[nn.Module], None] | None = None
    #: every setting ``quantize`` passes the library besides the module plan's (a planner's layer cache keys
    #: stored layers by it: change a setting here and stored layers are quantized again)
    settings: dict[str, Any] = field(default_factory=dict)
    #: ``dequantize(module) -> Tensor``: the (out, in) weight the layer computes with (None: it cannot say);
    #: the planner's error-aware adapter init reads the quantization error W - dequantize(Q(W)) through it
    dequantize: Callable[[nn.Module], torch.Tensor] | None = None
    #: one line for docs and errors
    summary: str = ""


@cache
def registry() -> dict[str, Backend]:
    """Every backend in this package, by name (``none`` = the unquantized Linear)."""
    found: dict[str, Backend] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        backend = getattr(module, "BACKEND", None)
        if isinstance(backend, Backend):
            found[backend.name] = backend
    return found


def get_backend(name: str) -> Backend:
    try:
        return registry()[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(sorted(registry()))}") from None


def backend_bits() -> dict[str, frozenset[int]]:
    """Which bit-widths each backend can store (the plan schema validates against this)."""
    return {name: b.bits for name, b in registry().items()}


def quantizing_backends() -> list[Backend]:
    return [b for b in registry().values() if b.name != "none"]


def reuse_dequantized_weights(model: nn.Module) -> int:
    """Give every quantized layer of ``model`` whose backend can, one dequantized copy of its frozen weight
    (CPU fidelity runs and finals: it trades the memory of a dequantized copy for not dequantizing each step).
    Returns how many layers now reuse one."""
    count = 0
    for module in list(model.modules()):
        backend = owner(module)
        if backend is not None and backend.reuse_dequantized is not None:
            backend.reuse_dequantized(module)
            count += 1
    return count


def owner(module: nn.Module) -> Backend | None:
    """The quantizing backend whose layer ``module`` is, if any."""
    return next((b for b in quantizing_backends() if b.owns(module)), None)


def tensors_in(obj: Any, depth: int = 0) -> list[Any]:
    """Tensors inside plain containers (dicts, lists, tuples) a backend keeps outside parameters/buffers."""
    import torch

    if depth > 4 or obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v, depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v, depth + 1)]
    return []
