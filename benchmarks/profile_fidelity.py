"""Where a fidelity run's seconds go: torch.profiler over one short real run on the demo model (issue 25).

For each setting (HQQ bits × ``reuse_dequantized``), one fidelity run of ``--steps`` optimizer steps plus its
eval, profiled on CPU; the ops are grouped into the parts the issue asks about (dequantization, matmuls,
attention, the loss over the 49k vocabulary, the optimizer, the rest) by their self CPU time. The machine is
shared and noisy: read shares within one run, not seconds across runs.

  python -m benchmarks.profile_fidelity --bits 3,4 --steps 2
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, command_line, speed_run_config
from qra_plugin.io import write_json_atomic, write_text_atomic

OUT = ROOT / "benchmarks" / "results" / "profile_fidelity.json"
#: op-name fragments -> part (first match wins; names are aten ops and our own record_function labels)
PARTS = (
    ("dequantize", ("dequantize", "bitwise", "__rshift__", "__and__", "unpack", "aten::cat")),
    ("loss (log-softmax / NLL over the vocabulary)", ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("attention", ("scaled_dot_product", "_efficient_attention", "flash_attention", "softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("optimizer", ("Optimizer.step", "_foreach", "adam", "lerp", "aten::sqrt")),
)


def profile_run(bits: int, steps: int, reuse: bool, threads: int, model: str = "demo") -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from planner.fidelity.contract import EvalTask
    from planner.fidelity.sft import run_fidelity
    from planner.loading import load_meta_model
    from qra_plugin import Plan

    cfg = speed_run_config(steps, reuse, threads, model)
    plan = Plan.uniform(load_meta_model(cfg.model), bits=bits, rank=16, backend=None if bits < 16 else "none")
    run_fidelity(EvalTask(plan=plan, level="low", seed=1, config=cfg))  # warm caches (model, data) first
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = run_fidelity(EvalTask(plan=plan, level="low", seed=0, config=cfg))
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        part = next((p for p, keys in PARTS if any(k in event.key for k in keys)), "other ops")
        totals[part] = totals.get(part, 0.0) + event.self_cpu_time_total / 1e6
    ops = sum(totals.values())
    return {
        "bits": bits,
        "reuse_dequantized": reuse,
        "wall_s": round(result.wall_s, 1),
        "train_s": round(result.train_s or 0.0, 1),
        "eval_s": round(result.eval_s or 0.0, 1),
        "setup_s": round(result.setup_s or 0.0, 1),
        "op_self_cpu_s": round(ops, 1),
        "share": {k: round(v / ops, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="demo", help="demo (SmolLM2-135M) or tiny (a check of this script)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs = [
        profile_run(int(b), args.steps, reuse, args.threads, args.model)
        for b in args.bits.split(",")
        for reuse in (False, True)
    ]
    command = command_line("profile_fidelity", argv)
    write_json_atomic(out, {"command": command, "steps": args.steps, "runs": runs})
    lines = ["# Where a fidelity run's time goes", "", f"Command: `{command}`", "",
             "Self CPU time of the profiled ops by part (shares of all op time; the machine was shared, so shares "
             "within a run are the reading, not seconds across runs).", ""]  # fmt: skip
    for r in runs:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in r["share"].items())
        lines.append(
            f"- HQQ {r['bits']}-bit, reuse_dequantized={r['reuse_dequantized']}: wall {r['wall_s']} s (setup "
            f"{r['setup_s']}, train {r['train_s']}, eval {r['eval_s']}); {shares}"
        )
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines[-len(runs) :]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
