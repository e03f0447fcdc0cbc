"""How fast the memory model prices a plan: what was a timed unit test (``test_plan_bytes_is_fast_for_30_blocks``,
a 20 ms limit per plan) is measured here instead, where timing belongs.

A 30-block tiny Llama (the block count of SmolLM2-135M), 40 random block plans over HQQ {2, 3, 4, 8} bits ×
ranks {4, 8, 16, 32}: seconds for the first call (activation trace + module costs) and per later call.

  python -m benchmarks.planner_speed
"""

from __future__ import annotations

import random
import statistics
import time

from benchmarks.harness import ROOT, command_line
from qra_plugin.io import write_json_atomic, write_text_atomic

OUT = ROOT / "benchmarks" / "results" / "planner_speed.json"


def measure(plans: int = 40, repeats: int = 3) -> dict:
    from planner.memory import plan_bytes
    from planner.model_info import load_model_info
    from planner.settings import TrainingSettings
    from planner.tiny import build_tiny_model
    from qra_plugin.plan import Plan

    info = load_model_info(build_tiny_model("llama", layers=30, hidden=64))
    train = TrainingSettings(batch=4, seq_len=64)
    rng = random.Random(0)
    pairs = [[(rng.choice([2, 3, 4, 8]), rng.choice([4, 8, 16, 32])) for _ in range(30)] for _ in range(plans)]
    built = [Plan.from_block_pairs(info.fingerprint, info.linears, p) for p in pairs]
    start = time.perf_counter()
    plan_bytes(info, built[0], train)
    first_s = time.perf_counter() - start
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for plan in built:
            plan_bytes(info, plan, train)
        per_call.append((time.perf_counter() - start) / len(built))
    return {"blocks": 30, "plans": plans, "first_call_s": round(first_s, 4),
            "per_plan_ms": [round(1000 * s, 3) for s in per_call],
            "per_plan_ms_median": round(1000 * statistics.median(per_call), 3)}  # fmt: skip


def main() -> None:
    result = {"command": command_line("planner_speed"), **measure()}
    write_json_atomic(OUT, result)
    write_text_atomic(
        OUT.with_suffix(".md"),
        f"# Memory-model pricing speed\n\nCommand: `{result['command']}`\n\n"
        f"30-block tiny Llama, {result['plans']} random block plans: first call {result['first_call_s']} s "
        f"(trace + module costs), then {result['per_plan_ms_median']} ms per plan "
        f"(median of {len(result['per_plan_ms'])} passes: {result['per_plan_ms']}).\n",
    )
    print(result)


if __name__ == "__main__":
    main()
