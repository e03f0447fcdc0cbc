"""Probe (issue 23, item 6): starting eval loss of SmolLM2-135M with zero vs error-aware adapter init.

No training: the loss the fine-tune starts from. Uniform HQQ 4- and 3-bit (g64 / g32, axis 0), r16 (and r4
at 4-bit), alpha 32; second moments from packed wiki *train* rows, eval on packed *selection* rows (disjoint).
Zero init = the quantized model (B = 0). Also, per module at 4-bit: does the init lower the output error on
the held-out rows (the accept-if-better question: it cannot be worse on the calibration rows)?
One thread: on a shared 2-core machine two threads made each eigh/SVD ~100x slower (spin-waiting).

Run: nice -n 10 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.adapter_init_probe
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from planner.config import DataSection, ModelSection
from planner.fidelity.quantized import prequantize, quantized_layer, use_directory
from planner.loading import load_model, load_tokenizer
from planner.priors.adapter_init import plan_with_error_init, quantization_error
from planner.priors.calibration import calibration_batch
from planner.priors.moments import second_moments
from qra_plugin import apply_plan
from qra_plugin.adapter_init import read_init_tensors
from qra_plugin.io import write_json_atomic
from qra_plugin.plan import Plan


def packed_rows(tokenizer, split: str, n_rows: int, seq_len: int) -> torch.Tensor:
    """``n_rows`` x ``seq_len`` ids packed from one wiki split's texts, EOS between texts."""
    from planner.data.wiki import as_plain_text, wiki_split

    ids: list[int] = []
    for row in wiki_split(split, n_rows * 8, seed=0):
        ids += tokenizer(as_plain_text(row), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= n_rows * seq_len:
            break
    return torch.tensor(ids[: n_rows * seq_len]).view(n_rows, seq_len)


def eval_loss(model, tokens: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token NLL over every position of the packed rows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            ids = tokens[start : start + batch]
            logits = model.eval()(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            total += float(nll) * ids[:, 1:].numel()
            count += ids[:, 1:].numel()
    return total / count


def held_out_errors(model, plan: Plan, moments_eval: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per module: (output error on held-out inputs with zero init, with the error init)."""
    tensors = read_init_tensors(plan)
    out = {}
    for name, mp in plan.modules.items():
        linear = model.get_submodule(name)
        error = quantization_error(linear, quantized_layer(linear, mp, torch.float32))
        a, b = tensors[f"{name}.lora_A"].double(), tensors[f"{name}.lora_B"].double()
        residual = error - (mp.lora_alpha / mp.rank) * b @ a
        h = moments_eval[name]
        out[name] = [float(torch.trace(error @ h @ error.T)), float(torch.trace(residual @ h @ residual.T))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calibration-rows", type=int, default=32)
    parser.add_argument("--eval-rows", type=int, default=48)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default="runs/adapter_init_probe")
    parser.add_argument("--result", default="benchmarks/results/adapter_init_probe.json")
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    use_directory(out / "layers")
    section = ModelSection(path="demo")
    model = load_model(section).eval()
    tokenizer = load_tokenizer(section)
    calib = calibration_batch(tokenizer, DataSection(), args.calibration_rows, args.seq_len)
    held_out = packed_rows(tokenizer, "selection", args.eval_rows, args.seq_len)
    names = list(Plan.uniform(model, 4, 16).modules)
    moments = second_moments(model, calib, names)
    results: dict = {"unquantized": eval_loss(model, held_out)}
    print("unquantized", results["unquantized"], flush=True)
    for bits, ranks in ((4, (16, 4)), (3, (16,))):
        quantized = copy.deepcopy(model)
        prequantize(quantized, Plan.uniform(model, bits, 16), "smollm2", torch.float32)
        results[f"hqq{bits}_zero"] = eval_loss(quantized, held_out)
        print(f"hqq{bits} zero", results[f"hqq{bits}_zero"], flush=True)
        for rank in ranks:
            plan = Plan.uniform(model, bits, rank, alpha=32.0)
            path = out / f"hqq{bits}_r{rank}.init.safetensors"
            init = plan_with_error_init(model, plan, calib, path, plan_dir=out, moments=moments)
            loss = eval_loss(apply_plan(copy.deepcopy(quantized), init), held_out)
            results[f"hqq{bits}_r{rank}_error"] = loss
            print(f"hqq{bits} r{rank} error", loss, flush=True)
            write_json_atomic(args.result, json.loads(json.dumps(results)))
            if bits == 4 and rank == 16:
                errors = held_out_errors(model, init, second_moments(model, held_out, names))
                worse = [n for n, (zero, err) in errors.items() if err > zero]
                results["hqq4_r16_held_out_modules_worse"] = worse
                results["hqq4_r16_held_out_error_ratio"] = {n: e / z for n, (z, e) in errors.items()}
                print("modules worse on held-out inputs:", len(worse), "of", len(errors), flush=True)
        del quantized
    for bits in (4, 3):
        gap = results[f"hqq{bits}_zero"] - results["unquantized"]
        removed = results[f"hqq{bits}_zero"] - results[f"hqq{bits}_r16_error"]
        results[f"hqq{bits}_r16_gap_removed"] = removed / gap
    results["settings"] = vars(args) | {"alpha": 32.0, "damping": 0.01, "wall_s": time.perf_counter() - started}
    write_json_atomic(args.result, json.loads(json.dumps(results)))
    print(json.dumps({k: v for k, v in results.items() if "ratio" not in k and "worse" not in k}, indent=1))


if __name__ == "__main__":
    main()
