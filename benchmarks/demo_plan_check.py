"""Did a cheaper demo find a worse plan? Rescore two demo runs' best plans under one config, side by side.

Two ``make demo`` runs with different configs (or code) report scores of different recipes. This scores each
run's best allocation at the high fidelity of ``--config`` (the current demo's, by default), same seed and
rows, so the two plans are compared like with like (runs stored in ``--store``; a re-run reads them back).

  python -m benchmarks.demo_plan_check runs/demo-r4 runs/demo-r5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.harness import RESULTS, command_line, run_tasks, write_result
from planner.config import QRAConfig
from planner.fidelity.contract import EvalTask
from planner.orchestration.setup import SearchSetup
from planner.search.space import parse_allocation_key


def best_allocation(run: Path) -> tuple[str, float]:
    trace = json.loads((run / "trace.json").read_text())
    return trace["best"], trace["best_score"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2, type=Path, help="two demo RUN directories (before, after)")
    parser.add_argument("--config", default="example_configs/smollm2-demo.yaml")
    parser.add_argument("--store", type=Path, default=RESULTS / "demo_plan_check.sqlite")
    args = parser.parse_args(argv)
    cfg = QRAConfig.load(args.config)
    setup = SearchSetup.build(cfg)
    rows, tasks = {}, []
    for run in args.runs:
        key, own = best_allocation(run)
        config = parse_allocation_key(key)
        plan = setup.space.to_plan(config)
        tasks.append(EvalTask(plan=plan, level="high", seed=cfg.seed, config=cfg, tag=f"demo_best:{run.name}",
                              memory_predicted=setup.cost(config)))  # fmt: skip
        rows[run.name] = {"best": key, "score_in_its_run": own, "memory_predicted": setup.cost(config)}
    for row, result in zip(rows.values(), run_tasks(args.store, tasks), strict=True):
        row["score_under_config"] = result.eval_loss
    result = {"command": command_line("demo_plan_check", argv).strip(), "config": args.config, "runs": rows}
    lines = [f"# Demo plans rescored under `{args.config}`\n", f"`{result['command']}`\n",
             "| run | score in its run | score under the config | MiB |", "|---|---|---|---|"]  # fmt: skip
    for name, row in rows.items():
        lines.append(f"| {name} | {row['score_in_its_run']:.4f} | {row['score_under_config']:.4f} | "
                     f"{row['memory_predicted'] / 2**20:.2f} |")  # fmt: skip
    write_result(RESULTS / "demo_plan_check.json", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
