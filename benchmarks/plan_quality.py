"""Plan-quality benchmark: at the memory of uniform 4-bit (and 3-bit), does the searched plan fine-tune better?

Protocol (round 2; round 1 is ``results/plan_quality_v1.*``):

* three disjoint splits fixed by a hash of the title (``planner.data.wiki``): every run trains on ``train``,
  every search and baseline evaluation scores on ``selection``, and only the final fine-tunes are scored on
  ``test``; the data mixes the wiki summaries with a topic task that has exact answers (``wiki_mix``), so
  each final reports test eval loss *and* task accuracy (the topic is chosen by log-likelihood over the 11
  labels, as lm-eval scores multiple choice: not generated text matched exactly);
* budgets of kind ``plan`` (what scales with the plan: planned weights + quantization metadata + LoRA + its
  gradients and optimizer states) of uniform 4-bit r16 and of uniform 3-bit r16, and optionally the peak
  budget of round 1 (``--budgets peak_uniform4_r16``);
* per budget: ``qra search``; random and TPE with the search's optimizer steps at the high fidelity (TPE's
  random start-up is a third of its trials, ``planner.search.baselines.tpe_startup``); ILP, greedy priors and the
  budget's uniform plan without evaluations; then every chosen plan and LoRA r16 on the unquantized model
  (``unquantized_r16``, in the recipe's compute dtype) fine-tuned for ``final_steps`` (≥ 5× the high
  fidelity and ≥ one epoch of the train rows) over 3 seeds;
* search cost in final-fine-tune equivalents, with and without the priors' profiling time (converted to
  optimizer steps at the uniform plan's measured step time); memory predicted and measured as the same
  quantity (``plan`` budgets: real planned-module, LoRA, gradient and optimizer-state tensors).

Every evaluation and final fine-tune is stored as it finishes (SQLite under ``--out``); a re-run recomputes
nothing that finished, and ``--out benchmarks/results/plan_quality_stores`` keeps the stores in the repo so a
fresh machine resumes a partly finished run.

  python -m benchmarks.plan_quality --recipe cpu --parallel --out benchmarks/results/plan_quality_stores
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.harness import command_line
from benchmarks.harness.benchmark import BUDGETS, DEFAULT_BUDGETS, RECIPES, Benchmark, recipe_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument(
        "--out", default=None, help="working directory (stores, plans); default runs/plan_quality-RECIPE"
    )
    parser.add_argument(
        "--results", default=None, help="summary JSON; default benchmarks/results/plan_quality[-RECIPE].json"
    )
    parser.add_argument("--budgets", default=",".join(DEFAULT_BUDGETS), help="comma-separated, of " + ",".join(BUDGETS))
    parser.add_argument("--parallel", action="store_true", help="one process per budget")
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)  # set by --parallel for its children
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    out, results_path = recipe_paths("plan_quality", args.recipe, args.out, args.results)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    unknown = [b for b in budgets if b not in BUDGETS]
    if unknown:
        print(f"error: unknown budget(s) {', '.join(unknown)}; choose from {', '.join(BUDGETS)}", file=sys.stderr)
        return 2
    command = command_line("plan_quality", argv)
    bench = Benchmark(recipe, args.recipe, out, results_path, command, part=args.part)
    if args.parallel and len(budgets) > 1:
        return bench.run_parallel(budgets)
    bench.run(budgets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
