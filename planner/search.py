"""``qra search``: wire model info, budget, priors, space, stage 1 and stage 2; write the outputs.

Only wiring lives here. Every evaluation is a real SFT fidelity run sent through the executor, which
reads finished results from ``store.sqlite`` instead of recomputing them; since every random choice
comes from the seed and scores are the only feedback, re-running the same command replays the search
from the store and continues where a killed run stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.config import QRAConfig
from planner.evolution import Importance, Stage1Settings, run_stage1
from planner.pareto import Point, best_for_budget, write_pareto
from planner.space import BudgetCost, Config, SearchSpace, config_key
from planner.trust_region import TRSettings, run_stage2
from qra_plugin.errors import QRAError
from qra_plugin.io import write_json_atomic

PLAN_FILE = "plan.yaml"
PARETO_FILE = "pareto.json"
REPORT_FILE = "report.html"
STORE_FILE = "store.sqlite"
TRACE_FILE = "trace.json"
SCORE_DIGITS = 6  # scores fed back to the optimisers are rounded: float noise never changes a decision


@dataclass
class SearchResult:
    out_dir: Path
    best: Config
    best_score: float
    best_memory: int
    budget_bytes: int
    pareto: list[Point]
    surrogate_spearman: float | None
    screening_spearman: float | None
    evaluations: int
    computed: int
    trace: list[dict[str, Any]] = field(default_factory=list)

    @property
    def plan_path(self) -> Path:
        return self.out_dir / PLAN_FILE


class Evaluator:
    """Turns ``evaluate(configs, level)`` calls of a stage into EvalTasks, runs them, records a trace."""

    def __init__(self, cfg: QRAConfig, space: SearchSpace, cost: BudgetCost, executor: Any, say: Callable) -> None:
        self.cfg, self.space, self.cost, self.executor, self.say = cfg, space, cost, executor, say
        self.trace: list[dict[str, Any]] = []
        #: wall seconds spent waiting for evaluations; the rest of a search's wall time is the planner's own
        self.eval_wall_s = 0.0

    def for_stage(self, stage: str) -> Callable[[list[Config], str], list[float | None]]:
        def evaluate(configs: list[Config], level: str) -> list[float | None]:
            return self.run(configs, level, stage)

        return evaluate

    def run(self, configs: list[Config], level: str, stage: str) -> list[float | None]:
        from planner.fidelity import EvalTask

        seeds = self.cfg.fidelity.seeds
        tasks = [
            EvalTask(
                plan=self.space.to_plan(c),
                level=level,  # type: ignore[arg-type]
                seed=s,
                config=self.cfg,
                tag=f"{stage}:{config_key(c)}",
                memory_predicted=self.cost(c),
            )
            for c in configs
            for s in seeds
        ]
        start = time.perf_counter()
        results = self.executor.run(tasks)
        self.eval_wall_s += time.perf_counter() - start
        scores: list[float | None] = []
        for i, c in enumerate(configs):
            group = results[i * len(seeds) : (i + 1) * len(seeds)]
            ok = all(r.status == "ok" and r.eval_loss is not None for r in group)
            score = round(sum(r.eval_loss for r in group) / len(group), SCORE_DIGITS) if ok else None
            scores.append(score)
            measured = [r.memory_measured for r in group if r.memory_measured]
            self.trace.append(
                {
                    "index": len(self.trace),
                    "stage": stage,
                    "level": level,
                    "config": config_key(c),
                    "score": score,
                    "memory": self.cost(c),
                    "memory_measured": max(measured) if measured else None,
                    "steps": sum(r.steps for r in group),
                    "wall_s": round(sum(r.wall_s for r in group), 3),
                    "status": "ok" if ok else next(r.status for r in group if r.status != "ok"),
                    "error": next((r.error for r in group if r.error), None),
                }
            )
            shown = f"{score:.4f}" if score is not None else f"[red]{self.trace[-1]['status']}[/red]"
            self.say(f"[dim]{stage}[/dim] {level:4s} loss {shown}  mem {self.cost(c) / 2**20:.2f} MiB  {config_key(c)}")
        return scores


@dataclass
class SearchSetup:
    """What every planner run needs before it evaluates anything: model structure, budget, space, cost."""

    cfg: QRAConfig
    info: Any
    budget: Any
    space: SearchSpace
    budget_bytes: int
    cost: BudgetCost

    @classmethod
    def build(cls, cfg: QRAConfig) -> SearchSetup:
        from planner.memory import Budget, plan_bytes
        from planner.model_info import load_model_info

        info = load_model_info(cfg.model)
        budget = Budget.parse(cfg.budget)
        space = SearchSpace.from_config(cfg, info)
        budget_bytes = int(budget.check_feasible(info, cfg.train, space.bits, space.ranks, space.backend))
        cost = BudgetCost(space, lambda c: plan_bytes(info, space.to_plan(c), cfg.train, budget.kind))
        return cls(cfg, info, budget, space, budget_bytes, cost)

    def fits(self, config: Config) -> bool:
        return self.cost(config) <= self.budget_bytes

    def evaluator(self, executor: Any, say: Callable) -> Evaluator:
        return Evaluator(self.cfg, self.space, self.cost, executor, say)


def run_search(
    cfg: QRAConfig,
    out_dir: str | Path,
    seed: int | None = None,
    executor_kind: str | None = None,
    *,
    evaluate: Callable | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search per-unit (bits, rank) for ``cfg``'s model and budget; write plan, Pareto front, report, store.

    ``evaluate`` replaces ``planner.fidelity.run_fidelity`` in the executor (tests inject failures).
    """
    from rich.console import Console

    from planner.executors import make_executor
    from planner.priors import profile, warm_start
    from planner.store import Store

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed if seed is None else int(seed)
    kind = executor_kind or cfg.search.executor
    console = Console(stderr=True, quiet=not progress, highlight=False, log_path=False)
    say = console.log
    started = time.time()

    # ---- model, budget, space, priors
    setup = SearchSetup.build(cfg)
    budget, space, budget_bytes, cost, fits = setup.budget, setup.space, setup.budget_bytes, setup.cost, setup.fits

    say(
        f"[bold]qra search[/bold] {cfg.name}: {space.n_units} {space.unit} units, budget {cfg.budget} = "
        f"{budget_bytes / 2**20:.2f} MiB ({budget.kind}), seed {seed}, executor {kind}"
    )
    priors = profile(cfg, out, progress=progress)
    importance = Importance.from_priors(priors, space)
    s = cfg.search
    n_warm = s.warm_start if s.warm_start is not None else max(1, s.population // 2)
    warm = warm_start(priors, space, fits, min(n_warm, s.population), seed) if n_warm else []
    if n_warm:  # the allocations the priors give for free come before the sampled warm starts
        warm = [*_prior_allocations(space, cost, budget_bytes, importance, budget), *warm]
    budget_plan = _baseline(budget, space)
    if budget_plan is not None and fits(budget_plan):
        # The uniform plan the budget names is what the user would otherwise run: start from it, so the
        # search explores around it and never needs luck to match it.
        warm = [budget_plan, *warm]  # run_stage1 keeps the first of any repeats

    # ---- stages, each evaluation through the store-backed executor
    store = Store(out / STORE_FILE)
    counts = {"computed": 0, "cached": 0}

    def on_result(_task: Any, _result: Any, from_store: bool) -> None:
        counts["cached" if from_store else "computed"] += 1

    executor = make_executor(
        kind,  # type: ignore[arg-type]
        subprocess=cfg.fidelity.subprocess,
        store=store,
        ray_address=s.ray_address,
        gpus_per_eval=s.gpus_per_eval,
        timeout_s=cfg.fidelity.timeout_s,
        workers=cfg.fidelity.workers,
        on_result=on_result,
        **({"evaluate": evaluate} if evaluate is not None else {}),
    )
    evaluator = Evaluator(cfg, space, cost, executor, say)
    stages_start = time.perf_counter()
    try:
        say("[bold]stage 1[/bold]: multi-fidelity evolution")
        stage1 = run_stage1(
            space,
            importance,
            cost,
            budget_bytes,
            evaluator.for_stage("stage1"),
            Stage1Settings(s.population, s.generations, s.offspring, s.promote, s.screen_factor, seed=seed),
            warm,
            progress=say,
        )
        say(
            f"performance model held-out Spearman: {_fmt(stage1.surrogate_spearman)}; "
            f"screening model: {_fmt(stage1.screening_spearman)}"
        )
        high = {r.config: r.high for r in stage1.records.values() if r.high_done}
        say("[bold]stage 2[/bold]: trust-region Bayesian optimisation")
        tr = TRSettings(
            iterations=s.tr_iterations,
            batch=s.tr_batch,
            length_init=s.tr_length,
            length_max=max(s.tr_length, 2 * space.n_units),
            n_candidates=s.tr_candidates,
            seed=seed,
        )
        stage2 = run_stage2(space, fits, cost, evaluator.for_stage("stage2"), high, tr, progress=say)
        history = dict(stage2.history)
        baseline = _baseline(budget, space)
        if baseline is not None and fits(baseline) and baseline not in history:
            say("[bold]baseline[/bold]: the uniform plan that defines the budget, at the high fidelity")
            history[baseline] = evaluator.run([baseline], "high", "baseline")[0]
    finally:
        executor.close()
        store.close()
    planner_s = time.perf_counter() - stages_start - evaluator.eval_wall_s

    # ---- outputs
    stage_of = {}
    for row in evaluator.trace:
        if row["level"] == "high":
            stage_of.setdefault(row["config"], row["stage"])
    measured = {row["config"]: row["memory_measured"] for row in evaluator.trace if row["level"] == "high"}
    points = [
        Point(c, float(v), cost(c), measured.get(config_key(c)), stage_of.get(config_key(c), ""))
        for c, v in sorted(history.items())
        if v is not None
    ]
    best = best_for_budget(points, budget_bytes)
    if best is None:
        raise QRAError("no evaluated plan fits the budget (every high-fidelity evaluation failed?)")
    pareto = write_pareto(out / PARETO_FILE, space, points, budget_bytes, cfg.budget, budget.kind)
    plan = space.to_plan(
        best.config,
        meta={
            "qra_search": {
                "config": cfg.name,
                "seed": seed,
                "score": best.score,
                "objective": "high-fidelity held-out eval loss",
                "memory_bytes": best.memory,
                "budget": cfg.budget,
                "budget_bytes": budget_bytes,
                "budget_kind": budget.kind,
            }
        },
    )
    plan.save(out / PLAN_FILE)
    result = SearchResult(
        out_dir=out,
        best=best.config,
        best_score=best.score,
        best_memory=best.memory,
        budget_bytes=budget_bytes,
        pareto=pareto,
        surrogate_spearman=stage1.surrogate_spearman,
        screening_spearman=stage1.screening_spearman,
        evaluations=len(evaluator.trace),
        computed=counts["computed"],
        trace=evaluator.trace,
    )
    summary = {
        "name": cfg.name,
        "seed": seed,
        "budget": cfg.budget,
        "budget_bytes": budget_bytes,
        "best": config_key(best.config),
        "best_score": best.score,
        "best_memory": best.memory,
        "surrogate_spearman": stage1.surrogate_spearman,
        "screening_spearman": stage1.screening_spearman,
        "stage1_generations": stage1.generations,
        "stage2_restarts": stage2.restarts,
        "baseline": config_key(baseline) if baseline is not None else None,
        "baseline_score": history.get(baseline) if baseline is not None else None,
        "evaluations": evaluator.trace,
        "computed_this_run": counts["computed"],
        "wall_s_this_run": round(time.time() - started, 1),
        "search_steps": sum(r["steps"] for r in evaluator.trace),
        # the planner's own compute (operators, performance model, GP fits, acquisition) between evaluations
        "planner_s": round(planner_s, 3),
        "planner_s_per_proposal": round(planner_s / max(len(evaluator.trace), 1), 4),
        "final_finetune_steps": cfg.fidelity.high.steps,
    }
    write_json_atomic(out / TRACE_FILE, summary)
    from planner.report import write_report

    write_report(out, space, priors, summary, points, pareto, best)
    say(
        f"[green]best plan[/green] loss {best.score:.4f}, {best.memory / 2**20:.2f} MiB of "
        f"{budget_bytes / 2**20:.2f} MiB → {out / PLAN_FILE}"
    )
    return result


def _prior_allocations(
    space: SearchSpace, cost: BudgetCost, budget_bytes: int, importance: Importance, budget: Any
) -> list[Config]:
    """The two allocations the priors give for free: greedy importance-per-byte and the LQ-LoRA-style ILP.

    On SmolLM2 both beat a search that started without them (benchmarks/results/plan_quality.json), so
    the population starts from them and the evaluations go into refining them, not into finding them.
    """
    from planner.baselines import greedy_priors, ilp

    named = budget.uniform[1] if budget.uniform is not None else None
    rank = named if named in space.ranks else sorted(space.ranks)[len(space.ranks) // 2]
    found: list[Config] = []
    # a budget that leaves no room for one allocation raises QRAError for it; the other starts still stand
    with contextlib.suppress(QRAError):
        found.append(greedy_priors(space, cost, budget_bytes, importance))
    with contextlib.suppress(QRAError):
        found.append(ilp(space, cost, budget_bytes, importance, rank))
    return found


def _baseline(budget: Any, space: SearchSpace) -> Config | None:
    """The uniform config a relative budget names (``uniform:4bit:r16``), if the space contains it."""
    if budget.uniform is None:
        return None
    bits, rank, backend = budget.uniform
    if bits not in space.bits or rank not in space.ranks or (bits < 16 and backend != space.backend):
        return None
    return space.uniform(bits, rank)


def _fmt(value: float | None) -> str:
    return "n/a (too few points)" if value is None else f"{value:.3f}"
