"""Which fidelity predicts the final fine-tune? Rank correlation of short selection-split runs with final test scores.

Takes the plans the plan-quality benchmark fine-tuned (every method, every budget: its ``plan_quality.json``
and the plans under its ``--out``), scores each with a ladder of short SFT runs (``--steps``, seed 0, on the
**selection** split, exactly as a search would) and reports, per step count, the Spearman correlation of
those scores with the plans' mean **test** loss (and task accuracy) after the final fine-tunes. A fidelity
whose correlation is low cannot tell the search which plan will fine-tune better, whatever the optimizer.
Every run is stored (SQLite under ``--out``) and a re-run resumes.

  python -m benchmarks.fidelity_correlation --out benchmarks/results/fidelity_correlation_store
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, command_line, run_tasks, write_result
from benchmarks.harness.benchmark import BUDGETS, RECIPES, uniform_plan
from planner.config import FidelityLevel, QRAConfig


def _plans(stores: Path, name: str, methods: dict[str, Any], space: Any) -> dict[str, Any]:
    """The plan each method fine-tuned at budget ``name``, checked against the hash the benchmark recorded."""
    from qra_plugin.plan import Plan

    budget_dir = stores / name
    out = {}
    for method, facts in methods.items():
        path = budget_dir / "qra" / "plan.yaml" if method == "qra" else budget_dir / "baselines" / method / "plan.yaml"
        if path.is_file():
            plan = Plan.load(path)
        else:  # the uniform plan and the unquantized ceiling are not searched for
            bits, rank = (16, 16) if method == "unquantized_r16" else BUDGETS[name][1:]
            plan = uniform_plan(space, bits, rank)
        if plan.content_hash() != facts.get("plan_hash"):
            raise SystemExit(f"{name}/{method}: plan on disk is not the one the benchmark fine-tuned")
        out[f"{name}/{method}"] = (plan, facts)
    return out


def _scores(cfg: QRAConfig, plans: dict[str, Any], steps: list[int], store_path: Path) -> dict[int, dict[str, float]]:
    """Selection-split eval loss of every plan after each number of steps (seed 0), through one store."""
    from planner.fidelity.contract import EvalTask

    scores: dict[int, dict[str, float]] = {}
    for n in steps:
        level_cfg = cfg.model_copy(deep=True)
        level_cfg.fidelity.high = FidelityLevel(steps=n, eval_examples=cfg.fidelity.high.eval_examples)
        tasks = [EvalTask(plan=p, level="high", seed=0, config=level_cfg, tag=k) for k, (p, _) in plans.items()]
        results = run_tasks(store_path, tasks)
        scores[n] = {t.tag: r.eval_loss for t, r in zip(tasks, results, strict=True) if r.eval_loss is not None}
    return scores


def _correlations(scores: dict[int, dict[str, float]], plans: dict[str, Any]) -> list[dict[str, Any]]:
    from planner.search.surrogate import spearman

    rows = []
    for n, by_plan in scores.items():
        keys = [k for k in plans if k in by_plan]
        final_loss = [plans[k][1]["final_eval_loss_mean"] for k in keys]
        accs = [(k, plans[k][1].get("final_accuracy_mean")) for k in keys]
        accs = [(k, a) for k, a in accs if a is not None]
        # the search's hard case: plans whose finals are close (the better half by final test loss)
        best_half = sorted(keys, key=lambda k: plans[k][1]["final_eval_loss_mean"])[: max(3, len(keys) // 2)]
        rows.append(
            {
                "steps": n,
                "plans": len(keys),
                "spearman_final_loss": spearman([by_plan[k] for k in keys], final_loss),
                "best_half": len(best_half),
                "spearman_final_loss_best_half": spearman(
                    [by_plan[k] for k in best_half], [plans[k][1]["final_eval_loss_mean"] for k in best_half]
                ),
                # lower loss should mean higher accuracy: the sign is flipped so that 1 = ranks them right
                "spearman_final_accuracy": None
                if len(accs) < 3
                else -spearman([by_plan[k] for k, _ in accs], [a for _, a in accs]),  # type: ignore[operator]
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--benchmark", default=str(ROOT / "benchmarks/results/plan_quality.json"))
    parser.add_argument("--stores", default=str(ROOT / "benchmarks/results/plan_quality_stores"))
    parser.add_argument("--steps", default="0,1,3,8,16", help="comma-separated step counts of the ladder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/fidelity_correlation_store"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/fidelity_correlation.json"))
    args = parser.parse_args(argv)
    from planner.orchestration.setup import SearchSetup

    bench = json.loads(Path(args.benchmark).read_text())
    cfg = RECIPES[args.recipe].load()
    plans: dict[str, Any] = {}
    for name, budget in bench["budgets"].items():
        setup = SearchSetup.build(cfg.model_copy(update={"budget": BUDGETS[name][0]}))
        plans.update(_plans(Path(args.stores), name, budget["methods"], setup.space))
    distinct = {p.content_hash(): k for k, (p, _) in plans.items()}  # the same plan twice would count twice
    plans = {k: plans[k] for k in distinct.values()}
    steps = [int(s) for s in args.steps.split(",")]
    scores = _scores(cfg, plans, steps, Path(args.out) / "store.sqlite")
    results = {
        "command": command_line("fidelity_correlation", argv),
        "benchmark": str(Path(args.benchmark).relative_to(ROOT))
        if args.benchmark.startswith(str(ROOT))
        else args.benchmark,
        "what": "Spearman of seed-0 selection-split eval loss after N steps vs the mean test loss of the finals",
        "plans": {
            k: {
                "final_eval_loss_mean": f["final_eval_loss_mean"],
                "final_accuracy_mean": f.get("final_accuracy_mean"),
                "scores": {str(n): scores[n].get(k) for n in steps},
            }
            for k, (_, f) in plans.items()
        },
        "ladder": _correlations(scores, plans),
    }
    write_result(Path(args.results), results)
    for row in results["ladder"]:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
