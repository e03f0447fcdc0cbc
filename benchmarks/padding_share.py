"""How much of a fidelity run's batch is padding (issue 25, item 3: the ceiling of the padding lever; no training).

The plan-quality recipe's train rows (SmolLM2's chat template over wiki_mix prompt + completion, cut at
``seq_len``) in the order a run sees them at each seed, batched by ``batch`` and padded to the longest row of
each batch (what the collator does): the share of token slots that are real tokens, against the same rows
grouped by length (``group_by_length``-style, sorted) and packed (every slot a token). Step time on CPU grows
about linearly with the slots at 128 tokens (attention is a small part), so 1 − share bounds what bucketing or
packing could save per step. Orders: the split's, and one random permutation per seed (``torch.randperm``, as
a shuffling sampler draws; not the trainer's exact order).

  python -m benchmarks.padding_share
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import RESULTS, command_line, write_result
from benchmarks.harness.benchmark import RECIPES
from planner.fidelity.sft import cached_tokenizer, examples, sft_rows


def row_lengths(recipe: str) -> tuple[list[int], int, int]:
    cfg = RECIPES[recipe].load()
    tokenizer = cached_tokenizer(cfg.model)
    rows = sft_rows(examples(cfg.data, "train", cfg.data.train_examples), bool(tokenizer.chat_template))
    lengths = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        lengths.append(min(len(ids), cfg.train.seq_len))
    return lengths, cfg.train.batch, cfg.train.seq_len


def real_share(lengths: list[int], batch: int) -> float:
    """Real tokens over padded slots when consecutive rows form a batch padded to its longest row."""
    slots = sum(max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    return round(sum(lengths) / slots, 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cpu", choices=sorted(RECIPES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--result", default=str(RESULTS / "padding_share.json"))
    args = parser.parse_args(argv)
    lengths, batch, seq_len = row_lengths(args.recipe)
    shuffled: dict[str, Any] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        shuffled[str(seed)] = real_share([lengths[i] for i in order], batch)
    result = {
        "command": command_line("padding_share", argv),
        "rows": len(lengths),
        "batch": batch,
        "seq_len": seq_len,
        "mean_length": round(statistics.mean(lengths), 2),
        "rows_at_seq_len": sum(n == seq_len for n in lengths),
        "real_share": {"split_order": real_share(lengths, batch), "shuffled_by_seed": shuffled,
                       "length_grouped": real_share(sorted(lengths), batch), "packed": 1.0},
    }  # fmt: skip
    write_result(Path(args.result), result)
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
