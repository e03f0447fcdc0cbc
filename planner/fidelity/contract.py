"""The evaluation contract: what is asked (``EvalTask``), what comes back (``EvalResult``), and the key
that says when a stored result may be reused.

A stored score is reused only for the same plan, level, seed **and recipe**: the recipe hash covers
everything else that can change the number — the level's steps/data/eval size, the train section,
the fidelity settings that act on a run, the model (its files' contents, not only its shapes), the
data (its files' contents) and ``FIDELITY_VERSION`` of this code. Rows of other recipes stay in the
store side by side (a reverted change finds its old scores again) and are never read for this one.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import cached_property, lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from planner.config import DataSection, FidelityLevel, ModelSection, QRAConfig
from planner.data.sources import source_files
from planner.loading import resolve_model_path
from planner.objectives import objective_for
from qra_plugin.errors import QRAError
from qra_plugin.plan import Plan

#: Bump when the fidelity run itself changes what it measures (training loop, loss, eval, metric).
FIDELITY_VERSION = 3
#: Bump when the error-aware adapter init's math changes (planner.priors.adapter_init, fidelity.adapter_start).
ADAPTER_INIT_VERSION = 1

Status = Literal["ok", "failed", "stopped"]
#: transient failures (timeout, OOM, a killed worker) are retried once on resume; deterministic ones are kept
Failure = Literal["transient", "deterministic"]
EvalKey = tuple[str, str, int, str]  # (plan hash, level, seed, recipe hash)
LEVELS = ("low", "high", "confirm")


class EvalTask(BaseModel):
    """One evaluation to run: a plan at a fidelity level with a seed (picklable, JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid")

    plan: Plan
    level: Literal["low", "high", "confirm"]
    seed: int
    config: QRAConfig
    tag: str = ""
    memory_predicted: int | None = None

    @cached_property
    def recipe_hash(self) -> str:
        """Computed once per task (it stats and hashes the model and data files); never serialised."""
        return recipe_hash(self.config, self.level)

    @cached_property
    def key(self) -> EvalKey:
        """What identifies an evaluation in the store: never recompute the same (plan, level, seed, recipe)."""
        return (self.plan.content_hash(), self.level, self.seed, self.recipe_hash)


class EvalResult(BaseModel):
    """What one evaluation measured.

    ``memory_measured`` (bytes): on CUDA the peak allocated memory of the run; on CPU the measured
    bytes of weights + LoRA + LoRA grads + optimizer states + the peak of tensors autograd saved for
    backward in one step — real tensors, but *not* the allocator peak the memory model predicts
    (no logits/loss buffers): compare it with the model's ``saved + states`` parts, not its total.
    ``weight_bytes``: weights incl. LoRA as held after quantization (``qra_plugin.weight_memory``).
    """

    model_config = ConfigDict(extra="forbid")

    status: Status
    eval_loss: float | None = None
    accuracy: float | None = None
    train_loss: float | None = None
    memory_measured: int | None = None
    #: measured planned weights + LoRA + its grads + optimizer states: what a ``plan:`` budget predicts
    plan_bytes_measured: int | None = None
    weight_bytes: int | None = None
    wall_s: float = 0.0
    steps: int = 0
    error: str | None = None
    failure: Failure | None = None
    token_accuracy: float | None = None
    stop_reason: str | None = None
    #: seconds inside ``trainer.train()`` only (no load, quantization or eval): step time = train_s / steps
    train_s: float | None = None
    #: seconds before training (model copy, quantization, LoRA, trainer) and scoring (eval loss, accuracy)
    setup_s: float | None = None
    eval_s: float | None = None
    #: quantized layers this run made / loaded from the layer cache's disk (CPU; the rest came from memory)
    layers_quantized: int | None = None
    layers_loaded: int | None = None
    #: the value of a non-default objective (``planner.objectives``; an lm-eval task's metric), None for eval_loss
    objective_value: float | None = None

    @classmethod
    def failed(cls, reason: str, wall_s: float = 0.0, failure: Failure | None = None) -> EvalResult:
        line = one_line(reason)
        return cls(status="failed", error=line, wall_s=wall_s, failure=failure or classify_failure(line))


_TRANSIENT_MARKS = (
    "timed out",
    "out of memory",
    "memoryerror",
    "cannot allocate memory",
    "worker was killed",
    "worker died",
    "workercrashed",
)


def classify_failure(message: str) -> Failure:
    """A timeout, an OOM or a dead worker may not happen again on a quieter machine; anything the plan
    itself raised (or a non-finite loss) will."""
    text = message.lower()
    return "transient" if any(mark in text for mark in _TRANSIENT_MARKS) else "deterministic"


def one_line(text: str, limit: int = 300) -> str:
    """Store and CLI messages are one line; keep the last line of a traceback-like text."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "unknown error"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def level_settings(config: QRAConfig, level: str) -> FidelityLevel:
    level_cfg = getattr(config.fidelity, level, None) if level in LEVELS else None
    if not isinstance(level_cfg, FidelityLevel):
        unset = " (fidelity.confirm is not set)" if level == "confirm" else ""
        raise QRAError(f"unknown fidelity level {level!r}{unset}: use 'low', 'high' or a set 'confirm'")
    return level_cfg


def timeout_scale(config: QRAConfig, level: str) -> float:
    """How many high-fidelity runs' time a run of ``level`` may take (``fidelity.timeout_s`` is sized for one)."""
    if level != "confirm" or config.fidelity.confirm is None:
        return 1.0
    return max(1.0, config.fidelity.confirm.steps / max(config.fidelity.high.steps, 1))


def fidelity_levels(config: QRAConfig) -> tuple[str, ...]:
    """The levels a search of ``config`` runs: low, high, and confirm when it is set."""
    return LEVELS if config.fidelity.confirm is not None else LEVELS[:2]


# ---------------------------------------------------------------------------------------------- recipe
#: fidelity settings that decide where, when or how fast a run goes, never what it measures; every other field
#: of the section (today's and any added later) is part of the recipe, so a new setting cannot be forgotten.
#: ``torch_threads``: 1 and 2 threads gave bit-identical losses on tiny models and on SmolLM2-135M (HQQ 4-bit
#: r16, 2 steps: 2.52870774269104 both); ``reuse_dequantized``: the same matmul on the same tensor — both
#: re-checked bit for bit by tests (test_store_key.py, test_fidelity.py)
_RESULT_NEUTRAL = frozenset(
    {
        "low",
        "high",
        "confirm",
        "seeds",
        "subprocess",
        "timeout_s",
        "workers",
        "layer_cache",
        "torch_threads",
        "reuse_dequantized",
    }
)
#: train fields that say only where the final job runs (ranks, sharding): a fidelity run is one process either way
_TRAIN_NEUTRAL = frozenset({"world_size", "sharding"})
#: train fields added after results were stored: in the recipe only when not at their default (which is what
#: every stored run did), so older keys stay valid
_TRAIN_NEW_DEFAULTS = {"group_by_length": False, "padding_free": False}


def _train_neutral(config: QRAConfig) -> set[str]:
    at_default = {k for k, v in _TRAIN_NEW_DEFAULTS.items() if getattr(config.train, k) == v}
    return set(_TRAIN_NEUTRAL) | at_default


#: where the recipe holds each field of a fidelity run's ``TrainingSettings`` (a dotted path in ``recipe()``);
#: the fields not here are ``_TRAIN_NEUTRAL``. A field added to the value and to neither fails
#: tests/test_settings.py. The recipe keeps hashing the train section whole (every stored key stays valid);
#: ``adapter_precision``: fidelity runs keep PEFT's fp32 adapters, a constant of this code (``FIDELITY_VERSION``)
SETTINGS_IN_RECIPE = {
    "batch": "level.batch",
    "seq_len": "level.seq_len",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "optimizer": "train.optimizer",
    "grad_checkpointing": "train.grad_checkpointing",
    "packing": "train.packing",
    "loss_path": "train.loss_path",
    "precision": "model.dtype",
    "adapter_precision": "fidelity_version",
    "device": "device",
}
#: packages whose code computes a fidelity score (training loop, tokenizer, quantizers, LoRA)
LIBRARIES = ("torch", "transformers", "tokenizers", "trl", "peft", "accelerate", "datasets", "hqq", "bitsandbytes")


#: the objective's fields: the objective adds its own recipe entry, and only when it is not eval_loss, so every
#: config from before the objective hook keeps its recipe hash (``planner.objectives.Objective.recipe``)
_OBJECTIVE_FIELDS = frozenset({"objective", "lm_eval"})


def recipe(config: QRAConfig, level: str) -> dict[str, Any]:
    """Everything besides (plan, seed) that can change a fidelity run's result, as plain JSON."""
    lv = level_settings(config, level)
    fid = config.fidelity
    fidelity = {k: v for k, v in fid.model_dump(mode="json").items() if k not in _RESULT_NEUTRAL | _OBJECTIVE_FIELDS}
    objective = objective_for(config).recipe(config)
    return ({"objective": objective} if objective is not None else {}) | {
        "fidelity_version": FIDELITY_VERSION,
        "level": lv.model_dump(mode="json")
        | {
            "train_examples": lv.train_examples or config.data.train_examples,
            "seq_len": lv.seq_len or config.train.seq_len,
            "batch": lv.batch or config.train.batch,
        },
        "train": config.train.model_dump(mode="json", exclude=_train_neutral(config)),
        "fidelity": fidelity,
        # how ``init: error`` adapters are computed (the plan says which modules use it and their alphas)
        "adapter_init": {"version": ADAPTER_INIT_VERSION, "damping": config.adapter.damping},
        "device": device_identity(),
        "libraries": library_versions(),
        "model": config.model.model_dump(mode="json") | {"weights": model_identity(config.model.model_dump_json())},
        "data": config.data.model_dump(mode="json") | {"files": data_identity(config.data.model_dump_json())},
    }


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Installed versions of ``LIBRARIES`` ("absent" for one not installed), read once per process."""

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@lru_cache(maxsize=1)
def device_identity() -> str:
    """Where fidelity runs execute: "cpu" or the CUDA device's name (their kernels round differently)."""
    import torch

    return f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"


def recipe_hash(config: QRAConfig, level: str) -> str:
    """Short hash of ``recipe``; cheap after the first call (file digests are cached by size and mtime)."""
    return hashlib.sha256(json.dumps(recipe(config, level), sort_keys=True).encode()).hexdigest()[:16]


def recipe_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the recipe entries that differ (``level.steps``, ``model.weights`` …)."""
    names: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += recipe_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


#: a file changed less than this long ago may change again within its mtime's resolution (git's "racily
#: clean" case: two same-size writes in one clock tick share an mtime), so its digest is not cached
RACY_WINDOW_NS = 2_000_000_000


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if time.time_ns() - stat.st_mtime_ns < RACY_WINDOW_NS:
        return _file_digest_cached.__wrapped__(*key)
    return _file_digest_cached(*key)


@lru_cache(maxsize=256)
def _file_digest_cached(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
#: files besides the weights that change what a run computes: the architecture, the tokenizer (vocabulary,
#: merges, special tokens) and the chat template prompts are rendered with
MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.json",
        "chat_template.jinja",
    }
)


def _identifies_model(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in MODEL_FILES


def model_identity(model_json: str) -> str:
    """Content hash of the model's weight files (a same-shape checkpoint is another model); tiny models
    are built in code from their (seeded) section, which the recipe already holds."""

    path = resolve_model_path(ModelSection.model_validate_json(model_json))
    if path is None:
        return "built-in-code"
    files = sorted(p for p in path.iterdir() if p.is_file() and _identifies_model(p.name))
    return hashlib.sha256("".join(f"{p.name}:{_file_digest(p)};" for p in files).encode()).hexdigest()[:16]


def data_identity(data_json: str) -> str:
    """Content hash of the files the data section reads (jsonl files, or the shipped wiki summaries)."""

    files = source_files(DataSection.model_validate_json(data_json))
    return hashlib.sha256("".join(f"{p.name}:{_file_digest(p)};" for p in files).encode()).hexdigest()[:16]
