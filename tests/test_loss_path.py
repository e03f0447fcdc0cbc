"""The memory model prices the loss the trainer runs: TRL's chunked NLL (fidelity runs' default), transformers'
full-logits loss (Axolotl's trainer), Liger / cut cross-entropy (Axolotl loss plugins); and measured through
TRL's SFTTrainer at the allocator level, the chunked path's peak is predicted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.config import LOSS_PATHS
from planner.memory import estimate, uniform_plan
from planner.memory.activations import trace_activations
from planner.memory.loss import TRL_CHUNK_TOKENS
from planner.model_info import load_model_info
from planner.settings import TrainingSettings
from planner.tiny import build_tiny_model, save_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def info():
    return load_model_info(build_tiny_model("llama", seed=0, layers=2, hidden=64, vocab_size=4096))


def test_the_chunk_size_is_trls() -> None:
    from trl.trainer import sft_trainer

    assert sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE == TRL_CHUNK_TOKENS


def test_the_loss_part_of_the_trace_is_the_full_logits_log_softmax(info) -> None:
    trace = trace_activations(info, 2, 64, info.dtype)
    assert 0 < trace.loss_saved <= trace.head_saved
    assert trace.loss_saved >= trace.logits_elems * 4  # the fp32 log-softmax of every position


def test_each_loss_path_is_priced_and_only_the_full_logits_one_grows_with_tokens_x_vocab(info) -> None:
    plan = uniform_plan(info, 4, 8)
    parts = {
        p: estimate(info, plan, TrainingSettings(batch=4, seq_len=256, loss_path=p)).logits_loss for p in LOSS_PATHS
    }
    assert parts["hf_full"] > parts["trl_chunked"] > parts["liger"] > parts["cce"] > 0
    doubled = {
        p: estimate(info, plan, TrainingSettings(batch=8, seq_len=256, loss_path=p)).logits_loss for p in LOSS_PATHS
    }
    assert doubled["hf_full"] / parts["hf_full"] == pytest.approx(2, rel=0.02)
    assert doubled["trl_chunked"] / parts["trl_chunked"] < 1.1  # one 256-token chunk of logits at a time
    assert estimate(info, plan, TrainingSettings(batch=4, seq_len=256)).settings["loss_path"] == "trl_chunked"


def test_gradient_accumulation_keeps_the_lora_gradients_through_the_next_forward(info) -> None:
    plan = uniform_plan(info, 4, 8)
    once = estimate(info, plan, TrainingSettings(batch=2, seq_len=64))
    accumulated = estimate(info, plan, TrainingSettings(batch=2, seq_len=64, gradient_accumulation_steps=4))
    assert once.peak_phase == accumulated.peak_phase == "loss"
    assert accumulated.total - once.total == once.lora_grads > 0


@pytest.mark.parametrize("loss", ["trl_chunked", "hf_full"])
def test_the_peak_measured_through_trls_sft_trainer_is_predicted(loss: str, tmp_path) -> None:
    """benchmarks.memory_accuracy on a tiny Llama with a 4096-token vocabulary (the loss buffers are most of
    the step): allocator-level peak of the second SFTTrainer step vs the prediction for that loss path."""
    model_dir = save_tiny_model(tmp_path / "model", layers=2, hidden=64, vocab_size=4096)
    out = tmp_path / "memory.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    only = f"hqq4-r16/adamw_torch/{loss}"
    cmd = [sys.executable, "-m", "benchmarks.memory_accuracy", "--model", str(model_dir), "--out", str(out)]
    cmd += ["--only", only]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    step_bytes = row["measured"]["peak"] - row["measured"]["static_bytes"]
    assert row["predicted"]["breakdown"]["logits_loss"] > 0.5 * step_bytes  # the loss is most of the step
    assert abs(row["error_pct"]["peak"]) <= 2.0, row["error_pct"]
