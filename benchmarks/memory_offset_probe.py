"""Two CPU facts behind the GPU memory offset in ``plan_quality_gpu_partial.json`` (no GPU needed).

The memory model over-predicted ``torch.cuda.max_memory_allocated`` by 639 MiB at the GPU recipe's
30-step high fidelity and by 699 MiB at its 10-step low fidelity. This records

* the padded length of every training batch the recipe's SFTTrainer builds (seed 0, the order the
  fidelity runs see): the peak follows the longest batch so far, and the model assumes ``seq_len``;
* the activation trace's saved bytes at three sequence lengths: linear growth means no seq x seq
  attention matrix is counted, so attention kernels cannot explain the offset.

  python -m benchmarks.memory_offset_probe --out benchmarks/results/memory_offset_probe.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT
from qra_plugin.io import write_json_atomic

RECIPE = ROOT / "benchmarks" / "recipes" / "plan_quality-gpu.yaml"
MIB = 2**20


def padded_lengths(cfg: Any, steps: int) -> tuple[list[int], list[int]]:
    """Padded length per batch for the first ``steps`` steps, and every tokenized example's length."""
    from trl import SFTConfig, SFTTrainer

    from planner.data.sources import examples, sft_rows
    from planner.fidelity.sft import cached_tokenizer, fresh_model

    tokenizer = cached_tokenizer(cfg.model)
    rows = sft_rows(examples(cfg.data, "train", cfg.data.train_examples), bool(tokenizer.chat_template))
    args = SFTConfig(
        output_dir=str(ROOT / "runs" / "memory_offset_probe"),
        max_steps=steps,
        per_device_train_batch_size=cfg.train.batch,
        max_length=cfg.train.seq_len,
        seed=0,
        data_seed=0,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=fresh_model(cfg.model), args=args, train_dataset=rows, processing_class=tokenizer)
    lengths = []
    for batch in trainer.get_train_dataloader():
        lengths.append(int(batch["input_ids"].shape[1]))
        if len(lengths) == steps:
            break
    return lengths, [len(x["input_ids"]) for x in trainer.train_dataset]


def trace_bytes(cfg: Any, seq_lens: list[int]) -> dict[str, dict[str, float]]:
    """What autograd saves at ``cfg``'s batch for each sequence length (meta trace, no memory used)."""
    import torch

    from planner.memory import trace_activations
    from planner.model_info import load_model_info

    info = load_model_info(cfg.model)
    out = {}
    for t in seq_lens:
        trace = trace_activations(info, cfg.train.batch, t, torch.float32)
        out[str(t)] = {
            "blocks_saved_mib": round(sum(trace.blocks_saved) / MIB, 3),
            "head_saved_mib": round(trace.head_saved / MIB, 3),
            "logits_fp32_mib": round(trace.logits_elems * 4 / MIB, 3),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_offset_probe.json"))
    parser.add_argument("--steps", type=int, default=30, help="the GPU recipe's high fidelity")
    parser.add_argument("--low-steps", type=int, default=10, help="the GPU recipe's low fidelity")
    args = parser.parse_args()
    from planner.config import QRAConfig

    cfg = QRAConfig.load(RECIPE)
    lengths, examples = padded_lengths(cfg, args.steps)
    seq_lens = [cfg.train.seq_len // 2, cfg.train.seq_len, 2 * cfg.train.seq_len]
    traces = trace_bytes(cfg, seq_lens)
    write_json_atomic(
        Path(args.out),
        {
            "command": f"python -m benchmarks.memory_offset_probe --out {args.out}",
            "recipe": str(RECIPE.relative_to(ROOT)),
            "padded_batch_lengths": lengths,
            "max_padded_length": {
                f"first_{args.low_steps}_steps": max(lengths[: args.low_steps]),
                f"first_{args.steps}_steps": max(lengths),
            },
            "examples": {
                "n": len(examples),
                "mean_tokens": round(statistics.fmean(examples), 1),
                "at_max_length": sum(n >= cfg.train.seq_len for n in examples),
            },
            f"trace_batch_{cfg.train.batch}": traces,
            "trace_growth_per_doubling": [
                round(traces[str(b)]["blocks_saved_mib"] / traces[str(a)]["blocks_saved_mib"], 4)
                for a, b in zip(seq_lens, seq_lens[1:], strict=False)
            ],
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
