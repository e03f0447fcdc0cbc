"""The error table on SmolLM2-135M and the allocation it gives for free (issue 23, item 6; no training).

Per block and (bits, rank) of the plan-quality space (HQQ {3, 4, 8} x {4, 8, 16, 32}): the starting output
error left after an error-aware init, summed over the block's linears (second moments from 32 wiki train
rows x 128). ``table_allocation`` then picks per block (bits, rank) at the plan budget of uniform 4-bit r16.
What it says: where the table spends the budget (bits vs rank), and how much starting error it leaves.

Run: nice -n 10 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.error_table_smollm2
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from planner.config import QRAConfig
from planner.fidelity.quantized import use_directory
from planner.loading import load_model, load_tokenizer
from planner.memory import Budget, plan_bytes
from planner.model_info import load_model_info
from planner.priors.adapter_init import error_table
from planner.priors.calibration import calibration_batch
from planner.priors.moments import second_moments
from planner.search.allocation import table_allocation
from planner.search.space import BudgetCost, SearchSpace, allocation_key
from planner.settings import TrainingSettings
from qra_plugin.io import write_json_atomic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="plan:uniform:4bit:r16")
    parser.add_argument("--layers", default="runs/adapter_init_probe/layers")
    parser.add_argument("--result", default="benchmarks/results/error_table_smollm2.json")
    args = parser.parse_args()
    started = time.perf_counter()
    use_directory(args.layers)
    cfg = QRAConfig.model_validate(
        {"model": {"path": "demo"}, "budget": args.budget, "space": {"bits": [3, 4, 8], "ranks": [4, 8, 16, 32]}}
    )
    info = load_model_info(cfg.model)
    budget = Budget.parse(cfg.budget)
    space = SearchSpace.from_config(cfg, info)
    settings = TrainingSettings.of(cfg)
    budget_bytes = int(budget.check_feasible(info, settings, space.bits, space.ranks, space.backend))
    cost = BudgetCost(space, lambda c: plan_bytes(info, space.to_plan(c), settings, budget.kind))
    model = load_model(cfg.model).eval()
    tokens = calibration_batch(load_tokenizer(cfg.model), cfg.data, 32, 128)
    moments = second_moments(model, tokens, [s.name for s in space.specs])
    table = error_table(model, space, moments)
    config = table_allocation(space, cost, budget_bytes, table)
    uniform = space.uniform(4, 16)
    total = {
        "table_alloc": sum(table[(u, *c)] for u, c in enumerate(config)),
        "uniform4_r16": sum(table[(u, *c)] for u, c in enumerate(uniform)),
    }
    result = {
        "command": "python -m benchmarks.error_table_smollm2 " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "budget_mib": budget_bytes / 2**20,
        "table_alloc": allocation_key(config),
        "table_alloc_mib": cost(config) / 2**20,
        "table_alloc_counts": {f"{b}/{r}": n for (b, r), n in sorted(Counter(config).items())},
        "starting_error": total,
        "table": {f"{u}/{b}/{r}": v for (u, b, r), v in sorted(table.items())},
        "wall_s": time.perf_counter() - started,
    }
    write_json_atomic(args.result, result)
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))


if __name__ == "__main__":
    main()
