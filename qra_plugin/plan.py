"""The plan: per linear module, a quantization (bits, backend, group size) and a LoRA rank/alpha.

A plan is the product's artefact. It carries a fingerprint of the model it was made for, so it is
never silently applied to another model, and it is validated on load so bad input fails with one line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from torch import nn

from qra_plugin.backends import registry
from qra_plugin.errors import QRAError
from qra_plugin.io import write_text_atomic
from qra_plugin.modules import LinearSpec, find_blocks, modules_hash, quantizable_linears

Bits = Literal[2, 3, 4, 8, 16]


def default_backend(bits: int) -> str:
    """16 bits stays a plain Linear; every lower width defaults to HQQ, the one backend for all of them."""
    return "none" if bits == 16 else "hqq"


class ModulePlan(BaseModel):
    """What happens to one linear module."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Bits
    backend: str = "hqq"
    group_size: int | None = Field(default=None, gt=0)
    axis: Literal[0, 1] = 0
    rank: int = Field(default=16, ge=0)
    alpha: float | None = Field(default=None, gt=0)
    #: how the adapter starts: "zero" (PEFT's B = 0) or "error" (A/B from the plan's init file, computed by the
    #: planner so that the adapter cancels most of this module's quantization error on calibration inputs)
    init: Literal["zero", "error"] = "zero"

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        bits = data.get("bits")
        if "backend" not in data and isinstance(bits, int):
            data["backend"] = default_backend(bits)
        backend = registry().get(data.get("backend")) if isinstance(data.get("backend"), str) else None
        if data.get("group_size") is None and backend is not None and bits in backend.default_group:
            data["group_size"] = backend.default_group[bits]
        return data

    @model_validator(mode="after")
    def _check_backend(self) -> ModulePlan:
        backends = registry()
        if self.backend not in backends:
            raise ValueError(f"unknown backend {self.backend!r} (known: {', '.join(sorted(backends))})")
        backend = backends[self.backend]
        if self.bits not in backend.bits:
            allowed = sorted(backend.bits)
            raise ValueError(f"backend {self.backend!r} cannot store {self.bits}-bit weights (it supports {allowed})")
        problem = backend.check(self)
        if problem:
            raise ValueError(problem)
        return self

    def hash_body(self) -> dict[str, Any]:
        """What the plan hash sees: a default ``init`` is left out, so plans made before it existed keep
        their hash (and their stored evaluations)."""
        return self.model_dump(exclude={"init"} if self.init == "zero" else None)

    @property
    def quantized_with_adapter(self) -> bool:
        """Only such a module has a quantization error for its adapter to start from (``init: error``)."""
        return self.rank > 0 and self.bits < 16

    @property
    def lora_alpha(self) -> float:
        """Alpha defaults to 2·rank so the LoRA scale (alpha/rank) is the same at every rank."""
        return float(self.alpha) if self.alpha is not None else float(2 * self.rank)


class BlockPruning(BaseModel):
    """What one block keeps after structured pruning: MLP intermediate channels and key/value head groups
    (each group keeps its query heads, so GQA's grouping is unchanged). Indices are stored, not ratios, so
    applying a plan needs no calibration data and gives the same model on every rank of a distributed run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mlp_keep: list[int] | None = None
    kv_keep: list[int] | None = None

    @model_validator(mode="after")
    def _sorted_unique(self) -> BlockPruning:
        for name in ("mlp_keep", "kv_keep"):
            kept = getattr(self, name)
            if kept is not None and (not kept or kept != sorted(set(kept)) or kept[0] < 0):
                raise ValueError(f"{name} must be a non-empty, sorted list of distinct indices >= 0")
        return self


class Fingerprint(BaseModel):
    """Identifies the model a plan was made for: architecture, depth, width and module names/shapes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    num_layers: int
    hidden_size: int
    modules_hash: str

    def describe(self) -> str:
        return f"{self.architecture} ({self.num_layers} layers, hidden {self.hidden_size}, modules {self.modules_hash})"


def fingerprint(model: nn.Module) -> Fingerprint:
    """Fingerprint of a model (works on the meta device and on an already-quantized model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    source = getattr(base, "qra_source_fingerprint", None)
    if source is not None:  # a pruned model is identified by the model it was pruned from
        return source
    config = getattr(base, "config", None)
    archs = getattr(config, "architectures", None) or [type(base).__name__]
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    _, blocks = find_blocks(base)
    return Fingerprint(
        architecture=str(archs[0]),
        num_layers=len(blocks),
        hidden_size=int(hidden),
        modules_hash=modules_hash(quantizable_linears(base)),
    )


class Plan(BaseModel):
    """Per-module bits and rank for one model. Load with ``Plan.load``, write with ``plan.save``."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    fingerprint: Fingerprint
    modules: dict[str, ModulePlan]
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: structured pruning per block index, applied before quantization (``qra_plugin.prune``); empty: none
    pruning: dict[int, BlockPruning] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    #: the safetensors file with the initial ``<module>.lora_A`` / ``.lora_B`` of modules with ``init: error``
    #: (relative paths resolve against the plan file's directory) and its sha256: an edited file is refused
    init_file: str | None = None
    init_hash: str | None = None
    #: the directory the plan was loaded from (resolves a relative ``init_file``); not part of the plan
    _source_dir: Path | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        """Plans are equal when their fields are: where a plan was loaded from is not part of it."""
        return isinstance(other, Plan) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, like every non-frozen pydantic model

    @model_validator(mode="after")
    def _init_file_named(self) -> Plan:
        """A file comes with its hash. ``init: error`` modules without a file are a planner's candidate (its
        fidelity runs compute the init): ``apply_plan`` refuses them unless given the tensors."""
        if bool(self.init_file) != bool(self.init_hash):
            raise ValueError("init_file and init_hash go together")
        return self

    # ---------------------------------------------------------------- constructors
    @classmethod
    def uniform(
        cls,
        model: nn.Module,
        bits: int = 4,
        rank: int = 16,
        backend: str | None = None,
        group_size: int | None = None,
        alpha: float | None = None,
    ) -> Plan:
        """Every quantizable module at the same bits and rank (the QLoRA-style baseline)."""
        specs = quantizable_linears(model)
        module = _module_plan(bits, rank, backend, group_size, alpha)
        return cls(fingerprint=fingerprint(model), modules={s.name: module for s in specs})

    @classmethod
    def from_blocks(
        cls,
        model: nn.Module,
        blocks: Sequence[tuple[int, int]],
        backend: str | None = None,
        alpha: float | None = None,
    ) -> Plan:
        """One (bits, rank) pair per transformer block; all of a block's linears share it (AutoQRA's unit)."""
        return cls.from_block_pairs(fingerprint(model), quantizable_linears(model), blocks, backend, alpha)

    @classmethod
    def from_block_pairs(
        cls,
        fp: Fingerprint,
        specs: Sequence[LinearSpec],
        blocks: Sequence[tuple[int, int]],
        backend: str | None = None,
        alpha: float | None = None,
    ) -> Plan:
        """Like ``from_blocks`` but from a fingerprint and specs alone (the planner has no weights)."""
        n_blocks = max(s.block for s in specs) + 1
        if len(blocks) != n_blocks:
            raise QRAError(f"need {n_blocks} (bits, rank) pairs for this model, got {len(blocks)}")
        per_block = [_module_plan(b, r, backend, None, alpha) for b, r in blocks]
        return cls(fingerprint=fp, modules={s.name: per_block[s.block] for s in specs})

    @classmethod
    def from_module_pairs(
        cls,
        fp: Fingerprint,
        specs: Sequence[LinearSpec],
        pairs: Sequence[tuple[int, int]],
        backend: str | None = None,
        alpha: float | None = None,
    ) -> Plan:
        """One (bits, rank) pair per quantizable module, in ``specs`` order (module granularity)."""
        if len(pairs) != len(specs):
            raise QRAError(f"need {len(specs)} (bits, rank) pairs, one per module, got {len(pairs)}")
        cache: dict[tuple[int, int], ModulePlan] = {}
        modules = {}
        for spec, (b, r) in zip(specs, pairs, strict=True):
            if (b, r) not in cache:
                cache[(b, r)] = _module_plan(b, r, backend, None, alpha)
            modules[spec.name] = cache[(b, r)]
        return cls(fingerprint=fp, modules=modules)

    # ---------------------------------------------------------------- queries
    def with_init(self, init: Literal["zero", "error"]) -> Plan:
        """Every quantized module with an adapter starting as ``init`` (the others from zero): the plan, not a
        config, says how a run's adapters start."""
        modules = {
            n: m.model_copy(update={"init": init if m.quantized_with_adapter else "zero"})
            for n, m in self.modules.items()
        }
        return self.model_copy(update={"modules": modules})

    def lora_targets(self) -> list[str]:
        """Full names of modules that get an adapter (rank > 0), in plan order."""
        return [name for name, m in self.modules.items() if m.rank > 0]

    def backends_used(self) -> set[str]:
        return {m.backend for m in self.modules.values() if m.bits < 16}

    def summary(self) -> str:
        """One line for logs: how many modules at each (bits, backend) and the rank spread."""
        counts: dict[str, int] = {}
        for m in self.modules.values():
            key = f"{m.bits}b/{m.backend}"
            counts[key] = counts.get(key, 0) + 1
        ranks = sorted({m.rank for m in self.modules.values()})
        parts = ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
        return f"{len(self.modules)} modules: {parts}; ranks {ranks}"

    def content_hash(self) -> str:
        """Hash of what the plan does (not its metadata): the key of an evaluation in the planner's store."""
        body = {n: m.hash_body() for n, m in sorted(self.modules.items())}
        content: dict[str, Any] = {"fp": self.fingerprint.model_dump(), "m": body, "d": self.lora_dropout}
        if self.init_hash is not None:  # the init's content, not where its file lies
            content["i"] = self.init_hash
        if self.pruning:  # an unpruned plan hashes as before pruning existed: stored evaluations stay valid
            content["p"] = {str(i): p.model_dump(exclude_none=True) for i, p in sorted(self.pruning.items())}
        payload = json.dumps(content, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def check_model(self, model: nn.Module) -> list[LinearSpec]:
        """Raise a one-line QRAError unless this plan was made for ``model``; return the model's specs."""
        actual = fingerprint(model)
        if actual != self.fingerprint:
            raise QRAError(
                f"plan fingerprint does not match the model: plan is for {self.fingerprint.describe()}, "
                f"model is {actual.describe()}"
            )
        specs = quantizable_linears(model)
        known = {s.name for s in specs}
        unknown = [n for n in self.modules if n not in known]
        if unknown:
            raise QRAError(f"plan names {len(unknown)} module(s) the model does not have, e.g. {unknown[0]!r}")
        return specs

    # ---------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True)
        if not self.pruning:
            data.pop("pruning")
        for module in data["modules"].values():
            if module.get("init") == "zero":
                module.pop("init")
        return data

    def save(self, path: str | Path) -> Path:
        """Write YAML (or JSON for a .json suffix) atomically."""
        path = Path(path)
        data = self.to_dict()
        text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
        return write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a YAML/JSON plan; any problem becomes one QRAError line naming the file."""
        path = Path(path)
        if not path.is_file():
            raise QRAError(f"plan file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise QRAError(f"{path}: malformed plan file ({first})") from None
        plan = cls.parse(data, source=str(path))
        plan._source_dir = path.resolve().parent
        return plan

    def init_path(self) -> Path | None:
        """Where the init file lies: an absolute ``init_file`` as is, a relative one next to the plan file
        (the current directory for a plan that was never loaded from a file)."""
        if not self.init_file:
            return None
        path = Path(self.init_file).expanduser()
        return path if path.is_absolute() else (self._source_dir or Path.cwd()) / path

    @classmethod
    def parse(cls, data: Any, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise QRAError(f"{source}: a plan must be a mapping with 'fingerprint' and 'modules'")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise QRAError(f"{source}: invalid plan: {one_line_validation_error(exc)}") from None


def _module_plan(bits: int, rank: int, backend: str | None, group_size: int | None, alpha: float | None) -> ModulePlan:
    data: dict[str, Any] = {"bits": bits, "rank": rank}
    if backend is not None:
        data["backend"] = "none" if bits == 16 else backend
    if group_size is not None:
        data["group_size"] = group_size
    if alpha is not None:
        data["alpha"] = alpha
    try:
        return ModulePlan.model_validate(data)
    except ValidationError as exc:
        raise QRAError(f"invalid module plan: {one_line_validation_error(exc)}") from None


def one_line_validation_error(exc: ValidationError) -> str:
    """The first pydantic error as 'where: what' on one line."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"


def block_pairs(plan: Plan) -> list[tuple[int, int]] | None:
    """(bits, rank) per block when every module of each block agrees, else None (a module-level plan)."""
    per_block: dict[int, set[tuple[int, int]]] = {}
    for name, m in plan.modules.items():
        idx = _block_index(name)
        per_block.setdefault(idx, set()).add((m.bits, m.rank))
    if any(len(v) != 1 for v in per_block.values()):
        return None
    return [next(iter(per_block[i])) for i in sorted(per_block)]


def _block_index(name: str) -> int:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return -1
