"""Fine-tune with a qra plan in a plain TRL SFTTrainer script.

    python example_configs/train_trl.py --model demo --plan runs/smollm2-demo/plan.yaml --steps 20
    accelerate launch --num_processes 2 example_configs/train_trl.py --model tiny --plan plan.yaml

The three lines that matter are marked (1)–(3): load the model, apply the plan, add the callback.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer

from planner.config import ModelSection, TinyModel
from planner.data.wiki import sft_dataset
from planner.loading import load_model, load_tokenizer
from qra_plugin import Plan, QRACallback, apply_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="a local model dir, 'demo' (SmolLM2-135M) or 'tiny'")
    parser.add_argument("--plan", required=True, help="plan.yaml written by `qra search` or Plan.save")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--eval-examples", type=int, default=0, help="evaluate on this many held-out examples")
    parser.add_argument("--out", default="outputs/trl-qra")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-if-loss-above", type=float, default=None, help="early stop (agreed on all ranks)")
    parser.add_argument("--min-steps", type=int, default=0, help="never stop early before this step")
    args = parser.parse_args()

    section = ModelSection(tiny=TinyModel()) if args.model == "tiny" else ModelSection(path=args.model)
    tokenizer = load_tokenizer(section)
    model = load_model(section, device="cuda" if torch.cuda.is_available() else "cpu")  # (1) load as usual
    plan = Plan.load(args.plan)
    model = apply_plan(model, plan)  # (2) quantize per module + per-module LoRA ranks

    out = Path(args.out)
    config = SFTConfig(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        learning_rate=args.lr,
        max_length=args.seq_len,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=sft_dataset("train", args.train_examples, seed=args.seed),
        eval_dataset=sft_dataset("eval", args.eval_examples) if args.eval_examples else None,
        processing_class=tokenizer,
        callbacks=[  # (3) log plan + memory; optional early stop with the same decision on every rank
            QRACallback(
                plan=plan,
                metrics_path=out / "qra_metrics.json",
                stop_if_loss_above=args.stop_if_loss_above,
                min_steps=args.min_steps,
            )
        ],
    )
    result = trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    summary = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
    }
    summary["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if args.eval_examples:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    if rank == 0:
        trainer.model.save_pretrained(out / "adapter")
        plan.save(out / "adapter" / "qra_plan.yaml")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
