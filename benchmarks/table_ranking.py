"""How well the error table ranks real damage (issue 23, item 6): Spearman against the fidelity scores the stores hold.

For every SmolLM2 plan a committed store scored (plan-quality searches and baselines, their finals, the
adapter-init benchmark), two zero-evaluation predictors of its loss: the error table's summed starting output
error at the plan's (bits, rank) per block (``results/error_table_smollm2.json``, error-aware init) and the
priors' summed loss increase at the plan's bits (``loss_increase``, what ``greedy_priors`` ranks by; rank-blind).
Spearman per group of runs that share store, level, recipe, seed and init (only such losses are comparable),
groups of at least ``MIN_GROUP`` plans. Plans outside the table's space (other bits/ranks, mixed within a
block, pruned) are counted and left out. No fine-tuning here: it reads the stores.

  python -m benchmarks.table_ranking
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

from scipy.stats import spearmanr

from benchmarks.harness import RESULTS, ROOT, command_line, write_result

TABLE = RESULTS / "error_table_smollm2.json"
PRIORS = RESULTS / "plan_quality_stores" / "uniform4_r16" / "qra" / "priors.json"
STORES = ("plan_quality_stores", "adapter_init_stores")
MIN_GROUP = 5


def block_choices(plan: dict[str, Any]) -> list[tuple[int, int]] | None:
    """Per block (bits, rank), or None where a block mixes them or the plan prunes."""
    if plan.get("pruning"):
        return None
    per_block: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for name, module in plan["modules"].items():
        per_block[int(name.split(".layers.")[1].split(".")[0])].add((module["bits"], module["rank"]))
    if any(len(v) != 1 for v in per_block.values()):
        return None
    return [next(iter(per_block[b])) for b in sorted(per_block)]


def predictors(choices: list[tuple[int, int]], table: dict[str, float], priors: dict[str, Any]) -> dict | None:
    keys = [f"{u}/{b}/{r}" for u, (b, r) in enumerate(choices)]
    if any(k not in table for k in keys):
        return None
    damage = priors["loss_increase"]
    prior = sum(0.0 if b >= 8 else damage[str(b)][u] for u, (b, _) in enumerate(choices))
    return {"table": sum(table[k] for k in keys), "priors": prior}


def store_rows(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("select * from evaluations where status = 'ok' and eval_loss is not null")]


def groups(table: dict[str, float], priors: dict[str, Any]) -> tuple[dict[tuple, list], dict[str, int]]:
    grouped: dict[tuple, list] = defaultdict(list)
    skipped = {"outside_table_space": 0}
    for root in STORES:
        for path in sorted((RESULTS / root).rglob("*.sqlite")):
            for row in store_rows(path):
                plan = json.loads(row["plan_json"])
                choices = block_choices(plan)
                scores = predictors(choices, table, priors) if choices else None
                if scores is None:
                    skipped["outside_table_space"] += 1
                    continue
                init = "error" if any(m.get("init") == "error" for m in plan["modules"].values()) else "zero"
                key = (str(path.relative_to(ROOT)), row["level"], row["recipe"], row["seed"], init)
                grouped[key].append((row["eval_loss"], scores, row["plan_hash"]))
    return grouped, skipped


def correlate(grouped: dict[tuple, list]) -> list[dict[str, Any]]:
    rows = []
    for (store, level, recipe, seed, init), runs in sorted(grouped.items()):
        unique = {h: (loss, s) for loss, s, h in runs}  # one loss per plan
        if len(unique) < MIN_GROUP:
            continue
        losses = [loss for loss, _ in unique.values()]
        row = {"store": store, "level": level, "recipe": recipe, "seed": seed, "init": init, "n": len(unique)}
        for name in ("table", "priors"):
            rho, p = spearmanr([s[name] for _, s in unique.values()], losses)
            row[f"spearman_{name}"], row[f"p_{name}"] = round(float(rho), 4), round(float(p), 5)
        rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Error table vs real damage\n\n`{result['command']}`\n", result["what"] + "\n"]
    lines += ["| store | level | seed | init | n | ρ table (p) | ρ priors (p) |", "|---|---|---|---|---|---|---|"]
    for r in result["groups"]:
        lines.append(
            f"| {r['store']} | {r['level']} | {r['seed']} | {r['init']} | {r['n']} | "
            f"{r['spearman_table']} ({r['p_table']}) | {r['spearman_priors']} ({r['p_priors']}) |"
        )
    lines.append(f"\nleft out (outside the table's space): {result['skipped']['outside_table_space']} runs")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", default=str(RESULTS / "table_ranking.json"))
    args = parser.parse_args(argv)
    table = json.loads(TABLE.read_text())["table"]
    priors = json.loads(PRIORS.read_text())
    grouped, skipped = groups(table, priors)
    result = {
        "command": command_line("table_ranking", argv),
        "what": "Spearman of each zero-evaluation predictor with the stored eval loss (selection or test split as "
        "the run was scored), per group of comparable runs; higher = ranks damage better",
        "groups": correlate(grouped),
        "skipped": skipped,
    }
    write_result(Path(args.result), result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
