"""Score a plan at a fidelity level with a real short TRL SFT run (quantize + LoRA via ``apply_plan``).

The published AutoQRA code scores candidates with a synthetic proxy; here every score is measured after
``level.steps`` real optimizer steps: the held-out eval loss, and the config's objective when it is another
(``planner.objectives``: an lm-eval task on the trained model). Base weights and tokenized datasets are cached
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
from typing import Any

import torch

from planner.config import FidelityLevel, ModelSection, QRAConfig
from planner.data.sources import examples, sft_rows
from planner.data.tokenized import tokenized_rows
from planner.fidelity.adapter_start import error_init_for, wants_error_init
from planner.fidelity.contract import EvalResult, EvalTask, Status, level_settings
from planner.fidelity.meter import ActivationMeter, plan_scaled_bytes, state_bytes
from planner.fidelity.metrics import answer_accuracy
from planner.fidelity.packing import flattening_refusal
from planner.fidelity.quantized import STATS, prequantize
from planner.loading import load_model, load_tokenizer
from planner.memory.optimizers import fidelity_refusal
from planner.objectives import objective_for
from planner.settings import TrainingSettings
from qra_plugin import QRACallback, apply_plan
from qra_plugin.backends import reuse_dequantized_weights
from qra_plugin.errors import QRAError
from qra_plugin.quantize import model_compute_dtype
from qra_plugin.weight_memory import memory_report


# ---------------------------------------------------------------------------------------------- caches
@lru_cache(maxsize=2)
def _base_model_cached(model_json: str) -> torch.nn.Module:

    model = load_model(ModelSection.model_validate_json(model_json))
    model.requires_grad_(False)
    return model


@lru_cache(maxsize=2)
def _tokenizer_cached(model_json: str) -> Any:

    return load_tokenizer(ModelSection.model_validate_json(model_json))


def cached_tokenizer(section: ModelSection) -> Any:
    """The model's tokenizer, loaded once per process."""
    return _tokenizer_cached(section.model_dump_json())


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
    if config.data.source == "tokenized":
        from datasets import Dataset

        split = config.data.eval_split if split == "eval" else split
        return key, Dataset.from_list(tokenized_rows(config.data, split, n))
    return key, sft_rows(examples(config.data, split, n), bool(getattr(tokenizer, "chat_template", None)))


# ---------------------------------------------------------------------------------------------- the run
def _make_trainer_class():
    from trl import SFTTrainer

    class _MeteredSFTTrainer(SFTTrainer):
        """SFTTrainer that measures activation bytes and the optimizer state at its largest."""

        qra_meter: ActivationMeter | None = None
        qra_state_bytes: int = 0
        qra_plan_bytes: int | None = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            assert self.qra_meter is not None
            with self.qra_meter.step():
                loss = super().training_step(model, inputs, num_items_in_batch)
            return loss

    return _MeteredSFTTrainer


#: TRL ``loss_type`` per ``train.loss_path``: Liger and cut cross-entropy are the same NLL computed by kernels
#: that need CUDA; a fidelity run computes it with the model's own loss (same math, the memory model prices theirs)
TRL_LOSS_TYPE = {"trl_chunked": "chunked_nll", "hf_full": "nll", "liger": "nll", "cce": "nll"}


def _length_grouping(on: bool) -> dict[str, Any]:
    """Batches of rows of similar length (``LengthGroupedSampler``): transformers 5 names it
    ``train_sampling_strategy="group_by_length"``, 4.x ``group_by_length=True``."""
    if not on:
        return {}
    from transformers import TrainingArguments

    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _sft_args(task: EvalTask, level: FidelityLevel, workdir: str, job: TrainingSettings) -> Any:
    """The SFTConfig of one fidelity run: ``job`` (``TrainingSettings.of(config, level)``) says batch, sequence
    length, accumulation, optimizer, loss, packing, checkpointing and device; the train section the rest."""
    from trl import SFTConfig

    cfg = task.config
    return SFTConfig(
        output_dir=workdir,
        max_steps=max(level.steps, 1),
        per_device_train_batch_size=job.batch,
        per_device_eval_batch_size=cfg.fidelity.eval_batch,
        gradient_accumulation_steps=job.gradient_accumulation_steps,  # a step = one optimizer step
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_steps or round(cfg.train.warmup_ratio * level.steps),
        weight_decay=cfg.train.weight_decay,
        optim=job.optimizer,
        loss_type=TRL_LOSS_TYPE[job.loss_path],
        packing=job.packing,
        **_length_grouping(cfg.train.group_by_length),
        eval_packing=False,  # the score is the loss on the same held-out rows, packed training or not
        gradient_checkpointing=job.grad_checkpointing,
        max_length=job.seq_len,
        seed=task.seed,
        data_seed=task.seed,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN step loss must reach QRACallback, not the running mean
        eval_strategy="no",
        prediction_loss_only=True,  # the score is the loss: no vocabulary-wide logits kept across eval batches
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=job.device == "cpu",
        bf16=False,  # the model is loaded in ``job.precision`` and trains in it: no autocast
        fp16=False,
        dataloader_num_workers=0,
    )


def _build_trainer(
    task: EvalTask, level: FidelityLevel, peft_model: Any, tokenizer: Any, workdir: str, job: TrainingSettings
) -> Any:
    """An SFTTrainer over the fixed train/eval samples, with the stop callback and memory meters attached."""
    import datasets
    from transformers.trainer_callback import PrinterCallback, TrainerCallback

    cfg = task.config
    seq_len = job.seq_len
    train_key, train_ds = _dataset(cfg, "train", level.train_examples or cfg.data.train_examples, seq_len, tokenizer)
    eval_key, eval_ds = _dataset(cfg, cfg.data.eval_split, level.eval_examples, seq_len, tokenizer)
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
                trainer.qra_plan_bytes = plan_scaled_bytes(model, optimizer)

    progress = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        trainer = _make_trainer_class()(
            model=peft_model,
            args=_sft_args(task, level, workdir, job),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            callbacks=[callback, _OptimizerBytes()],
        )
    finally:
        if progress:
            datasets.enable_progress_bars()
    trainer.remove_callback(PrinterCallback)
    if cfg.train.padding_free and not job.packing:
        _flatten_batches(trainer)
    trainer.qra_meter = ActivationMeter(peft_model)
    trainer.qra_callback = callback
    _PROCESSED.setdefault(train_key, trainer.train_dataset)
    _PROCESSED.setdefault(eval_key, trainer.eval_dataset)
    return trainer


def _flatten_batches(trainer: Any) -> None:
    """TRL's padding-free collator on rows TRL has already cut to ``max_length`` (its ``padding_free=True``
    without packing refuses a ``max_length``): each batch of train and eval rows becomes one row. An eval
    batch then counts as one row in the eval loss's mean over batches, as equal as full batches were."""
    import dataclasses

    trainer.data_collator = dataclasses.replace(trainer.data_collator, padding_free=True)
    trainer.padding_free = True


def _timed_train(trainer: Any, steps: int, on_cuda: bool) -> tuple[float | None, float | None]:
    """(mean train loss, seconds inside ``train()``); (None, None) for a 0-step level."""
    if steps <= 0:
        return None, None
    if on_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = trainer.train()
    if on_cuda:
        torch.cuda.synchronize()
    return float(out.training_loss), time.perf_counter() - start


def _outcome(stop_reason: str | None, eval_loss: float, steps: int) -> tuple[Status, str | None]:
    """ok / failed (non-finite loss, the plan's own fault: kept on resume) / stopped (hopeless loss)."""
    if stop_reason and stop_reason.startswith("non-finite"):
        return "failed", f"non-finite train loss at step {steps}"
    if not math.isfinite(eval_loss):
        return "failed", "non-finite eval loss"
    if stop_reason and not stop_reason.startswith("reached step"):
        return "stopped", None
    return "ok", None


def _train_and_eval(task: EvalTask, level: FidelityLevel, workdir: str) -> EvalResult:
    import transformers

    cfg = task.config
    job = TrainingSettings.of(cfg, level)  # device: where this process trains (CUDA when it has one)
    refusal = fidelity_refusal(job.optimizer) or flattening_refusal(cfg)
    if refusal:  # never substitute another optimizer: the score would not be the user's job
        raise QRAError(refusal)
    started, layer_stats = time.perf_counter(), dict(STATS)
    tokenizer = cached_tokenizer(cfg.model)
    on_cuda = job.device == "cuda"
    model_json = cfg.model.model_dump_json()
    init_tensors = None
    if wants_error_init(task.plan):  # the candidate trains from the start its final plan's init file gives
        init_tensors = error_init_for(cfg, task.plan, _base_model_cached(model_json), model_json)
    model = fresh_model(cfg.model).to("cuda" if on_cuda else "cpu")
    if not on_cuda:
        prequantize(model, task.plan, model_json, model_compute_dtype(model))
    transformers.set_seed(task.seed)  # LoRA init
    peft_model = apply_plan(model, task.plan, init_tensors=init_tensors, lora_dropout=cfg.train.lora_dropout)
    if not on_cuda and cfg.fidelity.reuse_dequantized:
        reuse_dequantized_weights(peft_model)
    if on_cuda:  # after quantization freed the full-precision copy: the peak is what training needs
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = _build_trainer(task, level, peft_model, tokenizer, workdir, job)
    setup_s = time.perf_counter() - started
    train_loss, train_s = _timed_train(trainer, level.steps, on_cuda)
    eval_started = time.perf_counter()
    metrics = trainer.evaluate()
    steps = int(trainer.state.global_step)
    eval_loss = float(metrics["eval_loss"])
    token_acc = metrics.get("eval_mean_token_accuracy")
    if on_cuda:
        memory = int(torch.cuda.max_memory_allocated())
    else:
        memory = max(trainer.qra_state_bytes, state_bytes(peft_model, None)) + trainer.qra_meter.peak
    reason = trainer.qra_callback.stop_reason
    status, error = _outcome(reason, eval_loss, steps)
    accuracy = objective_value = None
    if level.accuracy and status != "failed":
        accuracy = answer_accuracy(peft_model, tokenizer, examples(cfg.data, cfg.data.eval_split, level.eval_examples))
    if status == "ok":  # a stopped run's score is never used; a failed one has none
        objective_value = objective_for(cfg).measure(peft_model, tokenizer, cfg)
    eval_s = time.perf_counter() - eval_started
    return EvalResult(
        status=status,
        eval_loss=eval_loss if math.isfinite(eval_loss) else None,
        accuracy=accuracy,
        token_accuracy=float(token_acc) if token_acc is not None else None,
        train_loss=train_loss if train_loss is None or math.isfinite(train_loss) else None,
        memory_measured=memory,
        plan_bytes_measured=trainer.qra_plan_bytes,
        weight_bytes=memory_report(peft_model).total_bytes,
        steps=steps,
        error=error,
        failure="deterministic" if status == "failed" else None,
        stop_reason=reason,
        train_s=train_s,
        setup_s=setup_s,
        eval_s=eval_s,
        layers_quantized=STATS["misses"] - layer_stats["misses"],
        layers_loaded=STATS["disk_hits"] - layer_stats["disk_hits"],
        objective_value=objective_value,
    )


def run_fidelity(task: EvalTask) -> EvalResult:
    """A real short SFT run of ``task.plan`` at ``task.level``, scored by held-out eval loss and the objective.

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
