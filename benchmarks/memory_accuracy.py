"""Predicted vs measured training memory (planner.memory.estimate) on real quantized models.

For each configuration: load the model, ``apply_plan`` (real HQQ / bitsandbytes layers + PEFT LoRA), and train
two steps with TRL's ``SFTTrainer`` — the trainer fidelity runs use — with the configuration's optimizer and loss
path (TRL's default chunked NLL, or the model's full-logits loss as Axolotl's trainer runs it); the first step
creates the optimizer states, the second is measured.

How peak memory is measured on CPU: ``torch.profiler`` with ``profile_memory=True`` records every
allocation and free that goes through PyTorch's CPU allocator (c10), with its size, in order. The running
sum of those events over the step, plus the bytes already held when the step starts (weights, quantized
state, LoRA, optimizer states: summed over distinct tensor storages), gives the exact number of bytes
held by tensors at every moment; its maximum is the peak. That is the same quantity
``torch.cuda.max_memory_allocated`` reports on a GPU (bytes held by live tensors, without allocator
caching or fragmentation, which depend on the allocator rather than on the plan).

Run:  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.memory_accuracy --model demo \
          --out benchmarks/results/memory_accuracy.json     (--grid plans: the bits / backend / checkpointing mix)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from planner.config import ModelSection, TinyModel
from planner.data.wiki import as_plain_text, wiki_split
from planner.loading import load_model, load_tokenizer
from planner.memory import estimate
from planner.model_info import load_model_info
from planner.settings import TrainingSettings
from qra_plugin import apply_plan
from qra_plugin.io import write_json_atomic, write_text_atomic
from qra_plugin.plan import Plan
from qra_plugin.weight_memory import memory_report, storage_bytes

METHOD = (
    "Two optimizer steps on full rows of trl.SFTTrainer (the trainer fidelity runs use; loss_type chunked_nll "
    "for trl_chunked) or, for hf_full, transformers.Trainer (the base of Axolotl's AxolotlTrainer: the model's "
    "full-logits loss); the row marked /sft is hf_full through SFTTrainer(loss_type=nll). The second step is "
    "measured: "
    "torch.profiler(profile_memory=True) records every allocation/free through PyTorch's CPU allocator from "
    "on_step_begin to on_step_end (forward, backward, optimizer step); peak = bytes held by tensors when the "
    "step begins (distinct storages of weights, quantized state, LoRA, optimizer states) + max running sum of the "
    "step's allocation events. This is the CPU analogue of torch.cuda.max_memory_allocated (live tensor bytes, "
    "no allocator caching/fragmentation)."
)


def configs(n_blocks: int, grid: str = "loss") -> list[dict[str, Any]]:
    """``loss`` (default): two plans x two optimizers x TRL's chunked NLL / transformers' full-logits loss, all
    through SFTTrainer; ``plans``: the earlier bits / rank / backend / checkpointing mix, chunked loss, AdamW;
    ``dtype`` (the default of ``--dtype bfloat16``/``float16``): uniform HQQ 4-bit r16, a mixed 3/4/8-bit plan
    and the unquantized model at r16, each with AdamW and bitsandbytes' 8-bit AdamW, TRL's chunked loss (+ one
    row with transformers' full-logits loss)."""
    if grid == "dtype":
        mixed = [((8, 4), (4, 16), (3, 8))[i % 3] for i in range(n_blocks)]
        plans = [
            {"name": "hqq4-r16", "blocks": [(4, 16)] * n_blocks},
            {"name": "hqq8/4/3-r4/16/8", "blocks": mixed},
            {"name": "none16-r16", "blocks": [(16, 16)] * n_blocks},
        ]
        base = {"backend": "hqq", "batch": 2, "seq": 128, "gc": False, "loss_path": "trl_chunked", "trainer": "sft"}
        rows = [
            {**base, **p, "name": f"{p['name']}/{opt}", "optimizer": opt}
            for p in plans
            for opt in ("adamw_torch", "adamw_bnb_8bit")
        ]
        # the full-logits loss (Axolotl's trainer): bf16 logits, upcast to fp32 by transformers' loss
        return [*rows, {**rows[0], "name": "hqq4-r16/adamw_torch/hf_full", "loss_path": "hf_full", "trainer": "hf"}]
    if grid == "loss":
        plans = [
            {"name": "hqq4-r16", "blocks": [(4, 16)] * n_blocks, "backend": "hqq", "batch": 2, "seq": 128, "gc": False},
            {"name": "nf4-r8-gc", "blocks": [(4, 8)] * n_blocks, "backend": "bnb", "batch": 2, "seq": 128, "gc": True},
        ]
        rows = [
            {**p, "name": f"{p['name']}/{opt}/{loss}", "optimizer": opt, "loss_path": loss, "trainer": TRAINER[loss]}
            for p in plans
            for opt in ("adamw_torch", "adamw_bnb_8bit")
            for loss in ("trl_chunked", "hf_full")
        ]
        # what a fidelity run of an hf_full job runs: TRL's nll also copies the shifted logits for its metrics
        extra = [{**rows[1], "name": "hqq4-r16/adamw_torch/hf_full/sft", "trainer": "sft"}]
        # 1020 labelled tokens: four 256-token chunks, the regime of the GPU runs (8 x 256: eight chunks)
        longer = {**plans[0], "name": "hqq4-r16-4x256", "batch": 4, "seq": 256, "optimizer": "adamw_torch"}
        extra += [{**longer, "name": f"hqq4-r16-4x256/adamw_torch/{loss}", "loss_path": loss, "trainer": TRAINER[loss]}
                  for loss in ("trl_chunked", "hf_full")]  # fmt: skip
        return [*rows, *extra]
    mixed = [(8, 8)] * 6 + [(4, 8)] * (n_blocks - 6)
    alternating = [(3, 8) if i % 2 else (8, 8) for i in range(n_blocks)]
    ladder = [((2, 3, 4, 8, 16)[i % 5], 16) for i in range(n_blocks)]
    rows = [
        {"name": "hqq4-r16", "blocks": [(4, 16)] * n_blocks, "backend": "hqq", "batch": 2, "seq": 128, "gc": False},
        {"name": "hqq4-r16-gc", "blocks": [(4, 16)] * n_blocks, "backend": "hqq", "batch": 4, "seq": 128, "gc": True},
        {"name": "nf4-r16", "blocks": [(4, 16)] * n_blocks, "backend": "bnb", "batch": 1, "seq": 64, "gc": False},
        {"name": "int8-r4", "blocks": [(8, 4)] * n_blocks, "backend": "bnb", "batch": 4, "seq": 64, "gc": False},
        {"name": "hqq8x6+hqq4-r8", "blocks": mixed, "backend": "hqq", "batch": 4, "seq": 128, "gc": False},
        {"name": "hqq3/hqq8-r8", "blocks": alternating, "backend": "hqq", "batch": 1, "seq": 256, "gc": False},
        {"name": "hqq2-r32-gc", "blocks": [(2, 32)] * n_blocks, "backend": "hqq", "batch": 2, "seq": 64, "gc": True},
        {"name": "ladder2..16-r16-gc", "blocks": ladder, "backend": "hqq", "batch": 1, "seq": 512, "gc": True},
    ]
    return [{**r, "optimizer": "adamw_torch", "loss_path": "trl_chunked", "trainer": "sft"} for r in rows]


def _events(prof: Any) -> list[int]:
    evs = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    evs.sort(key=lambda e: e.start_ns())
    return [e.nbytes() for e in evs]


def _run_max(deltas: list[int]) -> tuple[int, int]:
    """(max running sum, final running sum) of allocation deltas."""
    live = peak = 0
    for d in deltas:
        live += d
        peak = max(peak, live)
    return peak, live


def held_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes held by the model (incl. quantized state kept outside parameters) and the optimizer state."""
    report = memory_report(model)
    states = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return report.total_bytes + storage_bytes(states) + storage_bytes(grads)


def batch_ids(tokenizer: Any, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Real SFT text (wiki summaries), tokenized and cut into ``batch`` rows of exactly ``seq`` tokens."""
    texts = [as_plain_text(r) for r in wiki_split("train", 8 * batch * max(1, seq // 64), seed)]
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    if len(ids) < batch * seq:
        raise ValueError(f"not enough text for {batch}x{seq} tokens")
    return torch.tensor(ids[: batch * seq]).view(batch, seq)


#: how SFTTrainer runs each loss path here (Liger / cut cross-entropy kernels need CUDA: not measured on CPU)
TRL_LOSS_TYPE = {"trl_chunked": "chunked_nll", "hf_full": "nll"}
#: the trainer each loss path runs in: TRL's SFTTrainer (fidelity runs), or transformers' Trainer, which Axolotl's
#: AxolotlTrainer subclasses (the model's own loss, no extra metrics on the logits)
TRAINER = {"trl_chunked": "sft", "hf_full": "hf"}


class _StepProbe:
    """A TrainerCallback that profiles the second optimizer step (the first creates the optimizer states):
    static bytes when it begins, then every allocation until it ends (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.prof: Any = None
        self.static = self.rise = 0
        self.wall = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any):
        if state.global_step == 1:
            self.static = held_bytes(model, optimizer)
            self.wall = time.perf_counter()
            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.rise, _ = _run_max(_events(self.prof))
            self.wall = time.perf_counter() - self.wall
            self.prof = None


def measure(section: ModelSection, cfg: dict[str, Any], info: Any, seed: int) -> dict[str, Any]:
    """Two optimizer steps of TRL's SFTTrainer (the fidelity runs' trainer) on the planned model; the second
    is measured at the allocator level."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(seed)
    model = load_model(section)
    plan = Plan.from_block_pairs(info.fingerprint, info.linears, cfg["blocks"], cfg["backend"])
    peft_model = apply_plan(model, plan)
    tokenizer = load_tokenizer(section)
    rows = batch_ids(tokenizer, 2 * cfg["batch"], cfg["seq"], seed)  # full rows: every position has a label
    probe = type("StepProbe", (_StepProbe, TrainerCallback), {})()
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            output_dir=tmp,
            max_steps=2,
            per_device_train_batch_size=cfg["batch"],
            learning_rate=1e-4,
            optim=cfg["optimizer"],
            gradient_checkpointing=cfg["gc"],
            gradient_checkpointing_kwargs={"use_reentrant": False},
            use_cpu=True,
            bf16=False,
            fp16=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        if cfg["trainer"] == "sft":
            args = SFTConfig(
                **common, loss_type=TRL_LOSS_TYPE[cfg["loss_path"]], max_length=cfg["seq"], shuffle_dataset=False
            )
            dataset = Dataset.from_list([{"input_ids": row.tolist()} for row in rows])
            trainer = SFTTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer)
        else:
            full = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r), "labels": r.tolist()} for r in rows]
            trainer = Trainer(
                model=peft_model,
                args=TrainingArguments(**common),
                train_dataset=Dataset.from_list(full),
                data_collator=default_data_collator,
            )
        trainer.add_callback(probe)
        trainer.train()
    return {
        "static_bytes": probe.static,
        "peak": probe.static + probe.rise,
        "step_wall_s": round(probe.wall, 2),
        "plan_summary": plan.summary(),
    }


def predict(info: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    plan = Plan.from_block_pairs(info.fingerprint, info.linears, cfg["blocks"], cfg["backend"])
    t0 = time.perf_counter()
    job = TrainingSettings(
        batch=cfg["batch"],
        seq_len=cfg["seq"],
        grad_checkpointing=cfg["gc"],
        optimizer=cfg["optimizer"],
        loss_path=cfg["loss_path"],
        precision=info.dtype,
    )
    est = estimate(info, plan, job)
    static = est.quantized_weights + est.unquantized_weights + est.lora_params + est.optimizer_states
    return {
        "breakdown": est.to_dict(),
        "static_bytes": static,
        "peak": est.total,
        "estimate_s": round(time.perf_counter() - t0, 3),
    }


#: ``--model tiny``: a Llama built in code (planner.tiny), big enough that its tensors dwarf allocator noise
TINY = {"arch": "llama", "layers": 4, "hidden": 256, "vocab_size": 512}


def model_section(model: str, dtype: str) -> ModelSection:
    if model == "tiny":
        return ModelSection(tiny=TinyModel(**TINY), dtype=dtype)
    return ModelSection(path=model, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="local model dir, 'demo' (SmolLM2-135M) or 'tiny'")
    parser.add_argument("--out", default="benchmarks/results/memory_accuracy.json")
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the dtype the model is loaded and trained in (as fidelity runs: no autocast)",
    )
    parser.add_argument(
        "--grid",
        choices=("loss", "plans", "dtype"),
        default=None,
        help="which configs (see configs(); default: loss in float32, dtype otherwise)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows already in --out (other model/dtype/name) and add or replace these",
    )
    args = parser.parse_args()
    grid = args.grid or ("loss" if args.dtype == "float32" else "dtype")
    torch.set_num_threads(1)
    section = model_section(args.model, args.dtype)
    info = load_model_info(section)
    command = (
        f"OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.memory_accuracy --model {args.model} "
        f"--dtype {args.dtype} --grid {grid}{' --merge' if args.merge else ''} --out {args.out}"
    )
    rows = []
    for cfg in configs(info.n_blocks, grid):
        if args.only and cfg["name"] not in args.only:
            continue
        pred = predict(info, cfg)
        meas = measure(section, cfg, info, args.seed)
        row = {
            "name": cfg["name"],
            "model": args.model,
            "dtype": args.dtype,
            "backend": cfg["backend"],
            "batch": cfg["batch"],
            "seq_len": cfg["seq"],
            "grad_checkpointing": cfg["gc"],
            "optimizer": cfg["optimizer"],
            "loss_path": cfg["loss_path"],
            "trainer": {"sft": "trl.SFTTrainer", "hf": "transformers.Trainer"}[cfg["trainer"]],
            "command": command,
            "predicted": pred,
            "measured": meas,
            "error_pct": {k: round(100 * (pred[k] - meas[k]) / meas[k], 2) for k in ("static_bytes", "peak")},
        }
        rows.append(row)
        print(
            f"{cfg['name']:32s} peak pred {pred['peak'] / 2**20:8.1f} MiB  meas {meas['peak'] / 2**20:8.1f} MiB"
            f"  err {row['error_pct']}",
            flush=True,
        )
    previous = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).is_file() else {}
    result = {
        **{k: v for k, v in previous.items() if k != "rows"},
        "command": previous.get("command", command),
        "model": previous.get("model", args.model),
        "architecture": previous.get("architecture", info.architecture),
        "n_blocks": previous.get("n_blocks", info.n_blocks),
        "dtype": previous.get("dtype", str(info.dtype)),
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "method": METHOD,
        "rows": merged_rows(previous.get("rows", []), rows, previous.get("command")),
    }
    result["max_abs_error_pct"] = max_errors(result["rows"])
    out = write_json_atomic(args.out, result)
    write_text_atomic(out.with_suffix(".md"), to_markdown(result))
    print(f"wrote {out}")


def _row_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row.get("model", "demo"), row.get("dtype", "float32"), row["name"]


def merged_rows(old: list[dict[str, Any]], new: list[dict[str, Any]], old_command: str | None) -> list[dict[str, Any]]:
    """Rows from an earlier run (tagged with its model, dtype and command when they predate those fields) in
    their order, those rerun replaced in place, then the new ones."""
    fresh = {_row_key(r): r for r in new}
    kept = [{"model": "demo", "dtype": "float32", "command": old_command, **r} for r in old]
    out = [fresh.pop(_row_key(r), r) for r in kept]
    return out + [r for r in new if _row_key(r) in fresh]


def max_errors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Max |error| % over all rows and per (model, dtype)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(f"{r.get('model', 'demo')}/{r.get('dtype', 'float32')}", []).append(r)
    out: dict[str, Any] = (
        {k: max(abs(r["error_pct"][k]) for r in rows) for k in ("static_bytes", "peak")} if rows else {}
    )
    out["by_model_dtype"] = {
        g: {k: max(abs(r["error_pct"][k]) for r in rs) for k in ("static_bytes", "peak")} for g, rs in groups.items()
    }
    return out


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# planner.memory accuracy: {result['model']} ({result['architecture']}, {result['n_blocks']} blocks, cpu)",
        "",
        "Commands (each row names its own in the JSON):",
        "",
        *sorted({f"- `{r.get('command') or result['command']}`" for r in result["rows"]}),
        "",
        f"Method: {result['method']}",
        "",
        "| model | dtype | config | trainer | optimizer | loss path | batch | seq | gc | static pred/meas MiB "
        "| loss buffers pred MiB | peak pred/meas MiB | static err % | peak err % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in result["rows"]:
        p, m = r["predicted"], r["measured"]
        lines.append(
            f"| {r.get('model', 'demo')} | {r.get('dtype', 'float32')} | {r['name']} | {r['trainer']} | "
            f"{r['optimizer']} | {r['loss_path']} | {r['batch']} | {r['seq_len']} | "
            f"{r['grad_checkpointing']} | {p['static_bytes'] / mib:.1f} / {m['static_bytes'] / mib:.1f} | "
            f"{p['breakdown']['logits_loss'] / mib:.1f} | "
            f"{p['peak'] / mib:.1f} / {m['peak'] / mib:.1f} | {r['error_pct']['static_bytes']:+.2f} | "
            f"{r['error_pct']['peak']:+.2f} |"
        )
    lines += ["", f"Max |error| %: {result['max_abs_error_pct']}", ""]
    lines += [f"{line}" for line in result.get("notes", [])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
