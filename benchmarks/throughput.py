"""Seconds per optimizer step of a fidelity run on the demo model, before and after each speed lever.

Levers (issue 25), each measured alone against the same baseline run:
* ``reuse_dequantized`` — a frozen HQQ layer dequantizes its weight once per run instead of in every forward
  *and* backward (hqq's CPU autograd function recomputes it in backward). Same math: losses equal to the bit.
* ``padding_free`` — each batch flattened into one row of its rows' real tokens (TRL's padding-free collator,
  the packing rule keeping rows apart): the same rows per step and the same tokens in the loss, no FLOPs on
  padding. Float sums change order: losses equal to rounding, not to the bit.
For each bit-width (HQQ 3/4/8, and 16 = unquantized) the settings run back to back in one process, alternating,
so their ratios are measured under the same machine load. Then the **thread layout** at 4 bits: one worker with
two threads against two single-thread workers side by side (spawned processes), in optimizer steps per second
of the whole machine.

  python -m benchmarks.throughput                    # SmolLM2-135M fp32, batch 4 x 128, 2 threads
  python -m benchmarks.throughput --steps 2 --bits 4  # quicker
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, command_line, speed_run_config
from qra_plugin.io import write_json_atomic, write_text_atomic

OUT = ROOT / "benchmarks" / "results" / "throughput.json"
#: setting -> (reuse_dequantized, padding_free); "before" is today's default, each lever alone
SETTINGS = {"before": (False, False), "reuse_dequantized": (True, False), "padding_free": (False, True)}
#: the lever "after" names: the one that can help a step (opt-in; ``reuse_dequantized`` measured no gain)
KEPT = "padding_free"


def one_run(bits: int, steps: int, setting: str, threads: int, model: str) -> dict[str, Any]:
    from planner.fidelity.contract import EvalTask
    from planner.fidelity.sft import run_fidelity
    from planner.loading import load_meta_model
    from qra_plugin import Plan

    reuse, padding_free = SETTINGS[setting]
    cfg = speed_run_config(steps, reuse, threads, model, padding_free=padding_free)
    plan = Plan.uniform(load_meta_model(cfg.model), bits=bits, rank=16, backend=None if bits < 16 else "none")
    result = run_fidelity(EvalTask(plan=plan, level="low", seed=0, config=cfg))
    if result.status != "ok":
        raise SystemExit(f"{bits}-bit run failed: {result.error}")
    return {"step_s": result.train_s / result.steps, "eval_s": result.eval_s, "setup_s": result.setup_s,
            "train_loss": result.train_loss, "eval_loss": result.eval_loss}  # fmt: skip


def measure(bits_list: list[int], steps: int, repeats: int, threads: int, model: str) -> dict[str, Any]:
    step_s: dict[str, Any] = {}
    for bits in bits_list:
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
        for _ in range(repeats):
            for setting in SETTINGS:
                runs[setting].append(one_run(bits, steps, setting, threads, model))
        med = {s: round(statistics.median(r["step_s"] for r in v), 3) for s, v in runs.items()}
        evals = {s: round(statistics.median(r["eval_s"] for r in v), 2) for s, v in runs.items()}
        losses = {s: [(r["train_loss"], r["eval_loss"]) for r in v] for s, v in runs.items()}
        step_s[str(bits)] = {
            "before": med["before"],
            "after": med[KEPT],
            "by_lever": {s: med[s] for s in SETTINGS if s != "before"},
            "ratio": {s: round(med[s] / med["before"], 3) for s in SETTINGS if s != "before"},
            "eval_s": evals,
            "losses": {s: list(v[0]) for s, v in losses.items()},
            "losses_identical": {s: losses[s] == losses["before"] for s in SETTINGS if s != "before"},
            "largest_loss_difference": {
                s: _largest_difference(losses[s], losses["before"]) for s in SETTINGS if s != "before"
            },
        }
        print(bits, step_s[str(bits)], flush=True)
    return step_s


def padded_vs_flat(bits: int, data: str, threads: int, model: str, rounds: int = 2) -> dict[str, Any]:
    """The padding_free lever on the same batches in one process: 8 batches of 4 rows, each step (forward +
    backward) run padded and flattened in alternating order, ``rounds`` times — a paired reading the machine's
    drift cannot fake. Also the share of real tokens in the padded batches."""
    import dataclasses
    import tempfile

    import torch

    from planner.fidelity import sft
    from planner.fidelity.contract import EvalTask, level_settings
    from planner.fidelity.quantized import prequantize
    from planner.loading import load_meta_model
    from planner.settings import TrainingSettings
    from qra_plugin import Plan, apply_plan
    from qra_plugin.quantize import model_compute_dtype

    torch.set_num_threads(threads)
    cfg = speed_run_config(4, False, threads, model)
    cfg.data.source = data
    plan = Plan.uniform(load_meta_model(cfg.model), bits=bits, rank=16, backend=None if bits < 16 else "none")
    level = level_settings(cfg, "low")
    peft = sft.fresh_model(cfg.model)
    if bits < 16:
        prequantize(peft, plan, cfg.model.model_dump_json(), model_compute_dtype(peft))
    peft = apply_plan(peft, plan)
    with tempfile.TemporaryDirectory() as workdir:
        job = TrainingSettings.of(cfg, level, device="cpu")
        trainer = sft._build_trainer(EvalTask(plan=plan, level="low", seed=0, config=cfg), level, peft,
                                     sft.cached_tokenizer(cfg.model), workdir, job)  # fmt: skip
    rows = [trainer.train_dataset[i] for i in range(32)]
    batches = [rows[i : i + 4] for i in range(0, 32, 4)]
    collators = {"padded": trainer.data_collator, "flat": dataclasses.replace(trainer.data_collator, padding_free=True)}
    seconds: dict[str, float] = {"padded": 0.0, "flat": 0.0}
    for r in range(rounds):
        for batch in batches:
            for name in ("padded", "flat") if r % 2 == 0 else ("flat", "padded"):
                inputs = collators[name](batch)
                start = time.perf_counter()
                peft(**inputs).loss.backward()
                seconds[name] += time.perf_counter() - start
                peft.zero_grad(set_to_none=True)
    real = sum(len(row["input_ids"]) for row in rows)
    slots = sum(len(b) * max(len(row["input_ids"]) for row in b) for b in batches)
    return {"bits": bits, "data": data, "real_token_share": round(real / slots, 3),
            "padded_s": round(seconds["padded"], 2), "flat_s": round(seconds["flat"], 2),
            "flat_over_padded": round(seconds["flat"] / seconds["padded"], 3)}  # fmt: skip


def eval_batches(
    bits: int, threads: int, model: str, sizes: tuple[int, ...] = (4, 8, 16, 24), rounds: int = 2, rows: int = 24
) -> dict[str, Any]:
    """The eval pass sized by measurement: one trained-free model, ``trainer.evaluate()`` over the same ``rows``
    selection rows at each ``fidelity.eval_batch`` in ``sizes``, rotating the order each round (paired, one
    process). The loss differs across sizes only by how HF averages batch means (eval_batch is in the recipe)."""
    import tempfile

    import torch

    from planner.fidelity import sft
    from planner.fidelity.contract import EvalTask, level_settings
    from planner.fidelity.quantized import prequantize
    from planner.loading import load_meta_model
    from planner.settings import TrainingSettings
    from qra_plugin import Plan, apply_plan
    from qra_plugin.quantize import model_compute_dtype

    torch.set_num_threads(threads)
    cfg = speed_run_config(1, False, threads, model)
    cfg.fidelity.low.eval_examples = rows
    plan = Plan.uniform(load_meta_model(cfg.model), bits=bits, rank=16)
    level = level_settings(cfg, "low")
    peft = sft.fresh_model(cfg.model)
    prequantize(peft, plan, cfg.model.model_dump_json(), model_compute_dtype(peft))
    peft = apply_plan(peft, plan)
    seconds: dict[int, float] = dict.fromkeys(sizes, 0.0)
    losses: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as workdir:
        job = TrainingSettings.of(cfg, level, device="cpu")
        trainer = sft._build_trainer(EvalTask(plan=plan, level="low", seed=0, config=cfg), level, peft,
                                     sft.cached_tokenizer(cfg.model), workdir, job)  # fmt: skip
        for r in range(rounds):
            for size in sizes[r % len(sizes) :] + sizes[: r % len(sizes)]:
                trainer.args.per_device_eval_batch_size = size
                start = time.perf_counter()
                losses[size] = trainer.evaluate()["eval_loss"]
                seconds[size] += time.perf_counter() - start
    return {"bits": bits, "rows": rows, "rounds": rounds, "threads": threads,
            "eval_s": {str(k): round(v / rounds, 2) for k, v in seconds.items()},
            "eval_loss": {str(k): round(v, 6) for k, v in losses.items()}}  # fmt: skip


def _largest_difference(runs: list[tuple[float, float]], baseline: list[tuple[float, float]]) -> float:
    """Largest |train or eval loss − the baseline run's| over the repeats."""
    return max(abs(a - b) for x, y in zip(runs, baseline, strict=True) for a, b in zip(x, y, strict=True))


def _layout_worker(args: tuple[int, int, str, int, str]) -> dict[str, Any]:
    bits, steps, setting, threads, model = args
    return one_run(bits, steps, setting, threads, model)


def layout(steps: int, model: str, repeats: int) -> dict[str, Any]:
    """Steps per second of the machine at 4 bits: one 2-thread worker vs two 1-thread workers at once, the two
    layouts alternating ``repeats`` times (the machine's speed drifts; a ratio within each pair is the reading)."""
    one_rates, two_rates = [], []
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_layout_worker, [(4, 1, "before", 1, model)] * 2)  # imports and caches, untimed
        for _ in range(repeats):
            one = one_run(4, steps, "before", 2, model)
            two = pool.map(_layout_worker, [(4, steps, "before", 1, model)] * 2)
            one_rates.append(1 / one["step_s"])
            two_rates.append(sum(1 / r["step_s"] for r in two))
    ratios = [b / a for a, b in zip(one_rates, two_rates, strict=True)]
    return {
        "one_worker_2_threads_steps_per_s": [round(r, 4) for r in one_rates],
        "two_workers_1_thread_steps_per_s": [round(r, 4) for r in two_rates],
        "two_over_one": [round(r, 3) for r in ratios],
        "two_over_one_median": round(statistics.median(ratios), 3),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Fidelity-run throughput",
        "",
        f"Command: `{result['command']}`",
        "",
        f"{result['model']}, batch 4 × 128 (wiki rows), {result['threads']} threads, {result['steps']} optimizer "
        f"steps per run, {result['repeats']} run(s) per setting (median), the settings alternating in one process. "
        f"`after` = with `{KEPT}` (opt-in `train.{KEPT}`; no per-step lever is on by default). One run of a few "
        "steps drifts with this machine's speed (the 16-bit row moves where no lever can act): the paired "
        "readings below, alternating on the same batches in one process, are the measurement.",
        "",
        "| bits | s/step before | reuse_dequantized | padding_free | after / before | losses (padding_free − before) |",
        "|---|---|---|---|---|---|",
    ]
    for bits, row in result["step_s"].items():
        lever, diff = row["by_lever"], row["largest_loss_difference"]
        lines.append(f"| {bits} | {row['before']} | {lever['reuse_dequantized']} | {lever['padding_free']} | "
                     f"{row['ratio'][KEPT]} | ≤ {diff['padding_free']:.1e} |")  # fmt: skip
    if result.get("final_s"):
        f = result["final_s"]
        lines += ["", f"One 40-step final (HQQ 4-bit r16, estimated from the 4-bit step time + eval): "
                      f"{f['before']} s before, {f['after']} s after."]  # fmt: skip
    if result.get("layout"):
        lay = result["layout"]
        lines += ["", f"Thread layout (4-bit, alternating pairs): one 2-thread worker "
                      f"{lay['one_worker_2_threads_steps_per_s']} steps/s; two 1-thread workers side by side "
                      f"{lay['two_workers_1_thread_steps_per_s']} steps/s (ratios {lay['two_over_one']}, median "
                      f"×{lay['two_over_one_median']})."]  # fmt: skip
    for p in result.get("padding_free_pairs") or []:
        lines += ["", f"padding_free, paired steps ({p['bits']}-bit, {p['data']} rows, {p['real_token_share']:.1%} "
                      f"real tokens when padded): flat / padded = {p['flat_over_padded']} "
                      f"({p['flat_s']} s vs {p['padded_s']} s over the same batches)."]  # fmt: skip
    if result.get("eval_batch"):
        e = result["eval_batch"]
        per = ", ".join(f"{k}: {v} s (loss {e['eval_loss'][k]})" for k, v in e["eval_s"].items())
        lines += ["", f"Eval pass over {e['rows']} rows ({e['bits']}-bit, {e['threads']} thread, mean of "
                      f"{e['rounds']} rotated rounds) per eval_batch — {per}."]  # fmt: skip
    if result.get("demo_wall_s"):
        lines += ["", f"`make demo` wall: {result['demo_wall_s']} s ({result.get('demo_note', '')})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="3,4,8,16")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="demo", help="demo (SmolLM2-135M) or tiny")
    parser.add_argument("--no-layout", action="store_true", help="skip the thread-layout comparison")
    parser.add_argument("--layout-only", action="store_true", help="only the thread layout (keeps step_s)")
    parser.add_argument("--padding-only", action="store_true", help="only padded vs flat steps (keeps the rest)")
    parser.add_argument("--eval-batch-only", action="store_true", help="only the eval pass per batch size")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    started = time.time()
    out = Path(args.out)
    previous = _read(out)
    command = command_line("throughput", argv)
    if args.padding_only:  # paired padded/flat steps on the demo's data and on the benchmark's (padded) data
        pairs = [padded_vs_flat(4, data, args.threads, args.model) for data in ("wiki", "wiki_mix")]
        result = {**previous, "padding_free_pairs": pairs, "padding_command": command}
    elif args.eval_batch_only:  # the eval pass at each eval_batch, one thread as the search's workers run
        result = {**previous, "eval_batch": eval_batches(4, 1, args.model), "eval_batch_command": command}
    elif args.layout_only:  # the step times stay those of the run that measured them, with its command
        result = {**previous, "layout": layout(args.steps, args.model, max(args.repeats, 3)),
                  "layout_command": command}  # fmt: skip
    else:
        step_s = measure([int(b) for b in args.bits.split(",")], args.steps, args.repeats, args.threads, args.model)
        result = {
            "command": command,
            "model": "SmolLM2-135M-Instruct fp32" if args.model == "demo" else "tiny Llama",
            "threads": args.threads,
            "steps": args.steps,
            "repeats": args.repeats,
            "step_s": step_s,
            "layout": None if args.no_layout else layout(args.steps, args.model, max(args.repeats, 3)),
            "wall_s": round(time.time() - started, 1),
        }
    if "4" in result["step_s"]:
        row = result["step_s"]["4"]
        evals = {"before": row["eval_s"]["before"], "after": row["eval_s"][KEPT]}
        result["final_s"] = {k: round(40 * row[k] + evals[k], 1) for k in ("before", "after")}
    # written by benchmarks/demo_record.py when make demo is timed alone; a re-run here keeps it
    result["demo_wall_s"] = previous.get("demo_wall_s")
    result["demo_note"] = previous.get("demo_note")
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), markdown(result))
    return 0


def _read(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


if __name__ == "__main__":
    raise SystemExit(main())
