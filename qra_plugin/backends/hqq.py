"""HQQ (half-quadratic quantization): 2/3/4/8 bits with a group size and axis, calibration-free.

HQQ keeps scale/zero in a plain dict (``meta``), not in registered buffers, so ``.to()``, DDP and FSDP do
not move them: we always quantize on the layer's final device. Axolotl's Triton LoRA kernels assume a
bnb/plain base layer, so they are off for HQQ.

Sharded (ZeRO-3, FSDP2): every rank quantizes the same full weights with the same deterministic
optimisation, so ranks hold the same layer without a broadcast (tests/test_sharded.py compares their
digests). The packed weight ``W_q`` is the layer's one parameter, frozen and integer (uint8; int32 at 3
bits): FSDP2 shards it along dim 0 as it shards any parameter (its mixed-precision policy never casts a
non-float one) and ZeRO-3 partitions it, and both gather it back before the layer runs. ``meta`` (scale and
zero, one each per group in the compute dtype) is invisible to them, so every rank keeps all of it:
2·itemsize/group bytes per weight (bf16: 2-bit g16 0.25 B, 3-bit g32 0.125 B, 4/8-bit g64 0.0625 B) against
the packed weight's bits/8 B (3-bit: 0.4 B) divided by the number of ranks. FSDP1 cannot hold HQQ: it
flattens a unit's parameters into one float flat parameter (hqq's own FSDP1 route views W_q as float,
``view_as_float``, which qra does not use).
"""

from __future__ import annotations

import math
import types
from typing import TYPE_CHECKING

import torch
from torch import nn

from qra_plugin.backends import Backend, tensors_in
from qra_plugin.errors import QRAError

if TYPE_CHECKING:
    from qra_plugin.modules import LinearSpec
    from qra_plugin.plan import ModulePlan

#: Group sizes per bit-width. Below 4 bits small groups matter as much as the bit-width
#: (SmolLM2-135M, axis 0: 3-bit g64 ppl 63.5 vs g32 29.8; 2-bit g32 14,199 vs g16 1,243).
DEFAULT_GROUP = {2: 16, 3: 32, 4: 64, 8: 64}
#: what qra passes ``BaseQuantizeConfig`` besides bits, group and axis (hqq's defaults, stated so a change
#: here re-keys a planner's stored layers): scale/zero unquantized, kept on the layer, packed as integers
SETTINGS = {"quant_zero": False, "quant_scale": False, "offload_meta": False, "view_as_float": False}


def quantize(linear: nn.Linear, plan: ModulePlan, compute_dtype: torch.dtype) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=plan.bits, group_size=plan.group_size, axis=plan.axis, **SETTINGS)
    device = linear.weight.device
    layer = HQQLinear(linear, config, del_orig=True, compute_dtype=compute_dtype, device=str(device))
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    return layer


def stored_bytes(spec: LinearSpec, plan: ModulePlan, compute_dtype: torch.dtype) -> int:
    """Packed W_q + scale + zero (+ bias), as hqq 0.2.x stores them.

    The (reshaped) weight is packed along dim 0: 8 bit 1/byte, 4 bit 2/byte, 2 bit 4/byte (uint8), 3 bit
    10 per int32 (rows rounded up to 10); scale and zero are one value per group in the compute dtype.
    """
    group = plan.group_size or DEFAULT_GROUP[plan.bits]
    numel = spec.numel
    if numel % group:
        raise QRAError(f"{spec.name}: HQQ group_size {group} does not divide its {numel} weights")
    groups = numel // group
    rows, cols = (group, groups) if plan.axis == 0 else (groups, group)
    packed = {8: rows * cols, 4: (rows // 2) * cols, 2: (rows // 4) * cols, 3: math.ceil(rows / 10) * cols * 4}
    if plan.bits not in packed:
        raise QRAError(f"{spec.name}: HQQ cannot store {plan.bits}-bit weights")
    elem = compute_dtype.itemsize
    return packed[plan.bits] + 2 * groups * elem + (spec.out_features * elem if spec.bias else 0)


def owns(module: nn.Module) -> bool:
    return type(module).__module__.startswith("hqq.")


def restored(module: nn.Module) -> None:
    """HQQLinear picks its ``forward`` at class level in ``__init__`` (``set_backend``): a process that only
    unpickles layers never ran it, and calling one raises "missing the required forward function"."""
    cls = type(module)
    cls.set_backend(cls.backend)


def reuse_dequantized(module: nn.Module) -> None:
    """hqq's CPU forward (``HQQMatmulNoCacheMul``: saves only x, dequantizes again in backward) and its plain
    forward both get the weight from ``dequantize()``; a frozen layer's dequantized weight never changes, so
    the layer answers with one copy made now. Same tensors into the same ops: bit-identical losses and the
    same tensors saved for backward (tests/test_fidelity.py). A deep copy carries its own (a bound method)."""
    module.qra_dequantized = module.dequantize().detach()
    module.dequantize = types.MethodType(_dequantized_once, module)


def _dequantized_once(self: nn.Module) -> torch.Tensor:
    return self.qra_dequantized


def hidden_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The ``meta`` dict (scale, zero, shapes) and the bias HQQLinear keeps as a plain attribute."""
    tensors = tensors_in(getattr(module, "meta", None))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter):
        tensors.append(bias)
    return tensors


def dequantize(module: nn.Module) -> torch.Tensor:
    """HQQ's own dequantization (the weight its forward multiplies by), shaped (out, in)."""
    with torch.no_grad():
        return module.dequantize().reshape(module.out_features, module.in_features)


BACKEND = Backend(
    name="hqq",
    bits=frozenset({2, 3, 4, 8}),
    quantize=quantize,
    stored_bytes=stored_bytes,
    owns=owns,
    hidden_tensors=hidden_tensors,
    shardable=lambda bits, half_precision: True,  # FSDP2 and ZeRO-3: tests/test_sharded.py
    axolotl_kernels=False,
    default_group=DEFAULT_GROUP,
    default_axis=0,
    settings=SETTINGS,
    reuse_dequantized=reuse_dequantized,
    picklable=True,  # HQQLinear keeps W_q and a meta dict of plain tensors (tested round trip)
    restored=restored,
    dequantize=dequantize,
    summary="HQQ 2/3/4/8-bit, groups g16/g32/g64/g64, axis 0; calibration-free",
)
