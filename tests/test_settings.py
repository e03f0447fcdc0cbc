"""``TrainingSettings``: one value built from a qra config or an Axolotl YAML, priced by the memory model, run by
fidelity runs and ``qra estimate``; every field in the recipe key or named result-neutral; bad values one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from planner.config import QRAConfig
from planner.fidelity.contract import _TRAIN_NEUTRAL, SETTINGS_IN_RECIPE, recipe
from planner.memory import estimate, plan_bytes, uniform_plan
from planner.model_info import load_model_info
from planner.settings import TrainingSettings
from qra_plugin.errors import QRAError
from tests.test_estimate_cli import qra_inprocess
from tests.test_fidelity import tiny_config

ROOT = Path(__file__).resolve().parents[1]
#: every train field the value carries, set away from its default (the model section says the precision)
TRAIN = {"batch": 3, "seq_len": 48, "gradient_accumulation_steps": 2, "optimizer": "adamw_bnb_8bit",
         "grad_checkpointing": True, "packing": True, "loss_path": "hf_full",
         "world_size": 2, "sharding": "zero2"}  # fmt: skip


def _config() -> QRAConfig:
    return tiny_config(train=TRAIN, model={"dtype": "bfloat16"}, fidelity={"low": {"steps": 2, "eval_examples": 4}})


def _at(tree: dict, path: str):
    for key in path.split("."):
        tree = tree[key]
    return tree


def test_a_qra_config_gives_its_train_section_and_model_dtype() -> None:
    settings = TrainingSettings.of(_config())
    assert settings.model_dump(include=set(TRAIN)) == TRAIN
    assert (settings.precision, settings.adapter_precision, settings.dtype) == ("bfloat16", "float32", torch.bfloat16)
    assert settings.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert TrainingSettings.of(_config(), device="cpu").device == "cpu"


def test_a_fidelity_level_overrides_batch_and_sequence_length_only() -> None:
    cfg = _config()
    level = cfg.fidelity.low.model_copy(update={"batch": 1, "seq_len": 16})
    at_level = TrainingSettings.of(cfg, level)
    assert (at_level.batch, at_level.seq_len) == (1, 16)
    assert at_level.replace(batch=3, seq_len=48) == TrainingSettings.of(cfg)
    assert TrainingSettings.of(cfg, cfg.fidelity.low) == TrainingSettings.of(cfg)  # no override: the job's


def test_every_field_is_in_the_recipe_key_or_result_neutral() -> None:
    """A field added to the value must be placed: in ``SETTINGS_IN_RECIPE`` (where the recipe holds it) or in
    the result-neutral train fields. The recipe holds the value a fidelity run at that level uses."""
    fields = set(TrainingSettings.model_fields)
    assert fields == set(SETTINGS_IN_RECIPE) | _TRAIN_NEUTRAL and not set(SETTINGS_IN_RECIPE) & _TRAIN_NEUTRAL
    cfg = _config()
    level = cfg.fidelity.low.model_copy(update={"batch": 1, "seq_len": 16})
    cfg = cfg.model_copy(update={"fidelity": cfg.fidelity.model_copy(update={"low": level})})
    settings, held = TrainingSettings.of(cfg, cfg.fidelity.low, device="cpu"), recipe(cfg, "low")
    derived = {"adapter_precision", "device"}  # a constant of the fidelity code; the device's name
    for field, path in SETTINGS_IN_RECIPE.items():
        value = _at(held, path)
        assert field in derived or value == getattr(settings, field), (field, path, value)
    assert held["fidelity_version"] >= 1 and held["device"]


@pytest.mark.parametrize("kind", ["peak", "plan", "weights"])
def test_plan_bytes_and_estimate_price_the_same_value(kind: str) -> None:
    cfg = QRAConfig.load(ROOT / "example_configs" / "tiny-search.yaml")
    info = load_model_info(cfg.model)
    plan, settings = uniform_plan(info, 4, 16), TrainingSettings.of(cfg)
    breakdown = estimate(info, plan, settings)
    expected = {"peak": breakdown.total, "plan": breakdown.plan_scaled, "weights": breakdown.weights}[kind]
    assert plan_bytes(info, plan, settings, kind) == expected
    assert breakdown.settings == {"optimizer": "adamw_torch", "grad_checkpointing": False, "compute_dtype": "float32",
                                  "adapter_dtype": "float32", "loss_path": "trl_chunked",
                                  "gradient_accumulation_steps": 1}  # fmt: skip


def test_qra_estimate_of_a_qra_config_prices_the_configs_value(capsys) -> None:
    config = ROOT / "example_configs" / "tiny-search.yaml"
    code, out, err = qra_inprocess(capsys, "estimate", str(config), "--json", "--world-size", "2")
    assert code == 0, err
    cfg = QRAConfig.load(config)
    info = load_model_info(cfg.model)
    expected = estimate(info, uniform_plan(info, 4, 16), TrainingSettings.of(cfg))  # the budget's uniform plan
    got = json.loads(out)
    assert got["total"] == expected.total and got["per_rank"]["world_size"] == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch": 0}, "training settings: batch: Input should be greater than or equal to 1"),
        ({"optimizer": "lamb9000"}, "training settings: optimizer: unknown optimizer 'lamb9000'"),
        ({"precision": "float64"}, "training settings: precision: Input should be 'float32', 'bfloat16'"),
        ({"adapter_precision": "float16"}, "PEFT keeps adapters in float32 or the model's dtype, not float16"),
        ({"device": "tpu"}, "training settings: device: Input should be 'cpu' or 'cuda'"),
        ({"sharding": "zero4"}, "training settings: sharding: Input should be"),
        ({"batchsize": 4}, "training settings: batchsize: Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_one_line(fields: dict, message: str) -> None:
    with pytest.raises(QRAError) as caught:
        TrainingSettings(**({"batch": 2, "seq_len": 8} | fields))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_value_is_frozen() -> None:
    settings = TrainingSettings(batch=2, seq_len=8)
    with pytest.raises(ValueError, match="frozen"):
        settings.batch = 4  # type: ignore[misc]


@pytest.mark.axolotl
def test_an_axolotl_yaml_gives_the_value_its_keys_say(tmp_path, tiny_model_dir, capsys) -> None:
    """Axolotl's llama-3 qlora-1b example as written: micro batch 2, accumulation 4, 8-bit AdamW, packing,
    transformers' model loss; ``qra estimate`` on the YAML prices exactly this value."""
    pytest.importorskip("axolotl")
    from planner.axolotl.config import load_axolotl
    from tests.test_axolotl_qlora_examples import FIXTURES, as_user_would

    path, raw = as_user_would(FIXTURES / "llama3-qlora-1b.yml", tmp_path, tiny_model_dir)
    code, out, err = qra_inprocess(capsys, "estimate", str(path), "--json")  # first: Axolotl's logging stays quiet
    assert code == 0, err[-2000:]
    cfg, _, _ = load_axolotl(Path(path), raw, tmp_path / "out", prepare_data=False)
    settings = TrainingSettings.of(cfg)
    written = TrainingSettings(
        batch=raw["micro_batch_size"], seq_len=raw["sequence_len"], optimizer=raw["optimizer"],
        gradient_accumulation_steps=raw["gradient_accumulation_steps"], packing=raw["sample_packing"],
        grad_checkpointing=bool(raw.get("gradient_checkpointing")), loss_path="hf_full", precision=cfg.model.dtype,
    )  # fmt: skip
    assert settings == written
    info = load_model_info(cfg.model)
    expected = estimate(info, uniform_plan(info, 4, int(raw["lora_r"]), "bnb"), settings)
    assert json.loads(out)["total"] == expected.total


def test_table_features_refuse_a_searched_pruning_ratio() -> None:
    assert tiny_config(search={"surrogate_features": "table"}).search.surrogate_features == "table"
    with pytest.raises(ValueError, match="table does not price pruning"):
        tiny_config(search={"surrogate_features": "table"}, space={"unit": "block", "prune": [0.0, 0.25]})
