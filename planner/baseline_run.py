"""``qra baseline METHOD CONFIG``: one baseline under the config's budget, scored like the search.

Uses the same model info, budget, space, memory model, store and executor as ``qra search``, so a
baseline's evaluations are real SFT runs cached in the same kind of ``store.sqlite`` (and shared with a
search when pointed at the same directory).
"""

from __future__ import annotations

from pathlib import Path

from planner.baselines import METHODS, BaselineResult, choose
from planner.config import QRAConfig
from planner.space import config_key
from qra_plugin.errors import QRAError
from qra_plugin.io import write_json_atomic


def run_baseline(
    cfg: QRAConfig,
    out_dir: str | Path,
    method: str,
    *,
    evaluations: int = 8,
    rank: int = 16,
    bits: int | None = None,
    seed: int | None = None,
    executor_kind: str | None = None,
    progress: bool = True,
    score_choice: bool = True,
) -> BaselineResult:
    """Choose a plan with ``method``; write ``<out>/<method>/plan.yaml`` and ``result.json``."""
    if method not in METHODS:
        raise QRAError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    from rich.console import Console

    from planner.evolution import Importance
    from planner.executors import make_executor
    from planner.search import STORE_FILE, SearchSetup
    from planner.store import Store

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed if seed is None else int(seed)
    console = Console(stderr=True, quiet=not progress, highlight=False, log_path=False)
    setup = SearchSetup.build(cfg)
    importance = None
    if method in ("ilp", "greedy_priors"):
        from planner.priors import profile

        importance = Importance.from_priors(profile(cfg, out, progress=progress), setup.space)
    store = Store(out / STORE_FILE)
    executor = make_executor(
        executor_kind or cfg.search.executor,  # type: ignore[arg-type]
        subprocess=cfg.fidelity.subprocess,
        store=store,
        ray_address=cfg.search.ray_address,
        gpus_per_eval=cfg.search.gpus_per_eval,
        timeout_s=cfg.fidelity.timeout_s,
        workers=cfg.fidelity.workers,
    )
    try:
        evaluate = setup.evaluator(executor, console.log).for_stage(f"baseline-{method}")
        result = choose(
            method,
            setup.space,
            setup.cost,
            setup.budget_bytes,
            evaluate,
            importance=importance,
            evaluations=evaluations,
            rank=rank,
            bits=bits,
            seed=seed,
            score_choice=score_choice,
        )
    finally:
        executor.close()
        store.close()
    memory = setup.cost(result.config)
    plan = setup.space.to_plan(
        result.config,
        meta={"qra_baseline": {"method": method, "score": result.score, "memory_bytes": memory, "budget": cfg.budget}},
    )
    target = out / method
    plan.save(target / "plan.yaml")
    write_json_atomic(
        target / "result.json",
        {
            "method": method,
            "config": config_key(result.config),
            "score": result.score,
            "memory_bytes": memory,
            "budget_bytes": setup.budget_bytes,
            "evaluations": result.evaluations,
            "history": [[config_key(c), s] for c, s in result.history],
        },
    )
    console.log(f"[green]{method}[/green] loss {result.score} at {memory / 2**20:.2f} MiB → {target / 'plan.yaml'}")
    return result
