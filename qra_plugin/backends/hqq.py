"""HQQ (half-quadratic quantization): 2/3/4/8 bits with a group size and axis, calibration-free.

HQQ keeps scale/zero in a plain dict (``meta``), not in registered buffers, so ``.to()``, DDP and FSDP do
not move them: we always quantize on the layer's final device.
"""

from __future__ import annotations

import torch
from torch import nn

from qra_plugin.backends import Backend
from qra_plugin.plan import ModulePlan


def quantize(linear: nn.Linear, plan: ModulePlan, compute_dtype: torch.dtype) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=plan.bits, group_size=plan.group_size, axis=plan.axis)
    device = linear.weight.device
    layer = HQQLinear(linear, config, del_orig=True, compute_dtype=compute_dtype, device=str(device))
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    return layer


BACKEND = Backend(name="hqq", quantize=quantize, model_flags={})
