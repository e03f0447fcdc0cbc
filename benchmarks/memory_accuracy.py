"""Predicted vs measured training memory (planner.memory.estimate) on real quantized models.

For each configuration: load the model, ``apply_plan`` (real HQQ / bitsandbytes layers + PEFT LoRA), build
the optimizer the HF Trainer would build, run one warm-up training step (so optimizer states exist, as in
every later step), then measure a second step.

How peak memory is measured on CPU: ``torch.profiler`` with ``profile_memory=True`` records every
allocation and free that goes through PyTorch's CPU allocator (c10), with its size, in order. The running
sum of those events over the step, plus the bytes already held when the step starts (weights, quantized
state, LoRA, optimizer states: summed over distinct tensor storages), gives the exact number of bytes
held by tensors at every moment; its maximum is the peak. That is the same quantity
``torch.cuda.max_memory_allocated`` reports on a GPU (bytes held by live tensors, without allocator
caching or fragmentation, which depend on the allocator rather than on the plan).

Run:  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/memory_accuracy.py --model demo \
          --out benchmarks/results/memory_accuracy.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.config import ModelSection  # noqa: E402
from planner.data.wiki import as_plain_text, wiki_split  # noqa: E402
from planner.loading import load_model, load_tokenizer  # noqa: E402
from planner.memory import estimate, trace_activations  # noqa: E402
from planner.model_info import load_model_info  # noqa: E402
from qra_plugin import apply_plan  # noqa: E402
from qra_plugin.io import write_json_atomic, write_text_atomic  # noqa: E402
from qra_plugin.plan import Plan  # noqa: E402
from qra_plugin.weight_memory import memory_report, storage_bytes  # noqa: E402

METHOD = (
    "torch.profiler(profile_memory=True) records every allocation/free through PyTorch's CPU allocator; "
    "peak = bytes held by tensors when the step starts (distinct storages of weights, quantized state, LoRA, "
    "optimizer states) + max running sum of the step's allocation events. This is the CPU analogue of "
    "torch.cuda.max_memory_allocated (live tensor bytes, no allocator caching/fragmentation). Activations "
    "measured = bytes still held right after the forward (outputs dropped, loss kept) = what autograd saved."
)


def configs(n_blocks: int) -> list[dict[str, Any]]:
    """Bits mixes, ranks, backends, batch, seq-len and gradient checkpointing on/off."""
    mixed = [(8, 8)] * 6 + [(4, 8)] * (n_blocks - 6)
    alternating = [(3, 8) if i % 2 else (8, 8) for i in range(n_blocks)]
    ladder = [((2, 3, 4, 8, 16)[i % 5], 16) for i in range(n_blocks)]
    return [
        {"name": "hqq4-r16", "blocks": [(4, 16)] * n_blocks, "backend": "hqq", "batch": 2, "seq": 128, "gc": False},
        {"name": "hqq4-r16-gc", "blocks": [(4, 16)] * n_blocks, "backend": "hqq", "batch": 4, "seq": 128, "gc": True},
        {"name": "nf4-r16", "blocks": [(4, 16)] * n_blocks, "backend": "bnb", "batch": 1, "seq": 64, "gc": False},
        {"name": "int8-r4", "blocks": [(8, 4)] * n_blocks, "backend": "bnb", "batch": 4, "seq": 64, "gc": False},
        {"name": "hqq8x6+hqq4-r8", "blocks": mixed, "backend": "hqq", "batch": 4, "seq": 128, "gc": False},
        {"name": "hqq3/hqq8-r8", "blocks": alternating, "backend": "hqq", "batch": 1, "seq": 256, "gc": False},
        {"name": "hqq2-r32-gc", "blocks": [(2, 32)] * n_blocks, "backend": "hqq", "batch": 2, "seq": 64, "gc": True},
        {"name": "ladder2..16-r16-gc", "blocks": ladder, "backend": "hqq", "batch": 1, "seq": 512, "gc": True},
    ]


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


def measure(section: ModelSection, cfg: dict[str, Any], info: Any, seed: int) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(seed)
    model = load_model(section)
    plan = Plan.from_block_pairs(info.fingerprint, info.linears, cfg["blocks"], cfg["backend"])
    peft_model = apply_plan(model, plan)
    if cfg["gc"]:
        peft_model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        peft_model.base_model.model.enable_input_require_grads()
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, optim="adamw_torch", use_cpu=True, report_to=[])
        opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(targs)
    opt = opt_cls(params, lr=1e-4)
    ids = batch_ids(load_tokenizer(section), cfg["batch"], cfg["seq"], seed)

    def step(profiled: bool) -> tuple[int, int, float]:
        t0 = time.perf_counter()
        acts = [ProfilerActivity.CPU]
        if not profiled:
            loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return 0, 0, time.perf_counter() - t0
        with profile(activities=acts, profile_memory=True) as fwd:
            out = peft_model(input_ids=ids, labels=ids)
            loss = out.loss
            del out
        with profile(activities=acts, profile_memory=True) as bwd:
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
        f_peak, f_end = _run_max(_events(fwd))
        b_peak, _ = _run_max(_events(bwd))
        return max(f_peak, f_end + b_peak), f_end, time.perf_counter() - t0

    step(False)  # warm-up: optimizer states now exist, as in every later step
    base = held_bytes(peft_model, opt)
    rise, fwd_end, wall = step(True)
    return {
        "static_bytes": base,
        "activations_after_forward": fwd_end,
        "peak": base + rise,
        "step_wall_s": round(wall, 2),
        "plan_summary": plan.summary(),
    }


def predict(info: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    plan = Plan.from_block_pairs(info.fingerprint, info.linears, cfg["blocks"], cfg["backend"])
    t0 = time.perf_counter()
    est = estimate(info, plan, batch=cfg["batch"], seq_len=cfg["seq"], grad_checkpointing=cfg["gc"])
    trace = trace_activations(info, cfg["batch"], cfg["seq"], info.dtype)
    static = est.quantized_weights + est.unquantized_weights + est.lora_params + est.optimizer_states
    return {
        "breakdown": est.to_dict(),
        "static_bytes": static,
        # held after the forward: saved activations + the loss's saved fp32 log-softmax
        "activations_after_forward": est.activations + trace.head_saved,
        "peak": est.total,
        "estimate_s": round(time.perf_counter() - t0, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="local model dir or 'demo' (SmolLM2-135M)")
    parser.add_argument("--out", default="benchmarks/results/memory_accuracy.json")
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    section = ModelSection(path=args.model)
    info = load_model_info(section)
    rows = []
    for cfg in configs(info.n_blocks):
        if args.only and cfg["name"] not in args.only:
            continue
        pred = predict(info, cfg)
        meas = measure(section, cfg, info, args.seed)
        row = {
            "name": cfg["name"],
            "backend": cfg["backend"],
            "batch": cfg["batch"],
            "seq_len": cfg["seq"],
            "grad_checkpointing": cfg["gc"],
            "predicted": pred,
            "measured": meas,
            "error_pct": {
                k: round(100 * (pred[k] - meas[k]) / meas[k], 2)
                for k in ("static_bytes", "activations_after_forward", "peak")
            },
        }
        rows.append(row)
        print(
            f"{cfg['name']:32s} peak pred {pred['peak'] / 2**20:8.1f} MiB  meas {meas['peak'] / 2**20:8.1f} MiB"
            f"  err {row['error_pct']}",
            flush=True,
        )
    result = {
        "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/memory_accuracy.py --model "
        f"{args.model} --out {args.out}",
        "model": args.model,
        "architecture": info.architecture,
        "n_blocks": info.n_blocks,
        "dtype": str(info.dtype),
        "optimizer": "adamw_torch",
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "method": METHOD,
        "max_abs_error_pct": {
            k: max(abs(r["error_pct"][k]) for r in rows) for k in ("static_bytes", "activations_after_forward", "peak")
        }
        if rows
        else {},
        "rows": rows,
    }
    out = write_json_atomic(args.out, result)
    write_text_atomic(out.with_suffix(".md"), to_markdown(result))
    print(f"wrote {out}")


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# planner.memory accuracy: {result['model']} ({result['architecture']}, {result['n_blocks']} blocks, "
        f"{result['dtype']}, {result['optimizer']}, {result['device']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Method: {result['method']}",
        "",
        "| config | batch | seq | gc | static pred/meas MiB | act. pred/meas MiB | peak pred/meas MiB | peak err % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in result["rows"]:
        p, m = r["predicted"], r["measured"]
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['seq_len']} | {r['grad_checkpointing']} | "
            f"{p['static_bytes'] / mib:.1f} / {m['static_bytes'] / mib:.1f} | "
            f"{p['activations_after_forward'] / mib:.1f} / {m['activations_after_forward'] / mib:.1f} | "
            f"{p['peak'] / mib:.1f} / {m['peak'] / mib:.1f} | {r['error_pct']['peak']:+.2f} |"
        )
    lines += ["", f"Max |error| %: {result['max_abs_error_pct']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
