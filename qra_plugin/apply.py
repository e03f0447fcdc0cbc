"""Apply a plan to a loaded model (quantize + LoRA) and rebuild a trained model for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from qra_plugin.adapter_init import apply_adapter_init
from qra_plugin.errors import QRAError
from qra_plugin.lora import lora_config
from qra_plugin.plan import Plan
from qra_plugin.prune import prune_model
from qra_plugin.quantize import quantize_model


def _as_plan(plan: Plan | str | Path) -> Plan:
    return plan if isinstance(plan, Plan) else Plan.load(plan)


def apply_plan(
    model: nn.Module,
    plan: Plan | str | Path,
    *,
    init_tensors: dict[str, torch.Tensor] | None = None,
    **lora_overrides: Any,
) -> PeftModel:
    """Prune (if the plan says so), quantize the planned modules in place on their device, then attach the
    planned LoRA adapters (started from the plan's init file for modules with ``init: error``, or from
    ``init_tensors`` named like the file's: a planner's fidelity run computes them for each candidate).

    The base model's own parameters are frozen by PEFT; only LoRA weights train. Gradient
    checkpointing users should call ``model.enable_input_require_grads()`` (TRL/Axolotl do).
    """
    plan = _as_plan(plan)
    prune_model(model, plan)
    quantize_model(model, plan)
    peft_model = get_peft_model(model, lora_config(plan, **lora_overrides))
    apply_adapter_init(peft_model, plan, tensors=init_tensors)
    peft_model.qra_plan = plan
    return peft_model


def load_for_inference(
    base_path: str | Path,
    plan: Plan | str | Path,
    adapter_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PeftModel:
    """Load the base weights, quantize them exactly as in training, and attach the trained adapter.

    The adapter stays separate from the quantized base: merging LoRA into a quantized base changes
    outputs a lot (nf4 rel. 1.4, HQQ-2 1.0), so we never merge here.
    """
    from transformers import AutoModelForCausalLM

    plan = _as_plan(plan)
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QRAError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype).to(device)
    prune_model(model, plan)
    quantize_model(model, plan)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    peft_model.qra_plan = plan
    return peft_model.eval()
