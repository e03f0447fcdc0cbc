"""The YAML keys the Axolotl plugin adds (merged into Axolotl's config schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

#: Axolotl's Triton LoRA kernel switches; a backend declares whether it works with them (``Backend.axolotl_kernels``)
KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")


#: what the ``qra:`` section of an Axolotl YAML may hold: the planner settings Axolotl's own keys do not say
#: (model, data, batch, sequence length, optimizer, dtype and learning rate come from Axolotl's keys; the sharding
#: from ``deepspeed``/``fsdp``; ``world_size``: the ranks the launcher will start, so budgets count one rank)
QRA_SECTION_KEYS = ("name", "seed", "budget", "space", "fidelity", "search", "profile", "data", "world_size")
#: ``qra.data`` only sizes the samples qra takes from the data Axolotl prepares
QRA_DATA_KEYS = ("train_examples", "eval_examples", "calibration_examples")


#: the paths a qra user types with ``~`` (``base_model: ~/.cache/qra/...`` would be taken for a hub repo id)
HOME_PATH_KEYS = ("base_model", "tokenizer_config", "qra_plan")


def expand_home(cfg: dict, keys: tuple[str, ...] = HOME_PATH_KEYS) -> None:
    """Expand a leading ``~`` in the string values of ``keys``, in place."""
    from pathlib import Path

    for key in keys:
        value = cfg.get(key)
        if isinstance(value, str) and value.startswith("~"):
            cfg[key] = str(Path(value).expanduser())


def kernels_blocked_by(plan: Any) -> list[str]:
    """The backends in ``plan`` that Axolotl's Triton LoRA kernels do not handle."""
    from qra_plugin.backends import registry

    return sorted(b for b in plan.backends_used() if not registry()[b].axolotl_kernels)


class QRAArgs(BaseModel):
    """``qra_plan`` turns the plugin on; without it every hook does nothing."""

    qra_plan: str | None = Field(default=None, description="path to a qra plan (YAML/JSON)")
    qra_check_fingerprint: bool = Field(default=True, description="refuse a plan made for another model")
    qra_stop_at_step: int | None = Field(default=None, ge=1, description="stop training after this many steps")
    qra: dict[str, Any] | None = Field(
        default=None, description="planner settings for `qra search CONFIG.yaml` (budget, space, fidelity, ...)"
    )

    @field_validator("qra")
    @classmethod
    def _known_qra_keys(cls, section):
        """The planner validates values; unknown keys fail here too, so `axolotl train` names a typo."""
        if section is None:
            return section
        for key in section:
            if key not in QRA_SECTION_KEYS:
                raise ValueError(f"qra.{key}: unknown key (qra: takes {', '.join(QRA_SECTION_KEYS)})")
        for key in section.get("data") or {}:
            if key not in QRA_DATA_KEYS:
                raise ValueError(
                    f"qra.data.{key}: unknown key (data comes from Axolotl's datasets; qra.data takes "
                    f"{', '.join(QRA_DATA_KEYS)})"
                )
        return section

    @model_validator(mode="before")
    @classmethod
    def _validate_plan(cls, data):
        """Fail at config time, with one line, for a missing/malformed plan or a backend clash."""
        if not isinstance(data, dict) or not data.get("qra_plan"):
            return data
        from qra_plugin.errors import QRAError
        from qra_plugin.plan import Plan

        try:
            plan = Plan.load(data["qra_plan"])
        except QRAError as exc:
            raise ValueError(str(exc)) from None
        conflict = plan_conflict(data)
        if conflict:
            raise ValueError(conflict)
        blocked = kernels_blocked_by(plan)
        if blocked:
            for key in KERNEL_KEYS:
                if data.get(key):
                    raise ValueError(
                        f"{key} does not support {'/'.join(blocked)} base layers in this plan: set {key}: false"
                    )
                data[key] = False
        return data


#: what a QLoRA / 8-bit LoRA YAML says that a qra plan replaces: Axolotl loads the model unquantized, the plan
#: quantizes each module, PEFT adds plain LoRA adapters (``take_over_quantization``)
WHOLE_MODEL_QUANTIZATION = {"load_in_4bit": False, "load_in_8bit": False, "quantize_moe_experts": False}
#: keys naming a model that is already quantized (a plan cannot re-quantize it)
PREQUANTIZED_KEYS = ("gptq", "model_quantization_config")


def take_over_quantization(config: dict) -> list[str]:
    """Make Axolotl load the model unquantized so the plan's per-module quantization is the only one:
    ``load_in_4bit``/``load_in_8bit`` off and ``adapter: qlora`` trained as ``lora``. In place, on the raw
    config (``register`` runs before Axolotl validates it); returns the keys it changed."""
    changed = [k for k, v in WHOLE_MODEL_QUANTIZATION.items() if k in config and bool(config[k]) != v]
    config.update({k: v for k, v in WHOLE_MODEL_QUANTIZATION.items() if k in config})
    if config.get("adapter") == "qlora":
        config["adapter"] = "lora"
        changed.append("adapter")
    return changed


def plan_conflict(config: dict) -> str | None:
    """The one line naming an Axolotl setting a qra plan cannot train with (None: no conflict); shared by this
    validator (``axolotl train``) and the planner's reader of the same YAML (``qra search``). QLoRA's
    ``load_in_4bit`` / ``adapter: qlora`` (and 8-bit LoRA) are no conflict: the plan takes over quantization."""
    for key in PREQUANTIZED_KEYS:
        if config.get(key):
            return f"{key}: the model is already quantized; a qra plan quantizes an unquantized model per module"
    if config.get("adapter") not in (None, "lora", "qlora"):
        return f"adapter: a qra plan trains LoRA adapters; set adapter: lora or qlora (got {config.get('adapter')!r})"
    return None
