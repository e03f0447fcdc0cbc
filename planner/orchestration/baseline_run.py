"""``qra baseline``: choose a plan with one of the baselines (``planner.search.baselines``) under the same
set-up, store and executor as ``qra search``, and write it with what it scored."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from planner.config import QRAConfig
from planner.orchestration.setup import STORE_FILE, SearchSetup, exclusive_run, open_executor
from planner.priors import profile
from planner.priors.adapter_init import save_plan
from planner.priors.error_table import cached_error_table
from planner.search.allocation import Importance
from planner.search.baselines import METHODS, BaselineResult, choose
from planner.search.space import allocation_key
from planner.store import Store
from qra_plugin.errors import QRAError
from qra_plugin.io import write_json_atomic


def run_baseline(
    cfg: QRAConfig,
    out_dir: str | Path,
    method: str,
    *,
    evaluations: int = 8,
    rank: int | None = None,
    bits: int | None = None,
    seed: int | None = None,
    executor_kind: str | None = None,
    progress: bool = True,
    score_choice: bool = True,
) -> BaselineResult:
    """Choose a plan with ``method``; write ``<out>/<method>/plan.yaml`` and ``result.json``.

    Same model info, budget, space, memory model, store and executor as ``qra search`` (``SearchSetup``),
    so a baseline's evaluations are the same real SFT runs, shared with a search in the same directory.
    """
    if method not in METHODS:
        raise QRAError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    out = Path(out_dir)
    seed = cfg.seed if seed is None else int(seed)
    console = Console(stderr=True, quiet=not progress, highlight=False, log_path=False)
    if method == "table_alloc" and cfg.adapter.init != "error":  # the table prices ranks as error-init repairs
        console.log("table_alloc: adapters start from the quantization error (adapter.init: error)")
        cfg = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"init": "error"})})
    setup = SearchSetup.build(cfg)  # bad input fails before anything is written
    with exclusive_run(out):
        importance = _importance(cfg, out, setup, progress) if method in ("ilp", "greedy_priors") else None
        table = cached_error_table(cfg, setup.space, out) if method == "table_alloc" else None
        store = Store(out / STORE_FILE)
        executor = open_executor(cfg, store, kind=executor_kind)
        try:
            evaluate = setup.evaluator(executor, console.log).for_stage(f"baseline-{method}")
            result = choose(
                method,
                setup.space,
                setup.cost,
                setup.budget_bytes,
                evaluate,
                importance=importance,
                table=table,
                evaluations=evaluations,
                rank=rank,
                bits=bits,
                seed=seed,
                score_choice=score_choice,
            )
        finally:
            executor.close()
            store.close()
        target = _write_baseline(out / method, cfg, setup, method, result)
    mib = setup.cost(result.config) / 2**20
    scored = f"loss {result.score}" if result.evaluations else "not fine-tuned (--no-score)"
    console.log(f"[green]{method}[/green] {scored} at {mib:.2f} MiB → {target}")
    return result


def _importance(cfg: QRAConfig, out: Path, setup: SearchSetup, progress: bool) -> Importance:
    return Importance.from_priors(profile(cfg, out, progress=progress), setup.space)


def _write_baseline(target: Path, cfg: QRAConfig, setup: SearchSetup, method: str, result: BaselineResult) -> Path:
    memory = setup.cost(result.config)
    meta = {"qra_baseline": {"method": method, "score": result.score, "memory_bytes": memory, "budget": cfg.budget}}
    save_plan(cfg, setup.space.to_plan(result.config, meta=meta), [target / "plan.yaml"], target.parent)
    write_json_atomic(
        target / "result.json",
        {
            "method": method,
            "config": allocation_key(result.config),
            "score": result.score,
            "memory_bytes": memory,
            "budget_bytes": setup.budget_bytes,
            "evaluations": result.evaluations,
            "history": [[allocation_key(c), s] for c, s in result.history],
        },
    )
    return target / "plan.yaml"
