"""Are issue 23's gains a short-fine-tune artefact? The same plans fine-tuned 5x longer (issue 23's check).

Protocol: the adapter-init benchmark's (``benchmarks.adapter_init``: SmolLM2-135M fp32, wiki_mix, scored on the
**test** split, each method at the learning rate that protocol tuned for it on the selection split, read from
``results/adapter_init.json``) with one change: finals of ``--steps`` optimizer steps (default 200, 5x the
40-step finals) over that many batches of **fresh** train rows (one epoch: 800 rows instead of 160, so the
longer run sees more data rather than repeating 160 rows five times), one seed (0). Plans at the uniform-4
budget:

* ``unquantized_r16``: the fp32 ceiling;
* ``uniform``: uniform HQQ 4-bit r16, adapters from zero (the budget);
* ``table_alloc_sqrt``: the best plan of the 40-step finals (the error table's allocation, the sqrt scale
  rule, error-aware init);
* ``table_alloc_sqrt_zero``: the same plan with adapters from zero, at the same rate.

Runs are stored as they finish (``<out>/long_runs.sqlite``, next to the adapter-init stores whose priors and
layer cache it reuses); a re-run computes only what is missing.

  nice python -m benchmarks.long_finals --out benchmarks/results/adapter_init_stores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, command_line, write_result
from benchmarks.harness.adapter_bench import BUDGETS, CEILING, Bench
from planner.fidelity.contract import EvalTask

BUDGET = "uniform4_r16"
#: method -> (the adapter-init method whose plan and tuned rate it uses, init)
METHODS = {
    CEILING: (CEILING, "zero"),
    "uniform": ("uniform", "zero"),
    "table_alloc_sqrt": ("table_alloc_sqrt", "error"),
    "table_alloc_sqrt_zero": ("table_alloc_sqrt", "zero"),
}


def long_bench(out: Path, steps: int, command: str) -> Bench:
    """The adapter-init bench with longer finals over as many fresh train rows, in its own store."""
    bench = Bench("cpu", out, RESULTS / "long_finals.json", command)
    rows = steps * bench.base.train.batch
    bench.base = bench.base.model_copy(update={"data": bench.base.data.model_copy(update={"train_examples": rows})})
    bench.final_steps, bench.seeds = steps, (0,)
    bench.store_path = out / "long_runs.sqlite"
    return bench


def run(bench: Bench, rates: dict[str, Any]) -> dict[str, Any]:
    plans = bench.fixed_plans(BUDGET)
    budget = BUDGETS[BUDGET][0]
    tasks = {
        m: EvalTask(plan=plans[source][0].with_init(init), level="high", seed=0, tag=f"long:{m}",
                    config=bench.level_config(bench.config(budget, init, rates[source]["lr"]), "test"))
        for m, (source, init) in METHODS.items()
    }  # fmt: skip
    done = dict(zip(tasks, bench.run_tasks(list(tasks.values())), strict=True))
    short = {m: rates[src]["final_eval_losses"] for m, (src, _) in METHODS.items()}
    rows = {
        m: {
            "plan_of": METHODS[m][0],
            "init": METHODS[m][1],
            "lr": rates[METHODS[m][0]]["lr"],
            "final_eval_loss": r.eval_loss,
            "accuracy": r.accuracy,
            "train_loss": r.train_loss,
            "short_final_seed0": short[m].get("0") if METHODS[m][1] == rates[METHODS[m][0]]["init"] else None,
        }
        for m, r in done.items()
    }
    uniform, ceiling = rows["uniform"]["final_eval_loss"], rows[CEILING]["final_eval_loss"]
    for row in rows.values():
        row["G"] = round((uniform - row["final_eval_loss"]) / (uniform - ceiling), 4) if uniform > ceiling else None
    return rows


def markdown(result: dict[str, Any]) -> str:
    p = result["protocol"]
    lines = [
        f"# Long finals ({p['final_steps']} steps, {p['train_rows']} fresh train rows, seed 0, test split)\n",
        f"`{result['command']}`\n",
        "| method | plan of | init | lr | test loss | G | 40-step final, seed 0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in result["methods"].items():
        short = f"{r['short_final_seed0']:.4f}" if r["short_final_seed0"] is not None else "—"
        lines.append(f"| {m} | {r['plan_of']} | {r['init']} | {r['lr']:g} | {r['final_eval_loss']:.4f} | "
                     f"{r['G']} | {short} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/adapter_init_stores")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rates-from", default=str(RESULTS / "adapter_init.json"))
    args = parser.parse_args(argv)
    bench = long_bench(Path(args.out), args.steps, command_line("long_finals", argv).strip())
    rates = json.loads(Path(args.rates_from).read_text())["budgets"][BUDGET]["methods"]
    methods = run(bench, rates)
    protocol = {"final_steps": bench.final_steps, "train_rows": bench.base.data.train_examples, "seeds": [0],
                "final_eval_split": "test", "test_rows": bench.test_rows, "rates_from": args.rates_from,
                "splits_disjoint": True}  # fmt: skip
    result = {"command": bench.command, "protocol": protocol, "methods": methods}
    write_result(bench.results, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
