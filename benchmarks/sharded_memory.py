"""Bytes per rank, predicted (``planner.sharding.per_rank``) vs held by the real run, and step time vs one process.

    python -m benchmarks.sharded_memory             # ~4 min on 2 CPU cores
    python -m benchmarks.sharded_memory --smollm2   # + SmolLM2-135M rows, ~8 min more

Runs tests/sharded_worker.py on the tiny Llama with the mixed HQQ 2/3/4/8 + 16-bit plan of tests/test_sharded.py
(ranks 0/4/8/12, a pruned block; global batch 4 x 32 tokens, 3 steps) in one process and on 2 CPU ranks under
DDP, ZeRO-2, ZeRO-3 and FSDP2. Measured = what each rank stores after the last step, from its real tensors
(CPU has no allocator peak): frozen weights' local shards + HQQ scale/zero + buffers, LoRA parameters'
local shards, DeepSpeed's fp32 copies of the rank's partition it steps, optimizer states' local shards.
Predicted = the same four parts of ``per_rank``. Activations and gradients are not counted on either side
(they live inside the step, which only a GPU allocator sees).
``--smollm2`` adds (or replaces) rows of the real SmolLM2-135M (fp32, the same bit/rank cycle over its 210
linears, no pruning) in one process and under ZeRO-3 and FSDP2 on 2 ranks, keeping the tiny model's rows.
Writes benchmarks/results/sharded_memory.json and .md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import ROOT, write_result

RESULTS = ROOT / "benchmarks" / "results"
PARTS = ("weights", "lora_params", "master_params", "optimizer_states")
MODES = {"ddp": "ddp", "zero2": "zero2", "zero3": "zero3", "fsdp2": "fsdp2"}
TINY, SMOLLM2 = "tiny Llama", "SmolLM2-135M"
#: the sharded runs of SmolLM2 (2 ranks each quantize the whole model: the replicated ones add little)
SMOLLM2_MODES = ("zero3", "fsdp2")


def predicted(model_dir: Path, plan_path: Path, sharding: str, world_size: int) -> dict[str, int]:
    from planner.memory import estimate
    from planner.model_info import load_model_info
    from planner.settings import TrainingSettings
    from planner.sharding import per_rank
    from qra_plugin import Plan

    info, plan = load_model_info(str(model_dir)), Plan.load(plan_path)
    breakdown = estimate(info, plan, TrainingSettings(batch=4 // world_size, seq_len=32, precision=info.dtype))
    rank = per_rank(info, plan, breakdown, world_size=world_size, sharding=sharding)
    return {part: rank[part] for part in PARTS}


def measure(model_dir: Path, root: Path, modes: dict[str, str], name: str) -> list[dict]:
    """One process, then 2 ranks in each of ``modes``, on ``model_dir`` with the plan at ``root/plan.yaml``."""
    from tests.test_sharded import WORKER, _launch, _run

    args = ["--model", str(model_dir), "--plan", str(root / "plan.yaml")]
    _run([sys.executable, str(WORKER), "--mode", "single", *args, "--out", str(root / "single")], root)
    single = json.loads((root / "single" / "rank0.json").read_text())
    runs = [_row("ddp", 1, 0, single, predicted(model_dir, root / "plan.yaml", "ddp", 1), single["step_s"])]
    for port, (sharding, mode) in enumerate(modes.items(), start=29660):
        _, ranks, _ = _launch((root, args), mode, port)
        guess = predicted(model_dir, root / "plan.yaml", sharding, 2)
        runs += [_row(sharding, 2, r["rank"], r, guess, single["step_s"]) for r in ranks]
    return [{"model": name, **run} for run in runs]


def smollm2_runs() -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from planner.demo_model import materialize_demo_model
    from qra_plugin import Plan
    from tests.test_sharded import CHOICES

    root = Path(tempfile.mkdtemp(prefix="sharded_memory_smollm2_"))
    model_dir = materialize_demo_model()
    base = Plan.uniform(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), bits=4, rank=8)
    modules = {name: CHOICES[i % len(CHOICES)] for i, name in enumerate(base.modules)}
    Plan(fingerprint=base.fingerprint, modules=modules).save(root / "plan.yaml")
    return measure(model_dir, root, {m: MODES[m] for m in SMOLLM2_MODES}, SMOLLM2)


def main() -> None:
    from planner.tiny import build_tiny_model, save_tiny_model
    from tests.test_sharded import sharded_plan

    if "--smollm2" in sys.argv:  # keep the tiny rows, replace SmolLM2's
        kept = json.loads((RESULTS / "sharded_memory.json").read_text())["runs"]
        runs = [{"model": TINY, **r} for r in kept if r.get("model", TINY) == TINY] + smollm2_runs()
    else:
        root = Path(tempfile.mkdtemp(prefix="sharded_memory_"))
        model_dir = save_tiny_model(root / "model", seed=0)
        sharded_plan(build_tiny_model("llama", seed=0)).save(root / "plan.yaml")
        runs = measure(model_dir, root, MODES, TINY)
    command = "python -m benchmarks.sharded_memory [--smollm2]"
    write_result(RESULTS / "sharded_memory.json", {"command": command, "runs": runs}, _markdown(command, runs))
    print(_markdown(command, runs))


def _row(sharding: str, world: int, rank: int, run: dict, guess: dict[str, int], single_s: float) -> dict:
    held = run["held"]
    return {
        "sharding": sharding,
        "world_size": world,
        "rank": rank,
        "predicted": sum(guess.values()),
        "measured": sum(held[p] for p in PARTS),
        "step_s": round(run["step_s"], 3),
        "step_s_single": round(single_s, 3),
        "parts": {p: {"predicted": guess[p], "measured": held[p]} for p in PARTS},
    }


def _markdown(command: str, runs: list[dict]) -> str:
    lines = [
        "# Bytes per rank: predicted vs held (mixed HQQ 2/3/4/8 + 16-bit plan, 2 CPU ranks, gloo)",
        "",
        f"`{command}` — per rank after the last step: weights, LoRA, DeepSpeed's fp32 partition copy, optimizer.",
        "Tiny Llama: the plan of tests/test_sharded.py (a pruned block); SmolLM2-135M: the same bit/rank cycle,",
        "fp32. Global batch 4 x 32 tokens, 3 steps; step s = mean over the steps (one process's in brackets).",
        "",
        "| model | sharding | ranks | rank | predicted | measured | weights p/m | LoRA p/m | master p/m | optim p/m "
        "| step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        parts = " | ".join(f"{r['parts'][p]['predicted']}/{r['parts'][p]['measured']}" for p in PARTS)
        lines.append(
            f"| {r.get('model', TINY)} | {r['sharding']} | {r['world_size']} | {r['rank']} | {r['predicted']} | "
            f"{r['measured']} | {parts} | "
            f"{r['step_s']} ({r['step_s_single']}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
