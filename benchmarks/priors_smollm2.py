"""Evidence for the priors on SmolLM2-135M-Instruct (30 blocks, HQQ, bits 2/3/4, wiki calibration text).

1. Profile two disjoint calibration samples (different offsets into the shuffled wiki train split) and
   compare the block rankings: Spearman of I_q (per bits; the reported number is the minimum) and of I_r.
2. Monotonicity: fraction of blocks with I_q(2) >= I_q(3) >= I_q(4).
3. Signal: quantize the k blocks with the lowest I_q(2) to 2 bits together (real ``quantize_model`` on a
   block plan), versus the k highest, versus random k-sets; KL and loss increase on held-out wiki text
   (the eval split, never used for calibration).

Run: OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.priors_smollm2 [--k 5] [--examples 8]
Profiles are cached/resumable under runs/bench_priors_{a,b}; the JSON goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
from scipy.stats import spearmanr

from benchmarks.harness import ROOT
from planner.config import DataSection, ModelSection, ProfileSection, QRAConfig
from planner.loading import load_model, load_tokenizer
from planner.priors.calibration import calibration_texts
from planner.priors.measure import kl_and_loss, reference_pass
from planner.priors.profile import Priors, profile
from qra_plugin.io import write_json_atomic
from qra_plugin.plan import Plan
from qra_plugin.quantize import quantize_model

RESULT = ROOT / "benchmarks" / "results" / "priors_smollm2.json"


def _config(offset: int, examples: int, seq_len: int) -> QRAConfig:
    return QRAConfig(
        name="bench-priors",
        seed=0,
        model=ModelSection(path="demo"),
        data=DataSection(source="wiki"),
        profile=ProfileSection(
            bits=[2, 3, 4], calibration_examples=examples, calibration_offset=offset, seq_len=seq_len, batch=8
        ),
    )


def _eval_tokens(tokenizer, n_rows: int, seq_len: int) -> torch.Tensor:
    """Packed held-out wiki text (the eval split), disjoint from every calibration sample."""
    from planner.data.wiki import as_plain_text, wiki_split

    ids: list[int] = []
    for record in wiki_split("eval", 400, seed=1):
        ids.extend(tokenizer(as_plain_text(record), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= n_rows * seq_len:
            break
    return torch.tensor(ids[: n_rows * seq_len]).view(n_rows, seq_len)


@torch.no_grad()
def _damage_of_blocks(blocks: list[int], tokens: torch.Tensor, ref, n_blocks: int) -> tuple[float, float]:
    """(KL per token, loss increase) of the real model with ``blocks`` at HQQ 2 bits, the rest unquantized."""
    model = load_model(ModelSection(path="demo")).eval()
    pairs = [(2 if i in blocks else 16, 0) for i in range(n_blocks)]
    quantize_model(model, Plan.from_blocks(model, pairs))
    kl_sum = loss_sum = 0.0
    for b, start in enumerate(range(0, tokens.shape[0], 8)):
        chunk = tokens[start : start + 8]
        kl, loss = kl_and_loss(model(input_ids=chunk, use_cache=False).logits, ref.log_probs[b], chunk)
        kl_sum, loss_sum = kl_sum + kl, loss_sum + loss
    return kl_sum / tokens.numel(), loss_sum / (tokens.shape[0] * (tokens.shape[1] - 1)) - ref.loss


def _monotonic(p: Priors) -> float:
    n = len(p.units)
    return sum(p.I_q[2][i] >= p.I_q[3][i] >= p.I_q[4][i] for i in range(n)) / n


def _two_profiles(args: argparse.Namespace) -> tuple[Priors, Priors, tuple[float, float], tuple[float, float]]:
    """The priors profiled twice on disjoint calibration samples, with each profile's wall and CPU seconds."""
    cfg_a = _config(0, args.examples, args.seq_len)
    cfg_b = _config(args.offset_b, args.examples, args.seq_len)
    # disjointness of the two calibration samples, checked on the texts themselves
    n_texts = 64 * max(4, args.examples)
    texts_a = set(calibration_texts(cfg_a.data, n_texts, 0, 0))
    texts_b = set(calibration_texts(cfg_b.data, n_texts, args.offset_b, 0))
    assert not texts_a & texts_b, "calibration samples overlap"

    t0, c0 = time.perf_counter(), time.process_time()
    pa = profile(cfg_a, ROOT / "runs" / "bench_priors_a", progress=False)
    wall_a, cpu_a = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    pb = profile(cfg_b, ROOT / "runs" / "bench_priors_b", progress=False)
    wall_b, cpu_b = time.perf_counter() - t0, time.process_time() - c0
    print(f"profiles: wall {wall_a:.0f}/{wall_b:.0f} s, cpu {cpu_a:.0f}/{cpu_b:.0f} s", flush=True)
    return pa, pb, (wall_a, wall_b), (cpu_a, cpu_b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--offset-b", type=int, default=5000)
    parser.add_argument("--random-sets", type=int, default=3)
    parser.add_argument("--note", default="2-core CPU shared with 4 other engineers' jobs during the run")
    args = parser.parse_args()
    load_start = os.getloadavg()
    started = time.perf_counter()
    cpu_started = time.process_time()
    pa, pb, (wall_a, wall_b), (cpu_a, cpu_b) = _two_profiles(args)

    by_bits = {b: float(spearmanr(pa.I_q[b], pb.I_q[b]).statistic) for b in sorted(pa.I_q)}
    spearman_ir = float(spearmanr(pa.I_r, pb.I_r).statistic)

    n = len(pa.units)
    order = sorted(range(n), key=lambda i: pa.I_q[2][i])
    low, high = sorted(order[: args.k]), sorted(order[-args.k :])
    model = load_model(ModelSection(path="demo")).eval()
    tokenizer = load_tokenizer(ModelSection(path="demo"))
    eval_tokens = _eval_tokens(tokenizer, 8, args.seq_len)
    ref = reference_pass(model, eval_tokens, 8)
    del model
    low_kl, low_loss = _damage_of_blocks(low, eval_tokens, ref, n)
    high_kl, high_loss = _damage_of_blocks(high, eval_tokens, ref, n)
    rng = random.Random(0)
    random_sets = [sorted(rng.sample(range(n), args.k)) for _ in range(args.random_sets)]
    random_results = [_damage_of_blocks(s, eval_tokens, ref, n) for s in random_sets]

    result = {
        "command": (
            "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.priors_smollm2 "
            f"--k {args.k} --examples {args.examples} --seq-len {args.seq_len} "
            f"--offset-b {args.offset_b} --random-sets {args.random_sets}"
        ),
        "model": "SmolLM2-135M-Instruct (30 blocks), HQQ axis 0, group 16/32/64 at 2/3/4 bits",
        "calibration": {
            "examples": args.examples,
            "seq_len": args.seq_len,
            "offsets": [0, args.offset_b],
            "hashes": [pa.calibration_hash, pb.calibration_hash],
        },
        "spearman_iq": min(by_bits.values()),
        "spearman_iq_by_bits": {str(b): v for b, v in by_bits.items()},
        "spearman_ir": spearman_ir,
        "monotonic_fraction": _monotonic(pa),
        "monotonic_fraction_b": _monotonic(pb),
        "k": args.k,
        "low_k_blocks": low,
        "high_k_blocks": high,
        "low_k_kl": low_kl,
        "high_k_kl": high_kl,
        "low_k_loss_increase": low_loss,
        "high_k_loss_increase": high_loss,
        "random_k_blocks": random_sets,
        "random_k_kl": [r[0] for r in random_results],
        "random_k_loss_increase": [r[1] for r in random_results],
        "eval_tokens": int(eval_tokens.numel()),
        "eval_reference_loss": ref.loss,
        "profile_timings_s": {"a": pa.timings_s, "b": pb.timings_s},
        "profile_wall_s": {"a": wall_a, "b": wall_b},
        "profile_cpu_s": {"a": cpu_a, "b": cpu_b},
        "total_wall_s": time.perf_counter() - started,
        "total_cpu_s": time.process_time() - cpu_started,
        "conditions": {
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "note": args.note,
        },
        "I_q_a": {str(b): v for b, v in pa.I_q.items()},
        "I_q_b": {str(b): v for b, v in pb.I_q.items()},
        "I_r_a": pa.I_r,
        "I_r_b": pb.I_r,
    }
    write_json_atomic(RESULT, result)
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
