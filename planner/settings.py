"""``TrainingSettings``: the training job as the memory model, ``qra estimate`` and fidelity runs see it.

One frozen value built once — from a qra config (an Axolotl YAML becomes one: ``planner.axolotl``) with
``TrainingSettings.of``, from a train section and a dtype with ``from_train``, or from ``qra estimate``'s flags —
so every consumer prices and runs the same batch, sequence length, accumulation, optimizer, precision and device.
Where the recipe key holds each field, or why it need not, is ``planner.fidelity.contract.SETTINGS_IN_RECIPE``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from planner.config import FidelityLevel, QRAConfig, TrainSection
from qra_plugin.errors import QRAError
from qra_plugin.plan import one_line_validation_error

Precision = Literal["float32", "bfloat16", "float16"]
#: PEFT's default ``autocast_adapter_dtype=True`` upcasts adapters to fp32 (qra's runs, Axolotl's default)
ADAPTER_DEFAULT: Precision = "float32"


def available_device() -> Literal["cpu", "cuda"]:
    """Where a run started now would train."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class TrainingSettings(BaseModel):
    """One training job's settings. ``batch`` is the micro batch (per rank); ``precision`` the dtype the model is
    loaded and trained in; ``adapter_precision`` the LoRA weights' dtype (fp32 under PEFT's upcast, or the
    compute dtype with ``autocast_adapter_dtype=False``), which their gradients and optimizer states follow."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch: int = Field(ge=1)
    seq_len: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    optimizer: str = "adamw_torch"
    grad_checkpointing: bool = False
    packing: bool = False
    loss_path: Literal["trl_chunked", "hf_full", "liger", "cce"] = "trl_chunked"
    precision: Precision = "float32"
    adapter_precision: Precision = ADAPTER_DEFAULT
    device: Literal["cpu", "cuda"] = Field(default_factory=available_device)
    world_size: int = Field(1, ge=1)
    sharding: Literal["ddp", "zero1", "zero2", "zero3", "fsdp2"] | None = None

    def __init__(self, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise QRAError(f"training settings: {one_line_validation_error(exc)}") from None

    @field_validator("precision", "adapter_precision", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value

    @field_validator("optimizer")
    @classmethod
    def _priced_optimizer(cls, name: str) -> str:
        from planner.memory.optimizers import check_optimizer  # planner.memory imports this module

        return check_optimizer(name)

    @model_validator(mode="after")
    def _peft_adapter_dtype(self) -> TrainingSettings:
        if self.adapter_precision not in (ADAPTER_DEFAULT, self.precision):
            raise ValueError(f"PEFT keeps adapters in float32 or the model's dtype, not {self.adapter_precision}")
        return self

    @classmethod
    def of(cls, cfg: QRAConfig, level: FidelityLevel | None = None, **override: Any) -> TrainingSettings:
        """The settings of ``cfg``'s job; with ``level``, of its fidelity runs (the level's batch / seq_len win)."""
        settings = cls.from_train(cfg.train, cfg.model.dtype, **override)
        if level is None:
            return settings
        return settings.replace(batch=level.batch or settings.batch, seq_len=level.seq_len or settings.seq_len)

    @classmethod
    def from_train(cls, train: TrainSection, precision: Any, **override: Any) -> TrainingSettings:
        """A train section's settings in ``precision`` (a dtype or its name); ``override``: any other field."""
        fields = train.model_dump(include=set(cls.model_fields) - {"precision"}) | {"precision": precision}
        return cls(**(fields | override))

    def replace(self, **changes: Any) -> TrainingSettings:
        """A validated copy with ``changes``."""
        return type(self)(**(self.model_dump() | changes))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.precision)

    @property
    def adapter_dtype(self) -> torch.dtype:
        return getattr(torch, self.adapter_precision)

    @property
    def tokens(self) -> int:
        """Tokens of one micro batch: rows are taken as full (exact under packing, an upper bound when padded)."""
        return self.batch * self.seq_len
