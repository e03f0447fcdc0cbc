"""The YAML config of ``qra profile`` / ``qra search`` / ``qra baseline``, validated with pydantic.

Each section belongs to one stage; unknown keys are errors so a typo never silently changes a run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from planner.data.lm_eval_tasks import SHIPPED as SHIPPED_TASKS
from planner.data.lm_eval_tasks import task_names as lm_eval_task_names
from qra_plugin.errors import QRAError
from qra_plugin.plan import one_line_validation_error


def read_yaml(path: Path) -> dict:
    """A YAML mapping, or one QRAError line naming the file."""
    if not path.is_file():
        raise QRAError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise QRAError(f"{path}: malformed YAML ({str(exc).strip().splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise QRAError(f"{path}: a config must be a YAML mapping")
    return data


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyModel(_Section):
    """A model built in code from a config (no weights file): for tests and the tiny search."""

    arch: Literal["llama", "qwen2"] = "llama"
    layers: int = Field(4, ge=1)
    hidden: int = Field(64, ge=16)
    vocab_size: int = Field(512, ge=64)
    seed: int = 0


class ModelSection(_Section):
    """Exactly one of ``path`` (a local HF dir, or ``demo`` for the bundled SmolLM2-135M) or ``tiny``."""

    path: str | None = None
    tiny: TinyModel | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.path (a local dir or 'demo') and model.tiny")
        return self


class DataSection(_Section):
    """SFT data: the bundled wiki summaries (``wiki``), their topic task with exact answers (``wiki_topic``),
    both mixed (``wiki_mix``), a local jsonl of text, prompt/completion, messages or alpaca rows, or
    ``tokenized`` jsonl rows of ``input_ids`` + ``labels`` (what ``qra`` exports from Axolotl's own dataset
    preparation, so fidelity runs train on exactly the tokens ``axolotl train`` will).

    Splits are disjoint and fixed: ``train`` (every run trains on it), ``selection`` (what fidelity runs
    score on) and ``test`` (for final fine-tunes only). ``eval_split`` says which one eval losses use.
    """

    source: Literal["wiki", "wiki_topic", "wiki_mix", "jsonl", "tokenized"] = "wiki"
    path: str | None = None
    eval_path: str | None = None
    test_path: str | None = None
    eval_split: Literal["selection", "test"] = "selection"
    train_examples: int = Field(256, ge=1)
    eval_examples: int = Field(32, ge=1)
    calibration_examples: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _path_for_jsonl(self) -> DataSection:
        if self.source in ("jsonl", "tokenized") and not self.path:
            raise ValueError(f"data.source {self.source!r} needs data.path")
        if self.source == "tokenized" and not self.eval_path:
            raise ValueError("data.source 'tokenized' needs data.eval_path (the selection rows)")
        return self


class SpaceSection(_Section):
    """The per-unit choices the planner searches over."""

    unit: Literal["block", "module"] = "block"
    bits: list[Literal[2, 3, 4, 8, 16]] = Field(default_factory=lambda: [2, 3, 4, 8])
    ranks: list[int] = Field(default_factory=lambda: [4, 8, 16, 32])
    backend: str = "hqq"
    #: structured pruning ratio(s) of each block's MLP channels and key/value groups. One ratio > 0: every
    #: candidate is pruned by it (RankAdaptor: bits and ranks are searched for the pruned model). Several:
    #: each block's ratio is searched with its bits and rank (AutoMixQ; needs ``unit: block``)
    prune: list[float] = Field(default_factory=lambda: [0.0])

    @model_validator(mode="after")
    def _sane(self) -> SpaceSection:
        from qra_plugin.backends import registry

        if any(r < 0 for r in self.ranks):
            raise ValueError("space.ranks must be >= 0")
        backends = {k: v for k, v in registry().items() if k != "none"}
        if self.backend not in backends:
            raise ValueError(f"space.backend must be one of {', '.join(sorted(backends))}, not {self.backend!r}")
        stores = backends[self.backend].bits | {16}
        if not set(self.bits) <= stores:
            raise ValueError(f"space.backend {self.backend!r} supports only bits {', '.join(map(str, sorted(stores)))}")
        self.bits = sorted(set(self.bits))
        self.ranks = sorted(set(self.ranks))
        if not self.prune or any(not 0 <= r < 1 for r in self.prune):
            raise ValueError("space.prune takes ratios in [0, 1)")
        self.prune = sorted(set(self.prune))
        if len(self.prune) > 1 and self.unit != "block":
            raise ValueError("space.prune: a searched pruning ratio is chosen per block; set space.unit: block")
        return self

    @property
    def searched_prune(self) -> list[float]:
        """The ratios each block chooses from (empty: pruning is fixed or off)."""
        return self.prune if len(self.prune) > 1 else []


#: HF schedulers a fidelity run builds from the train section alone (others need arguments qra does not carry)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")  # fmt: skip
#: the loss a trainer runs: TRL SFTTrainer's default chunked NLL (never builds batch x seq x vocab logits),
#: transformers' model loss (full fp32 logits; Axolotl's trainer without a loss plugin), Liger's fused
#: linear cross-entropy, Apple's cut cross-entropy (Axolotl plugins)
LOSS_PATHS = ("trl_chunked", "hf_full", "liger", "cce")


class TrainSection(_Section):
    """Training settings shared by the memory model, the fidelity runs and the final fine-tune."""

    batch: int = Field(4, ge=1)
    seq_len: int = Field(128, ge=8)
    #: an HF ``optim`` name whose state layout ``planner.memory.optimizers`` prices (fidelity runs build it)
    optimizer: str = "adamw_torch"
    grad_checkpointing: bool = False
    lr: float = Field(5e-4, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    #: warmup in optimizer steps; when > 0 it wins over ``warmup_ratio`` (as in HF's TrainingArguments)
    warmup_steps: int = Field(0, ge=0)
    #: micro-batches per optimizer step: a fidelity step is one optimizer step of ``batch x accumulation`` rows
    gradient_accumulation_steps: int = Field(1, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    #: an HF ``lr_scheduler_type`` that needs no extra arguments (``LR_SCHEDULERS``)
    lr_scheduler: str = "linear"
    weight_decay: float = Field(0.0, ge=0)
    #: TRL's best-fit-decreasing packing (Axolotl's ``sample_packing``): rows concatenated to ``seq_len``,
    #: kept apart by position ids (``planner.fidelity.sft.packing_refusal`` checks the model does so)
    packing: bool = False
    #: batches of rows of similar length (transformers' ``group_by_length``, Axolotl's key of that name): less
    #: padding per step; the rows a step sees change, so it enters the recipe when on (``fidelity/contract.py``)
    group_by_length: bool = False
    #: TRL's ``padding_free`` without packing: the same rows per step, each batch flattened into one row (position
    #: ids restarting, the packing rule keeping rows apart), so no FLOPs go to padding. The loss covers the same
    #: tokens; only the order of float sums changes, so it enters the recipe when on
    padding_free: bool = False
    #: the loss the trainer runs (``LOSS_PATHS``); the memory model prices its buffers
    loss_path: Literal["trl_chunked", "hf_full", "liger", "cce"] = "trl_chunked"
    #: ranks the real job trains on and how it shards (``planner.sharding``, as ``qra estimate --world-size
    #: --sharding``): budgets then count one rank's bytes, ``batch`` being each rank's micro batch. None and 1:
    #: one device. Fidelity runs stay one process, so neither enters the recipe (fidelity/contract.py)
    world_size: int = Field(1, ge=1)
    sharding: Literal["ddp", "zero1", "zero2", "zero3", "fsdp2"] | None = None

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        if name not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, not {name!r}")
        return name

    @field_validator("optimizer")
    @classmethod
    def _priced_optimizer(cls, name: str) -> str:
        from planner.memory.optimizers import check_optimizer

        return check_optimizer(name)


class FidelityLevel(_Section):
    """One fidelity: a real short SFT run of ``steps`` optimizer steps, scored on ``eval_examples``.

    ``train_examples`` is the data fraction (default: data.train_examples); ``seq_len`` / ``batch``
    override the train section for this level only (cheaper low fidelities). ``accuracy``: also score eval
    rows that have an answer — a closed set of choices by log-likelihood (lm-eval's multiple choice), free
    text by greedy generation and exact match; it costs about as much as a few training steps on CPU, so
    searches score on loss only and final fine-tunes turn it on.
    """

    steps: int = Field(ge=0)
    eval_examples: int = Field(ge=1)
    train_examples: int | None = Field(default=None, ge=1)
    seq_len: int | None = Field(default=None, ge=8)
    batch: int | None = Field(default=None, ge=1)
    accuracy: bool = False


class LMEvalSection(_Section):
    """An lm-evaluation-harness task run offline on each trained model (``fidelity.objective: lm_eval``).

    ``task``: a task (or group) defined in ``include_path``, a directory of lm-eval task YAMLs whose data are
    local files (``dataset_path: json`` + ``dataset_kwargs: {data_files: ...}``); without ``include_path``, a
    task qra ships (``qra_wiki_topic``: the 11-way wiki topic choice on the held-out split ``data.eval_split``
    names). ``metric``: the task's metric the search maximises (``acc``, ``acc_norm``, ...). ``limit``: score
    the first rows only (None: all). ``apply_chat_template``: None = when the tokenizer has a chat template,
    as fidelity runs render their training rows. Cost on CPU: lm-eval runs every choice with its full prompt
    (SmolLM2-135M, 1 thread on a busy 2-core machine: 4.9 s a topic row, 3.2x the in-house scorer's shared-
    prefix 1.5 s), so a CPU search wants a ``limit``; the whole task suits finals or a GPU.
    """

    task: str = "qra_wiki_topic"
    include_path: str | None = None
    metric: str = "acc_norm"
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(8, ge=1)
    apply_chat_template: bool | None = None

    @model_validator(mode="after")
    def _known_task(self) -> LMEvalSection:
        if self.include_path is None:
            if self.task not in SHIPPED_TASKS:
                shipped = ", ".join(sorted(SHIPPED_TASKS))
                raise ValueError(f"unknown task {self.task!r}: qra ships {shipped}; set include_path for your own")
            return self
        if not Path(self.include_path).is_dir():
            raise ValueError(f"include_path not found (a directory of lm-eval task YAMLs): {self.include_path}")
        if self.task not in (names := lm_eval_task_names(Path(self.include_path))):
            known = ", ".join(sorted(names)[:8]) or "none"
            raise ValueError(f"unknown task {self.task!r} in {self.include_path} (tasks there: {known})")
        return self


class FidelitySection(_Section):
    """How candidates are scored (planner.fidelity) and run (planner.executors)."""

    low: FidelityLevel = FidelityLevel(steps=6, eval_examples=16)
    high: FidelityLevel = FidelityLevel(steps=24, eval_examples=32)
    #: a longer run that re-scores the search's finalists before one is chosen (``planner.orchestration.confirm``):
    #: short runs overrate plans that start ahead (error init on 4-bit weights); None: the high fidelity decides
    confirm: FidelityLevel | None = None
    seeds: list[int] = Field(default_factory=lambda: [0])
    subprocess: bool = True
    timeout_s: float = Field(3600, gt=0)
    #: stop a run whose logged train loss exceeds this after ``min_steps`` steps (status "stopped").
    stop_if_loss_above: float | None = None
    min_steps: int = Field(1, ge=0)
    #: torch CPU threads inside an evaluation (None: torch's default). 1 avoids oversubscription on shared CPUs.
    torch_threads: int | None = Field(default=None, ge=1)
    eval_batch: int = Field(8, ge=1)
    #: evaluations run side by side (spawned workers of the local executor): several small runs share a GPU
    workers: int = Field(1, ge=1)
    #: CPU: each frozen quantized layer dequantizes its weight once per run and reuses it (bit-identical
    #: scores; the worker holds a dequantized copy of every quantized weight). Measured on SmolLM2 at 2 threads
    #: (benchmarks/results/throughput.md): train steps unchanged at 3/4-bit, 11 % faster at 8-bit, eval
    #: 10-27 % faster — not worth a full-precision copy of the model by default
    reuse_dequantized: bool = False
    #: where quantized layers are stored for reuse by the profile, every worker and a resumed run (CPU):
    #: None = OUT/layers, "off" = each worker's memory only, or a directory shared by runs of one model
    layer_cache: str | None = None
    #: what a fidelity run and a final report score (``planner.objectives``): ``eval_loss`` (held-out loss, lower
    #: is better) or ``lm_eval`` (the ``lm_eval`` section's task on the trained model, higher is better; the
    #: search minimises its negation). Only a non-default objective enters the recipe key
    objective: Literal["eval_loss", "lm_eval"] = "eval_loss"
    lm_eval: LMEvalSection = LMEvalSection()

    @model_validator(mode="after")
    def _confirm_is_longer(self) -> FidelitySection:
        if self.confirm is not None and self.confirm.steps <= (high := self.high.steps):
            raise ValueError(f"fidelity.confirm.steps ({self.confirm.steps}) must exceed fidelity.high.steps ({high})")
        return self

    @model_validator(mode="after")
    def _lm_eval_needs_its_objective(self) -> FidelitySection:
        # a dumped-and-reloaded config carries the default section: only a non-default one is "set"
        if self.lm_eval != LMEvalSection() and self.objective != "lm_eval":
            raise ValueError(f"lm_eval is set but objective is {self.objective}: set fidelity.objective: lm_eval")
        if self.objective == "lm_eval" and importlib.util.find_spec("lm_eval") is None:
            raise ValueError('objective lm_eval needs lm-evaluation-harness: pip install "qra[lmeval]"')
        return self


class ProfileSection(_Section):
    """Importance priors (``qra profile``): calibration size, unit granularity and plasticity settings.

    ``unit`` defaults to ``space.unit``; ``calibration_offset`` skips wiki rows so disjoint samples can be
    profiled (stability checks).
    """

    bits: list[Literal[2, 3, 4, 8]] = Field(default_factory=lambda: [2, 3, 4])
    unit: Literal["block", "module"] | None = None
    calibration_examples: int = Field(8, ge=1)  # x seq_len tokens; SmolLM2 at 8 x 128: ~11 CPU-min, 1 thread
    calibration_offset: int = Field(0, ge=0)
    seq_len: int = Field(128, ge=8)
    batch: int = Field(8, ge=1)
    plasticity_draws: int = Field(2, ge=1)
    plasticity_rank: int = Field(8, ge=1)
    #: also measure the pruning-sensitivity prior at these ratios (loss increase when one block is pruned)
    prune_ratios: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sorted_bits(self) -> ProfileSection:
        self.bits = sorted(set(self.bits))
        if any(not 0 < r < 1 for r in self.prune_ratios):
            raise ValueError("profile.prune_ratios takes ratios in (0, 1)")
        self.prune_ratios = sorted(set(self.prune_ratios))
        return self


class SearchSection(_Section):
    """Stage 1 (multi-fidelity evolution) and stage 2 (trust-region BO) sizes."""

    population: int = Field(12, ge=2)
    generations: int = Field(3, ge=1)
    offspring: int = Field(12, ge=1)
    promote: int = Field(4, ge=1)
    tr_iterations: int = Field(6, ge=0)
    tr_batch: int = Field(1, ge=1)
    #: members of the first population drawn from the priors (default: half the population)
    warm_start: int | None = Field(default=None, ge=0)
    #: with ``adapter.init: error``, start from the error table's allocation too (``qra baseline table_alloc``'s
    #: plan, a zero-evaluation allocation the search must beat); the table costs minutes, once per model and space
    table_start: bool = True
    #: offspring drafted per offspring evaluated; the screening model picks which get a low-fidelity run
    screen_factor: int = Field(3, ge=1)
    #: initial trust-region length (one-step moves from the centre) and candidates sampled per iteration
    tr_length: int = Field(4, ge=1)
    tr_candidates: int = Field(256, ge=1)
    #: stage 2 stops after this many iterations in a row without beating its starting best by more than
    #: ``min_gain`` nats (0: never stops early); set ``min_gain`` to the seed noise of a high-fidelity run
    tr_patience: int = Field(0, ge=0)
    min_gain: float = Field(0.0, ge=0)
    #: stage 2 also proposes trades: one coordinate one step up, another one step down (rank for bits)
    tr_trades: bool = False
    #: ``fidelity.confirm``: the best high-fidelity plans it re-scores, besides the best and the fast path's free ones
    confirm_top: int = Field(2, ge=1)
    #: what the performance models see (``planner.search.surrogate.FEATURE_SETS``): ``ordinal`` coordinates,
    #: the ``prior`` aggregates (damage at the chosen bits, plasticity-weighted rank), ``both``, or ``table``: the
    #: error table's starting error (bits and rank together) with the prior aggregates (the table costs minutes)
    surrogate_features: Literal["ordinal", "prior", "both", "table"] = "ordinal"
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    gpus_per_eval: float = Field(0.0, ge=0)


class AdapterSection(_Section):
    """The LoRA scale each planned module gets and how its adapter starts (issue 23; a section of its own).

    ``lora_r`` / ``lora_alpha`` are the setting the user tuned a learning rate for. ``alpha_rule`` says what a
    module given another rank keeps: ``sqrt`` (default, rsLoRA-style): alpha = lora_alpha·sqrt(rank/lora_r), so
    the size of an Adam update of scale·B·A (which grows with scale·sqrt(rank)) stays what lora_r gave;
    ``rank`` (rounds 1–2's plans): the scale alpha/rank stays lora_alpha/lora_r; ``fixed``: alpha =
    lora_alpha at every rank (PEFT's behaviour when only ``r`` changes). ``init: error`` starts each quantized
    module's adapter from its quantization error (``planner.priors.adapter_init``); ``damping`` is λ's share
    of the mean diagonal of the input second moments.
    """

    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    alpha_rule: Literal["rank", "sqrt", "fixed"] = "sqrt"
    init: Literal["zero", "error"] = "zero"
    damping: float = Field(0.01, ge=0)


class QRAConfig(_Section):
    name: str = "qra"
    seed: int = 0
    model: ModelSection
    data: DataSection = DataSection()
    space: SpaceSection = SpaceSection()
    train: TrainSection = TrainSection()
    budget: str = "uniform:4bit:r16"
    fidelity: FidelitySection = FidelitySection()
    profile: ProfileSection = ProfileSection()
    search: SearchSection = SearchSection()
    adapter: AdapterSection = AdapterSection()

    @model_validator(mode="after")
    def _profile_prices_searched_ratios(self) -> QRAConfig:
        """A searched pruning ratio needs its prior: profile every ratio the space offers."""
        wanted = {r for r in self.space.searched_prune if r > 0}
        if not wanted <= set(self.profile.prune_ratios):
            self.profile.prune_ratios = sorted(wanted | set(self.profile.prune_ratios))
        return self

    @model_validator(mode="after")
    def _table_features_without_pruning(self) -> QRAConfig:
        if self.search.surrogate_features == "table" and self.space.searched_prune:
            raise ValueError("search.surrogate_features: table does not price pruning; use prior or both")
        return self

    @classmethod
    def load(cls, path: str | Path) -> QRAConfig:
        """Read and validate a YAML config; every problem is one QRAError line naming the file."""
        path = Path(path)
        data = read_yaml(path)
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise QRAError(f"{path}: invalid config: {one_line_validation_error(exc)}") from None
        for key in ("path", "eval_path", "test_path"):
            file = getattr(config.data, key)
            if file and not Path(file).is_file():
                raise QRAError(f"{path}: data.{key} not found: {file}")
        from planner.data.sources import check_data

        try:
            check_data(config.data)  # a bad data file fails here, before any run writes anything
        except QRAError as exc:
            raise QRAError(f"{path}: {exc}") from None
        return config
