"""Axolotl's own QLoRA example YAMLs (tests/fixtures/axolotl_qlora/), as written: ``adapter: qlora``,
``load_in_4bit: true``, 8-bit / paged / torchao optimizers. Only ``base_model`` and ``datasets`` are swapped for
local ones, the plugin lines are added; the plan takes over quantization and the budget is the job as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from planner.data.wiki import write_alpaca_jsonl
from tests.test_estimate_cli import qra_inprocess

pytest.importorskip("axolotl")
pytestmark = pytest.mark.axolotl

FIXTURES = Path(__file__).parent / "fixtures" / "axolotl_qlora"
EXAMPLES = sorted(FIXTURES.glob("*.yml"))


def as_user_would(
    example: Path, tmp_path: Path, model_dir: Path, qra: dict | None = None, **cpu: object
) -> tuple[Path, dict]:
    """The example with ``base_model`` and ``datasets`` swapped for local ones and the plugin lines added
    (``qra_plan`` + a ``qra:`` section); ``cpu`` holds any further change a CPU run needs (said by the caller)."""
    raw = yaml.safe_load(example.read_text())
    data = write_alpaca_jsonl(tmp_path / "train.jsonl", "train", 64)
    raw["base_model"] = str(model_dir)
    raw["datasets"] = [{"path": str(data), "type": "alpaca", "ds_type": "json"}]
    raw["plugins"] = [*(raw.get("plugins") or []), "qra_plugin.QRAPlugin"]
    raw["qra_plan"] = str(tmp_path / "plan.yaml")
    raw["qra"] = qra or {}
    raw.update(cpu)
    path = tmp_path / example.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, raw


def test_the_fixtures_cover_every_optimizer_users_pick_and_are_qlora():
    optimizers = set()
    for example in EXAMPLES:
        raw = yaml.safe_load(example.read_text())
        assert raw["adapter"] == "qlora" and raw["load_in_4bit"] is True, example.name
        assert "axolotl-ai-cloud/axolotl examples/" in example.read_text().splitlines()[0]
        optimizers.add(raw["optimizer"])
    expected = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch_8bit"}
    assert optimizers >= expected | {"adamw_torch_4bit", "adamw_torch", "adamw_torch_fused"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_qra_estimate_prices_the_job_as_written(example, tmp_path, tiny_model_dir, capsys):
    """No plan yet and no qra.budget: the estimate is the YAML's own job (uniform nf4 at ``lora_r``, its
    optimizer, micro batch and sequence length)."""
    from planner.memory import estimate, uniform_plan
    from planner.model_info import load_model_info

    config, raw = as_user_would(example, tmp_path, tiny_model_dir)
    code, out, err = qra_inprocess(capsys, "estimate", str(config), "--json")
    assert code == 0, err[-2000:]
    got = json.loads(out)
    assert got["settings"]["optimizer"] == raw["optimizer"]
    assert got["quantized_by_backend"].keys() == {"bnb4"}
    dtype = got["settings"]["compute_dtype"]  # Axolotl resolves ``bf16: auto`` for this machine
    info = load_model_info(str(tiny_model_dir), dtype)
    job = estimate(
        info,
        uniform_plan(info, 4, int(raw["lora_r"]), "bnb"),
        batch=int(raw["micro_batch_size"]),
        seq_len=int(raw["sequence_len"]),
        optimizer=raw["optimizer"],
        grad_checkpointing=bool(raw.get("gradient_checkpointing")),
    )
    assert got["total"] == job.total and got["optimizer_states"] == job.optimizer_states
