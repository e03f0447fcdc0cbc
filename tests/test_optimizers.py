"""Every optimizer qra prices, built as HF builds it, stepped on CPU: its real state bytes equal the prediction."""

from __future__ import annotations

import pytest
import torch

from planner.fidelity.meter import optimizer_state_bytes
from planner.memory.optimizers import OPTIMIZER_STATES, OPTIMIZERS, optimizer_bytes, optimizer_states

#: torchao's low-bit AdamW compiles its update with Inductor on the first step (~45 s per optimizer on 1 CPU)
COMPILED = {"adamw_torch_8bit", "adamw_torch_4bit"}
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in COMPILED else n for n in OPTIMIZERS]


@pytest.fixture(scope="module")
def lora_model():
    """A one-block tiny Llama with LoRA tensors on both sides of the 8-bit thresholds: 1024/2048/3072 elements
    (32-bit states in bitsandbytes and torchao), 4800 and 7200 (not multiples of 256: a partial bitsandbytes
    block, plain torchao states), and 4096 (exactly the threshold), 8192, 19200 (multiples of 256)."""
    from peft import LoraConfig, get_peft_model

    from planner.tiny import build_tiny_model

    model = build_tiny_model("llama", hidden=256, intermediate_size=600, layers=1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, target_modules=targets, rank_pattern={"q_proj": 16, "down_proj": 12, "up_proj": 32})
    return get_peft_model(model, config)


def _step_with(name: str, model) -> torch.optim.Optimizer:
    """HF's own ``optim`` mapping builds the optimizer; one real forward/backward and ``step()``."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="unused", optim=name, use_cpu=True, report_to="none")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = cls(params, **kwargs)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


@pytest.mark.parametrize("name", NAMES)
def test_real_state_bytes_equal_the_prediction(name, lora_model):
    problem = optimizer_states(name).cpu_problem()
    if problem:
        pytest.skip(f"{name} cannot step on this CPU: {problem} (fidelity runs refuse it: see the test below)")
    optimizer = _step_with(name, lora_model)
    shapes = [tuple(p.shape) for p in lora_model.parameters() if p.requires_grad]
    numels = {p.numel() for p in lora_model.parameters() if p.requires_grad}
    assert numels == {1024, 2048, 3072, 4096, 4800, 7200, 8192, 19200}
    assert optimizer_state_bytes(optimizer) == optimizer_bytes(name, shapes)


def test_low_bit_states_are_cheaper_and_paging_changes_no_bytes():
    shapes = [(16, 576), (576, 16), (8, 1536), (576, 8)]
    adam = optimizer_bytes("adamw_torch", shapes)
    assert optimizer_bytes("paged_adamw_32bit", shapes) == adam - 4 * len(shapes)  # bnb keeps ``step`` as an int
    assert optimizer_bytes("paged_adamw_8bit", shapes) == optimizer_bytes("adamw_bnb_8bit", shapes)
    assert optimizer_bytes("adamw_8bit", shapes) == optimizer_bytes("adamw_bnb_8bit", shapes)
    assert optimizer_bytes("adamw_torch_4bit", shapes) < optimizer_bytes("adamw_torch_8bit", shapes) < adam / 3
    assert optimizer_bytes("adamw_bnb_8bit", shapes) < adam / 3
    assert optimizer_bytes("adafactor", shapes) < adam / 10


def test_an_unknown_optimizer_is_one_line_listing_the_supported_ones(capsys):
    from tests.test_estimate_cli import qra_inprocess

    code, _, err = qra_inprocess(capsys, "estimate", "--model", "demo", "--uniform", "4:16", "--optimizer", "adamw_bnb")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "unknown optimizer 'adamw_bnb'" in line and all(n in line for n in OPTIMIZER_STATES)


def test_an_optimizer_that_cannot_step_on_this_cpu_is_refused_not_substituted(monkeypatch, tmp_path):
    """No C++ compiler on PATH: torchao's compiled update cannot run, and a fidelity run says so in one line."""
    from planner.fidelity.sft import run_fidelity
    from qra_plugin.errors import QRAError
    from tests.test_fidelity import task, tiny_config

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    cfg = tiny_config(train={"optimizer": "adamw_torch_4bit"})
    from planner.loading import load_meta_model
    from qra_plugin import Plan

    plan = Plan.uniform(load_meta_model(cfg.model), bits=4, rank=8)
    line = r"^optimizer adamw_torch_4bit: fidelity runs train on this CPU, but .*needs a C\+\+ compiler"
    with pytest.raises(QRAError, match=line):
        run_fidelity(task(cfg, plan))
    from planner.orchestration.setup import SearchSetup

    with pytest.raises(QRAError, match=line):  # a search stops before it spends anything
        SearchSetup.build(cfg)


@pytest.mark.parametrize(
    "name", ["adamw_bnb_8bit", "paged_adamw_8bit", pytest.param("adamw_torch_4bit", marks=pytest.mark.slow)]
)
def test_a_fidelity_run_trains_with_the_users_optimizer_and_its_plan_bytes_are_predicted(name):
    """The SFT run builds the named optimizer (HF ``optim``): the measured plan bytes (weights + LoRA + grads +
    real optimizer states) equal the ``plan:`` budget's prediction, and are below AdamW's."""
    from planner.fidelity.sft import run_fidelity
    from planner.memory import plan_bytes
    from planner.model_info import load_model_info
    from planner.settings import TrainingSettings
    from qra_plugin import Plan
    from tests.test_fidelity import task, tiny_config

    measured = {}
    for optimizer in (name, "adamw_torch"):
        cfg = tiny_config(train={"optimizer": optimizer}, fidelity={"low": {"steps": 2, "eval_examples": 4}})
        info = load_model_info(cfg.model)
        plan = Plan.from_module_pairs(  # ranks 64 on 64 x 64 / 128 x 64 shapes: 4096+ elements, 8-bit states
            info.fingerprint, info.linears, [((4, 16)[i % 2], (8, 64)[i % 2]) for i in range(len(info.linears))]
        )
        result = run_fidelity(task(cfg, plan))
        assert result.status == "ok"
        assert result.plan_bytes_measured == plan_bytes(info, plan, TrainingSettings.of(cfg), "plan")
        measured[optimizer] = result.plan_bytes_measured
    assert measured[name] < measured["adamw_torch"]
