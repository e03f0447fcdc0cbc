"""Is bf16 LoRA training with HQQ faster than fp32 on this CPU? Whole optimizer steps, not a matmul.

The same real fidelity run (``planner.fidelity.sft.run_fidelity``: SmolLM2-135M, HQQ uniform plan, LoRA,
AdamW, wiki SFT rows) with the model loaded in float32 and in bfloat16, alternated ``--repeats`` times so
machine noise hits both alike; the measured quantity is seconds inside ``trainer.train()`` per step
(``EvalResult.train_s / steps``: dequantize + matmuls + LoRA + loss + backward + optimizer). In bf16 HQQ
keeps scale/zero in 16 bits, as on GPUs.

    python -m benchmarks.bf16_step_time   # ≈ 10 min; one torch thread, as each benchmark worker runs
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.harness import ROOT

RESULT = ROOT / "benchmarks" / "results" / "bf16_step_time.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    from planner.config import QRAConfig
    from planner.fidelity.contract import EvalTask
    from planner.fidelity.sft import run_fidelity
    from planner.loading import load_meta_model
    from planner.quiet import quiet_libraries
    from qra_plugin.io import write_json_atomic
    from qra_plugin.plan import Plan

    quiet_libraries()
    runs: dict[str, list[dict]] = {"float32": [], "bfloat16": []}
    for repeat in range(args.repeats + 1):  # repeat 0 warms caches and imports for both dtypes
        for dtype in ("float32", "bfloat16"):
            cfg = QRAConfig.model_validate(
                {
                    "model": {"path": "demo", "dtype": dtype},
                    "train": {"batch": 4, "seq_len": 128, "lr": 5e-4},
                    "data": {"train_examples": 64},
                    "fidelity": {"low": {"steps": args.steps, "eval_examples": 8}, "torch_threads": 1},
                }
            )
            plan = Plan.uniform(load_meta_model(cfg.model), bits=args.bits, rank=16)
            result = run_fidelity(EvalTask(plan=plan, level="low", seed=0, config=cfg))
            if repeat:
                runs[dtype].append(
                    {
                        "s_per_step": result.train_s / result.steps,
                        "eval_loss": result.eval_loss,
                        "wall_s": result.wall_s,
                    }
                )
            print(dtype, repeat, round(result.train_s / result.steps, 3), result.eval_loss, flush=True)
    median = {d: statistics.median(r["s_per_step"] for r in rs) for d, rs in runs.items()}
    write_json_atomic(
        args.out,
        {
            "command": "python -m benchmarks.bf16_step_time"
            + (f" --steps {args.steps}" if args.steps != 6 else "")
            + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
            "what": f"seconds per optimizer step inside trainer.train(), SmolLM2-135M, HQQ {args.bits}-bit r16, "
            "batch 4 x 128, AdamW; float32 and bfloat16 runs alternated",
            "torch_threads": 1,  # fidelity.torch_threads, as each benchmark worker runs
            "runs": runs,
            "median_s_per_step": median,
            "bf16_over_fp32": median["bfloat16"] / median["float32"],
            "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        },
    )
    print("bf16 / fp32 step time:", round(median["bfloat16"] / median["float32"], 3))


if __name__ == "__main__":
    main()
