"""``accelerate launch`` with 2 CPU processes (gloo) running the TRL example with a mixed plan."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from planner.data.wiki import write_jsonl
from planner.tiny import build_tiny_model, save_tiny_model
from tests.conftest import mixed_plan
from tests.launch import launch_env

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")


def _launch(tmp_path: Path, *extra: str) -> list[dict]:
    model_dir = save_tiny_model(tmp_path / "model", seed=0)
    data = write_jsonl(tmp_path / "train.jsonl", "train", 32, fmt="prompt-completion")
    plan = mixed_plan(build_tiny_model("llama", seed=0))
    plan.save(tmp_path / "plan.yaml")
    out = tmp_path / "out"
    cmd = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "example_configs" / "train_trl.py"),
        "--model", str(model_dir), "--plan", str(tmp_path / "plan.yaml"), "--data", str(data), "--batch", "2",
        "--out", str(out), *extra,
    ]  # fmt: skip
    env = launch_env(HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_train_a_mixed_plan_with_the_same_loss(tmp_path):
    ranks = _launch(tmp_path, "--steps", "3")
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    assert ranks[0]["losses"] == pytest.approx(ranks[1]["losses"], abs=1e-6)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_early_stop_is_the_same_decision_on_every_rank(tmp_path):
    ranks = _launch(tmp_path, "--steps", "6", "--stop-if-loss-above", "0.01", "--min-steps", "2")
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
