"""Error-aware adapter init, the LoRA scale and a bits x rank allocation on a tuned protocol (issue 23).

Protocol: the plan-quality recipe (``benchmarks/recipes/plan_quality-<recipe>.yaml``: SmolLM2-135M fp32,
wiki_mix, 40-step finals, three disjoint splits) with one change — **every method's learning rate is tuned
alike**: per method, one seed-0 fine-tune of the final's length per learning rate of ``LR_GRID``, scored on
the **selection** split; the lowest selection loss picks the rate; the finals (seeds 0/1/2) run at it and are
scored on the disjoint **test** split. The search's own fidelity runs use the rate tuned for its best
zero-evaluation start with the search's init (zero: the uniform plan or greedy_priors; error: uniform_init or
table_alloc — whichever scored lower on selection at its tuned rate), known before it starts.

Methods per budget (plan memory of uniform 4-bit r16 and 3-bit r16):

* ``uniform`` / ``uniform_init``: the budget's uniform plan, adapters from zero / from the quantization error;
* ``greedy_priors``: the priors' greedy allocation (zero init, as round 2);
* ``table_alloc``: ``planner.search.allocation.table_allocation`` on the committed error table
  (``results/error_table_smollm2.json``: starting output error after the error init, per block x bits x
  rank), error init — zero evaluations;
* ``qra`` / ``qra_init``: ``qra search`` with ``adapter.init`` zero / error (every candidate scored as its
  final will train);
* ``qra_confirm`` / ``qra_init_confirm``: the same searches (their stored evaluations replayed) with
  ``fidelity.confirm`` at the final's steps on the selection rows: the best high-fidelity plans and the
  zero-evaluation starts are re-scored by 40-step runs, the lowest is the plan;
* ``unquantized_r16``: LoRA r16 on the fp32 model, the ceiling (its rate tuned too);
* ``all8_r4``: every block 8-bit at the smallest rank, zero init (where it fits: separates what the table's plan
  gains from 8-bit weights from what the init and its wider blocks add);
* ``table_alloc_sqrt``: the table's plan with the rsLoRA-style scale rule (alpha ∝ √rank) instead of the rank rule.

G = (uniform − method) / (uniform − unquantized_r16) on mean test loss, both sides tuned. Every run is
stored as it finishes (SQLite under ``--out``); a re-run computes only what is missing.

  nice python -m benchmarks.adapter_init --recipe cpu --out benchmarks/results/adapter_init_stores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.harness import command_line
from benchmarks.harness.adapter_bench import BUDGETS, RECIPES, Bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--out", default="benchmarks/results/adapter_init_stores")
    parser.add_argument("--results", default="benchmarks/results/adapter_init.json")
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument("--optimizer", help="train.optimizer for every run (default: the recipe's)")
    parser.add_argument("--methods", help="comma-separated methods to run (default: all)")
    parser.add_argument("--rates-from", help="a result JSON whose tuned rates to use instead of tuning")
    args = parser.parse_args(argv)
    command = command_line("adapter_init", argv)
    bench = Bench(args.recipe, Path(args.out), Path(args.results), command.strip(), args.optimizer)
    bench.methods = set(args.methods.split(",")) if args.methods else None
    bench.rates_from = json.loads(Path(args.rates_from).read_text()) if args.rates_from else None
    for name in args.budgets.split(","):
        bench.budget(name.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
