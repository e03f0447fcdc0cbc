"""Fine-tune with a qra plan in a plain TRL SFTTrainer script (transformers + datasets + TRL + qra_plugin).

    qra export-data --out data/train.jsonl --format prompt-completion        # or bring your own jsonl
    python example_configs/train_trl.py --model ~/.cache/qra/smollm2-135m-instruct \
        --plan runs/smollm2-demo/plan.yaml --data data/train.jsonl --steps 20
    accelerate launch --num_processes 2 example_configs/train_trl.py --model DIR --plan plan.yaml --data data.jsonl

The data is any jsonl TRL reads: ``prompt``/``completion``, conversational ``messages`` or plain ``text``.
The three lines that matter are marked (1)–(3): load the model, apply the plan, add the callback.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from qra_plugin import Plan, QRACallback, apply_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local transformers model directory")
    parser.add_argument("--plan", required=True, help="plan.yaml written by `qra search` or Plan.save")
    parser.add_argument("--data", required=True, help="training jsonl (prompt/completion, messages or text)")
    parser.add_argument("--eval-data", default=None, help="optional evaluation jsonl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--out", default="outputs/trl-qra")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-if-loss-above", type=float, default=None, help="early stop (agreed on all ranks)")
    parser.add_argument("--min-steps", type=int, default=0, help="never stop early before this step")
    args = parser.parse_args()

    model_dir = os.path.expanduser(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)  # (1) load as usual
    plan = Plan.load(args.plan)
    model = apply_plan(model, plan)  # (2) quantize per module + per-module LoRA ranks

    files = {"train": args.data, **({"eval": args.eval_data} if args.eval_data else {})}
    data = load_dataset("json", data_files=files)
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
        bf16=False,  # on CPU: TRL's bf16 autocast would feed bf16 activations into HQQ's fp32 weights
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data.get("eval"),
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
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    if args.eval_data:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    if rank == 0:
        trainer.model.save_pretrained(out / "adapter")
        plan.save(out / "adapter" / "qra_plan.yaml")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
