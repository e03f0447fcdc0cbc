"""Seconds per optimizer step of a fidelity run on the demo model, before and after each speed lever.

Levers measured (issue 25): ``reuse_dequantized`` — a frozen HQQ layer dequantizes its weight once per run
instead of in every forward *and* backward (hqq's CPU autograd function recomputes it in backward). For each
bit-width (HQQ 3/4/8, and 16 = unquantized as a control that the lever cannot touch) the two settings run
back to back in one process, alternating, so their ratio is measured under the same machine load; the
losses of both are recorded and must be equal to the last bit (the math did not change).

  python -m benchmarks.throughput                    # SmolLM2-135M fp32, batch 4 x 128, 2 threads
  python -m benchmarks.throughput --steps 2 --bits 4  # quicker
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, command_line, speed_run_config
from qra_plugin.io import write_json_atomic, write_text_atomic

OUT = ROOT / "benchmarks" / "results" / "throughput.json"


def one_run(bits: int, steps: int, reuse: bool, threads: int, model: str) -> dict[str, Any]:
    from planner.fidelity.contract import EvalTask
    from planner.fidelity.sft import run_fidelity
    from planner.loading import load_meta_model
    from qra_plugin import Plan

    cfg = speed_run_config(steps, reuse, threads, model)
    plan = Plan.uniform(load_meta_model(cfg.model), bits=bits, rank=16, backend=None if bits < 16 else "none")
    result = run_fidelity(EvalTask(plan=plan, level="low", seed=0, config=cfg))
    if result.status != "ok":
        raise SystemExit(f"{bits}-bit run failed: {result.error}")
    return {"step_s": result.train_s / result.steps, "eval_s": result.eval_s, "setup_s": result.setup_s,
            "train_loss": result.train_loss, "eval_loss": result.eval_loss}  # fmt: skip


def measure(bits_list: list[int], steps: int, repeats: int, threads: int, model: str) -> dict[str, Any]:
    step_s: dict[str, Any] = {}
    for bits in bits_list:
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for _ in range(repeats):
            for reuse in (False, True):
                runs[reuse].append(one_run(bits, steps, reuse, threads, model))
        before = statistics.median(r["step_s"] for r in runs[False])
        after = statistics.median(r["step_s"] for r in runs[True])
        losses = {k: [(r["train_loss"], r["eval_loss"]) for r in v] for k, v in runs.items()}
        step_s[str(bits)] = {
            "before": round(before, 3),
            "after": round(after, 3),
            "ratio": round(after / before, 3),
            "eval_s": {
                "before": round(statistics.median(r["eval_s"] for r in runs[False]), 2),
                "after": round(statistics.median(r["eval_s"] for r in runs[True]), 2),
            },  # fmt: skip
            "losses_identical": losses[False] == losses[True],
            "losses": [list(x) for x in losses[True][:1]],
        }
        print(bits, step_s[str(bits)], flush=True)
    return step_s


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Fidelity-run throughput",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{result['model']}, batch 4 × 128, {result['threads']} threads, {result['steps']} optimizer steps per run, "
        f"{result['repeats']} runs per setting (median), the two settings alternating in one process. "
        "Lever: `reuse_dequantized` (a frozen HQQ layer dequantizes once per run).",
        "",
        "| bits | s/step before | s/step after | after / before | same losses |",
        "|---|---|---|---|---|",
    ]
    for bits, row in result["step_s"].items():
        lines.append(f"| {bits} | {row['before']} | {row['after']} | {row['ratio']} | {row['losses_identical']} |")
    if result.get("final_s"):
        f = result["final_s"]
        lines += ["", f"One 40-step final (HQQ 4-bit r16, estimated from the 4-bit step time + eval): "
                      f"{f['before']} s before, {f['after']} s after."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="3,4,8,16")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="demo", help="demo (SmolLM2-135M) or tiny")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    started = time.time()
    bits_list = [int(b) for b in args.bits.split(",")]
    step_s = measure(bits_list, args.steps, args.repeats, args.threads, args.model)
    result: dict[str, Any] = {
        "command": command_line("throughput", argv),
        "model": "SmolLM2-135M-Instruct fp32" if args.model == "demo" else "tiny Llama",
        "threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "step_s": step_s,
        "wall_s": round(time.time() - started, 1),
    }
    if "4" in step_s:
        row = step_s["4"]
        result["final_s"] = {k: round(40 * row[k] + row["eval_s"][k], 1) for k in ("before", "after")}
    result["demo_wall_s"] = None  # filled by benchmarks/demo_record.py when make demo is timed alone
    write_json_atomic(Path(args.out), result)
    write_text_atomic(Path(args.out).with_suffix(".md"), markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
