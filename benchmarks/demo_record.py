"""Record ``make demo`` runs: wall time (from ``/usr/bin/time -v``), where the evaluations' time went, the plan.

``make demo`` is the README's main command, so its wall time on a free 2-core CPU is a product number
(issue 11 asks ≤ 20 min). Give one run, or a ``--before`` run of an older commit on the same machine and the
same config: the record then says whether both chose the same plan with the same scores (a speed change must
not change a score) and the wall-time ratio measured in one session.

  /usr/bin/time -v make demo RUN=runs/demo-a > a.log 2>&1
  python -m benchmarks.demo_record runs/demo-a a.log --commit SHA [--before runs/demo-b b.log --before-commit SHA]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, command_line
from qra_plugin.io import write_json_atomic, write_text_atomic

TIME_FIELDS = {
    "wall_s": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)",
    "max_rss_kib": r"Maximum resident set size \(kbytes\): (\d+)",
    "user_s": r"User time \(seconds\): ([\d.]+)",
    "system_s": r"System time \(seconds\): ([\d.]+)",
}


def _clock(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def time_facts(log: Path) -> dict[str, float]:
    text = log.read_text(errors="replace")
    facts: dict[str, float] = {}
    for name, pattern in TIME_FIELDS.items():
        found = re.search(pattern, text)
        if found:
            facts[name] = _clock(found.group(1)) if name == "wall_s" else float(found.group(1))
    return facts


def run_facts(run: Path, log: Path, commit: str) -> dict[str, Any]:
    """What one demo run chose, scored and spent."""
    trace = json.loads((run / "trace.json").read_text())
    priors = json.loads((run / "priors.json").read_text())
    return {
        "run_dir": str(run),
        "commit": commit,
        **time_facts(log),
        "profile_timings_s": {k: round(v, 1) for k, v in (priors.get("timings_s") or {}).items()},
        "search_wall_s": trace["wall_s_this_run"],
        "evaluations": len(trace["evaluations"]),
        "search_steps": trace["search_steps"],
        "evaluation_time": trace.get("evaluation_time"),
        "budget": trace["budget"],
        "budget_bytes": trace["budget_bytes"],
        "best": trace["best"],
        "best_score_high_fidelity": trace["best_score"],
        "best_memory_bytes": trace["best_memory"],
        "budget_uniform_plan": trace["baseline"],
        "budget_uniform_score_high_fidelity": trace["baseline_score"],
        "best_free_allocation": trace.get("best_free_allocation"),
        "gain_over_best_free": trace.get("gain_over_best_free"),
        "eval_split": trace.get("eval_split"),
        "scores": [(e["level"], e["config"], e["score"]) for e in trace["evaluations"]],
    }


def compare(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    same_scores = sorted(map(tuple, after["scores"])) == sorted(map(tuple, before["scores"]))
    return {
        "same_plan": after["best"] == before["best"],
        "same_scores": same_scores,
        "wall_ratio_after_before": round(after["wall_s"] / before["wall_s"], 3),
        "search_wall_ratio_after_before": round(after["search_wall_s"] / before["search_wall_s"], 3),
    }


def markdown(record: dict[str, Any]) -> str:
    runs = [("after", record["run"])] + ([("before", record["before"])] if record.get("before") else [])
    lines = [
        "# `make demo` timing",
        "",
        f"`{record['command']}`",
        "",
        "| run | commit | wall (min) | profile I_q + I_r (s) | search (s) | evaluations | set-up share | best "
        "(selection, high fidelity) | uniform plan |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs:
        split = r.get("evaluation_time") or {}
        share = f"{split['setup_share']:.0%}" if split.get("setup_share") is not None else "not recorded"
        prof = r["profile_timings_s"]
        lines.append(
            f"| {name} | {r['commit']} | {r['wall_s'] / 60:.1f} | {prof.get('I_q', 0) + prof.get('I_r', 0):.0f} | "
            f"{r['search_wall_s']:.0f} | {r['evaluations']} | {share} | {r['best_score_high_fidelity']:.4f} | "
            f"{r['budget_uniform_score_high_fidelity']:.4f} |"
        )
    if record.get("comparison"):
        c = record["comparison"]
        lines += ["", f"Same plan: {c['same_plan']}; same scores: {c['same_scores']}; wall ratio after/before: "
                  f"{c['wall_ratio_after_before']} (search only: {c['search_wall_ratio_after_before']})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("time_log", type=Path)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--before", nargs=2, type=Path, metavar=("RUN", "TIME_LOG"))
    parser.add_argument("--before-commit", default="")
    parser.add_argument("--conditions", default="2-core CPU, nothing else running, fresh RUN dir, ~/.cache/qra empty")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_smollm2.json")
    args = parser.parse_args(argv)
    record: dict[str, Any] = {
        "command": command_line("demo_record", argv),
        "demo_command": "make demo (qra demo-model; qra profile …; qra search example_configs/smollm2-demo.yaml)",
        "conditions": args.conditions,
        "run": run_facts(args.run, args.time_log, args.commit),
    }
    if args.before:
        record["before"] = run_facts(*args.before, args.before_commit)
        record["comparison"] = compare(record["run"], record["before"])
    write_json_atomic(args.out, record)
    write_text_atomic(args.out.with_suffix(".md"), markdown(record))
    _into_throughput(record, ROOT / "benchmarks" / "results" / "throughput.json")
    print(markdown(record))
    return 0


def _into_throughput(record: dict[str, Any], path: Path) -> None:
    """The demo's wall time is issue 25's headline number: ``throughput.json`` carries it beside the step times."""
    if not path.is_file():
        return
    result = json.loads(path.read_text())
    result["demo_wall_s"] = record["run"]["wall_s"]
    result["demo_note"] = f"commit {record['run']['commit']}, {record['conditions']}; {record['command']}"
    write_json_atomic(path, result)


if __name__ == "__main__":
    sys.exit(main())
