"""``qra search``: model info, budget, priors, first population, stage 1, stage 2, outputs — in that order.

Only wiring lives here. Every evaluation is a real SFT fidelity run sent through the executor, which
reads finished results from ``store.sqlite`` instead of recomputing them; since every random choice
comes from the seed and scores are the only feedback, re-running the same command replays the search
from the store and continues where a killed run stopped. One process per output directory (a lock).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from planner.config import QRAConfig
from planner.fidelity.contract import fidelity_levels, recipe_hash
from planner.objectives import describe, objective_for
from planner.orchestration.confirm import choose, finalists, unconfirmed_note, verdict
from planner.orchestration.progress import SearchProgress, planned_evaluations
from planner.orchestration.report import next_facts, write_report
from planner.orchestration.setup import (
    PLAN_FILE,
    STORE_FILE,
    SearchSetup,
    exclusive_run,
    open_executor,
    stale_recipe_note,
    time_split,
)
from planner.priors.adapter_init import save_plan
from planner.priors.error_table import cached_error_table
from planner.priors.profile import profile
from planner.search.allocation import Importance, named_prior_allocations, table_allocation, warm_start
from planner.search.evolution import Stage1Result, Stage1Settings, run_stage1
from planner.search.pareto import Point, against_free, best_for_budget, prefer_free, write_pareto
from planner.search.space import Allocation, allocation_key
from planner.search.surrogate import FIT_STATS
from planner.search.trust_region import TRSettings, run_stage2
from planner.store import Store
from qra_plugin.errors import QRAError
from qra_plugin.io import write_json_atomic

PARETO_FILE = "pareto.json"
REPORT_FILE = "report.html"
TRACE_FILE = "trace.json"
__all__ = ["PARETO_FILE", "PLAN_FILE", "REPORT_FILE", "STORE_FILE", "TRACE_FILE", "SearchResult", "run_search"]


@dataclass
class SearchResult:
    out_dir: Path
    best: Allocation
    best_score: float
    best_memory: int
    budget_bytes: int
    pareto: list[Point]
    surrogate_spearman: float | None
    screening_spearman: float | None
    evaluations: int
    computed: int
    trace: list[dict[str, Any]] = field(default_factory=list)
    #: the budget's uniform plan at the high fidelity (what the user would otherwise run), when it has one
    baseline_score: float | None = None

    @property
    def plan_path(self) -> Path:
        return self.out_dir / PLAN_FILE


@dataclass
class _Run:
    """The state one search carries from step to step."""

    cfg: QRAConfig
    out: Path
    seed: int
    setup: SearchSetup
    say: Callable[..., None]
    counts: dict[str, int] = field(default_factory=lambda: {"computed": 0, "cached": 0})
    bar: Any = None
    gp_failures: int = 0
    failures: dict[str, int] = field(default_factory=lambda: {"transient": 0, "deterministic": 0})
    axolotl_config: Path | None = None
    plan_target: Path | None = None
    #: the zero-evaluation allocations in the first population, by name (greedy_priors, ilp, table_alloc)
    free: dict[str, Allocation] = field(default_factory=dict)
    #: the finalists' scores at the confirm fidelity (empty when it is not set)
    confirmed: dict[Allocation, float | None] = field(default_factory=dict)


def run_search(
    cfg: QRAConfig,
    out_dir: str | Path,
    seed: int | None = None,
    executor_kind: str | None = None,
    *,
    evaluate: Callable | None = None,
    progress: bool = True,
    axolotl_config: Path | None = None,
    plan_target: Path | None = None,
) -> SearchResult:
    """Search per-unit (bits, rank) for ``cfg``'s model and budget; write plan, Pareto front, report, store.

    ``evaluate`` replaces ``planner.fidelity.sft.run_fidelity`` in the executor (tests inject failures).
    ``axolotl_config``: the Axolotl YAML ``cfg`` came from; the plan is also written to ``plan_target`` (its
    ``qra_plan``) and the report's next command is ``axolotl train`` on that file.
    """
    from rich.console import Console

    out = Path(out_dir)
    console = Console(stderr=True, quiet=not progress, highlight=False, log_path=False)
    setup = SearchSetup.build(cfg)  # a bad model, space or budget fails here, before anything is written
    bar = SearchProgress(console, planned_evaluations(cfg), enabled=progress and console.is_terminal)
    with exclusive_run(out):
        run = _Run(cfg, out, cfg.seed if seed is None else int(seed), setup, console.log, bar=bar)
        run.axolotl_config, run.plan_target = axolotl_config, plan_target
        started = time.time()
        priors, importance = _priors(run, progress)  # the profile draws its own bar first
        warm = _first_population(run, importance)
        with bar:
            stages = _evaluate_stages(run, importance, warm, executor_kind, evaluate)
        return _write_outputs(run, priors, *stages, started)


def _priors(run: _Run, progress: bool) -> tuple[Any, Importance]:
    s = run.setup
    run.say(
        f"[bold]qra search[/bold] {run.cfg.name}: {s.space.n_units} {s.space.unit} units, budget {run.cfg.budget} = "
        f"{s.budget_bytes / 2**20:.2f} MiB ({s.budget.kind}), seed {run.seed}"
    )
    if run.seed != run.cfg.seed:
        run.say(
            f"--seed {run.seed} seeds the search only; the priors (calibration rows, plasticity draws) use the "
            f"config's seed {run.cfg.seed}, so every search seed shares one profile"
        )
    priors = profile(run.cfg, run.out, progress=progress)
    importance = Importance.from_priors(priors, s.space)
    if run.cfg.search.surrogate_features == "table":  # the performance model reads the error table
        importance = replace(importance, table=cached_error_table(run.cfg, s.space, run.out))
    return priors, importance


def _first_population(run: _Run, importance: Importance) -> list[Allocation]:
    """The budget's uniform plan (what the user would otherwise run), the priors' free allocations
    (greedy, ILP), then sampled warm starts; ``run_stage1`` keeps the first of any repeats."""
    s, search = run.setup, run.cfg.search
    n_warm = search.warm_start if search.warm_start is not None else max(1, search.population // 2)
    if not n_warm:
        warm: list[Allocation] = []
    else:
        named = s.budget.uniform[1] if s.budget.uniform is not None else None
        rank = named if named in s.space.ranks else sorted(s.space.ranks)[len(s.space.ranks) // 2]
        sampled = warm_start(importance, s.space, s.cost, s.budget_bytes, min(n_warm, search.population), run.seed)
        run.free = named_prior_allocations(s.space, s.cost, s.budget_bytes, importance, rank) | _table_start(run)
        warm = [*run.free.values(), *sampled]
    budget_plan = s.budget_plan()
    return [budget_plan, *warm] if budget_plan is not None else warm


def _table_start(run: _Run) -> dict[str, Allocation]:
    """With ``adapter.init: error``, the error table's allocation (bits and rank priced together, as the init
    repairs): one more zero-evaluation allocation for the first population and for the report to compare with."""
    s, cfg = run.setup, run.cfg
    if cfg.adapter.init != "error" or not cfg.search.table_start or s.space.prune:
        return {}
    run.say("[bold]error table[/bold]: the output error an error-aware init leaves per unit × bits × rank")
    table = cached_error_table(cfg, s.space, run.out)
    try:
        return {"table_alloc": table_allocation(s.space, s.cost, s.budget_bytes, table)}
    except QRAError:  # the budget is below the space's cheapest config: the search says so itself
        return {}


def _evaluate_stages(
    run: _Run, importance: Importance, warm: list[Allocation], executor_kind: str | None, evaluate: Callable | None
) -> tuple[Stage1Result, Any, dict[Allocation, float | None], Any, float]:
    """Stage 1, stage 2 and the budget's uniform plan at the high fidelity, through the store."""
    s, search = run.setup, run.cfg.search

    def on_result(_task: Any, _result: Any, from_store: bool) -> None:
        run.counts["cached" if from_store else "computed"] += 1
        run.bar.advance()

    store = Store(run.out / STORE_FILE)
    for note in (stale_recipe_note(store, run.cfg), unconfirmed_note(run.cfg)):
        if note:
            run.say(f"[yellow]{note}[/yellow]")
    executor = open_executor(run.cfg, store, kind=executor_kind, on_result=on_result, evaluate=evaluate)
    evaluator = s.evaluator(executor, run.say)
    closing = [(s.budget_plan(), "baseline"), (run.free.get("table_alloc"), "table_alloc")]
    evaluator.closing = [(config, stage) for config, stage in closing if config is not None]
    failed_fits = FIT_STATS["failed"]
    stages_start = time.perf_counter()
    try:
        run.say("[bold]stage 1[/bold]: multi-fidelity evolution")
        settings = Stage1Settings(
            search.population, search.generations, search.offspring, search.promote, search.screen_factor,
            seed=run.seed, features=search.surrogate_features,
        )  # fmt: skip
        stage1 = run_stage1(
            s.space,
            importance,
            s.cost,
            s.budget_bytes,
            run.bar.wrap("stage 1", evaluator.for_stage("stage1")),
            settings,
            warm,
            progress=run.say,
        )
        run.say(
            f"performance model held-out Spearman: {_fmt(stage1.surrogate_spearman)}; "
            f"screening model: {_fmt(stage1.screening_spearman)}"
        )
        stage2 = _stage2(run, stage1, evaluator)
        history = dict(stage2.history)
        baseline = s.budget_plan()
        if baseline is not None and baseline not in history:
            run.say("[bold]baseline[/bold]: the uniform plan that defines the budget, at the high fidelity")
            run.bar.stage("baseline · high fidelity")
            history[baseline] = evaluator.run([baseline], "high", "baseline")[0]
        table = run.free.get("table_alloc")
        if table is not None and table not in history:  # the fast path's plan: the report says if the search beat it
            run.say("[bold]table_alloc[/bold]: the error table's allocation, at the high fidelity")
            history[table] = evaluator.run([table], "high", "table_alloc")[0]
        _confirm(run, history, evaluator)
        run.failures = store.failure_counts({recipe_hash(run.cfg, level) for level in fidelity_levels(run.cfg)})
    finally:
        executor.close()
        store.close()
    run.gp_failures = FIT_STATS["failed"] - failed_fits
    return stage1, stage2, history, evaluator, time.perf_counter() - stages_start - evaluator.eval_wall_s


def _confirm(run: _Run, history: dict[Allocation, float | None], evaluator: Any) -> None:
    """Score the finalists at the confirm fidelity, when it is set (``planner.orchestration.confirm``)."""
    level = run.cfg.fidelity.confirm
    if level is None:
        return
    free, budget = _free_allocations(run), run.setup.budget_bytes
    picks = finalists(
        _points(run, history, evaluator.trace), free, budget, run.cfg.search.confirm_top, run.cfg.adapter.init
    )
    if picks:
        run.say(f"[bold]confirm[/bold]: {len(picks)} finalists, {level.steps} steps each")
        run.bar.stage("confirm")
        run.confirmed = dict(zip(picks, evaluator.run(picks, "confirm", "confirm"), strict=True))


def _stage2(run: _Run, stage1: Stage1Result, evaluator: Any) -> Any:
    s, search = run.setup, run.cfg.search
    run.say("[bold]stage 2[/bold]: trust-region Bayesian optimisation")
    high = {r.config: r.high for r in stage1.records.values() if r.high_done}
    settings = TRSettings(
        iterations=search.tr_iterations,
        batch=search.tr_batch,
        length_init=search.tr_length,
        length_max=max(search.tr_length, 2 * s.space.n_units),
        n_candidates=search.tr_candidates,
        seed=run.seed,
        patience=search.tr_patience,
        min_gain=search.min_gain,
        trades=search.tr_trades,
    )
    evaluate = run.bar.wrap("stage 2", evaluator.for_stage("stage2"))
    return run_stage2(s.space, s.fits, s.cost, evaluate, high, settings, progress=run.say)


def _points(run: _Run, history: dict[Allocation, float | None], trace: list[dict[str, Any]]) -> list[Point]:
    stage_of: dict[str, str] = {}
    for row in trace:
        if row["level"] == "high":
            stage_of.setdefault(row["config"], row["stage"])
    measured = {row["config"]: row["memory_measured"] for row in trace if row["level"] == "high"}
    cost = run.setup.cost
    return [
        Point(c, float(v), cost(c), measured.get(allocation_key(c)), stage_of.get(allocation_key(c), ""))
        for c, v in sorted(history.items())
        if v is not None
    ]


def _write_outputs(
    run: _Run,
    priors: Any,
    stage1: Stage1Result,
    stage2: Any,
    history: dict[Allocation, float | None],
    evaluator: Any,
    planner_s: float,
    started: float,
) -> SearchResult:

    s, cfg, out = run.setup, run.cfg, run.out
    points = _points(run, history, evaluator.trace)
    best = best_for_budget(points, s.budget_bytes)
    if best is None:
        raise QRAError("no evaluated plan fits the budget (every high-fidelity evaluation failed?)")
    confirm = None
    if run.confirmed:  # the longer runs decide; the front keeps the high-fidelity scores
        steps = cfg.fidelity.confirm.steps if cfg.fidelity.confirm else 0
        best, confirm = choose(points, run.confirmed, _free_allocations(run), best, cfg.search.min_gain, steps)
        set_aside = None
    else:
        best, set_aside = prefer_free(_free_allocations(run), points, best, s.budget_bytes, cfg.search.min_gain)
    scored = describe(cfg)
    pareto = write_pareto(out / PARETO_FILE, s.space, points, s.budget_bytes, cfg.budget, s.budget.kind, scored)
    search_meta = {
        "config": cfg.name,
        "seed": run.seed,
        "priors_seed": cfg.seed,
        "score": best.score,
        "objective": scored,
        "memory_bytes": best.memory,
        "budget": cfg.budget,
        "budget_bytes": s.budget_bytes,
        "budget_kind": s.budget.kind,
    } | ({"confirm_score": confirm["score"], "confirm_steps": confirm["steps"]} if confirm else {})
    plan = s.space.to_plan(best.config, meta={"qra_search": search_meta})

    # the Axolotl YAML's qra_plan reads it at plan_target
    save_plan(cfg, plan, [out / PLAN_FILE] + ([run.plan_target] if run.plan_target is not None else []), out)
    summary = _summary(run, stage1, stage2, history, evaluator.trace, best, planner_s, started)
    summary["within_noise_of_free"], summary["objective"], summary["confirm"] = set_aside, scored, confirm
    summary.update(next_facts(run, best.config, summary))
    write_json_atomic(out / TRACE_FILE, summary)
    write_report(out, s.space, priors, summary, points, pareto, best)
    run.say(
        f"[green]best plan[/green] {objective_for(cfg).label} {objective_for(cfg).shown(best.score):.4f}, "
        f"{best.memory / 2**20:.2f} MiB of {s.budget_bytes / 2**20:.2f} MiB → {out / PLAN_FILE}"
    )
    if confirm:
        run.say(verdict(summary))
    elif summary["best_is_free_allocation"]:
        run.say(
            f"[yellow]the prior allocation is already the best found[/yellow]: the plan is the "
            f"{summary['best_is_free_allocation']} allocation, which needs no evaluation; no evaluated "
            "candidate beat it at the high fidelity"
            + (" by more than search.min_gain" if summary["within_noise_of_free"] else "")
        )
    elif summary["gain_over_best_free"] is not None:
        run.say(
            f"best plan vs the best zero-evaluation allocation ({summary['best_free_allocation']}): "
            f"{summary['gain_over_best_free']:+.4f} nats at the high fidelity (one seed: seed noise not measured)"
        )
    return SearchResult(
        out_dir=out,
        best=best.config,
        best_score=best.score,
        best_memory=best.memory,
        budget_bytes=s.budget_bytes,
        pareto=pareto,
        surrogate_spearman=stage1.surrogate_spearman,
        screening_spearman=stage1.screening_spearman,
        evaluations=len(evaluator.trace),
        computed=run.counts["computed"],
        trace=evaluator.trace,
        baseline_score=summary["baseline_score"],
    )


def _summary(
    run: _Run,
    stage1: Stage1Result,
    stage2: Any,
    history: dict[Allocation, float | None],
    trace: list[dict[str, Any]],
    best: Point,
    planner_s: float,
    started: float,
) -> dict[str, Any]:
    cfg, s = run.cfg, run.setup
    baseline = s.budget_plan()
    return {
        "name": cfg.name,
        "seed": run.seed,
        "priors_seed": cfg.seed,
        "budget": cfg.budget,
        "budget_bytes": s.budget_bytes,
        "best": allocation_key(best.config),
        "best_score": best.score,
        "best_memory": best.memory,
        "surrogate_spearman": stage1.surrogate_spearman,
        "screening_spearman": stage1.screening_spearman,
        "stage1_generations": stage1.generations,
        "stage2_restarts": stage2.restarts,
        "stage2_stopped_early_at": stage2.stopped_early_at,
        "baseline": allocation_key(baseline) if baseline is not None else None,
        "baseline_score": history.get(baseline) if baseline is not None else None,
        **against_free(_free_allocations(run), best, history),
        "evaluations": trace,
        "failures": run.failures,
        "gp_fit_failures": run.gp_failures,
        "computed_this_run": run.counts["computed"],
        "wall_s_this_run": round(time.time() - started, 1),
        "search_steps": sum(r["steps"] for r in trace),
        # the planner's own compute (operators, performance model, GP fits, acquisition) between evaluations
        "planner_s": round(planner_s, 3),
        "planner_s_per_proposal": round(planner_s / max(len(trace), 1), 4),
        "evaluation_time": time_split(trace),
        "final_finetune_steps": cfg.fidelity.high.steps,
    }


def _free_allocations(run: _Run) -> dict[str, Allocation]:
    """The allocations that cost no evaluation: the priors' (greedy, ILP), the error table's and the budget's
    uniform plan."""
    free = dict(run.free)
    baseline = run.setup.budget_plan()
    if baseline is not None:
        free["uniform"] = baseline
    return free


def _fmt(value: float | None) -> str:
    return "n/a (too few points)" if value is None else f"{value:.3f}"
