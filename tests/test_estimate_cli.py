"""``qra estimate`` as a user runs it: a subprocess on a saved tiny model directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.memory import estimate, uniform_plan
from planner.model_info import load_model_info
from planner.settings import TrainingSettings
from planner.tiny import save_tiny_model

FIELDS = ("quantized_weights", "unquantized_weights", "lora_params", "lora_grads", "optimizer_states", "activations")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", "qwen2", layers=3, hidden=64, vocab_size=256)


def qra(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from planner.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_estimate_json_matches_library(model_dir: Path) -> None:
    res = qra("estimate", "--model", str(model_dir), "--uniform", "4:16", "--batch", "2", "--seq-len", "32", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout.strip().splitlines()[-1])
    for key in (*FIELDS, "total"):
        assert isinstance(data[key], int) and data[key] >= 0, key
    info = load_model_info(model_dir)
    expected = estimate(info, uniform_plan(info, 4, 16), TrainingSettings(batch=2, seq_len=32))
    assert data["total"] == expected.total
    assert data["quantized_weights"] == expected.quantized_weights > 0


def qra_inprocess(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The same entry point in this process (the subprocess start-up costs ~1 min on a loaded CI box)."""
    from planner.cli import main

    old = sys.argv
    sys.argv = ["qra", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_plan_file_and_table(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = load_model_info(model_dir)
    plan_path = uniform_plan(info, 8, 4, "bnb").save(tmp_path / "plan.yaml")
    base = ("estimate", "--model", str(model_dir), "--plan", str(plan_path), "--batch", "1", "--seq-len", "16")
    code, out, _ = qra_inprocess(capsys, *base)
    assert code == 0 and "quantized weights" in out and "peak total" in out
    code, out, _ = qra_inprocess(capsys, *base, "--json")
    plain = json.loads(out)
    code, out, _ = qra_inprocess(capsys, *base, "--grad-checkpointing", "--json")
    ckpt = json.loads(out)
    assert ckpt["activations"] < plain["activations"]
    assert ckpt["quantized_weights"] == plain["quantized_weights"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--uniform", "4:16", "--plan", "x.yaml"), "exactly one of --plan and --uniform"),
        (("--uniform", "four"), "BITS:RANK"),
        (("--uniform", "4:16", "--optimizer", "nope"), "unknown optimizer"),
        (("--plan", "/nonexistent/plan.yaml"), "plan file not found"),
    ],
)
def test_estimate_errors_exit_2(
    model_dir: Path, args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = qra_inprocess(capsys, "estimate", "--model", str(model_dir), "--batch", "1", "--seq-len", "8", *args)
    assert code == 2 and message in err, (code, err)


def test_estimate_bad_model_dir_subprocess(tmp_path: Path) -> None:
    res = qra("estimate", "--model", str(tmp_path), "--uniform", "4:16")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "not a local transformers model directory" in res.stderr and "Traceback" not in res.stderr
