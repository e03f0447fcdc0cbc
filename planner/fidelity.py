"""Score a plan at a fidelity level with a real short TRL SFT run (quantize + LoRA via ``apply_plan``).

The published AutoQRA code scores candidates with a synthetic proxy; here every score is the held-out
eval loss after ``level.steps`` real optimizer steps. Base weights and tokenized datasets are cached
per process, so a long-lived worker pays for them once; each evaluation trains a deep copy.
"""

from __future__ import annotations

import atexit
import copy
import gc
import json
import math
import tempfile
import time
from functools import lru_cache
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from planner.config import FidelityLevel, ModelSection, QRAConfig
from planner.fidelity_data import answer_accuracy, examples, sft_rows
from planner.fidelity_memory import ActivationMeter, state_bytes
from qra_plugin.errors import QRAError
from qra_plugin.plan import Plan

Status = Literal["ok", "failed", "stopped"]
EvalKey = tuple[str, str, int]


class EvalTask(BaseModel):
    """One evaluation to run: a plan at a fidelity level with a seed (picklable, JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid")

    plan: Plan
    level: Literal["low", "high"]
    seed: int
    config: QRAConfig
    tag: str = ""
    memory_predicted: int | None = None

    @property
    def key(self) -> EvalKey:
        """What identifies an evaluation in the store: never recompute the same (plan, level, seed)."""
        return (self.plan.content_hash(), self.level, self.seed)


class EvalResult(BaseModel):
    """What one evaluation measured.

    ``memory_measured`` (bytes): on CUDA the peak allocated memory of the run; on CPU the measured
    bytes of weights + LoRA + LoRA grads + optimizer states + the peak of tensors autograd saved for
    backward in one step (activations) — real tensors, not an estimate. ``weight_bytes``: weights
    incl. LoRA as held after quantization (``qra_plugin.weight_memory``).
    """

    model_config = ConfigDict(extra="forbid")

    status: Status
    eval_loss: float | None = None
    accuracy: float | None = None
    train_loss: float | None = None
    memory_measured: int | None = None
    weight_bytes: int | None = None
    wall_s: float = 0.0
    steps: int = 0
    error: str | None = None
    token_accuracy: float | None = None
    stop_reason: str | None = None
    #: seconds inside ``trainer.train()`` only (no load, quantization or eval): step time = train_s / steps
    train_s: float | None = None

    @classmethod
    def failed(cls, reason: str, wall_s: float = 0.0) -> EvalResult:
        return cls(status="failed", error=one_line(reason), wall_s=wall_s)


def one_line(text: str, limit: int = 300) -> str:
    """Store and CLI messages are one line; keep the last line of a traceback-like text."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "unknown error"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def level_settings(config: QRAConfig, level: str) -> FidelityLevel:
    level_cfg = getattr(config.fidelity, level, None)
    if not isinstance(level_cfg, FidelityLevel):
        raise QRAError(f"unknown fidelity level {level!r}: use 'low' or 'high'")
    return level_cfg


# ---------------------------------------------------------------------------------------------- caches
@lru_cache(maxsize=2)
def _base_model_cached(model_json: str) -> torch.nn.Module:
    from planner.loading import load_model

    model = load_model(ModelSection.model_validate_json(model_json))
    model.requires_grad_(False)
    return model


@lru_cache(maxsize=2)
def _tokenizer_cached(model_json: str) -> Any:
    from planner.loading import load_tokenizer

    return load_tokenizer(ModelSection.model_validate_json(model_json))


def fresh_model(section: ModelSection) -> torch.nn.Module:
    """A private copy of the cached base weights: evaluations quantize it in place, never the cache."""
    model = copy.deepcopy(_base_model_cached(section.model_dump_json()))
    model.train()
    return model


_PROCESSED: dict[str, Any] = {}  # tokenized datasets per (model, data, split, n, seq_len), filled by SFTTrainer


def _dataset(config: QRAConfig, split: str, n: int, seq_len: int, tokenizer: Any) -> tuple[str, Any]:
    """The cached tokenized dataset when a previous run made it, else the raw rows (SFTTrainer tokenizes)."""
    key = json.dumps([config.model.model_dump(), config.data.model_dump(), split, n, seq_len], sort_keys=True)
    if key in _PROCESSED:
        return key, _PROCESSED[key]
    return key, sft_rows(examples(config.data, split, n), bool(getattr(tokenizer, "chat_template", None)))


# ---------------------------------------------------------------------------------------------- the run
def _make_trainer_class():
    from trl import SFTTrainer

    class _MeteredSFTTrainer(SFTTrainer):
        """SFTTrainer that measures activation bytes and the optimizer state at its largest."""

        qra_meter: ActivationMeter | None = None
        qra_state_bytes: int = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            assert self.qra_meter is not None
            with self.qra_meter.step():
                loss = super().training_step(model, inputs, num_items_in_batch)
            return loss

    return _MeteredSFTTrainer


def _train_and_eval(task: EvalTask, level: FidelityLevel, workdir: str) -> EvalResult:
    import datasets
    import transformers
    from transformers.trainer_callback import PrinterCallback, TrainerCallback
    from trl import SFTConfig

    from qra_plugin import QRACallback, apply_plan
    from qra_plugin.weight_memory import memory_report

    cfg = task.config
    batch = level.batch or cfg.train.batch
    seq_len = level.seq_len or cfg.train.seq_len
    tokenizer = _tokenizer_cached(cfg.model.model_dump_json())
    on_cuda = torch.cuda.is_available()
    device = "cuda" if on_cuda else "cpu"

    model = fresh_model(cfg.model).to(device)
    transformers.set_seed(task.seed)  # LoRA init
    peft_model = apply_plan(model, task.plan)
    if on_cuda:  # after quantization freed the full-precision copy: the peak is what training needs
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    n_train = level.train_examples or cfg.data.train_examples
    train_key, train_ds = _dataset(cfg, "train", n_train, seq_len, tokenizer)
    eval_key, eval_ds = _dataset(cfg, "eval", level.eval_examples, seq_len, tokenizer)
    eval_items = examples(cfg.data, "eval", level.eval_examples)
    args = SFTConfig(
        output_dir=workdir,
        max_steps=max(level.steps, 1),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=cfg.fidelity.eval_batch,
        learning_rate=cfg.train.lr,
        warmup_steps=round(cfg.train.warmup_ratio * level.steps),
        optim=cfg.train.optimizer,
        gradient_checkpointing=cfg.train.grad_checkpointing,
        max_length=seq_len,
        seed=task.seed,
        data_seed=task.seed,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_cuda,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
    )
    callback = QRACallback(
        plan=task.plan,
        stop_at_step=level.steps,
        stop_if_loss_above=cfg.fidelity.stop_if_loss_above,
        min_steps=cfg.fidelity.min_steps,
        stop_on_nan=True,
    )

    class _OptimizerBytes(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step == 1:  # optimizer states exist after the first step and keep their size
                trainer.qra_state_bytes = state_bytes(model, optimizer)

    progress = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        trainer = _make_trainer_class()(
            model=peft_model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            callbacks=[callback, _OptimizerBytes()],
        )
    finally:
        if progress:
            datasets.enable_progress_bars()
    trainer.remove_callback(PrinterCallback)
    trainer.qra_meter = ActivationMeter(peft_model)
    _PROCESSED.setdefault(train_key, trainer.train_dataset)
    _PROCESSED.setdefault(eval_key, trainer.eval_dataset)

    train_loss = train_s = None
    if level.steps > 0:
        if on_cuda:
            torch.cuda.synchronize()
        train_start = time.perf_counter()
        out = trainer.train()
        if on_cuda:
            torch.cuda.synchronize()
        train_s = time.perf_counter() - train_start
        train_loss = float(out.training_loss)
    metrics = trainer.evaluate()
    steps = int(trainer.state.global_step)
    eval_loss = float(metrics["eval_loss"])
    token_acc = metrics.get("eval_mean_token_accuracy")
    weight_bytes = memory_report(peft_model).total_bytes
    if on_cuda:
        memory = int(torch.cuda.max_memory_allocated())
    else:
        memory = max(trainer.qra_state_bytes, state_bytes(peft_model, None)) + trainer.qra_meter.peak

    status: Status = "ok"
    error = None
    reason = callback.stop_reason
    if reason and reason.startswith("non-finite"):
        status, error = "failed", f"non-finite train loss at step {steps}"
    elif not math.isfinite(eval_loss):
        status, error = "failed", "non-finite eval loss"
    elif reason and not reason.startswith("reached step"):
        status = "stopped"
    return EvalResult(
        status=status,
        eval_loss=eval_loss if math.isfinite(eval_loss) else None,
        accuracy=answer_accuracy(peft_model, tokenizer, eval_items) if status != "failed" else None,
        token_accuracy=float(token_acc) if token_acc is not None else None,
        train_loss=train_loss if train_loss is None or math.isfinite(train_loss) else None,
        memory_measured=memory,
        weight_bytes=weight_bytes,
        steps=steps,
        error=error,
        stop_reason=reason,
        train_s=train_s,
    )


def run_fidelity(task: EvalTask) -> EvalResult:
    """A real short SFT run of ``task.plan`` at ``task.level``; held-out eval loss is the score.

    Raises on broken input or crashes (the executor records those as failed); a non-finite loss is a
    ``failed`` result, a run stopped by the hopeless-loss threshold is ``stopped``.
    """
    level = level_settings(task.config, task.level)
    threads = torch.get_num_threads()
    if task.config.fidelity.torch_threads:
        torch.set_num_threads(task.config.fidelity.torch_threads)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="qra-fid-") as workdir:
            result = _train_and_eval(task, level, workdir)
    finally:
        torch.set_num_threads(threads)
    result.wall_s = time.perf_counter() - start
    _freeze_heap_once()
    return result


_HEAP_FROZEN = False


def _freeze_heap_once() -> None:
    """After the first run (imports, cached weights and datasets alive), move the heap out of the GC's
    reach: accelerate's gc.collect() at the end of every train() then scans only new objects (0.9 s → ms)."""
    global _HEAP_FROZEN
    if not _HEAP_FROZEN:
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)  # let interpreter shutdown clean up as usual (no nanobind leak noise)
        _HEAP_FROZEN = True
