"""Paired differences between the test finals a benchmark store holds so far (before its result JSON is written).

Reads ``final:<method>`` rows (status ok) of a store such as ``results/adapter_init_stores/runs.sqlite`` and prints
each method's losses by seed and, for every pair ``a-b`` asked, the paired difference over the seeds both have
(``planner.stats.paired``: mean, s.e., t, p, df). Reads only; no training.

  python -m benchmarks.store_pairs benchmarks/results/adapter_init_stores/runs.sqlite greedy_priors-uniform
"""

from __future__ import annotations

import argparse
import sqlite3

from planner.stats import paired


def finals(store: str) -> dict[str, dict[int, float]]:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        rows = db.execute("select tag, seed, eval_loss from evaluations where tag like 'final:%' and status = 'ok'")
        by_method: dict[str, dict[int, float]] = {}
        for tag, seed, loss in rows:
            by_method.setdefault(tag.removeprefix("final:"), {})[seed] = loss
    return by_method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("pairs", nargs="*", help="a-b method pairs")
    args = parser.parse_args(argv)
    by_method = finals(args.store)
    for method, losses in sorted(by_method.items()):
        print(method, {s: round(v, 4) for s, v in sorted(losses.items())})
    for pair in args.pairs:
        a, b = pair.split("-", 1)
        seeds = sorted(set(by_method.get(a, {})) & set(by_method.get(b, {})))
        c = paired({s: by_method[a][s] for s in seeds}, {s: by_method[b][s] for s in seeds})
        print(f"{a} - {b} (seeds {seeds}): mean {c.mean:+.4f} se {c.se:.4f} t {c.t:.2f} p {c.p:.3f} df {c.df}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
