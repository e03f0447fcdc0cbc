"""What every planner run shares before and while it evaluates: model structure, budget, space, cost,
the store-backed executor and the ``evaluate(configs, level)`` function the stages and baselines call.

``qra search``, ``qra baseline`` and the benchmarks all build their runs from here, so a baseline's and a
search's evaluations are the same real SFT runs under the same keys.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.config import QRAConfig
from planner.executors import make_executor
from planner.fidelity.contract import EvalTask, fidelity_levels, recipe, recipe_diff, recipe_hash
from planner.fidelity.packing import flattening_refusal
from planner.fidelity.quantized import cache_directory
from planner.memory import Budget, plan_bytes
from planner.memory.optimizers import fidelity_refusal
from planner.model_info import load_model_info
from planner.objectives import objective_for
from planner.priors.pruning import fixed_pruning, searched_channels
from planner.search.space import Allocation, BudgetCost, SearchSpace, allocation_key
from planner.settings import TrainingSettings
from qra_plugin.errors import QRAError

STORE_FILE = "store.sqlite"
PLAN_FILE = "plan.yaml"
LOCK_FILE = ".qra.lock"
SCORE_DIGITS = 6  # scores fed back to the optimisers are rounded: float noise never changes a decision


class Evaluator:
    """Turns ``evaluate(configs, level)`` calls of a stage into EvalTasks, runs them, records a trace."""

    def __init__(self, cfg: QRAConfig, space: SearchSpace, cost: BudgetCost, executor: Any, say: Callable) -> None:
        self.cfg, self.space, self.cost, self.executor, self.say = cfg, space, cost, executor, say
        self.trace: list[dict[str, Any]] = []
        #: wall seconds spent waiting for evaluations; the rest of a search's wall time is the planner's own
        self.eval_wall_s = 0.0
        #: plans the search scores at the high fidelity when it ends (the budget's uniform plan, the table's):
        #: a high batch that leaves workers idle runs them there; the closing call then finds them stored
        self.closing: list[tuple[Allocation, str]] = []

    def for_stage(self, stage: str) -> Callable[[list[Allocation], str], list[float | None]]:
        def evaluate(configs: list[Allocation], level: str) -> list[float | None]:
            return self.run(configs, level, stage)

        return evaluate

    def tasks(self, configs: list[Allocation], level: str, stage: str) -> list[Any]:

        return [
            EvalTask(
                plan=self.space.to_plan(c),
                level=level,  # type: ignore[arg-type]
                seed=s,
                config=self.cfg,
                tag=f"{stage}:{allocation_key(c)}",
                memory_predicted=self.cost(c),
            )
            for c in configs
            for s in self.cfg.fidelity.seeds
        ]

    def run(self, configs: list[Allocation], level: str, stage: str) -> list[float | None]:
        n_seeds = len(self.cfg.fidelity.seeds)
        tasks = self.tasks(configs, level, stage)
        start = time.perf_counter()
        results = self.executor.run(tasks + self._fill_idle(tasks, level))[: len(tasks)]
        self.eval_wall_s += time.perf_counter() - start
        scores: list[float | None] = []
        for i, c in enumerate(configs):
            group = results[i * n_seeds : (i + 1) * n_seeds]
            scores.append(self._record(c, level, stage, group))
        return scores

    def _fill_idle(self, tasks: list[Any], level: str) -> list[Any]:
        """Closing plans not yet stored, as many as the batch leaves workers idle (their results are recorded
        when the search asks for them): same runs, fewer lone ones."""
        slots = getattr(self.executor, "slots", 1)
        store = getattr(self.executor, "store", None)
        if level != "high" or slots < 2 or store is None or not self.closing:
            return []
        pending = [t for t in tasks if store.get(t.key) is None]
        free = (-len(pending)) % slots if pending else 0
        filler: list[Any] = []
        while self.closing and len(filler) + len(self.cfg.fidelity.seeds) <= free:
            config, stage = self.closing.pop(0)
            filler += [t for t in self.tasks([config], "high", stage) if store.get(t.key) is None]
        return filler

    def _record(self, config: Allocation, level: str, stage: str, group: list[Any]) -> float | None:
        objective = objective_for(self.cfg)  # the search minimises its score, whichever objective it is
        values = [objective.search_score(r) for r in group]
        score = round(sum(values) / len(values), SCORE_DIGITS) if None not in values else None
        measured = [r.memory_measured for r in group if r.memory_measured]
        failed = next((r for r in group if r.status != "ok"), None)
        self.trace.append(
            {
                "index": len(self.trace),
                "stage": stage,
                "level": level,
                "config": allocation_key(config),
                "score": score,
                "memory": self.cost(config),
                "memory_measured": max(measured) if measured else None,
                "steps": sum(r.steps for r in group),
                "wall_s": round(sum(r.wall_s for r in group), 3),
                **{part: _total(group, part) for part in ("setup_s", "train_s", "eval_s", "layers_quantized")},
                "status": "ok" if failed is None else failed.status,
                "failure": failed.failure if failed is not None else None,
                "error": next((r.error for r in group if r.error), None),
            }
        )
        shown = f"{objective.shown(score):.4f}" if score is not None else f"[red]{self.trace[-1]['status']}[/red]"
        self.say(
            f"[dim]{stage}[/dim] {level:4s} {objective.label} {shown}  mem {self.cost(config) / 2**20:.2f} MiB  "
            f"{allocation_key(config)}"
        )
        return score


def _total(group: list[Any], part: str) -> float | None:
    """A timing or count summed over a plan's seeds (None when a result predates the field)."""
    values = [getattr(r, part) for r in group]
    return None if any(v is None for v in values) else round(sum(values), 3)


def time_split(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the evaluations' wall time went: set-up (copy, quantization, LoRA, trainer), training, scoring."""
    timed = [e for e in trace if e.get("setup_s") is not None]
    wall = sum(e["wall_s"] for e in timed)
    parts = {p: round(sum(e[p] or 0.0 for e in timed), 1) for p in ("setup_s", "train_s", "eval_s")}
    return {
        "evaluations_timed": len(timed),
        "wall_s": round(wall, 1),
        **parts,
        "setup_share": round(parts["setup_s"] / wall, 3) if wall else None,
        "layers_quantized": sum(e.get("layers_quantized") or 0 for e in timed),
    }


@dataclass
class SearchSetup:
    """What every planner run needs before it evaluates anything: model structure, budget, space, cost."""

    cfg: QRAConfig
    info: Any
    budget: Any
    space: SearchSpace
    budget_bytes: int
    cost: BudgetCost
    #: the job the budget prices (``TrainingSettings.of(cfg)``): batch, precision, optimizer, ranks ...
    settings: TrainingSettings

    @classmethod
    def build(cls, cfg: QRAConfig) -> SearchSetup:

        info = load_model_info(cfg.model)
        budget = Budget.parse(cfg.budget)
        _refuse_optimizer_here(cfg)

        space = SearchSpace.from_config(cfg, info, fixed_pruning(cfg), searched_channels(cfg))
        settings = TrainingSettings.of(cfg)
        budget_bytes = int(budget.check_feasible(info, settings, space.bits, space.ranks, space.backend))
        cost = BudgetCost(space, lambda c: plan_bytes(info, space.to_plan(c), settings, budget.kind))
        return cls(cfg, info, budget, space, budget_bytes, cost, settings)

    def fits(self, config: Allocation) -> bool:
        return self.cost(config) <= self.budget_bytes

    def evaluator(self, executor: Any, say: Callable) -> Evaluator:
        return Evaluator(self.cfg, self.space, self.cost, executor, say)

    def budget_plan(self) -> Allocation | None:
        """The uniform config a relative budget names (``uniform:4bit:r16``), if the space holds it and it fits."""
        if self.budget.uniform is None:
            return None
        bits, rank, backend = self.budget.uniform
        space = self.space
        if bits not in space.bits or rank not in space.ranks or (bits < 16 and backend != space.backend):
            return None
        config = space.uniform(bits, rank)
        return config if self.fits(config) else None


def _refuse_optimizer_here(cfg: QRAConfig) -> None:
    """Local evaluations train with the user's optimizer (and packing) on this machine: refuse up front where
    they cannot run as asked."""

    if cfg.search.executor != "local":
        return
    refusal = fidelity_refusal(cfg.train.optimizer) or flattening_refusal(cfg)
    if refusal:
        raise QRAError(refusal)


def open_executor(cfg: QRAConfig, store: Any, *, kind: str | None = None, **extra: Any) -> Any:
    """The store-backed executor the config asks for (``extra``: ``on_result``, an injected ``evaluate``)."""

    return make_executor(
        kind or cfg.search.executor,  # type: ignore[arg-type]
        subprocess=cfg.fidelity.subprocess,
        store=store,
        ray_address=cfg.search.ray_address,
        gpus_per_eval=cfg.search.gpus_per_eval,
        timeout_s=cfg.fidelity.timeout_s,
        workers=cfg.fidelity.workers,
        layer_cache=cache_directory(cfg.fidelity.layer_cache, Path(store.path).parent),
        **{k: v for k, v in extra.items() if v is not None},
    )


@contextlib.contextmanager
def exclusive_run(out_dir: Path) -> Iterator[None]:
    """One planner process per output directory, by design: a second one is refused with one line.

    An OS file lock (``flock``) on ``DIR/.qra.lock``: released by the kernel when the holder exits in any
    way, kill -9 included, so a crashed run never leaves a stale lock behind.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise QRAError(f"{out_dir} is in use by another qra run ({holder}); wait for it or use another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def stale_recipe_note(store: Any, cfg: QRAConfig) -> str | None:
    """One line naming what changed when the store holds evaluations of another recipe (never reused)."""

    notes = []
    for level in fidelity_levels(cfg):
        current = recipe(cfg, level)
        for _, old, rows in store.other_recipes(level, recipe_hash(cfg, level)):
            if rows:
                notes.append(f"{rows} {level} rows ({', '.join(recipe_diff(old, current)) or 'recipe'} changed)")
    return "store holds evaluations of another recipe, not reused: " + "; ".join(notes) if notes else None
