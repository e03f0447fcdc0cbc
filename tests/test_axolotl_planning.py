"""One Axolotl YAML drives `qra search`, `qra estimate` and then the real `axolotl train`, unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.launch import launch_env
from tests.test_axolotl import _config as axolotl_config
from tests.test_estimate_cli import qra_inprocess

pytest.importorskip("axolotl")
pytestmark = pytest.mark.axolotl

BIN = Path(sys.executable).parent
QRA_SECTION = {
    "budget": "uniform:4bit:r8",
    "space": {"unit": "block", "bits": [4, 8], "ranks": [4, 8], "backend": "hqq"},
    "data": {"train_examples": 16, "eval_examples": 2},
    "fidelity": {
        "low": {"steps": 1, "eval_examples": 2},
        "high": {"steps": 2, "eval_examples": 2},
        "subprocess": False,
        "torch_threads": 1,
    },  # fmt: skip
    "profile": {
        "bits": [4],
        "calibration_examples": 2,
        "seq_len": 32,
        "batch": 2,
        "plasticity_draws": 1,
        "plasticity_rank": 4,
    },  # fmt: skip
    "search": {"population": 2, "generations": 1, "offspring": 1, "promote": 1, "tr_iterations": 0},
}


def axolotl_yaml(tmp_path: Path, model_dir: Path, **extra) -> Path:
    """The ordinary Axolotl LoRA config of ``test_axolotl`` (local alpaca jsonl) plus qra_plan, a qra section and
    an eval split."""
    settings = {"qra_plan": str(tmp_path / "plan.yaml"), "qra": QRA_SECTION, "val_set_size": 0.1, "max_steps": 2}
    return axolotl_config(tmp_path, model_dir, **{**settings, **extra})


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = launch_env(HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # axolotl re-launches itself via accelerate
    exe = shutil.which(args[0], path=str(BIN)) or str(BIN / args[0])
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, env=env, timeout=1200)


def test_qra_search_writes_the_plan_axolotl_train_then_trains_with(tmp_path, tiny_model_dir):
    from safetensors import safe_open

    config = axolotl_yaml(tmp_path, tiny_model_dir)
    searched = _cli("qra", "search", str(config), "--out", str(tmp_path / "run"), "--no-progress")
    assert searched.returncode == 0, searched.stderr[-3000:]
    assert f"next:   axolotl train {config}" in searched.stdout
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())  # written where qra_plan points
    assert plan["meta"]["qra_search"]["budget"] == "uniform:4bit:r8"
    # the fidelity runs trained on the rows Axolotl prepared (input_ids + its loss mask)
    row = json.loads((tmp_path / "run" / "axolotl_data" / "train.jsonl").read_text().splitlines()[0])
    assert -100 in row["labels"] and len(row["labels"]) == len(row["input_ids"])
    trained = _cli("axolotl", "train", str(config))  # the same file, unchanged
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "out"
    adapter = json.loads((out / "adapter_config.json").read_text())
    planned = {name: m["rank"] for name, m in plan["modules"].items() if m["rank"] > 0}
    assert adapter["rank_pattern"] == planned
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        ranks = {k.split(".lora_A")[0].removeprefix("base_model.model."): weights.get_slice(k).get_shape()[0]
                 for k in weights.keys() if ".lora_A" in k}  # noqa: SIM118  # fmt: skip
    assert ranks == planned


def test_estimate_of_an_axolotl_yaml_equals_the_qra_native_estimate(tmp_path, tiny_model_dir, capsys):
    config = axolotl_yaml(tmp_path, tiny_model_dir, gradient_checkpointing=True)
    code, out, err = qra_inprocess(capsys, "estimate", str(config), "--json")
    assert code == 0, err
    from_axolotl = json.loads(out)
    # `axolotl train` runs AxolotlTrainer, i.e. transformers' Trainer and the model's full-logits loss
    assert from_axolotl["settings"]["loss_path"] == "hf_full"
    native = {"name": "n", "model": {"path": str(tiny_model_dir)}, "budget": "uniform:4bit:r8",
              "train": {"batch": 2, "seq_len": 256, "grad_checkpointing": True, "loss_path": "hf_full"}}  # fmt: skip
    (tmp_path / "native.yaml").write_text(yaml.safe_dump(native))
    code, out, err = qra_inprocess(capsys, "estimate", str(tmp_path / "native.yaml"), "--json")
    assert code == 0, err
    assert json.loads(out) == from_axolotl
    args = ("--model", str(tiny_model_dir), "--uniform", "4:8", "--batch", "2", "--seq-len", "256",
            "--loss-path", "hf_full")  # fmt: skip
    code, out, err = qra_inprocess(capsys, "estimate", *args, "--grad-checkpointing", "--json")
    assert json.loads(out) == from_axolotl
    code, out, err = qra_inprocess(capsys, "estimate", *args, "--json")  # the YAML's setting was really read
    assert json.loads(out)["activations"] > from_axolotl["activations"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"gptq": True}, "gptq: the model is already quantized"),
        ({"adapter": "ia3"}, "adapter: a qra plan trains LoRA adapters"),
        ({"qra": {**QRA_SECTION, "budgt": "1GiB"}}, "qra.budgt: unknown key"),
        ({"qra": {**QRA_SECTION, "data": {"path": "x.jsonl"}}}, "qra.data.path: unknown key"),
        ({"qra": {**QRA_SECTION, "space": {"bits": [5]}}}, "qra.space.bits"),
        ({"micro_batch_size": "many"}, "Axolotl rejects this config: micro_batch_size"),
        ({"base_model": "/nowhere/model"}, "base_model: /nowhere/model is neither a local model directory"),
        ({"qra": {**QRA_SECTION, "budget": "1KiB"}}, "budget 1KiB = 1.00 KiB is below the cheapest plan"),
    ],
)
def test_a_config_qra_cannot_use_is_one_line_naming_the_key(tmp_path, tiny_model_dir, capsys, extra, message):
    config = axolotl_yaml(tmp_path, tiny_model_dir, **extra)
    # qra estimate validates the YAML as qra search does, without preparing data; the budget binds in a search
    search = ("search", str(config), "--out", str(tmp_path / "run"))
    args = search if "1KiB" in str(extra) else ("estimate", str(config))
    code, _, err = qra_inprocess(capsys, *args)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("qra: error:") and message in line, err[-2000:]


def test_search_needs_held_out_rows(tmp_path, tiny_model_dir, capsys):
    config = axolotl_yaml(tmp_path, tiny_model_dir, val_set_size=0)
    code, _, err = qra_inprocess(capsys, "search", str(config), "--out", str(tmp_path / "run"))
    assert code == 2 and "val_set_size: qra scores candidates on rows no run trains on" in err


def test_the_qra_section_is_part_of_the_plugin_args():
    from qra_plugin.axolotl.args import QRAArgs

    assert QRAArgs(qra={"budget": "uniform:4bit:r16"}).qra == {"budget": "uniform:4bit:r16"}
    with pytest.raises(ValueError, match=r"qra.serach: unknown key \(qra: takes name, seed, budget"):
        QRAArgs(qra={"serach": {}})


@pytest.mark.parametrize("extra", ({"gptq": True}, {"adapter": "ia3"}))
def test_axolotl_train_and_qra_search_refuse_a_conflict_with_the_same_line(tmp_path, tiny_model_dir, capsys, extra):
    """The plugin's validator (what ``axolotl train`` runs) and the planner's reader share one check."""
    from pydantic import ValidationError
    from transformers import AutoModelForCausalLM

    from qra_plugin import Plan
    from qra_plugin.axolotl.args import QRAArgs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    Plan.uniform(model, bits=4, rank=8).save(tmp_path / "plan.yaml")
    with pytest.raises(ValidationError) as caught:
        QRAArgs.model_validate({"qra_plan": str(tmp_path / "plan.yaml"), **extra})
    code, _, err = qra_inprocess(capsys, "estimate", str(axolotl_yaml(tmp_path, tiny_model_dir, **extra)))
    assert code == 2
    planner_line = err.strip().splitlines()[-1].removeprefix("qra: error: ")
    assert planner_line.endswith(str(caught.value.errors()[0]["ctx"]["error"]))
