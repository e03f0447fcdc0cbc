"""Layer-wise importance priors (``qra profile``): I_q (quantization sensitivity) and I_r (LoRA plasticity).

AutoQRA warm-starts its search from these two signals; here they are measured for real (see
``planner.priors_measure`` for what each number is and why), cached in ``priors.json`` keyed by the
model fingerprint, a hash of the weights, the calibration-token hash and the profile settings, and
saved after every unit so an interrupted profile resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from planner.config import QRAConfig
from planner.fidelity.quantized import cache_directory, directory_in_use
from planner.loading import DTYPES, load_model, load_tokenizer
from planner.priors.calibration import calibration_batch, tokens_hash
from planner.priors.measure import plasticity, reference_pass, unit_damage
from planner.priors.plot import plot_priors
from planner.priors.pruning import prune_damage
from qra_plugin.errors import QRAError
from qra_plugin.io import write_json_atomic
from qra_plugin.modules import quantizable_linears
from qra_plugin.plan import Fingerprint, ModulePlan, fingerprint, one_line_validation_error

__all__ = ["Priors", "profile", "PRIORS_FILE", "PARTIAL_FILE", "CHART_FILE"]

log = logging.getLogger("qra")

PRIORS_FILE = "priors.json"
PARTIAL_FILE = "priors.partial.json"
CHART_FILE = "priors.png"
SCHEMA_VERSION = 1


def _log_minmax(values: list[float]) -> list[float]:
    """Min-max on a log scale into [0, 1]: the raw numbers span orders of magnitude across layers."""
    floor = 1e-12
    logs = [math.log(max(v, floor)) for v in values]
    lo, hi = min(logs), max(logs)
    if hi - lo < 1e-12:
        return [0.5 for _ in values]
    return [(x - lo) / (hi - lo) for x in logs]


class Priors(BaseModel):
    """Per-unit priors. ``I_q[bits][u]`` is the mean per-token KL when only unit u is quantized to ``bits``."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = SCHEMA_VERSION
    units: list[str]
    unit: Literal["block", "module"]
    I_q: dict[int, list[float]]
    I_r: list[float]
    loss_increase: dict[int, list[float]] = Field(default_factory=dict)
    #: pruning sensitivity: loss increase per block when only that block is pruned by the ratio (the key)
    I_p: dict[float, list[float]] = Field(default_factory=dict)
    fingerprint: Fingerprint
    calibration_hash: str
    settings: dict[str, Any] = Field(default_factory=dict)
    reference_loss: float | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)

    def normalised_iq(self, bits: int) -> list[float]:
        """I_q at ``bits`` scaled to [0, 1] on a log scale (1 = the most sensitive unit)."""
        if bits not in self.I_q:
            raise QRAError(f"priors were profiled for bits {sorted(self.I_q)}, not {bits}")
        return _log_minmax(self.I_q[bits])

    def normalised_ir(self) -> list[float]:
        """I_r scaled to [0, 1] on a log scale (1 = the unit whose adapter helps most)."""
        return _log_minmax(self.I_r)

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | Path) -> Priors:
        """Read priors.json; a missing or malformed file is one QRAError line."""
        path = Path(path)
        if not path.is_file():
            raise QRAError(f"priors file not found: {path} (run qra profile)")
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise QRAError(f"{path}: malformed priors file ({exc.msg})") from None
        except ValidationError as exc:
            raise QRAError(f"{path}: invalid priors: {one_line_validation_error(exc)}") from None


# ---------------------------------------------------------------- helpers


def weights_hash(model: nn.Module) -> str:
    """Cheap content hash of the weights: per-tensor sums and a strided sample (fingerprints only see shapes)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            if not flat.is_floating_point():
                flat = flat.to(torch.float64)
            stats = (float(flat.double().sum()), float(flat.double().abs().sum()), flat.numel())
            sample = flat[:: max(1, flat.numel() // 64)][:64].double().tolist()
            digest.update(f"{name}:{stats}:{sample};".encode())
    return digest.hexdigest()[:16]


def _units(model: nn.Module, unit: str) -> tuple[list[str], list[list[str]], list[int]]:
    """(unit names, module names per unit, block index per unit)."""

    specs = quantizable_linears(model)
    if unit == "module":
        return [s.name for s in specs], [[s.name] for s in specs], [s.block for s in specs]
    n_blocks = max(s.block for s in specs) + 1
    per_block: list[list[str]] = [[] for _ in range(n_blocks)]
    for s in specs:
        per_block[s.block].append(s.name)
    return [f"block.{i}" for i in range(n_blocks)], per_block, list(range(n_blocks))


def _module_plan(bits: int, backend: str) -> ModulePlan:
    try:
        return ModulePlan(bits=bits, backend=backend)
    except ValidationError as exc:
        raise QRAError(f"profile.bits: {one_line_validation_error(exc)}") from None


def _settings(cfg: QRAConfig, unit: str, w_hash: str) -> dict[str, Any]:
    p = cfg.profile
    plans = {b: _module_plan(b, cfg.space.backend) for b in p.bits}
    return {
        "bits": list(p.bits),
        "unit": unit,
        "backend": cfg.space.backend,
        "quant": {str(b): {"group_size": m.group_size, "axis": m.axis} for b, m in plans.items()},
        "calibration_examples": p.calibration_examples,
        "calibration_offset": p.calibration_offset,
        "seq_len": p.seq_len,
        "batch": p.batch,
        "plasticity_rank": p.plasticity_rank,
        "plasticity_draws": p.plasticity_draws,
        "seed": cfg.seed,
        "dtype": cfg.model.dtype,
        "weights_hash": w_hash,
        "torch": torch.__version__.split("+")[0],
    } | ({"prune_ratios": list(p.prune_ratios)} if p.prune_ratios else {})  # unchanged key without pruning


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _key_matches(data: dict[str, Any] | None, fp: Fingerprint, calib: str, settings: dict[str, Any]) -> bool:
    return (
        data is not None
        and data.get("fingerprint") == fp.model_dump(mode="json")
        and data.get("calibration_hash") == calib
        and data.get("settings") == json.loads(json.dumps(settings))
    )


def _add_time(timings: dict[str, float], key: str, wall_start: float, cpu_start: float) -> None:
    """Accumulate wall and CPU seconds (``key`` and ``key_cpu``): on a shared machine they differ a lot."""
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - wall_start
    timings[f"{key}_cpu"] = timings.get(f"{key}_cpu", 0.0) + time.process_time() - cpu_start


# ---------------------------------------------------------------- profile


def profile(cfg: QRAConfig, out_dir: str | Path, *, progress: bool = True) -> Priors:
    """Measure (or reuse) the priors for ``cfg``; write ``priors.json`` and ``priors.png`` into ``out_dir``.

    A ``priors.json`` with the same key is returned as is. Otherwise the per-(unit, bits) results are
    written to ``priors.partial.json`` as they come, and a later call with the same key resumes from it.
    """

    out = Path(out_dir)
    p = cfg.profile
    unit = p.unit or cfg.space.unit
    for b in p.bits:
        _module_plan(b, cfg.space.backend)  # bad bits/backend combination: fail before loading anything
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model).eval()
    tokenizer = load_tokenizer(cfg.model)
    tokens = calibration_batch(tokenizer, cfg.data, p.calibration_examples, p.seq_len, p.calibration_offset, cfg.seed)
    fp = fingerprint(model)
    calib = tokens_hash(tokens)
    settings = _settings(cfg, unit, weights_hash(model))

    final = out / PRIORS_FILE
    if _key_matches(_read_json(final), fp, calib, settings):
        log.info("qra: priors cache hit: %s", final)
        return Priors.load(final)

    names, unit_modules, unit_blocks = _units(model, unit)
    partial_path = out / PARTIAL_FILE
    state = _read_json(partial_path)
    if not _key_matches(state, fp, calib, settings):
        state = {
            "fingerprint": fp.model_dump(mode="json"),
            "calibration_hash": calib,
            "settings": settings,
            "units": names,
            "I_q": {},
            "loss_increase": {},
            "I_r": None,
            "timings_s": {},
        }

    with directory_in_use(cache_directory(cfg.fidelity.layer_cache, out)):  # the search's evaluations reuse them
        _measure_into(state, cfg, model, tokens, (names, unit_modules, unit_blocks), partial_path, progress)
    priors = Priors(
        units=names,
        unit=unit,
        I_q={b: [state["I_q"][str(b)][n] for n in names] for b in p.bits},
        loss_increase={b: [state["loss_increase"][str(b)][n] for n in names] for b in p.bits},
        I_r=state["I_r"],
        fingerprint=fp,
        calibration_hash=calib,
        settings=settings,
        reference_loss=state.get("reference_loss"),
        timings_s=state["timings_s"],
        I_p={float(r): v for r, v in (state.get("I_p") or {}).items()},
    )
    priors.save(final)
    plot_priors(priors, out / CHART_FILE)
    partial_path.unlink(missing_ok=True)
    return priors


def _measure_into(
    state: dict[str, Any],
    cfg: QRAConfig,
    model: nn.Module,
    tokens: torch.Tensor,
    units: tuple[list[str], list[list[str]], list[int]],
    partial_path: Path,
    progress: bool,
) -> None:
    """Fill ``state`` with every missing I_q (unit, bits) and I_r, saving it after each measurement."""

    p = cfg.profile
    names, unit_modules, unit_blocks = units
    done = {(int(b), u) for b, per_unit in state["I_q"].items() for u in per_unit}
    todo = [(b, i) for i in range(len(names)) for b in p.bits if (b, names[i]) not in done]
    if done:
        log.info("qra: resuming profile: %d of %d measurements already done", len(done), len(done) + len(todo))
    dtype = DTYPES[cfg.model.dtype]
    with _Progress(progress, total=len(todo) + (0 if state["I_r"] is not None else 1)) as bar:
        if todo:
            start, cpu = time.perf_counter(), time.process_time()
            ref = reference_pass(model, tokens, p.batch)
            state["reference_loss"] = ref.loss
            for b, i in todo:
                bar.describe(f"I_q {names[i]} @ {b} bits")
                plan = _module_plan(b, cfg.space.backend)
                kl, dloss = unit_damage(model, tokens, p.batch, ref, unit_modules[i], unit_blocks[i], plan, dtype)
                state["I_q"].setdefault(str(b), {})[names[i]] = kl
                state["loss_increase"].setdefault(str(b), {})[names[i]] = dloss
                _add_time(state["timings_s"], "I_q", start, cpu)
                start, cpu = time.perf_counter(), time.process_time()
                write_json_atomic(partial_path, state)
                bar.advance()
            del ref
        if p.prune_ratios and not state.get("I_p"):
            bar.describe("I_p (loss increase of pruning one block)")
            start, cpu = time.perf_counter(), time.process_time()
            ref_loss = state.get("reference_loss") or reference_pass(model, tokens, p.batch).loss
            damage = prune_damage(model, tokens, p.batch, ref_loss, list(p.prune_ratios))
            state["I_p"] = {str(r): v for r, v in damage.items()}
            _add_time(state["timings_s"], "I_p", start, cpu)
            write_json_atomic(partial_path, state)
        if state["I_r"] is None:
            bar.describe("I_r (LoRA gradient at init)")
            start, cpu = time.perf_counter(), time.process_time()
            state["I_r"] = plasticity(
                model, tokens, p.batch, unit_modules, p.plasticity_rank, p.plasticity_draws, cfg.seed
            )
            _add_time(state["timings_s"], "I_r", start, cpu)
            write_json_atomic(partial_path, state)
            bar.advance()


class _Progress:
    """A rich progress bar, or nothing when ``enabled`` is false (tests, logs)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("profiling", total=self.total)
        return self

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
