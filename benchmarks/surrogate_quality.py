"""How well does the performance model rank plans it was not fitted on? Measured on the plan-quality stores.

Every high-fidelity evaluation the plan-quality benchmark stored for a budget (qra's search, random, TPE:
8-step SFT runs scored on the selection split) is a (config, score) point. For each feature set of
``planner.search.surrogate`` (``ordinal``: per-unit coordinates + means, what the search used in round 2;
``prior``: the priors' aggregates + means; ``both``; ``table``: the error table's starting error with the
prior aggregates — the committed SmolLM2 table, ``results/error_table_smollm2.json``, measured on this very
space) this reports the k-fold held-out Spearman correlation of the GP's prediction with the real score — for
the screening model (features only) on every point, and for the promotion model (features + the low-fidelity
score) on the configs that have both. Also each error-init search of the adapter-init benchmark
(``adapter_init_stores/<budget>/qra-error-*``: adapters starting from the quantization error, the runs the
table describes best), one search's store at a time (each ran at its own learning rate). No new training
runs: GP fits only (seconds).

  python -m benchmarks.surrogate_quality
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ROOT, command_line
from planner.config import QRAConfig
from qra_plugin.io import write_json_atomic, write_text_atomic

BUDGETS = {"uniform4_r16": "plan:uniform:4bit:r16", "uniform3_r16": "plan:uniform:3bit:r16"}
ERROR_TABLE = RESULTS / "error_table_smollm2.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default=str(ROOT / "benchmarks/results/plan_quality_stores"))
    parser.add_argument("--recipe", default=str(ROOT / "benchmarks/recipes/plan_quality-cpu.yaml"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/surrogate_quality.json"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--error-searches", default=str(ROOT / "benchmarks/results/adapter_init_stores"))
    args = parser.parse_args(argv)
    base = QRAConfig.load(args.recipe)
    stores = Path(args.stores)
    budgets = {name: measure(base.model_copy(update={"budget": b}), [stores / name / "qra" / "store.sqlite",
                             stores / name / "baselines" / "store.sqlite"], stores / name / "qra", args.folds)
               for name, b in BUDGETS.items() if (stores / name).is_dir()}  # fmt: skip
    for search in sorted(Path(args.error_searches).glob("*/qra-error-*")):  # one store, one learning rate each
        cfg = base.model_copy(update={"budget": BUDGETS[search.parent.name]})
        budgets[f"{search.parent.name}/{search.name}"] = measure(cfg, [search / "store.sqlite"], search, args.folds)
    command = command_line("surrogate_quality", argv)
    results = {"command": command.strip(), "folds": args.folds, "budgets": budgets}
    write_json_atomic(Path(args.results), results)
    write_text_atomic(Path(args.results).with_suffix(".md"), markdown(results))
    print(markdown(results))
    return 0


def measure(cfg: QRAConfig, stores: list[Path], priors_dir: Path, folds: int) -> dict[str, Any]:
    """Held-out Spearman per feature set on the ok high (and low) evaluations of ``stores``."""
    from dataclasses import replace

    from planner.orchestration.setup import SearchSetup
    from planner.priors.error_table import read_table
    from planner.priors.profile import Priors
    from planner.search.allocation import Importance
    from planner.search.surrogate import FEATURE_SETS, heldout_spearman

    setup = SearchSetup.build(cfg)
    space = setup.space
    table = read_table(ERROR_TABLE)
    importance = replace(Importance.from_priors(Priors.load(priors_dir / "priors.json"), space), table=table)
    high = _scores(space, stores, "high")
    low = _scores(space, stores[:1], "low")
    both = [c for c in high if c in low]
    out: dict[str, Any] = {"high_points": len(high), "low_and_high_points": len(both)}
    for name in FEATURE_SETS:
        kwargs = {"importance": importance, "feature_set": name, "folds": folds}
        out[f"screening_{name}"] = _r(heldout_spearman(space, list(high), None, list(high.values()), **kwargs))
        out[f"promotion_{name}"] = _r(
            heldout_spearman(space, both, [low[c] for c in both], [high[c] for c in both], **kwargs)
        )
    return out


def _scores(space: Any, stores: list[Path], level: str) -> dict[Any, float]:
    """config -> score of every ok evaluation at ``level`` (the newest recipe of each store only)."""
    from qra_plugin.plan import Plan

    out: dict[Any, float] = {}
    for path in stores:
        if not path.is_file():
            continue
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            newest = db.execute(
                "SELECT recipe FROM evaluations WHERE level = ? AND status = 'ok' ORDER BY id DESC LIMIT 1", (level,)
            ).fetchone()
            if newest is None:
                continue
            rows = db.execute(
                "SELECT plan_json, eval_loss FROM evaluations WHERE level = ? AND status = 'ok' AND recipe = ?",
                (level, newest[0]),
            ).fetchall()
        for plan_json, loss in rows:
            plan = Plan.model_validate(json.loads(plan_json))
            per_block: dict[int, tuple[int, int]] = {}
            for spec in space.specs:
                m = plan.modules[spec.name]
                per_block.setdefault(spec.block, (m.bits, m.rank))
            out[tuple(per_block[b] for b in range(space.n_units))] = float(loss)
    return out


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Performance-model quality: held-out Spearman on the plan-quality stores",
        "",
        f"`{results['command']}` ({results['folds']}-fold; higher is better; the goal is ≥ 0.7). `table`: the error "
        "table's starting error + the prior aggregates. Rows `<budget>/qra-error-lr*`: one error-init search each.",
        "",
        "| stores | points | screening ordinal | prior | both | table | promotion points | ordinal | prior | both "
        "| table |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in results["budgets"].items():
        screening = " | ".join(str(b.get(f"screening_{f}")) for f in ("ordinal", "prior", "both", "table"))
        promotion = " | ".join(str(b.get(f"promotion_{f}")) for f in ("ordinal", "prior", "both", "table"))
        lines.append(f"| {name} | {b['high_points']} | {screening} | {b['low_and_high_points']} | {promotion} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
