"""TRL / transformers Trainer integration: a callback that logs the plan and can stop hopeless runs.

Typical SFTTrainer script::

    model = AutoModelForCausalLM.from_pretrained(path)
    model = apply_plan(model, "plan.yaml")            # quantize + per-module LoRA
    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                         callbacks=[QRACallback(stop_if_loss_above=6.0)])
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from qra_plugin.io import write_json_atomic
from qra_plugin.plan import Plan
from qra_plugin.weight_memory import memory_report

log = logging.getLogger("qra")


def _agree_on_stop(local_stop: bool) -> bool:
    """Every rank must take the same decision, or DDP hangs at the next collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([1.0 if local_stop else 0.0])
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)
    return local_stop


class QRACallback(TrainerCallback):
    """Logs the applied plan and measured memory; optionally stops early; writes metrics for the planner.

    Args:
        stop_at_step: stop after this many optimizer steps (a fidelity level's budget).
        stop_if_loss_above: stop when the logged train loss exceeds this after ``min_steps`` steps.
        stop_on_nan: stop as soon as a logged loss is NaN/inf (always agreed across ranks).
        metrics_path: JSON file updated atomically with the latest train/eval metrics and stop reason.
    """

    def __init__(
        self,
        plan: Plan | None = None,
        stop_at_step: int | None = None,
        stop_if_loss_above: float | None = None,
        min_steps: int = 0,
        stop_on_nan: bool = True,
        metrics_path: str | Path | None = None,
    ) -> None:
        self.plan = plan
        self.stop_at_step = stop_at_step
        self.stop_if_loss_above = stop_if_loss_above
        self.min_steps = min_steps
        self.stop_on_nan = stop_on_nan
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.stop_reason: str | None = None
        self.metrics: dict[str, Any] = {"train_loss_history": [], "eval": []}

    # ---------------------------------------------------------------- logging
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if self.stop_on_nan and getattr(args, "logging_nan_inf_filter", False):
            # HF's default swaps a NaN/inf step loss for the running mean in the logs: we would never see it
            args.logging_nan_inf_filter = False
        model = kw.get("model")
        plan = self.plan or getattr(model, "qra_plan", None)
        if model is not None:
            report = memory_report(model)
            self.metrics["memory"] = report.to_dict() | {"modules": len(report.modules)}
            if state.is_world_process_zero:
                log.info("qra: plan %s", plan.summary() if plan else "(none attached)")
                log.info("qra: measured weights: %s", report.summary())
        if plan is not None:
            self.metrics["plan_hash"] = plan.content_hash()
        self._flush(state)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw: Any):
        logs = logs or {}
        loss = logs.get("loss")
        local_reason = None
        if loss is not None:
            self.metrics["train_loss_history"].append([state.global_step, float(loss)])
            if self.stop_on_nan and not math.isfinite(float(loss)):
                local_reason = "non-finite loss"
            elif (
                self.stop_if_loss_above is not None
                and state.global_step >= self.min_steps
                and float(loss) > self.stop_if_loss_above
            ):
                local_reason = f"loss {float(loss):.4f} above {self.stop_if_loss_above}"
        if _agree_on_stop(local_reason is not None):
            self._stop(control, local_reason or "another rank asked to stop")
        self._flush(state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        # global_step is identical on every rank, so this decision needs no collective.
        if self.stop_at_step is not None and state.global_step >= self.stop_at_step:
            self._stop(control, f"reached step {self.stop_at_step}")
            control.should_evaluate = args.eval_strategy != "no"

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kw):
        if metrics:
            self.metrics["eval"].append({"step": state.global_step, **{k: float(v) for k, v in metrics.items()}})
        self._flush(state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.metrics["global_step"] = state.global_step
        if torch.cuda.is_available():
            self.metrics["cuda_max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
        self._flush(state)

    # ---------------------------------------------------------------- helpers
    def _stop(self, control: TrainerControl, reason: str) -> None:
        """Stop training. A loss reason outranks "reached step N": Trainer calls ``on_step_end`` before
        ``on_log`` for the same step, so a bad loss on the last step arrives after the step budget."""
        if not control.should_training_stop:
            log.info("qra: stopping early: %s", reason)
        control.should_training_stop = True
        if self.stop_reason is None or self.stop_reason.startswith("reached step"):
            self.stop_reason = reason
        self.metrics["stop_reason"] = self.stop_reason

    def _flush(self, state: TrainerState) -> None:
        if self.metrics_path is not None and state.is_world_process_zero:
            write_json_atomic(self.metrics_path, json.loads(json.dumps(self.metrics, default=float)))
