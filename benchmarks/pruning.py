"""Pruning benchmark: at one memory, does pruning + searched bits/ranks fine-tune better than not pruning?

Protocol (the plan-quality protocol, ``benchmarks.harness.benchmark``, with its recipe, splits and finals):

* the budget is the ``plan`` memory (planned weights + quantization metadata + LoRA + its gradients and
  optimizer states) of ``uniform_prune_lora``: every block's MLP channels and key/value groups pruned by
  ``--reduction`` (kept by the Wanda-style channel importance on the calibration rows), then uniform 4-bit
  r16 LoRA — the LLM-Pruner-style reference. Every other method gets the same budget:
* ``rankadaptor``: the same fixed pruning, per-block ranks searched (4-bit; RankAdaptor's setting);
* ``qra_prune``: per-block pruning ratio × bits × rank searched jointly (``space.prune`` with several ratios);
* ``qra``: the unpruned model, bits × rank searched; ``uniform_unpruned``: the best uniform unpruned plan
  that fits (most bits, then most rank);
* every search scores on the selection split; the chosen plans are fine-tuned ``final_steps`` on train and
  scored on the test split, 3 seeds (never seen by any search).

``params_kept_fraction`` is over the planned linear weights (what pruning removes). Stored as it runs under
``--out`` and resumable; commit ``--out benchmarks/results/pruning_stores`` to resume on another machine.

Differences are paired by seed (``planner.stats``: the same seed gives every method the same data order and init).

  python -m benchmarks.pruning --recipe cpu --out benchmarks/results/pruning_stores
  python -m benchmarks.pruning --reread benchmarks/results/pruning.json   # statistics only, no run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import command_line, write_result
from benchmarks.harness.benchmark import RECIPES, Benchmark, Recipe, recipe_paths
from benchmarks.harness.report import (
    DIFFERENCES_NOTE,
    STATISTICS,
    differences_table,
    final_cells,
    loss_and_accuracy,
    summarize_method,
)
from planner.config import QRAConfig

#: the ratios ``qra_prune`` chooses from per block (the reduction itself must be one of them)
SEARCHED_RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5)
SEARCHED = ("qra_prune", "rankadaptor", "qra")
ORDER = ("uniform_prune_lora", "rankadaptor", "qra_prune", "qra", "uniform_unpruned")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--reduction", type=float, default=0.25, choices=[r for r in SEARCHED_RATIOS if r > 0])
    parser.add_argument("--out", default=None, help="working directory; default runs/pruning-RECIPE")
    parser.add_argument("--results", default=None, help="default benchmarks/results/pruning[_RECIPE].json")
    parser.add_argument("--reread", type=Path, help="recompute a written result's differences from its finals; no run")
    args = parser.parse_args(argv)
    if args.reread:
        reread(args.reread)
        return 0
    out, results = recipe_paths("pruning", args.recipe, args.out, args.results)
    command = command_line("pruning", argv)
    PruningBenchmark(RECIPES[args.recipe], args.recipe, out, results, command, args.reduction).run_all()
    return 0


class PruningBenchmark(Benchmark):
    """The plan-quality machinery (priors once, finals through one store) with pruned methods."""

    def __init__(self, recipe: Recipe, name: str, out: Path, results: Path, command: str, reduction: float) -> None:
        super().__init__(recipe, name, out, results, command)
        self.reduction = reduction
        # one priors file for every method: the pruning prior at every searched ratio
        self.base = self._cfg(profile={**self.base.profile.model_dump(), "prune_ratios": list(SEARCHED_RATIOS[1:])})

    def _cfg(self, **sections: Any) -> QRAConfig:
        """The base config with some sections replaced, validated again (so derived settings follow)."""
        return QRAConfig.model_validate({**self.base.model_dump(), **sections})

    def run_all(self) -> None:
        from planner.memory import plan_bytes
        from planner.orchestration.setup import SearchSetup

        started = time.time()
        self._priors()
        space = self.base.space.model_dump()
        fixed = self._cfg(space={**space, "prune": [self.reduction]}, budget="plan:uniform:4bit:r16")
        fixed_setup = SearchSetup.build(fixed)
        reference = fixed_setup.space.to_plan(fixed_setup.space.uniform(4, 16))
        budget = f"plan:{plan_bytes(fixed_setup.info, reference, fixed_setup.settings, 'plan')}"
        cfgs = {
            "rankadaptor": self._cfg(space={**space, "prune": [self.reduction], "bits": [4]}, budget=budget),
            "qra_prune": self._cfg(space={**space, "prune": list(SEARCHED_RATIOS)}, budget=budget),
            "qra": self._cfg(budget=budget),
        }
        plans: dict[str, tuple[Any, dict[str, Any]]] = {"uniform_prune_lora": (reference, {"evaluations": 0})}
        for method, cfg in cfgs.items():
            plans[method] = self._search(method, cfg)
        unpruned = SearchSetup.build(cfgs["qra"])
        from planner.search.allocation import uniform_under_budget

        plain = uniform_under_budget(unpruned.space, unpruned.cost, unpruned.budget_bytes)
        plans["uniform_unpruned"] = (unpruned.space.to_plan(plain), {"evaluations": 0})
        finals = self._finals(cfgs["qra"], {m: p for m, (p, _) in plans.items()})
        methods = {m: self._summary(unpruned, plan, facts, finals[m]) for m, (plan, facts) in plans.items()}
        self._write_pruning(budget, unpruned.budget_bytes, methods, time.time() - started)

    def _search(self, method: str, cfg: QRAConfig) -> tuple[Any, dict[str, Any]]:
        from planner.orchestration.search_run import run_search
        from planner.orchestration.setup import SearchSetup

        directory = self.out / method
        self._seed_priors(directory)
        t0 = time.time()
        result = run_search(cfg.model_copy(update={"name": f"{self.base.name}-{method}"}), directory, progress=False)
        trace = json.loads((directory / "trace.json").read_text())
        state = self.progress.setdefault("pruning", {})
        state.setdefault(method, {"wall_s": round(time.time() - t0, 1)})
        self._save_progress()
        plan = SearchSetup.build(cfg).space.to_plan(result.best)
        facts = {"evaluations": len(trace["evaluations"]), "search_steps": int(trace["search_steps"])}
        return plan, facts | {"search_score": result.best_score, "wall_s": state[method]["wall_s"]}

    def _summary(self, setup: Any, plan: Any, facts: dict[str, Any], finals: list[dict[str, Any]]) -> dict[str, Any]:
        from planner.memory import plan_bytes
        from planner.model_info import pruned_info

        summary = summarize_method(finals, memory_key="plan_bytes_measured")
        kept = sum(s.numel for s in pruned_info(setup.info, plan).linears) / setup.info.linear_numel
        memory = int(plan_bytes(setup.info, plan, setup.settings, "plan"))
        summary.update(
            {
                "plan_hash": plan.content_hash(),
                "memory_predicted": memory,
                "within_budget": memory <= setup.budget_bytes,
                "params_kept_fraction": round(kept, 4),
                "mlp_pruned_by_block": [
                    _mlp_pruned(plan, b, setup.info.intermediate_size) for b in range(setup.info.n_blocks)
                ],
                "mean_rank": round(sum(m.rank for m in plan.modules.values()) / len(plan.modules), 2),
                "bits": sorted({m.bits for m in plan.modules.values()}),
                **{k: facts.get(k) for k in ("evaluations", "search_steps", "search_score", "wall_s")},
            }
        )
        return summary

    def _write_pruning(self, budget: str, budget_bytes: int, methods: dict[str, Any], wall_s: float) -> None:
        results = {
            "command": self.command,
            "recipe": self.recipe_name,
            "reduction": self.reduction,
            "budget": budget,
            "budget_bytes": budget_bytes,
            "budget_defined_by": "uniform_prune_lora (plan memory)",
            "protocol": self._protocol(),
            "searched_ratios": list(SEARCHED_RATIOS),
            "params_kept_over": "planned linear weights",
            "methods": {m: methods[m] for m in ORDER if m in methods},
            "statistics": STATISTICS,
            "differences": differences(methods),
            "wall_s_this_run": round(wall_s, 1),
            "priors_wall_s": self.progress.get("priors_wall_s"),
        }
        write_result(self.results_path, results, markdown(results))


def differences(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pairs ``_pairs`` names, test loss and accuracy, paired by seed."""
    best_unpruned = min(("qra", "uniform_unpruned"), key=lambda m: methods[m]["final_eval_loss_mean"] or 9e9)
    return {f"{a}-{b}": loss_and_accuracy(methods[a], methods[b]) for a, b in _pairs(best_unpruned)}


def reread(path: Path) -> dict[str, Any]:
    """Recompute a written result's differences from the per-seed finals it holds and rewrite it and its markdown."""
    results = json.loads(path.read_text())
    results["statistics"] = STATISTICS
    results["differences"] = differences(results["methods"])
    write_result(path, results, markdown(results))
    return results


def _pairs(best_unpruned: str) -> list[tuple[str, str]]:
    """Each pruned method against the best unpruned one, and each search against the plan it starts from."""
    pruned = [(m, best_unpruned) for m in ("uniform_prune_lora", "rankadaptor", "qra_prune")]
    starts = [("rankadaptor", "uniform_prune_lora"), ("qra_prune", "uniform_unpruned"), ("qra", "uniform_unpruned")]
    return pruned + starts


def _mlp_pruned(plan: Any, block: int, intermediate: int) -> float:
    keep = plan.pruning.get(block)
    return round(1 - len(keep.mlp_keep) / intermediate, 3) if keep is not None and keep.mlp_keep else 0.0


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Pruning benchmark ({results['recipe']}): reduction {results['reduction']:g}, budget "
        f"{results['budget_bytes'] / 2**20:.2f} MiB ({results['budget_defined_by']})",
        "",
        f"`{results['command']}`; finals on the test split, seeds {results['protocol']['seeds']}, "
        f"{results['protocol']['final_steps']} steps; searches score on the disjoint selection split.",
        "",
        "| method | final eval loss (mean ± sd) | accuracy | params kept | memory (MiB) | evaluations |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        shown, acc = final_cells(m)
        lines.append(
            f"| {name} | {shown} | {acc} | {m['params_kept_fraction']:.3f} | "
            f"{m['memory_predicted'] / 2**20:.2f} | {m.get('evaluations') or 0} |"
        )
    lines += ["", DIFFERENCES_NOTE, "", *differences_table(results["differences"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
