"""An Axolotl YAML read as a qra config: Axolotl's keys say the training job, ``qra:`` says the planner's part."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from planner.axolotl.data import export_rows
from planner.config import LR_SCHEDULERS, QRAConfig
from planner.memory.optimizers import check_optimizer
from qra_plugin.axolotl.args import HOME_PATH_KEYS, KERNEL_KEYS, expand_home, plan_conflict, take_over_quantization
from qra_plugin.errors import QRAError
from qra_plugin.plan import one_line_validation_error

#: Axolotl keys that hold a local path a user may type with ``~`` (the plugin's ``register`` expands the first three)
PATH_KEYS = (*HOME_PATH_KEYS, "dataset_prepared_path", "output_dir")


def is_axolotl_yaml(raw: dict[str, Any]) -> bool:
    """An Axolotl config names ``base_model``; a qra-native one has a ``model`` section instead."""
    return "base_model" in raw


def _expanded(raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    expand_home(out, PATH_KEYS)
    return out


def _model_dir(base_model: str) -> Path:
    """A local model directory, or the hub cache's snapshot of ``base_model`` (qra never downloads)."""
    path = Path(base_model)
    if (path / "config.json").is_file():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_model, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means: not available offline
        raise QRAError(
            f"base_model: {base_model} is neither a local model directory nor in the Hugging Face cache "
            "(qra runs offline: download it first)"
        ) from None


def _refuse_conflicts(raw: dict[str, Any], prepare_data: bool) -> None:
    """What Axolotl would accept but a qra plan cannot train with or search on: one line naming the key."""
    if prepare_data and not raw.get("val_set_size") and not raw.get("test_datasets"):
        raise QRAError(
            "val_set_size: qra scores candidates on rows no run trains on: set val_set_size (e.g. 0.05) "
            "or test_datasets"
        )

    conflict = plan_conflict(raw)
    if conflict:
        raise QRAError(conflict)


def axolotl_settings(path: Path, raw: dict[str, Any]) -> Any:
    """Axolotl's own validated and normalised config (``axolotl.cli.config.load_cfg``), one line if it rejects.

    ``qra_plan`` is left out: the plan may not exist yet (``qra search`` writes it).
    """
    config = {k: v for k, v in raw.items() if k != "qra_plan"}
    take_over_quantization(config)  # validate the job the plugin will run: the plan quantizes, not Axolotl
    for key in KERNEL_KEYS:  # no plan yet: keep Axolotl from auto-enabling kernels (and from printing so)
        if config.get(key) is None:
            config[key] = False
    try:
        with _environment_restored():  # before axolotl.cli's import: it configures Axolotl's logging
            from axolotl.cli.config import load_cfg
            from axolotl.utils.dict import DictDefault

            with _no_sharded_launch():
                return load_cfg(DictDefault(config))
    except ValidationError as exc:
        raise QRAError(f"{path}: Axolotl rejects this config: {one_line_validation_error(exc)}") from None
    except (ValueError, OSError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QRAError(f"{path}: Axolotl rejects this config: {first}") from None


@contextmanager
def _environment_restored() -> Iterator[None]:
    """``load_cfg`` exports ``ACCELERATE_*`` / ``FSDP_*`` / log levels into ``os.environ``; reading a YAML must
    not change what the planner's later launches (fidelity workers, a user's ``axolotl train``) inherit. Axolotl
    logs at WARNING meanwhile (else it prints the whole normalised config)."""
    before = dict(os.environ)
    os.environ.update(AXOLOTL_DO_NOT_TRACK="1", AXOLOTL_LOG_LEVEL="WARNING")
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


#: the keys with which Axolotl's ``prepare_optim_env`` readies this process for a sharded launch
SHARDING_KEYS = ("deepspeed", "fsdp", "fsdp_config")


@contextmanager
def _no_sharded_launch() -> Iterator[None]:
    """``load_cfg`` ends by readying this process to train (``axolotl/utils/trainer.py`` ``prepare_optim_env``):
    under ``deepspeed:`` it sets ``ACCELERATE_USE_DEEPSPEED`` and, with one process, runs
    ``deepspeed.comm.init_distributed(dist_backend="nccl")``; under ``fsdp:`` ``ACCELERATE_USE_FSDP``. The
    planner only reads the YAML and runs its fidelity runs unsharded here, so that step runs as for a YAML
    without those keys (the planner prices the sharding itself: ``yaml_sharding``)."""
    import axolotl.cli.config as cli_config

    original = cli_config.prepare_optim_env

    def unsharded(cfg: Any) -> None:
        kept = {key: cfg.get(key) for key in SHARDING_KEYS}
        cfg.update(dict.fromkeys(SHARDING_KEYS))
        try:
            original(cfg)
        finally:
            cfg.update(kept)

    cli_config.prepare_optim_env = unsharded
    try:
        yield
    finally:
        cli_config.prepare_optim_env = original


def _dtype_name(torch_dtype: Any) -> str:
    name = str(torch_dtype).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _value(setting: Any) -> Any:
    return getattr(setting, "value", setting)  # Axolotl normalises some keys to enums


def loss_path(ax: Any) -> str:
    """The loss Axolotl's trainer runs: a loss plugin's kernel when the YAML enables one, else transformers'
    model loss on the full logits (``AxolotlTrainer`` subclasses ``transformers.Trainer``). Liger's plain
    ``liger_cross_entropy`` still builds the full logits, so only its fused linear variant changes the path."""
    plugins = " ".join(str(p) for p in (ax.get("plugins") or [])).lower()
    if "cut_cross_entropy" in plugins and ax.get("cut_cross_entropy"):
        return "cce"
    if "liger" in plugins and ax.get("liger_fused_linear_cross_entropy"):
        return "liger"
    return "hf_full"


def _train_section(ax: Any) -> dict[str, Any]:
    """The training job as Axolotl will run it (micro batch, not the accumulated batch: memory is per step;
    a fidelity step is one optimizer step of ``micro_batch_size x gradient_accumulation_steps`` rows)."""
    return {
        "batch": int(ax.micro_batch_size),
        "seq_len": int(ax.sequence_len),
        "optimizer": str(_value(ax.optimizer) or "adamw_torch"),
        "grad_checkpointing": bool(ax.gradient_checkpointing),
        "lr": float(ax.learning_rate),
        "warmup_ratio": float(ax.warmup_ratio or 0.0),
        "warmup_steps": int(ax.warmup_steps or 0),
        "gradient_accumulation_steps": int(ax.gradient_accumulation_steps or 1),
        "lora_dropout": float(ax.lora_dropout or 0.0),
        "lr_scheduler": str(_value(ax.lr_scheduler) or "cosine"),  # Axolotl's default scheduler
        "weight_decay": float(ax.weight_decay or 0.0),
        "packing": bool(ax.sample_packing),
        "group_by_length": bool(ax.group_by_length),
        "loss_path": loss_path(ax),
    }


def yaml_sharding(raw: dict[str, Any], path: Path | str = "config") -> str | None:
    """The ``planner.sharding`` name of what an Axolotl YAML's ``deepspeed`` / ``fsdp`` keys ask for (None:
    neither): DeepSpeed's ZeRO stage (``zero_optimization.stage`` of the JSON it names) or FSDP2
    (``fsdp_version: 2``). FSDP1 is refused: it flattens a unit into one float parameter (no HQQ plan trains
    there, ``qra_plugin.distributed``) and is not priced per rank."""
    from qra_plugin.axolotl.plugin import sharding_of
    from qra_plugin.distributed import deepspeed_stage

    found = sharding_of(raw)
    if found == "fsdp1":
        raise QRAError(f"{path}: FSDP1 is not priced per rank; set fsdp_version: 2")
    if found == "zero2":  # stages 0-2 (stage 0: DeepSpeed's data parallelism, nothing partitioned)
        return {0: "ddp", 1: "zero1"}.get(deepspeed_stage(raw.get("deepspeed")) or 0, "zero2")
    return {"fsdp": "fsdp2"}.get(found, found)


def written_budget(raw: dict[str, Any]) -> str:
    """The memory of the job as the YAML writes it, as a budget: every block at Axolotl's quantization
    (QLoRA: bitsandbytes nf4 with double-quantized absmax, Axolotl's defaults; ``load_in_8bit``: LLM.int8;
    else unquantized) and rank ``lora_r``, priced with the YAML's optimizer, batch and sequence length."""
    rank = int(raw.get("lora_r") or 8)
    if raw.get("load_in_4bit") or raw.get("adapter") == "qlora":
        return f"uniform:4bit-bnb:r{rank}"
    if raw.get("load_in_8bit"):
        return f"uniform:8bit-bnb:r{rank}"
    return f"uniform:16bit:r{rank}"


def _adapter_section(ax: Any, section: dict[str, Any]) -> dict[str, Any]:
    """The user's ``lora_r`` / ``lora_alpha`` are what the LoRA scale rule keeps (``qra.adapter`` overrides)."""
    tuned = {}
    if ax.get("lora_r") and ax.get("lora_alpha"):
        tuned = {"lora_r": int(ax.lora_r), "lora_alpha": float(ax.lora_alpha)}
    return {**tuned, **(section.pop("adapter", None) or {})}


def qra_config(path: Path, raw: dict[str, Any], ax: Any, data: dict[str, Any]) -> QRAConfig:
    """The qra config of an Axolotl YAML: its ``qra:`` section plus what Axolotl's keys say; without a
    ``qra.budget`` the budget is the job as written (``written_budget``)."""

    section = dict(raw.get("qra") or {})
    sizes = section.pop("data", None) or {}
    # the launcher, not the YAML, says how many ranks: ``qra.world_size`` prices one of them
    train = {**_train_section(ax), "sharding": yaml_sharding(raw, path), "world_size": section.pop("world_size", 1)}
    try:
        check_optimizer(train["optimizer"])
    except ValueError as exc:  # Axolotl's key, not the qra section's
        raise QRAError(f"{path}: optimizer: {exc}") from None
    if train["lr_scheduler"] not in LR_SCHEDULERS:
        raise QRAError(
            f"{path}: lr_scheduler: {train['lr_scheduler']} is not one qra's fidelity runs build "
            f"({', '.join(LR_SCHEDULERS)})"
        )
    values = {
        "adapter": _adapter_section(ax, section),
        "name": section.pop("name", path.stem),
        "model": {"path": str(raw["base_model"]), "dtype": _dtype_name(ax.torch_dtype)},
        "train": train,
        "data": {**data, **sizes},
        "budget": section.pop("budget", None) or written_budget(raw),
        **section,
    }
    try:
        return QRAConfig.model_validate(values)
    except ValidationError as exc:
        raise QRAError(f"{path}: invalid qra section: qra.{one_line_validation_error(exc)}") from None


def load_axolotl(
    path: Path, raw: dict[str, Any], out_dir: Path | None, *, prepare_data: bool
) -> tuple[QRAConfig, Path, Path | None]:
    """(config, output directory, where Axolotl reads the plan) for an Axolotl YAML.

    ``prepare_data``: let Axolotl prepare the datasets and export the sample fidelity runs use (not needed
    by ``qra estimate``, whose config then keeps a placeholder data section nothing reads).
    """
    raw = _expanded(raw)
    _refuse_conflicts(raw, prepare_data)
    raw["base_model"] = str(_model_dir(str(raw["base_model"])))  # a cached hub id becomes its local snapshot
    ax = axolotl_settings(path, raw)
    provisional = qra_config(path, raw, ax, {})
    out = out_dir if out_dir is not None else Path("runs") / provisional.name
    plan_target = Path(raw["qra_plan"]) if raw.get("qra_plan") else None
    if not prepare_data:
        return provisional, out, plan_target

    files = export_rows(ax, out, provisional)
    return qra_config(path, raw, ax, {"source": "tokenized", **files}), out, plan_target
