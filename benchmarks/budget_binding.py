"""Which budget binds the plan: the span of the search space under a ``plan`` budget vs a ``peak`` budget.

For the plan-quality CPU recipe (SmolLM2-135M fp32, batch 4 × 128, HQQ bits {3, 4, 8} × ranks {4, 8, 16, 32}
per block), price the cheapest and the dearest uniform plan and each budget's uniform plan under both budget
kinds, and count how much of the space's memory range each budget leaves below it. A budget that sits near
the top of a range that activations dominate hardly constrains a plan; the paper-style ``plan`` budget does.
Also the compute-dtype question: HQQ keeps scale/zero in the compute dtype, so the 3-bit g32 budget is looser
than 4-bit g64 in fp32 and tighter in bf16. Meta-device pricing only (seconds, no weights).

  python -m benchmarks.budget_binding
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks.harness import ROOT, command_line
from planner.config import QRAConfig
from qra_plugin.io import write_json_atomic, write_text_atomic

RECIPE = ROOT / "benchmarks" / "recipes" / "plan_quality-cpu.yaml"
MIB = 2**20


def price(cfg: QRAConfig, dtype: str) -> dict[str, Any]:
    """Plan and peak bytes of the uniform plans that bound the space and define the budgets."""
    from planner.memory import plan_bytes
    from planner.orchestration.setup import SearchSetup

    cfg = QRAConfig.model_validate({**cfg.model_dump(), "model": {**cfg.model.model_dump(), "dtype": dtype}})
    setup = SearchSetup.build(cfg)
    space = setup.space
    corners = {
        "cheapest (3-bit r4)": (min(space.bits), min(space.ranks)),
        "uniform3_r16": (3, 16),
        "uniform4_r16": (4, 16),
        "dearest (8-bit r32)": (max(space.bits), max(space.ranks)),
    }
    rows: dict[str, dict[str, int]] = {}
    for name, (bits, rank) in corners.items():
        plan = space.to_plan(space.uniform(bits, rank))
        rows[name] = {kind: int(plan_bytes(setup.info, plan, setup.settings, kind)) for kind in ("plan", "peak")}
    out: dict[str, Any] = {
        "dtype": dtype,
        "plans_mib": {n: {k: v / MIB for k, v in r.items()} for n, r in rows.items()},
    }
    for kind in ("plan", "peak"):
        low, high = rows["cheapest (3-bit r4)"][kind], rows["dearest (8-bit r32)"][kind]
        out[f"{kind}_range_mib"] = (high - low) / MIB
        for budget in ("uniform3_r16", "uniform4_r16"):
            share = (rows[budget][kind] - low) / (high - low)
            out[f"{kind}_{budget}_position_in_range"] = round(share, 3)
            out[f"{kind}_{budget}_over_cheapest"] = round(rows[budget][kind] / low - 1, 4)
    out["uniform3_over_uniform4_plan"] = round(rows["uniform3_r16"]["plan"] / rows["uniform4_r16"]["plan"] - 1, 4)
    out["uniform3_over_uniform4_peak"] = round(rows["uniform3_r16"]["peak"] / rows["uniform4_r16"]["peak"] - 1, 4)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Which budget binds (plan-quality CPU recipe, meta-device pricing)", "", f"`{result['command']}`", ""]
    for part in result["dtypes"]:
        lines += [
            f"## compute dtype {part['dtype']}",
            "",
            "| uniform plan | plan MiB | peak MiB |",
            "|---|---|---|",
            *(f"| {n} | {r['plan']:.2f} | {r['peak']:.2f} |" for n, r in part["plans_mib"].items()),
            "",
            f"- space range: plan {part['plan_range_mib']:.1f} MiB, peak {part['peak_range_mib']:.1f} MiB",
            f"- uniform-4 budget sits at {part['plan_uniform4_r16_position_in_range']:.0%} of the plan range and "
            f"{part['peak_uniform4_r16_position_in_range']:.0%} of the peak range; it is "
            f"{part['plan_uniform4_r16_over_cheapest']:.0%} (plan) vs {part['peak_uniform4_r16_over_cheapest']:.1%} "
            "(peak) above the cheapest plan",
            f"- uniform-3 budget vs uniform-4: {part['uniform3_over_uniform4_plan']:+.1%} (plan), "
            f"{part['uniform3_over_uniform4_peak']:+.1%} (peak)",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = QRAConfig.load(RECIPE)
    result = {
        "command": (command_line("budget_binding", argv)).strip(),
        "recipe": str(RECIPE.relative_to(ROOT)),
        "setting": f"batch {cfg.train.batch} x {cfg.train.seq_len} tokens, {cfg.train.optimizer}",
        "dtypes": [price(cfg, dtype) for dtype in ("float32", "bfloat16")],
    }
    out = ROOT / "benchmarks" / "results" / "budget_binding.json"
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
