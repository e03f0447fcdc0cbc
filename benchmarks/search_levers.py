"""Do issue 12's search levers make the evaluations earn their cost? qra variants on the plan-quality yardstick.

Runs on the plan-quality benchmark's own stores and protocol (``benchmarks.harness.benchmark``: same recipe,
priors, splits, budgets, 40-step test finals over 3 seeds, one finals store), so the round-2 ``qra``,
``greedy_priors`` and the uniform plan are read from it, not recomputed. Each variant is a ``qra search`` with
some search settings changed (``VARIANTS``), in ``<out>/<budget>/qra_<variant>/``; its evaluations score on the
selection split only.
The result compares every variant with the zero-evaluation greedy prior plan and with round 2's qra — paired by
seed (``planner.stats``: mean ± s.e. of the per-seed difference, paired t, resolved at p < 0.05) — and reports its
cost in finals with and without the priors.

  python -m benchmarks.search_levers --recipe cpu --out benchmarks/results/plan_quality_stores
  python -m benchmarks.search_levers --reread benchmarks/results/search_levers.json   # statistics only, no run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import command_line, write_result
from benchmarks.harness.benchmark import BUDGETS, DEFAULT_BUDGETS, RECIPES, Benchmark, recipe_paths
from benchmarks.harness.report import (
    STATISTICS,
    differences_table,
    final_cells,
    loss_and_accuracy,
    summarize_method,
)

#: search settings each variant changes (everything else is the recipe's)
VARIANTS: dict[str, dict[str, Any]] = {
    # the performance models see the priors' aggregates; stage 2 long enough to grow, shrink and restart, with
    # trades (rank for bits) under the binding budget, stopping when it stops beating its start by the noise
    "levers": {
        "surrogate_features": "prior",
        "tr_trades": True,
        "tr_iterations": 8,
        "tr_patience": 4,
        "min_gain": 0.003,
    },
}
REFERENCES = ("greedy_priors", "qra")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument(
        "--out", default=None, help="the plan-quality working directory; default runs/plan-quality-RECIPE"
    )
    parser.add_argument("--results", default=None, help="default benchmarks/results/search_levers[_RECIPE].json")
    parser.add_argument("--budgets", default=",".join(DEFAULT_BUDGETS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--reread", type=Path, help="recompute a written result's differences from its finals; no run")
    args = parser.parse_args(argv)
    if args.reread:
        reread(args.reread)
        return 0
    out, results = recipe_paths("search_levers", args.recipe, args.out, args.results, work="plan-quality")
    bench = LeversBenchmark(RECIPES[args.recipe], args.recipe, out, results, command_line("search_levers", argv))
    bench.run_levers(args.budgets.split(","), args.variants.split(","))
    return 0


class LeversBenchmark(Benchmark):
    """The plan-quality machinery with extra qra variants per budget; references come from its stores."""

    def run_levers(self, budgets: list[str], variants: list[str]) -> None:
        from planner.orchestration.setup import SearchSetup

        started = time.time()
        self._priors()
        report: dict[str, Any] = {}
        for name in budgets:
            budget = BUDGETS[name][0]
            cfg = self.base.model_copy(update={"budget": budget, "name": f"{self.base.name}-{name}"})
            setup = SearchSetup.build(cfg)
            references = self._search_and_baselines(name, cfg, setup, BUDGETS[name][2])  # stored: re-read
            plans = {m: references[m] for m in REFERENCES}
            for variant in variants:
                plans[f"qra_{variant}"] = self._variant(name, cfg, setup, variant)
            finals = self._finals(cfg, {m: p for m, (p, _) in plans.items()})
            step_s = summarize_method(finals["qra"]).get("step_s")
            methods = {m: self._method(p, facts, finals[m], setup, step_s) for m, (p, facts) in plans.items()}
            report[name] = {
                "budget": budget,
                "budget_bytes": setup.budget_bytes,
                "methods": methods,
                "differences": differences(methods),
            }
        self._write_levers(report, variants, time.time() - started)

    def _variant(self, budget: str, cfg: Any, setup: Any, variant: str) -> tuple[Any, dict[str, Any]]:
        from planner.orchestration.search_run import run_search

        search = cfg.search.model_copy(update=VARIANTS[variant])
        vcfg = cfg.model_copy(update={"search": search, "name": f"{cfg.name}-{variant}"})
        directory = self.out / budget / f"qra_{variant}"
        self._seed_priors(directory)
        state = self.progress.setdefault(budget, {})
        t0 = time.time()
        result = run_search(vcfg, directory, progress=False)
        state.setdefault(f"qra_{variant}", {"wall_s": round(time.time() - t0, 1)})
        self._save_progress()
        trace = json.loads((directory / "trace.json").read_text())
        facts = {
            "evaluations": len(trace["evaluations"]),
            "search_steps": int(trace["search_steps"]),
            "priors": True,
            "search_score": result.best_score,
            "best_is_free_allocation": trace.get("best_is_free_allocation"),
            "gain_over_best_free": trace.get("gain_over_best_free"),
            "stage2_restarts": trace.get("stage2_restarts"),
            "stage2_stopped_early_at": trace.get("stage2_stopped_early_at"),
            "surrogate_spearman": trace.get("surrogate_spearman"),
            "screening_spearman": trace.get("screening_spearman"),
            "evaluation_time": trace.get("evaluation_time"),
            "wall_s": state[f"qra_{variant}"]["wall_s"],
        }
        return setup.space.to_plan(result.best), facts

    def _method(self, plan: Any, facts: dict, finals: list, setup: Any, step_s: float | None) -> dict[str, Any]:
        summary = super()._method(plan, facts, finals, setup, step_s)
        return summary | {k: v for k, v in facts.items() if k not in summary and k != "priors"}

    def _write_levers(self, report: dict[str, Any], variants: list[str], wall_s: float) -> None:
        results = {
            "command": self.command,
            "recipe": self.recipe_name,
            "protocol": self._protocol(),
            "variants": {v: VARIANTS[v] for v in variants},
            "references": "read from the plan-quality stores (round-2 qra, greedy_priors): not recomputed",
            "statistics": STATISTICS,
            "budgets": report,
            "wall_s_this_run": round(wall_s, 1),
        }
        write_result(self.results_path, results, markdown(results))


def differences(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every qra variant − each reference, test loss and accuracy, paired by seed."""
    return {
        f"{v}-{ref}": loss_and_accuracy(methods[v], methods[ref])
        for v in methods
        if v.startswith("qra_")
        for ref in REFERENCES
    }


def reread(path: Path) -> dict[str, Any]:
    """Recompute a written result's differences from the per-seed finals it holds and rewrite it and its markdown."""
    results = json.loads(path.read_text())
    results["statistics"] = STATISTICS
    for budget in results["budgets"].values():
        budget["differences"] = differences(budget["methods"])
    write_result(path, results, markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Search levers ({results['recipe']})", "", f"`{results['command']}`", ""]
    lines.append(f"Variants: {json.dumps(results['variants'])}; finals on the test split, seeds "
                 f"{results['protocol']['seeds']}, {results['protocol']['final_steps']} steps.")  # fmt: skip
    for name, budget in results["budgets"].items():
        lines += [
            "",
            f"## {name} ({budget['budget_bytes'] / 2**20:.2f} MiB)",
            "",
            "| method | test loss (mean ± sd) | accuracy | evaluations | search cost (with priors) |",
            "|---|---|---|---|---|",
        ]
        for method, m in budget["methods"].items():
            shown, acc = final_cells(m)
            lines.append(
                f"| {method} | {shown} | {acc} | {m['evaluations']} | "
                f"{m['search_cost']:.2f} ({m['search_cost_with_priors']:.2f}) |"
            )
        lines += [
            "",
            "Variant − reference, paired by seed: mean ± s.e. of the per-seed difference (paired t, df, two-sided p); "
            "* = p < 0.05 (|t| > 4.30 at n = 3). Loss: negative = variant better; accuracy: positive.",
            "",
            *differences_table(budget["differences"], "variant − reference"),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
