"""Axolotl integration: ``plugins: [qra_plugin.QRAPlugin]`` + ``qra_plan: plan.yaml``.

Thin by design: every hook calls a ``qra_plugin`` function. Every hook does nothing unless
``qra_plan`` is set (from Axolotl 0.21 installed plugins load for every config).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin

from qra_plugin.adapter_init import apply_adapter_init
from qra_plugin.axolotl.args import KERNEL_KEYS, expand_home, kernels_blocked_by, take_over_quantization
from qra_plugin.distributed import check_sharding, deepspeed_stage, gathered
from qra_plugin.errors import QRAError
from qra_plugin.io import write_json_atomic
from qra_plugin.lora import rank_alpha_patterns
from qra_plugin.plan import Plan, fingerprint
from qra_plugin.prune import prune_model
from qra_plugin.quantize import quantize_model
from qra_plugin.weight_memory import memory_report

log = logging.getLogger("axolotl.integrations.qra")


def sharding_of(cfg: Any) -> str | None:
    """The weight-sharding mode an Axolotl config asks for: zero3, fsdp (FSDP2), fsdp1, zero2 or None."""
    if cfg.get("fsdp") or cfg.get("fsdp_config"):
        version = cfg.get("fsdp_version") or (cfg.get("fsdp_config") or {}).get("fsdp_version")
        return "fsdp" if str(version) == "2" else "fsdp1"
    stage = deepspeed_stage(cfg.get("deepspeed"))
    if stage is None:
        return None
    return "zero3" if stage >= 3 else "zero2"


class QRAPlugin(BasePlugin):
    """Applies a qra plan: per-module quantization before LoRA, per-module rank/alpha for LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self._plans: dict[str, Plan] = {}

    def register(self, cfg: dict) -> None:
        """Axolotl hands the raw config here before validating it: expand ``~`` in the paths a qra user
        types (``base_model: ~/.cache/qra/...`` would otherwise be taken for a hub repo id), and let the plan
        take over a QLoRA YAML's quantization (no double quantization: Axolotl loads the model unquantized)."""
        if not cfg.get("qra_plan"):
            return
        warn_offline_telemetry()
        expand_home(cfg)
        changed = take_over_quantization(cfg)
        if changed:
            log.info("qra: the plan quantizes each module; Axolotl loads the model unquantized (%s)", ",".join(changed))
        try:
            blocked = kernels_blocked_by(self._plan(cfg))
        except QRAError:
            return  # the args validator names the broken plan in one line
        if blocked:  # before Axolotl's validation auto-enables the Triton LoRA kernels for a (Q)LoRA YAML
            for key in KERNEL_KEYS:
                if cfg.get(key) is None:
                    cfg[key] = False

    def get_input_args(self) -> str:
        return "qra_plugin.axolotl.args.QRAArgs"

    def _plan(self, cfg: Any) -> Plan | None:
        path = cfg.get("qra_plan")
        if not path:
            return None
        if path not in self._plans:
            self._plans[path] = Plan.load(path)
        return self._plans[path]

    def pre_model_load(self, cfg: Any) -> None:
        plan = self._plan(cfg)
        if plan is None:
            return
        check_sharding(plan, sharding=sharding_of(cfg), half_precision=bool(cfg.get("bf16") or cfg.get("fp16")))
        # The plan, not lora_target_linear, decides which modules get an adapter (rank 0 = none).
        cfg["lora_target_modules"] = plan.lora_targets()
        cfg["lora_target_linear"] = False
        if kernels_blocked_by(plan):
            for key in KERNEL_KEYS:
                cfg[key] = False
        log.info("qra: plan %s: %s", cfg.get("qra_plan"), plan.summary())

    def get_lora_config_kwargs(self, cfg: Any) -> dict:
        plan = self._plan(cfg)
        if plan is None:
            return {}
        patterns = rank_alpha_patterns(plan)
        return {"rank_pattern": patterns["rank_pattern"], "alpha_pattern": patterns["alpha_pattern"]}

    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        plan = self._plan(cfg)
        if plan is None:
            return
        if not cfg.get("qra_check_fingerprint", True):
            plan = plan.model_copy(update={"fingerprint": fingerprint(model)})
        with gathered(model):  # ZeRO-3's zero.Init left only partitions: prune/quantize the whole weights
            prune_model(model, plan)  # prune, then quantize; LoRA comes next, on the pruned shapes
            quantize_model(model, plan)

    def post_lora_load(self, cfg: Any, model: Any) -> None:
        """PEFT has made the adapters: start the ones the plan initialises from its init file (every rank).
        A run that loads a trained adapter (``lora_model_dir``) keeps it."""
        plan = self._plan(cfg)
        if plan is not None and not cfg.get("lora_model_dir"):
            apply_adapter_init(model, plan)

    def post_model_load(self, cfg: Any, model: Any) -> None:
        plan = self._plan(cfg)
        if plan is None:
            return
        report = memory_report(model)
        log.info("qra: measured weights: %s", report.summary())
        out = cfg.get("output_dir")
        if out and _is_main_process():
            # the copy names its init file absolutely: a relative name would resolve against output_dir
            record = plan.model_copy(update={"init_file": str(plan.init_path())}) if plan.init_file else plan
            record.save(Path(out) / "qra_plan.yaml")
            write_json_atomic(Path(out) / "qra_memory.json", report.to_dict())

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        plan = self._plan(cfg)
        if plan is None:
            return []
        from qra_plugin.trl import QRACallback

        return [QRACallback(plan=plan, stop_at_step=cfg.get("qra_stop_at_step"))]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true")


def warn_offline_telemetry() -> bool:
    """On a machine marked offline (``HF_HUB_OFFLINE``), Axolotl's telemetry (on unless ``AXOLOTL_DO_NOT_TRACK``
    or ``DO_NOT_TRACK``) has already queued an upload by the time a plugin runs: at exit the process waits on
    its retries (measured: no exit within 300 s after training). A plugin cannot cancel it, so say what to set."""
    if not _truthy("HF_HUB_OFFLINE") or _truthy("AXOLOTL_DO_NOT_TRACK") or _truthy("DO_NOT_TRACK"):
        return False
    log.warning(
        "qra: HF_HUB_OFFLINE is set but Axolotl's telemetry is on: its upload will hold this process after "
        "training; run `AXOLOTL_DO_NOT_TRACK=1 axolotl train ...` on offline machines"
    )
    return True


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
