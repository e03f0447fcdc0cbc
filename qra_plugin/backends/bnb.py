"""bitsandbytes: nf4 (4-bit, blocks of 64, double-quantized absmax) and LLM.int8 (8-bit, per-row scales).

With a bf16/fp16 compute dtype the packed nf4 bytes are stored in that dtype (``quant_storage``), the
layout FSDP and ZeRO-3 can shard; with fp32 they stay uint8.
"""

from __future__ import annotations

import torch
from torch import nn

from qra_plugin.backends import Backend
from qra_plugin.plan import ModulePlan


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
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=storage,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.cpu(),
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=True,
            quant_storage=storage,
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype).clone(), requires_grad=False)
    return layer.to(device)


BACKEND = Backend(name="bnb", quantize=quantize, model_flags={4: "is_loaded_in_4bit", 8: "is_loaded_in_8bit"})
