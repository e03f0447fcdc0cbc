"""The YAML keys the Axolotl plugin adds (merged into Axolotl's config schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

#: Axolotl's Triton LoRA kernel switches; a backend declares whether it works with them (``Backend.axolotl_kernels``)
KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")


def kernels_blocked_by(plan: Any) -> list[str]:
    """The backends in ``plan`` that Axolotl's Triton LoRA kernels do not handle."""
    from qra_plugin.backends import registry

    return sorted(b for b in plan.backends_used() if not registry()[b].axolotl_kernels)


class QRAArgs(BaseModel):
    """``qra_plan`` turns the plugin on; without it every hook does nothing."""

    qra_plan: str | None = Field(default=None, description="path to a qra plan (YAML/JSON)")
    qra_check_fingerprint: bool = Field(default=True, description="refuse a plan made for another model")
    qra_stop_at_step: int | None = Field(default=None, ge=1, description="stop training after this many steps")

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
        if data.get("load_in_4bit") or data.get("load_in_8bit"):
            raise ValueError(
                "qra_plan quantizes per module itself: remove load_in_4bit/load_in_8bit (use adapter: lora)"
            )
        if data.get("adapter") not in (None, "lora"):
            raise ValueError(f"qra_plan needs adapter: lora (got {data.get('adapter')!r})")
        blocked = kernels_blocked_by(plan)
        if blocked:
            for key in KERNEL_KEYS:
                if data.get(key):
                    raise ValueError(
                        f"{key} does not support {'/'.join(blocked)} base layers in this plan: set {key}: false"
                    )
                data[key] = False
        return data
