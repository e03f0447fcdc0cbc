"""bitsandbytes: nf4 (4-bit, blocks of 64, double-quantized absmax) and LLM.int8 (8-bit, per-row scales).

With a bf16/fp16 compute dtype the packed nf4 bytes are stored in that dtype (``quant_storage``), the
layout FSDP1 needs (a unit's flat parameter is one float tensor: the QLoRA-FSDP layout); with fp32 they stay
uint8. FSDP2 and ZeRO-3 shard each parameter in its own dtype, so nf4 trains there in either layout (2 CPU
ranks in tests/test_sharded.py: bf16 and fp32). int8 is never sharded:
``Int8Params`` keeps its row scales (``SCB``) as attributes of the parameter object, which a sharded copy
(FSDP2's DTensor, ZeRO-3's partitioned tensor) does not carry, and FSDP1 rejects int8 weights in a unit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qra_plugin.backends import Backend, tensors_in
from qra_plugin.errors import QRAError

if TYPE_CHECKING:
    from qra_plugin.modules import LinearSpec
    from qra_plugin.plan import ModulePlan

#: nf4 quantizes in fixed blocks of 64; int8 is per row.
NF4_BLOCK = 64
#: what qra passes bitsandbytes besides the module plan (a planner's layer cache keys stored layers by it):
#: nf4 with double-quantized absmax, LLM.int8 with its usual outlier threshold
SETTINGS = {"quant_type": "nf4", "compress_statistics": True, "int8_threshold": 6.0}


def quantize(linear: nn.Linear, plan: ModulePlan, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    device = linear.weight.device
    weight = linear.weight.data.to(compute_dtype).contiguous()
    bias = linear.bias is not None
    if plan.bits == 4:
        storage = compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else torch.uint8
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=compute_dtype,
            compress_statistics=SETTINGS["compress_statistics"],
            quant_type=SETTINGS["quant_type"],
            quant_storage=storage,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.cpu(),
            requires_grad=False,
            quant_type=SETTINGS["quant_type"],
            compress_statistics=SETTINGS["compress_statistics"],
            quant_storage=storage,
            module=layer,  # bitsandbytes then keeps the quant state on the layer too, where FSDP2 cannot drop it
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=SETTINGS["int8_threshold"],
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype).clone(), requires_grad=False)
    return layer.to(device)


def stored_bytes(spec: LinearSpec, plan: ModulePlan, compute_dtype: torch.dtype) -> int:
    """nf4: two values per byte, double-quantized absmax (one uint8 per 64-block, plus fp32 absmax per 256
    of those, a 256-entry fp32 code and an fp32 offset) and the 16-entry nf4 code, per layer.
    int8: one byte per weight plus one fp32 scale (SCB) per output row."""
    numel, elem = spec.numel, compute_dtype.itemsize
    bias = spec.out_features * elem if spec.bias else 0
    if plan.bits == 8:
        return numel + 4 * spec.out_features + bias
    if plan.bits != 4:
        raise QRAError(f"{spec.name}: bitsandbytes cannot store {plan.bits}-bit weights")
    store = (compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else torch.uint8).itemsize
    packed = math.ceil(math.ceil(numel / 2) / store) * store
    blocks = math.ceil(numel / NF4_BLOCK)
    nested = math.ceil(blocks / 256)
    return packed + blocks + 4 * nested + 4 * 256 + 4 + 4 * 16 + bias


def owns(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes.")


def _tensors(obj: Any) -> list[torch.Tensor]:
    if type(obj).__name__ == "QuantState":
        return [t for k in ("absmax", "code", "offset", "state2") for t in _tensors(getattr(obj, k, None))]
    return tensors_in(obj)


def hidden_tensors(module: nn.Module) -> list[torch.Tensor]:
    """nf4's QuantState (absmax, codes, nested state) and int8's scales (moved to ``state`` after a forward)."""
    weight = getattr(module, "weight", None)
    state = getattr(module, "state", None)
    found = _tensors(getattr(weight, "quant_state", None)) + _tensors(getattr(weight, "SCB", None))
    return found + _tensors(getattr(state, "SCB", None)) + _tensors(getattr(state, "CB", None))


def check(plan: ModulePlan) -> str | None:
    if plan.bits == 4 and plan.group_size != NF4_BLOCK:
        return f"bitsandbytes nf4 uses blocks of {NF4_BLOCK}, not group_size={plan.group_size}"
    return None


def dequantize(module: nn.Module) -> torch.Tensor:
    """nf4 through ``dequantize_4bit``; int8 as codes x row scale / 127 (LLM.int8's outlier columns are
    computed from these same codes, so this is the weight it multiplies by, up to activation rounding)."""
    import bitsandbytes.functional as F

    weight = module.weight
    with torch.no_grad():
        if getattr(weight, "quant_state", None) is not None:
            return F.dequantize_4bit(weight.data, weight.quant_state)
        state = getattr(module, "state", None)
        codes = getattr(weight, "CB", None)
        codes = codes if codes is not None else getattr(state, "CB", None)
        scales = getattr(weight, "SCB", None)
        scales = scales if scales is not None else getattr(state, "SCB", None)
        if codes is None:
            codes = weight.data
        return codes.float() * scales.float().unsqueeze(1) / 127.0


BACKEND = Backend(
    name="bnb",
    bits=frozenset({4, 8}),
    quantize=quantize,
    stored_bytes=stored_bytes,
    owns=owns,
    hidden_tensors=hidden_tensors,
    shardable=lambda bits, half_precision: bits == 4,
    flat_shardable=lambda bits, half_precision: bits == 4 and half_precision,
    axolotl_kernels=True,
    default_group={4: NF4_BLOCK},
    check=check,
    model_flags={4: "is_loaded_in_4bit", 8: "is_loaded_in_8bit"},
    settings=SETTINGS,
    dequantize=dequantize,
    picklable=False,  # a reloaded Params4bit comes back as a plain Parameter (no quant_state attributes)
    summary="bitsandbytes nf4 (blocks of 64, double quant) and LLM.int8",
)
