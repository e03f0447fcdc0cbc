"""The adapter-init protocol's machinery (``benchmarks.adapter_init`` runs it; ``benchmarks.long_finals`` reuses it):
per budget, fixed and searched plans, each method's learning rate tuned on the selection split, finals on test,
paired statistics and G against the tuned ceiling. The protocol itself is described in ``benchmarks/adapter_init.py``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, mean, run_tasks, write_result
from benchmarks.harness.benchmark import RECIPES as PLAN_QUALITY_RECIPES
from benchmarks.harness.benchmark import uniform_plan
from planner.config import FidelityLevel, QRAConfig
from planner.fidelity.contract import EvalTask
from planner.memory import plan_bytes
from planner.orchestration.baseline_run import run_baseline
from planner.orchestration.search_run import run_search
from planner.orchestration.setup import SearchSetup
from planner.scale import with_alpha_rule
from planner.search.allocation import table_allocation
from planner.stats import paired
from qra_plugin.plan import Plan

#: the plan-quality recipes this benchmark runs (config, test rows, seeds, final workers and final steps are theirs)
RECIPES = {name: PLAN_QUALITY_RECIPES[name] for name in ("cpu", "tiny")}
BUDGETS = {"uniform4_r16": ("plan:uniform:4bit:r16", 4), "uniform3_r16": ("plan:uniform:3bit:r16", 3)}
#: learning rates tried per method (the round-2 protocol ran every method at 5e-4, under-tuned for all)
LR_GRID = (1e-3, 2e-3, 4e-3)
#: how many rates beyond the grid one method may try when its best stays at the edge of what it tried
MAX_EXTENSIONS = 2
CEILING = "unquantized_r16"
#: tuned and fine-tuned before the rest: the ceiling, the budget's uniform plan with and without the init,
#: and the error-table allocation
FIRST = ("unquantized_r16", "uniform", "uniform_init", "table_alloc")
ORDER = ("unquantized_r16", "uniform", "uniform_init", "table_alloc", "greedy_priors", "all8_r4", "table_alloc_sqrt",
         "qra", "qra_init", "qra_confirm", "qra_init_confirm")  # fmt: skip
#: the LoRA-scale rule per method where it is not the config's (``planner.scale``)
ALPHA_RULES = {"table_alloc_sqrt": "sqrt"}
#: the paired differences the issue asks about (a − b over seeds)
PAIRS = (
    ("uniform_init", "uniform"),
    ("qra_init", "qra"),
    ("table_alloc", "greedy_priors"),
    ("table_alloc", "uniform"),
    ("qra_init", "table_alloc"),
    ("qra", "greedy_priors"),
    ("qra_init", "unquantized_r16"),
    ("table_alloc", "unquantized_r16"),
    ("table_alloc", "all8_r4"),  # the error init + the table's few wider blocks, over the all-8-bit r4 plan
    ("table_alloc_sqrt", "table_alloc"),  # rsLoRA-style scale vs the rank rule on the same plan
    ("qra_init_confirm", "table_alloc"),
    ("qra_init_confirm", "qra_init"),  # what the confirm fidelity changes, same evaluations otherwise
    ("qra_confirm", "greedy_priors"),
)
#: the searches, per method: the init their plans carry and whether a confirm fidelity (the final's steps, on the
#: selection rows) chooses among their finalists; a confirm search replays the plain one's evaluations
SEARCHES = {"qra": ("zero", False), "qra_init": ("error", False), "qra_confirm": ("zero", True),
            "qra_init_confirm": ("error", True)}  # fmt: skip
ERROR_TABLE = RESULTS / "error_table_smollm2.json"
#: the fixed plans a search also starts from (its zero-evaluation warm starts), per init: the search runs at the
#: rate tuned for the best of them on selection (the uniform plan's rate alone let a low rate pick the winner)
SEARCH_STARTS = {"zero": ("uniform", "greedy_priors"), "error": ("uniform_init", "table_alloc")}


class Bench:
    def __init__(self, recipe: str, out: Path, results: Path, command: str, optimizer: str | None = None) -> None:
        spec = RECIPES[recipe]
        self.test_rows, self.seeds, self.workers = spec.final_eval_examples, spec.seeds, spec.final_workers
        self.recipe, self.out, self.results, self.command = recipe, out, results, command
        base = spec.load()
        fidelity = base.fidelity.model_copy(update={"layer_cache": str(out / "layers")})
        train = base.train.model_copy(update={"optimizer": optimizer or base.train.optimizer})
        self.base = base.model_copy(update={"fidelity": fidelity, "train": train})
        #: restrict to these methods (None: all); take each method's rate from another result instead of tuning
        self.methods: set[str] | None = None
        self.rates_from: dict[str, Any] | None = None
        self.final_steps = spec.final_steps(base)
        out.mkdir(parents=True, exist_ok=True)
        self.store_path = out / "runs.sqlite"
        self.summary: dict[str, Any] = {}
        #: the results file's rows from earlier runs of the same recipe and optimizer: a run of some methods
        #: (``--methods``) updates its own rows and keeps the rest
        self.earlier = _earlier_result(results, recipe, self.base.train.optimizer)

    # ----------------------------------------------------------------------------- configs and plans
    def config(self, budget: str, init: str, lr: float) -> QRAConfig:
        cfg = self.base.model_copy(deep=True)
        cfg.budget, cfg.adapter.init, cfg.train.lr = budget, init, lr
        return cfg

    def level_config(self, cfg: QRAConfig, split: str) -> QRAConfig:
        """The final's recipe (its steps, scored on ``split``) in the store's ``high`` slot."""
        cfg = cfg.model_copy(deep=True)
        cfg.fidelity.high = FidelityLevel(steps=self.final_steps, eval_examples=self.test_rows, accuracy=True)
        cfg.fidelity.workers, cfg.fidelity.timeout_s = self.workers, max(cfg.fidelity.timeout_s, 7200.0)
        cfg.data.eval_split = split
        return cfg

    def fixed_plans(self, name: str) -> dict[str, tuple[Plan, str]]:
        """Plans chosen without evaluations: method -> (plan, init)."""
        budget, bits = BUDGETS[name]
        zero = SearchSetup.build(self.config(budget, "zero", LR_GRID[0]))
        error = SearchSetup.build(self.config(budget, "error", LR_GRID[0]))
        table = self.error_table(error)
        chosen = table_allocation(error.space, error.cost, error.budget_bytes, table)
        greedy = run_baseline(zero.cfg, self.out / name / "greedy", "greedy_priors", rank=16, progress=False)
        ceiling = uniform_plan(zero.space, 16, 16)
        table_plan = error.space.to_plan(chosen)
        sqrt_plan = with_alpha_rule(table_plan, "sqrt", error.space.lora_r, error.space.lora_alpha)
        plans = {
            CEILING: (ceiling, "zero"),
            "uniform": (zero.space.to_plan(zero.space.uniform(bits, 16)), "zero"),
            "uniform_init": (error.space.to_plan(error.space.uniform(bits, 16)), "error"),
            "table_alloc": (table_plan, "error"),
            "greedy_priors": (zero.space.to_plan(greedy.config), "zero"),
            "table_alloc_sqrt": (sqrt_plan, "error"),
        }
        all8 = zero.space.uniform(8, min(r for r in zero.space.ranks if r > 0))
        if zero.cost(all8) <= zero.budget_bytes:  # the all-8-bit plan at the smallest rank, where it fits
            plans["all8_r4"] = (zero.space.to_plan(all8), "zero")
        return plans

    def error_table(self, setup: SearchSetup) -> dict[tuple[int, int, int], float]:
        """Starting output error per (block, bits, rank): the committed SmolLM2 table for the demo model (what
        ``benchmarks/error_table_smollm2.py`` measured on this space), else measured here (tiny models)."""
        from planner.priors.error_table import read_table

        if self.base.model.path == "demo":
            return read_table(ERROR_TABLE)
        from planner.loading import load_model, load_tokenizer
        from planner.priors.adapter_init import error_table
        from planner.priors.calibration import calibration_batch
        from planner.priors.moments import second_moments

        model = load_model(self.base.model).eval()
        tokens = calibration_batch(load_tokenizer(self.base.model), self.base.data, 8, self.base.train.seq_len)
        return error_table(model, setup.space, second_moments(model, tokens, [s.name for s in setup.space.specs]))

    def searched_plan(self, name: str, init: str, lr: float, confirm: bool = False) -> tuple[Plan, dict[str, Any]]:
        cfg = self.config(BUDGETS[name][0], init, lr)
        directory = self.out / name / f"qra-{init}-lr{lr:g}"
        if confirm:
            cfg.fidelity.confirm = FidelityLevel(steps=self.final_steps, eval_examples=cfg.fidelity.high.eval_examples)
            directory = directory.with_name(f"{directory.name}-confirm{self.final_steps}")
            _copy_store(directory.with_name(f"qra-{init}-lr{lr:g}"), directory)
        self.seed_priors(directory, init)
        started = time.time()
        result = run_search(cfg, directory, progress=False)
        trace = json.loads((directory / "trace.json").read_text())
        facts = {"search_lr": lr, "evaluations": len(trace["evaluations"]), "search_steps": trace["search_steps"],
                 "search_wall_s_this_call": round(time.time() - started, 1),  # a replay from the store: seconds
                 "search_evaluation_s": trace["evaluation_time"]["wall_s"],
                 "search_computed_this_call": trace["computed_this_run"]}  # fmt: skip
        if confirm:
            facts["confirm"] = trace["confirm"]
        return SearchSetup.build(cfg).space.to_plan(result.best), facts

    def seed_priors(self, directory: Path, init: str) -> None:
        """Profile once into ``<out>/priors``; each search directory gets a copy, and an error-init search another
        search's error table and second moments (their cache keys are checked: a mismatch is recomputed)."""
        from planner.priors import profile

        profile(self.base, self.out / "priors", progress=False)
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "priors.json").is_file():
            shutil.copyfile(self.out / "priors" / "priors.json", directory / "priors.json")
        for cached in ("error_table.json", "moments.safetensors") if init == "error" else ():
            found = sorted(self.out.glob(f"*/qra-*/{cached}"))
            if found and not (directory / cached).is_file():
                shutil.copyfile(found[0], directory / cached)

    # ----------------------------------------------------------------------------- runs
    def run_tasks(self, tasks: list[EvalTask]) -> list[Any]:
        return run_tasks(self.store_path, tasks)

    def tune(self, name: str, plans: dict[str, tuple[Plan, str]]) -> dict[str, dict[float, float | None]]:
        """Per method, seed 0 on selection at every rate of ``LR_GRID``; where the best rate is at an edge of
        what was tried, one more rate a factor 2 beyond it (up to ``MAX_EXTENSIONS`` times), so no method is
        left at the edge of its grid."""
        budget = BUDGETS[name][0]
        rates = {m: list(LR_GRID) for m in plans}
        losses: dict[str, dict[float, float | None]] = {m: {} for m in plans}
        for _ in range(MAX_EXTENSIONS + 1):
            tasks = [
                EvalTask(plan=plans[m][0], level="high", seed=0, tag=f"tune:{m}:{lr:g}",
                         config=self.level_config(self.config(budget, plans[m][1], lr), "selection"))
                for m in plans for lr in rates[m] if lr not in losses[m]
            ]  # fmt: skip
            if not tasks:
                break
            for task, res in zip(tasks, self.run_tasks(tasks), strict=True):
                losses[task.tag.split(":")[1]][task.config.train.lr] = res.eval_loss
            for m in plans:
                best, tried = _lowest(losses[m]), sorted(losses[m])
                if best == tried[0]:
                    rates[m].append(best / 2)
                elif best == tried[-1]:
                    rates[m].append(best * 2)
        return losses

    def tune_and_finish(self, name: str, plans: dict[str, tuple[Plan, str]]) -> dict[str, dict[str, Any]]:
        """Per method: the tuned rate (``tune``), then the finals at it on test."""
        budget = BUDGETS[name][0]
        if self.rates_from is not None:  # rates carried over from a tuned result: no tuning runs here
            rates = self.rates_from["budgets"][name]["methods"]
            by_method: dict[str, dict[float, float | None]] = {m: {rates[m]["lr"]: None} for m in plans}
        else:
            by_method = self.tune(name, plans)
        best = {m: _lowest(losses) for m, losses in by_method.items()}
        finals = [
            EvalTask(plan=plan, level="high", seed=seed, tag=f"final:{m}",
                     config=self.level_config(self.config(budget, init, best[m]), "test"))
            for m, (plan, init) in plans.items() for seed in self.seeds
        ]  # fmt: skip
        done = self.run_tasks(finals)
        rows: dict[str, dict[str, Any]] = {}
        for m, (plan, init) in plans.items():
            results = [(t.seed, r) for t, r in zip(finals, done, strict=True) if t.tag == f"final:{m}"]
            rows[m] = {
                "init": init,
                "alpha_rule": ALPHA_RULES.get(m, self.base.adapter.alpha_rule),
                "tuning": {f"{lr:g}": by_method[m][lr] for lr in sorted(by_method[m])},
                "lr": best[m],
                "lr_at_grid_edge": best[m] in (min(by_method[m]), max(by_method[m])),
                "final_eval_losses": {s: r.eval_loss for s, r in results},
                "final_accuracies": {s: r.accuracy for s, r in results},
                "final_eval_loss_mean": mean([r.eval_loss for _, r in results], 5),
                "step_s": mean([r.wall_s / max(r.steps, 1) for _, r in results], 5),
                "plan_hash": plan.content_hash(),
                "bits_rank_counts": _counts(plan),
            }
        return rows

    def budget(self, name: str) -> None:
        plans = {m: p for m, p in self.fixed_plans(name).items() if self.methods is None or m in self.methods}
        methods: dict[str, dict[str, Any]] = {}
        for group in (FIRST, [m for m in plans if m not in FIRST]):  # the main comparison first
            methods.update(self.tune_and_finish(name, {m: plans[m] for m in group if m in plans}))
            self.write_budget(name, methods, plans)
        for key, (init, confirm) in SEARCHES.items():
            if self.methods is not None and key not in self.methods:
                continue
            start = best_start(methods, init)
            plan, facts = self.searched_plan(name, init, methods[start]["lr"], confirm)
            facts["search_lr_from"] = start
            plans[key] = (plan, init)
            methods.update(self.tune_and_finish(name, {key: (plan, init)}))
            methods[key].update(facts)
            self.write_budget(name, methods, plans)

    # ----------------------------------------------------------------------------- outputs
    def write_budget(self, name: str, methods: dict[str, dict[str, Any]], plans: dict[str, tuple[Plan, str]]) -> None:
        setup = SearchSetup.build(self.config(BUDGETS[name][0], "zero", LR_GRID[0]))
        methods = {**self.earlier.get("budgets", {}).get(name, {}).get("methods", {}), **methods}
        uniform, ceiling = methods["uniform"]["final_eval_loss_mean"], methods[CEILING]["final_eval_loss_mean"]
        for m, row in methods.items():
            if m in plans:  # an earlier run's row keeps the memory it was priced at
                row["memory_predicted"] = int(plan_bytes(setup.info, plans[m][0], setup.settings, setup.budget.kind))
            row["within_budget"] = m == CEILING or row["memory_predicted"] <= setup.budget_bytes
            gap = uniform - ceiling
            row["G"] = round((uniform - row["final_eval_loss_mean"]) / gap, 4) if gap > 0 else None
        pairs = {}
        for a, b in PAIRS:
            if a in methods and b in methods:
                c = paired(methods[a]["final_eval_losses"], methods[b]["final_eval_losses"])
                pairs[f"{a}-{b}"] = {k: _round(getattr(c, k)) for k in ("mean", "se", "t", "p", "df", "n")}
        order = {m: i for i, m in enumerate(ORDER)}
        self.summary[name] = {
            "budget": setup.cfg.budget,
            "budget_bytes": setup.budget_bytes,
            "methods": dict(sorted(methods.items(), key=lambda kv: order.get(kv[0], 99))),
            "paired": pairs,
        }
        self.write()

    def write(self) -> None:
        commands = [c for c in self.earlier.get("commands", []) if c != self.command]
        result = {
            "command": self.command,
            "commands": [*commands, self.command],  # every run whose rows the file holds, oldest first
            "protocol": {
                "recipe": self.recipe,
                "final_steps": self.final_steps,
                "seeds": list(self.seeds),
                "final_eval_split": "test",
                "selection_split": "selection",
                "splits_disjoint": True,
                "test_rows": self.test_rows,
                "tuning": {
                    "knob": "learning rate",
                    "grid": list(LR_GRID),
                    "how": "per method: seed 0, the final's steps, scored on the selection split; lowest loss wins; "
                    "a best rate at the edge of what was tried gets one more rate x2 beyond it (at most 2 more)",
                    "search_lr": "the rate tuned for the search's best zero-evaluation start with its init (lowest "
                    "selection loss among " + ", ".join(f"{i}: {'/'.join(m)}" for i, m in SEARCH_STARTS.items()) + ")",
                },
                "round2_lr": 5e-4,
                "optimizer": self.base.train.optimizer,
                "rates_from": self.rates_from["command"] if self.rates_from else None,
            },
            "budgets": {**self.earlier.get("budgets", {}), **self.summary},
        }
        write_result(self.results, result, markdown(result))


def markdown(result: dict[str, Any]) -> str:
    commands = "\n".join(f"    {c}" for c in result.get("commands", [result["command"]]))
    lines = [f"# Adapter init, tuned protocol\n\nThe runs whose rows this holds, oldest first:\n\n{commands}\n"]
    for name, b in result["budgets"].items():
        lines += [f"\n## {name} ({b['budget_bytes'] / 2**20:.2f} MiB)\n"]
        lines += ["| method | init | lr | test loss (seeds) | mean | G | MiB |", "|---|---|---|---|---|---|---|"]
        for m, r in b["methods"].items():
            losses = ", ".join(f"{v:.4f}" for v in r["final_eval_losses"].values())
            lines.append(f"| {m} | {r['init']} | {r['lr']:g} | {losses} | {r['final_eval_loss_mean']:.4f} | "
                         f"{r['G']} | {r['memory_predicted'] / 2**20:.2f} |")  # fmt: skip
        lines += ["", "| a − b | mean | se | t | p (df) |", "|---|---|---|---|---|"]
        for k, c in b["paired"].items():
            lines.append(f"| {k} | {c['mean']} | {c['se']} | {c['t']} | {c['p']} ({c['df']}) |")
    return "\n".join(lines) + "\n"


def best_start(methods: dict[str, dict[str, Any]], init: str) -> str:
    """The search's warm start (``SEARCH_STARTS``) whose tuned rate scored lowest on selection: its rate is the
    search's, so the search is not handicapped against the plan it starts from."""
    starts = [m for m in SEARCH_STARTS[init] if m in methods]
    if not starts:
        raise ValueError(f"no tuned start for the {init}-init search: run one of {SEARCH_STARTS[init]} with it")
    return min(starts, key=lambda m: methods[m]["tuning"].get(f"{methods[m]['lr']:g}") or float("inf"))


def _copy_store(source: Path, directory: Path) -> None:
    """Start a search directory from another's store (same plans, levels and recipes: its rows are replayed)."""
    import sqlite3
    from contextlib import closing

    if (directory / "store.sqlite").is_file() or not (source / "store.sqlite").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    with (
        closing(sqlite3.connect(source / "store.sqlite")) as src,
        closing(sqlite3.connect(directory / "store.part")) as dst,
    ):
        src.backup(dst)
    (directory / "store.part").replace(directory / "store.sqlite")  # whole or absent: a killed copy is not a store


def _earlier_result(path: Path, recipe: str, optimizer: str) -> dict[str, Any]:
    """The results file's content if an earlier run of this recipe and optimizer wrote it, else nothing."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    protocol = earlier.get("protocol", {})
    if (protocol.get("recipe"), protocol.get("optimizer")) != (recipe, optimizer):
        return {}
    earlier.setdefault("commands", [earlier["command"]])
    for budget in earlier.get("budgets", {}).values():  # JSON made the seeds strings: pair them with new rows
        for row in budget["methods"].values():
            for key in ("final_eval_losses", "final_accuracies"):
                row[key] = {int(seed): value for seed, value in row[key].items()}
    return earlier


def _lowest(losses: dict[float, float | None]) -> float:
    """The rate with the lowest selection loss (a failed run never wins)."""
    return min(losses, key=lambda lr: (losses[lr] is None, losses[lr] or 0.0))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def _counts(plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in plan.modules.values():
        counts[f"{m.bits}/{m.rank}"] = counts.get(f"{m.bits}/{m.rank}", 0) + 1
    return dict(sorted(counts.items()))
