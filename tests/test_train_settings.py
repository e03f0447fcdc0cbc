"""The user's training settings reach the fidelity runs: gradient accumulation, dropout, scheduler, warmup,
weight decay, packing and the loss path — each in the recipe key, each in the SFTConfig a run builds, each read
from an Axolotl YAML; packing only where the model keeps packed rows apart."""

from __future__ import annotations

import os

import pytest
import torch

from planner.config import QRAConfig
from planner.fidelity.contract import recipe, recipe_diff, recipe_hash
from planner.fidelity.sft import _sft_args
from planner.settings import TrainingSettings
from qra_plugin import Plan
from tests.test_fidelity import task, tiny_config

#: a changed value for each carried setting -> (SFTConfig attribute, the value the run must carry)
CARRIED = {
    "gradient_accumulation_steps": (3, "gradient_accumulation_steps", 3),
    "lr_scheduler": ("cosine", "lr_scheduler_type", "cosine"),
    "warmup_steps": (2, "warmup_steps", 2),
    "weight_decay": (0.1, "weight_decay", 0.1),
    "packing": (True, "packing", True),
    "group_by_length": (True, "train_sampling_strategy", "group_by_length"),
    "loss_path": ("hf_full", "loss_type", "nll"),
}


def _plan(cfg: QRAConfig) -> Plan:
    from planner.model_info import load_model_info

    info = load_model_info(cfg.model)
    return Plan.from_module_pairs(info.fingerprint, info.linears, [(4, 8)] * len(info.linears))


def _args(cfg: QRAConfig, tmp_path):
    """The SFTConfig a CPU fidelity run of ``cfg``'s low level builds."""
    level = cfg.fidelity.low
    return _sft_args(task(cfg, _plan(cfg)), level, str(tmp_path), TrainingSettings.of(cfg, level, device="cpu"))


@pytest.mark.parametrize("field", [*CARRIED, "lora_dropout", "warmup_ratio", "padding_free"])
def test_each_training_setting_changes_the_recipe_key(field: str) -> None:
    base = tiny_config()
    value = {"lora_dropout": 0.1, "warmup_ratio": 0.2, "padding_free": True}.get(field) or CARRIED[field][0]
    changed = tiny_config(train={field: value})
    assert recipe_diff(recipe(base, "low"), recipe(changed, "low")) == [f"train.{field}"]
    assert recipe_hash(base, "low") != recipe_hash(changed, "low")


@pytest.mark.parametrize("field", list(CARRIED))
def test_the_sft_config_a_fidelity_run_builds_carries_each_setting(field: str, tmp_path) -> None:
    value, attribute, expected = CARRIED[field]
    base = tiny_config()
    default_args = _args(base, tmp_path)
    cfg = tiny_config(train={field: value})
    args = _args(cfg, tmp_path)
    carried = getattr(getattr(args, attribute), "value", getattr(args, attribute))  # HF keeps the scheduler an enum
    assert carried == expected
    assert getattr(args, attribute) != getattr(default_args, attribute)


def test_defaults_run_trl_chunked_loss_and_warmup_steps_win_over_the_ratio(tmp_path) -> None:
    cfg = tiny_config(train={"warmup_ratio": 0.5})
    args = _args(cfg, tmp_path)
    assert args.loss_type == "chunked_nll" and args.warmup_steps == 3  # 0.5 x 6 steps
    cfg = tiny_config(train={"warmup_ratio": 0.5, "warmup_steps": 1})
    assert _args(cfg, tmp_path).warmup_steps == 1
    assert not args.eval_packing  # the score stays the loss on the same unpacked held-out rows


def test_an_unknown_scheduler_is_one_line() -> None:
    with pytest.raises(Exception, match="lr_scheduler must be one of linear, cosine"):
        tiny_config(train={"lr_scheduler": "one_cycle"})


def _run_and_look(cfg: QRAConfig, look) -> tuple[object, dict]:
    """A real fidelity run of ``cfg``'s low level; ``look(trainer, peft_model)`` -> facts about the trainer it built."""
    from planner.fidelity import sft

    seen: dict = {}
    original = sft._build_trainer

    def spy(t, level, peft_model, tokenizer, workdir, job):
        trainer = original(t, level, peft_model, tokenizer, workdir, job)
        seen.update(look(trainer, peft_model))
        return trainer

    sft._build_trainer = spy
    try:
        return sft.run_fidelity(task(cfg, _plan(cfg))), seen
    finally:
        sft._build_trainer = original


def test_a_fidelity_run_with_accumulation_dropout_and_packing_trains_the_planned_steps() -> None:
    """A step is an optimizer step: 2 steps of 2 micro-batches each; the adapters carry the dropout."""
    cfg = tiny_config(
        train={"batch": 2, "seq_len": 512, "gradient_accumulation_steps": 2, "lora_dropout": 0.1, "packing": True},
        fidelity={"low": {"steps": 2, "eval_examples": 4}},
    )
    result, seen = _run_and_look(
        cfg,
        lambda trainer, peft_model: {
            "dropout": {m.p for m in peft_model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0},
            "rows_per_pack": max(len(n) for n in trainer.train_dataset["seq_lengths"]),
        },
    )
    assert result.status == "ok" and result.steps == 2, result
    assert seen["dropout"] == {0.1}
    assert seen["rows_per_pack"] > 1  # rows were packed


def test_a_fidelity_run_grouped_by_length_batches_rows_of_similar_length() -> None:
    """``train.group_by_length``: the trainer's sampler groups rows by their tokenized length (less padding)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    cfg = tiny_config(train={"batch": 2, "group_by_length": True}, fidelity={"low": {"steps": 2, "eval_examples": 4}})
    result, seen = _run_and_look(
        cfg, lambda trainer, _: {"sampler": type(trainer._get_train_sampler(trainer.train_dataset))}
    )
    assert result.status == "ok" and result.steps == 2, result
    assert seen["sampler"] is LengthGroupedSampler


def test_a_padding_free_fidelity_run_trains_the_same_rows_without_padding_and_the_same_loss() -> None:
    """``train.padding_free``: each batch becomes one row of its rows' real tokens (no padding slots), the same
    rows per step and the same tokens in the loss — so train and eval losses match the padded run's to rounding."""
    fidelity = {"low": {"steps": 2, "eval_examples": 4}}
    cfg = tiny_config(train={"batch": 2}, fidelity=fidelity)

    def look(trainer, _):
        rows = [trainer.train_dataset[i] for i in range(2)]
        batch = trainer.data_collator(rows)
        return {"shape": tuple(batch["input_ids"].shape), "masked": "attention_mask" in batch,
                "tokens": sum(len(r["input_ids"]) for r in rows)}  # fmt: skip

    padded, seen_padded = _run_and_look(cfg, look)
    flat, seen_flat = _run_and_look(tiny_config(train={"batch": 2, "padding_free": True}, fidelity=fidelity), look)
    assert seen_padded["masked"] and seen_padded["shape"][0] == 2
    assert not seen_flat["masked"] and seen_flat["shape"] == (1, seen_flat["tokens"])  # one row, no padding
    assert flat.status == padded.status == "ok" and flat.steps == padded.steps == 2
    assert flat.train_loss == pytest.approx(padded.train_loss, abs=1e-4)
    assert flat.eval_loss == pytest.approx(padded.eval_loss, abs=1e-4)


def test_packed_rows_stay_apart_in_transformers_models_and_a_model_that_mixes_them_is_refused(monkeypatch):
    """The rule: pack only when the model's logits for two rows packed (position ids restarting) equal their
    logits apart. transformers' Llama does (it rebuilds a block mask from the position ids); with that
    detection gone (as in an attention that ignores position-id boundaries) rows mix, and packing is refused."""
    import transformers.masking_utils as masking

    from planner.fidelity import packing
    from planner.fidelity.sft import _base_model_cached

    cfg = tiny_config(train={"packing": True})
    model = _base_model_cached(cfg.model.model_dump_json())
    assert packing.rows_kept_apart(model)
    assert packing.packing_refusal(cfg.model) is None
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing.rows_kept_apart(model)
    other = tiny_config(model={"tiny": {"layers": 2, "hidden": 64, "vocab_size": 512}}, train={"packing": True})
    refusal = packing.packing_refusal(other.model)
    assert refusal and refusal.startswith("train.packing: packed rows attend to each other")


CCE = "axolotl.integrations.cut_cross_entropy"


@pytest.mark.axolotl
@pytest.mark.parametrize(
    ("extra", "loss_path"),
    [
        ({}, "hf_full"),  # AxolotlTrainer: transformers' model loss on the full logits
        ({"plugins": [f"{CCE}.CutCrossEntropyPlugin"], "cut_cross_entropy": True}, "cce"),
        ({"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_fused_linear_cross_entropy": True}, "liger"),
    ],
)
def test_an_axolotl_yamls_training_keys_arrive_in_the_train_section(extra, loss_path, tmp_path, tiny_model_dir):
    """Axolotl's llama-3 qlora-1b example as written: accumulation 4, cosine, warmup_ratio 0.1, dropout 0.05,
    sample_packing; ``warmup_steps`` / ``weight_decay`` set here to see them arrive."""
    pytest.importorskip("axolotl")
    from pathlib import Path

    from planner.axolotl.config import load_axolotl
    from tests.test_axolotl_qlora_examples import FIXTURES, as_user_would

    path, raw = as_user_would(FIXTURES / "llama3-qlora-1b.yml", tmp_path, tiny_model_dir)
    raw = {**raw, "warmup_steps": 7, "warmup_ratio": None, "weight_decay": 0.02, **extra}
    raw["plugins"] = [*(extra.get("plugins") or []), "qra_plugin.QRAPlugin"]
    environment = dict(os.environ)
    cfg, _, _ = load_axolotl(Path(path), raw, tmp_path / "out", prepare_data=False)
    # Axolotl's load_cfg exports ACCELERATE_* / log levels; what later launches inherit stays as it was
    assert dict(os.environ) == environment
    train = cfg.train
    assert (train.batch, train.gradient_accumulation_steps, train.lr_scheduler) == (2, 4, "cosine")
    assert (train.warmup_steps, train.weight_decay, train.lora_dropout) == (7, 0.02, 0.05)
    assert train.packing is True and train.loss_path == loss_path


@pytest.mark.axolotl
def test_the_plugin_warns_when_offline_with_axolotl_telemetry_on(monkeypatch, caplog) -> None:
    """Axolotl queues its telemetry upload before plugins load, so the plugin can only say what to set."""
    pytest.importorskip("axolotl")
    from qra_plugin.axolotl.plugin import warn_offline_telemetry

    for name in ("AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("WARNING", logger="axolotl.integrations.qra"):
        assert warn_offline_telemetry()
    assert "AXOLOTL_DO_NOT_TRACK=1" in caplog.text
    monkeypatch.setenv("AXOLOTL_DO_NOT_TRACK", "1")
    assert not warn_offline_telemetry()
    monkeypatch.delenv("AXOLOTL_DO_NOT_TRACK")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not warn_offline_telemetry()  # online: the upload goes through


def test_a_search_refuses_packing_up_front_where_rows_would_mix(monkeypatch) -> None:
    import transformers.masking_utils as masking

    from planner.orchestration.setup import _refuse_optimizer_here
    from qra_plugin.errors import QRAError

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    cfg = tiny_config(model={"tiny": {"layers": 3, "hidden": 64, "vocab_size": 512}}, train={"packing": True})
    with pytest.raises(QRAError, match="^train.packing: packed rows attend to each other"):
        _refuse_optimizer_here(cfg)
    flat = tiny_config(model={"tiny": {"layers": 3, "hidden": 64, "vocab_size": 512}}, train={"padding_free": True})
    with pytest.raises(QRAError, match="^train.padding_free: packed rows attend to each other.*turn padding_free off"):
        _refuse_optimizer_here(flat)
    _refuse_optimizer_here(tiny_config(model={"tiny": {"layers": 3, "hidden": 64, "vocab_size": 512}}))  # unpacked
