"""What 8-bit optimizer states do to the zero-evaluation plans at the uniform-4 and -3 budgets (no training).

Per optimizer (``adamw_torch``: two fp32 states per LoRA weight; ``adamw_bnb_8bit``: bitsandbytes' blockwise
8-bit states, as ``planner.memory.optimizers`` prices them), on SmolLM2-135M with the plan-quality space
(HQQ {3, 4, 8} x ranks {4, 8, 16, 32}, per block) and budget (``plan:uniform:4bit:r16`` / ``3bit``: the uniform
plan's plan memory under that optimizer), and the allocations that need no evaluation — the error table's
(``results/error_table_smollm2.json``) and the priors' greedy (``plan_quality_stores/uniform4_r16/qra/priors.json``)
— as (bits, rank) counts, mean rank and bytes. Finals under ``adamw_bnb_8bit`` (the G part) are not run here.

  python -m benchmarks.optimizer_allocation
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, command_line, write_result
from planner.config import QRAConfig
from planner.orchestration.setup import SearchSetup
from planner.priors.error_table import read_table
from planner.priors.profile import Priors
from planner.search.allocation import Importance, greedy_priors, table_allocation
from planner.search.space import Allocation

TABLE = RESULTS / "error_table_smollm2.json"
PRIORS = RESULTS / "plan_quality_stores" / "uniform4_r16" / "qra" / "priors.json"
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit")
BUDGETS = ("plan:uniform:4bit:r16", "plan:uniform:3bit:r16")


def setup_for(optimizer: str, budget: str) -> SearchSetup:
    return SearchSetup.build(
        QRAConfig.model_validate(
            {
                "model": {"path": "demo"},
                "budget": budget,
                "space": {"unit": "block", "bits": [3, 4, 8], "ranks": [4, 8, 16, 32], "backend": "hqq"},
                "train": {"batch": 4, "seq_len": 128, "optimizer": optimizer},
            }
        )
    )


def describe(setup: SearchSetup, config: Allocation) -> dict[str, Any]:
    counts = Counter(config)
    return {
        "counts": {f"{b}/{r}": n for (b, r), n in sorted(counts.items())},
        "mean_rank": round(sum(r for _, r in config) / len(config), 2),
        "blocks_8bit": sum(b == 8 for b, _ in config),
        "mib": round(setup.cost(config) / 2**20, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", default=str(RESULTS / "optimizer_allocation.json"))
    args = parser.parse_args(argv)
    table = read_table(TABLE)
    rows = {}
    for budget, optimizer in ((b, o) for b in BUDGETS for o in OPTIMIZERS):
        setup = setup_for(optimizer, budget)
        importance = Importance.from_priors(Priors.load(PRIORS), setup.space)
        rows[f"{budget} {optimizer}"] = {
            "budget_mib": round(setup.budget_bytes / 2**20, 3),
            "table_alloc": describe(setup, table_allocation(setup.space, setup.cost, setup.budget_bytes, table)),
            "greedy_priors": describe(setup, greedy_priors(setup.space, setup.cost, setup.budget_bytes, importance)),
        }
    result = {"command": command_line("optimizer_allocation", argv), "rows": rows}
    write_result(Path(args.result), result, markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Zero-evaluation plans per budget and optimizer\n\n`{result['command']}`\n"]
    lines += ["| budget, optimizer | budget MiB | plan | (bits/rank) × blocks | mean rank | 8-bit blocks | MiB |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for optimizer, row in result["rows"].items():
        for plan in ("table_alloc", "greedy_priors"):
            p = row[plan]
            counts = ", ".join(f"{k}×{n}" for k, n in p["counts"].items())
            lines.append(
                f"| {optimizer} | {row['budget_mib']} | {plan} | {counts} | {p['mean_rank']} | "
                f"{p['blocks_8bit']} | {p['mib']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
