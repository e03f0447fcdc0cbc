"""Plan-quality benchmark: does the searched plan beat uniform low-bit at equal memory?

For each budget (the memory of uniform 4-bit r16, and of uniform 3-bit r16) on SmolLM2-135M + the wiki
SFT data: run ``qra search`` and every baseline (random and TPE with the same evaluation budget in
optimizer steps as the search; ILP, greedy priors and the budget's uniform plan choose without
evaluations); then fine-tune every chosen plan plus bf16 LoRA r16 with one final recipe over several
seeds, and report final eval loss, gap closure G, predicted vs measured memory, search cost, wall time,
the step-time ratio qra / uniform and the planner's own compute per proposal.

Everything is resumable: searches and baselines keep their SQLite stores, final fine-tunes go to
``<out>/finals.sqlite``; a re-run recomputes nothing that finished. Results are rewritten after every
stage, so an interrupted run still leaves a (partial, ``"complete": false``) summary.

  python benchmarks/plan_quality.py --recipe cpu          # ≈ 2 h on a 2-core CPU
  python benchmarks/plan_quality.py --recipe gpu --out $OUT/pq --results $OUT/plan_quality_gpu.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from plan_quality_report import budget_summary, markdown, plot, summarize_method  # noqa: E402

from planner.config import FidelityLevel, QRAConfig  # noqa: E402
from qra_plugin.io import write_json_atomic, write_text_atomic  # noqa: E402

BUDGETS = {"uniform4_r16": (4, 16), "uniform3_r16": (3, 16)}
EVALUATING = ("random", "tpe")
PRIOR_ONLY = ("ilp", "greedy_priors")


@dataclass(frozen=True)
class Recipe:
    config: str
    final_steps: int
    final_eval_examples: int
    seeds: tuple[int, ...]


RECIPES = {
    # 2-core CPU: ≈ 4.5 s per step at batch 4 × 128 tokens (fp32). 12 final steps (1.5× the high
    # fidelity) keep the whole run, both budgets side by side, at ≈ 2 h on a shared 2-core machine.
    "cpu": Recipe("benchmarks/recipes/plan_quality-cpu.yaml", final_steps=12, final_eval_examples=32, seeds=(0, 1, 2)),
    # one GPU: 256 tokens, batch 8, longer fine-tunes, 4 evaluations side by side per budget process.
    "gpu": Recipe("benchmarks/recipes/plan_quality-gpu.yaml", final_steps=60, final_eval_examples=64, seeds=(0, 1, 2)),
    # tiny Llama built in code: a minutes-long end-to-end check of this script (not a quality result).
    "tiny": Recipe("benchmarks/recipes/plan_quality-tiny.yaml", final_steps=6, final_eval_examples=8, seeds=(0, 1)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument(
        "--out", default=None, help="working directory (stores, plans); default runs/plan_quality-RECIPE"
    )
    parser.add_argument(
        "--results", default=None, help="summary JSON; default benchmarks/results/plan_quality[-RECIPE].json"
    )
    parser.add_argument("--budgets", default=",".join(BUDGETS), help="comma-separated subset of " + ",".join(BUDGETS))
    parser.add_argument("--parallel", action="store_true", help="one process per budget (a GPU fits several)")
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)  # set by --parallel for its children
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    out = Path(args.out or ROOT / "runs" / f"plan_quality-{args.recipe}")
    suffix = "" if args.recipe == "cpu" else f"_{args.recipe}"
    results_path = Path(args.results or ROOT / "benchmarks" / "results" / f"plan_quality{suffix}.json")
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    unknown = [b for b in budgets if b not in BUDGETS]
    if unknown:
        print(f"error: unknown budget(s) {', '.join(unknown)}; choose from {', '.join(BUDGETS)}", file=sys.stderr)
        return 2
    command = "python benchmarks/plan_quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    bench = Benchmark(recipe, args.recipe, out, results_path, command.strip(), part=args.part)
    if args.parallel and len(budgets) > 1:
        return bench.run_parallel(budgets, args.recipe)
    bench.run(budgets)
    return 0


class Benchmark:
    def __init__(
        self, recipe: Recipe, recipe_name: str, out: Path, results_path: Path, command: str, part: str = ""
    ) -> None:
        self.recipe, self.recipe_name, self.out, self.results_path, self.command = (
            recipe,
            recipe_name,
            out,
            results_path,
            command,
        )
        self.base = QRAConfig.load(ROOT / recipe.config)
        self.out.mkdir(parents=True, exist_ok=True)
        suffix = f"-{part}" if part else ""
        self.part = part
        self.progress_path = out / f"progress{suffix}.json"
        self.finals_path = out / f"finals{suffix}.sqlite"  # one store per process: parallel parts never share
        self.progress: dict[str, Any] = (
            json.loads(self.progress_path.read_text()) if self.progress_path.is_file() else {}
        )
        self.summaries: dict[str, Any] = {}
        self.planner: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------ driver
    def run(self, budgets: list[str]) -> None:
        started = time.time()
        self._priors()
        for name in budgets:
            self._budget(name)
        self._write(complete=True, wall_s=time.time() - started)

    def run_parallel(self, budgets: list[str], recipe_name: str) -> int:
        """Priors here, then one child process per budget; merge their summaries (partial if one failed)."""
        import subprocess

        started = time.time()
        self._priors()
        parts = {b: self.results_path.with_name(f"{self.results_path.stem}.part-{b}.json") for b in budgets}
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--recipe",
                    recipe_name,
                    "--budgets",
                    b,
                    "--out",
                    str(self.out),
                    "--results",
                    str(parts[b]),
                    "--part",
                    b,
                ]
            )
            for b in budgets
        ]
        codes = [child.wait() for child in children]
        for path in parts.values():
            if path.is_file():
                part = json.loads(path.read_text())
                self.summaries.update(part["budgets"])
                self.planner.update(part["planner"])
        complete = all(c == 0 for c in codes) and set(self.summaries) == set(budgets)
        self._write(complete=complete, wall_s=time.time() - started)
        return 0 if complete else 1

    def _priors(self) -> None:
        """Profile once into ``<out>/priors``; every method directory gets a copy (the cache key is checked)."""
        from planner.priors.profile import profile

        t0 = time.time()
        profile(self.base, self.out / "priors")
        self.progress.setdefault("priors_wall_s", round(time.time() - t0, 1))
        self._save_progress()

    def _seed_priors(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        source = self.out / "priors" / "priors.json"
        if source.is_file() and not (directory / "priors.json").is_file():
            shutil.copyfile(source, directory / "priors.json")

    def _budget(self, name: str) -> None:
        from planner.baselines import run_baseline
        from planner.memory import plan_bytes
        from planner.search.run import run_search
        from planner.search.setup import SearchSetup
        from qra_plugin.plan import Plan

        bits, rank = BUDGETS[name]
        cfg = self.base.model_copy(update={"budget": f"uniform:{bits}bit:r{rank}", "name": f"{self.base.name}-{name}"})
        setup = SearchSetup.build(cfg)
        space = setup.space
        bdir = self.out / name
        state = self.progress.setdefault(name, {})
        high_steps = cfg.fidelity.high.steps
        plans: dict[str, tuple[Plan, dict[str, Any]]] = {}

        def predicted(plan: Plan) -> int:
            return int(plan_bytes(setup.info, plan, cfg.train, setup.budget.kind))

        def uniform_plan(b: int, r: int) -> Plan:
            return Plan.from_block_pairs(space.fingerprint, space.specs, [(b, r)] * space.n_units, space.backend)

        # ---- qra search
        self._seed_priors(bdir / "qra")
        t0 = time.time()
        result = run_search(cfg, bdir / "qra")
        trace = json.loads((bdir / "qra" / "trace.json").read_text())
        if "qra" not in state:
            state["qra"] = {"wall_s": round(time.time() - t0, 1)}
        search_steps = int(trace["search_steps"])
        plans["qra"] = (
            space.to_plan(result.best),
            {
                "evaluations": len(trace["evaluations"]),
                "search_steps": search_steps,
                "search_score": result.best_score,
                "planner_s": trace.get("planner_s"),
                "planner_s_per_proposal": trace.get("planner_s_per_proposal"),
                "evaluation_s_mean": _mean([e["wall_s"] for e in trace["evaluations"]]),
            },
        )
        self.planner[name] = {
            "planner_s_per_proposal": trace.get("planner_s_per_proposal"),
            "evaluation_s_mean": plans["qra"][1]["evaluation_s_mean"],
            "ratio": _ratio(trace.get("planner_s_per_proposal"), plans["qra"][1]["evaluation_s_mean"]),
            "surrogate_spearman": trace.get("surrogate_spearman"),
            "screening_spearman": trace.get("screening_spearman"),
        }
        self._save_progress()

        # ---- baselines: the same evaluation budget in optimizer steps as the search
        equal_evals = max(1, round(search_steps / high_steps))
        self._seed_priors(bdir / "baselines")
        for method in (*EVALUATING, *PRIOR_ONLY):
            t0 = time.time()
            chosen = run_baseline(
                cfg,
                bdir / "baselines",
                method,
                evaluations=equal_evals,
                rank=rank,
                score_choice=method in EVALUATING,
            )
            if method not in state:
                state[method] = {"wall_s": round(time.time() - t0, 1)}
            plans[method] = (
                space.to_plan(chosen.config),
                {
                    "evaluations": chosen.evaluations,
                    "search_steps": chosen.evaluations * high_steps,
                    "search_score": chosen.score,
                },
            )
            self._save_progress()

        # ---- references: the budget's own uniform plan and the bf16 ceiling
        plans[name] = (uniform_plan(bits, rank), {"evaluations": 0, "search_steps": 0})
        plans["bf16_r16"] = (uniform_plan(16, 16), {"evaluations": 0, "search_steps": 0})

        # ---- final fine-tunes, several seeds, one store shared by all budgets (same plan → run once)
        finals = self._finals(cfg, {m: p for m, (p, _) in plans.items()})
        methods: dict[str, Any] = {}
        for method, (plan, facts) in plans.items():
            summary = summarize_method(finals[method])
            summary.update(
                {
                    "plan_hash": plan.content_hash(),
                    "memory_predicted": predicted(plan),
                    "within_budget": predicted(plan) <= setup.budget_bytes,
                    "evaluations": facts["evaluations"],
                    "search_steps": facts["search_steps"],
                    "search_cost": round(facts["search_steps"] / self.recipe.final_steps, 3),
                    "search_score": facts.get("search_score"),
                    "wall_s": state.get(method, {}).get("wall_s", 0.0),
                    "bits_histogram": _bits_histogram(plan),
                    "mean_rank": round(_mean([m.rank for m in plan.modules.values()]) or 0.0, 2),
                }
            )
            for key in ("planner_s", "planner_s_per_proposal", "evaluation_s_mean"):
                if key in facts:
                    summary[key] = facts[key]
            methods[method] = summary
        self.summaries[name] = {
            "budget": cfg.budget,
            "budget_bytes": setup.budget_bytes,
            "budget_kind": setup.budget.kind,
            **budget_summary(methods, name),
        }
        self._write(complete=False)

    def _finals(self, cfg: QRAConfig, plans: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        from planner.executors import make_executor
        from planner.fidelity.contract import EvalTask
        from planner.store import Store

        level = FidelityLevel(steps=self.recipe.final_steps, eval_examples=self.recipe.final_eval_examples)
        final_cfg = cfg.model_copy(deep=True)
        final_cfg.fidelity.high = level  # the store file is final-only: "high" there means the final recipe
        tasks = [
            EvalTask(plan=plan, level="high", seed=seed, config=final_cfg, tag=f"final:{method}")
            for method, plan in plans.items()
            for seed in self.recipe.seeds
        ]
        store = Store(self.finals_path)
        executor = make_executor(
            "local", subprocess=cfg.fidelity.subprocess, store=store, timeout_s=cfg.fidelity.timeout_s
        )
        try:
            results = executor.run(tasks)
        finally:
            executor.close()
            store.close()
        by_method: dict[str, list[dict[str, Any]]] = {m: [] for m in plans}
        for task, res in zip(tasks, results, strict=True):
            by_method[task.tag.split(":", 1)[1]].append({"seed": task.seed, **res.model_dump()})
        return by_method

    # ------------------------------------------------------------------------------------ outputs
    def _save_progress(self) -> None:
        write_json_atomic(self.progress_path, self.progress)

    def _write(self, *, complete: bool, wall_s: float | None = None) -> None:
        import platform

        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
        results = {
            "command": self.command,
            "recipe": self.recipe_name,
            "config": self.recipe.config,
            "final_recipe": {
                "steps": self.recipe.final_steps,
                "eval_examples": self.recipe.final_eval_examples,
                "seeds": list(self.recipe.seeds),
                "batch": self.base.train.batch,
                "seq_len": self.base.train.seq_len,
                "lr": self.base.train.lr,
                "dtype": self.base.model.dtype,
            },
            "device": device,
            "complete": complete,
            "priors_wall_s": self.progress.get("priors_wall_s"),
            "wall_s_this_run": round(wall_s, 1) if wall_s is not None else None,
            "budgets": self.summaries,
            "planner": self.planner,
        }
        write_json_atomic(self.results_path, results)
        if self.summaries and not self.part:  # a --parallel child: its parent writes the table and plot
            write_text_atomic(self.results_path.with_suffix(".md"), markdown(results))
            plot(results, self.results_path.with_suffix(".png"))


def _mean(values: list[float]) -> float | None:
    values = [float(v) for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 5) if a is not None and b else None


def _bits_histogram(plan: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in plan.modules.values():
        counts[str(m.bits)] = counts.get(str(m.bits), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


if __name__ == "__main__":
    sys.exit(main())
