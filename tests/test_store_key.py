"""The store key misses nothing that changes a score, and the layer cache key nothing that changes a layer.

Each test here failed before its gap was closed: library versions, tokenizer and chat-template files, the wiki
data file behind ``wiki_topic`` / ``wiki_mix``, the CPU threads, the device, a same-size rewrite within one mtime
tick; the layer cache's torch version, the backend's own quantizer settings and the default group; the cache's
swallowed read and write failures.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata

import pytest
import torch
from torch import nn

from planner.config import QRAConfig
from planner.fidelity import contract, quantized
from planner.fidelity.contract import data_identity, recipe, recipe_diff, recipe_hash
from planner.tiny import save_tiny_model
from qra_plugin.backends import hqq
from qra_plugin.errors import QRAError
from qra_plugin.plan import ModulePlan

TINY = {"tiny": {"layers": 2, "hidden": 32, "vocab_size": 128}}


def _cfg(**over) -> QRAConfig:
    return QRAConfig.model_validate({"model": TINY, **over})


def test_library_versions_are_part_of_the_key(monkeypatch) -> None:
    cfg = _cfg()
    before = recipe(cfg, "high")
    assert before["libraries"]["torch"] == metadata.version("torch")
    assert set(contract.LIBRARIES) <= set(before["libraries"])
    bumped = {**contract.library_versions(), "peft": "99.0"}
    monkeypatch.setattr(contract, "library_versions", lambda: bumped)
    after = recipe(cfg, "high")
    assert recipe_diff(before, after) == ["libraries.peft"]
    assert recipe_hash(cfg, "high") != hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]


def test_the_device_is_part_of_the_key(monkeypatch) -> None:
    cfg = _cfg()
    before = recipe(cfg, "high")
    assert before["device"] == ("cpu" if not torch.cuda.is_available() else before["device"])
    monkeypatch.setattr(contract, "device_identity", lambda: "cuda:NVIDIA H100")
    assert recipe_diff(before, recipe(cfg, "high")) == ["device"]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("tokenizer_config.json", '{"model_max_length": 64}'),
        ("chat_template.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}"),
        ("special_tokens_map.json", '{"eos_token": "</s>"}'),
        ("generation_config.json", '{"do_sample": false}'),
    ],
)
def test_tokenizer_and_chat_template_files_change_the_key(tmp_path, name, text) -> None:
    model_dir = save_tiny_model(tmp_path / "model", layers=2, hidden=32, vocab_size=128)
    cfg = QRAConfig.model_validate({"model": {"path": str(model_dir)}})
    before = recipe(cfg, "high")
    (model_dir / name).write_text(text)
    assert recipe_diff(before, recipe(cfg, "high")) == ["model.weights"]


def test_a_same_size_rewrite_right_away_changes_the_key(tmp_path) -> None:
    """Two writes of the same size within one mtime tick (no sleep between them): the digest of a file that
    changed moments ago is never served from the cache."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 20)
    cfg = QRAConfig.model_validate({"model": TINY, "data": {"source": "jsonl", "path": str(data)}})
    before = recipe_hash(cfg, "high")
    for _ in range(3):
        data.write_text('{"prompt": "a", "completion": "c"}\n' * 20)
        assert recipe_hash(cfg, "high") != before
        data.write_text('{"prompt": "a", "completion": "b"}\n' * 20)
        assert recipe_hash(cfg, "high") == before


@pytest.mark.parametrize("source", ["wiki", "wiki_topic", "wiki_mix"])
def test_every_wiki_source_hashes_the_shipped_summaries(source) -> None:
    from planner.config import DataSection
    from planner.data.wiki import wiki_summaries_path

    empty = hashlib.sha256(b"").hexdigest()[:16]
    identity = data_identity(DataSection(source=source).model_dump_json())
    assert identity != empty
    digest = contract._file_digest(wiki_summaries_path())
    expected = f"{wiki_summaries_path().name}:{digest};"
    assert identity == hashlib.sha256(expected.encode()).hexdigest()[:16]


def test_threads_do_not_change_a_score_so_they_are_not_keyed() -> None:
    """``fidelity.torch_threads`` is left out of the key because 1 and 2 threads give bit-identical scores
    (measured on SmolLM2-135M too; see contract._RESULT_NEUTRAL). Should a torch release break that, this
    test fails and the setting must move into the key."""
    from planner.fidelity.sft import run_fidelity
    from planner.loading import load_meta_model
    from qra_plugin import Plan

    results = []
    for threads in (1, 2):
        cfg = _cfg(
            model={"tiny": {"layers": 2, "hidden": 128, "vocab_size": 256}},
            data={"train_examples": 16},
            train={"batch": 4, "seq_len": 64, "lr": 5e-3},
            fidelity={"low": {"steps": 3, "eval_examples": 8}, "torch_threads": threads, "subprocess": False},
        )
        plan = Plan.uniform(load_meta_model(cfg.model), bits=4, rank=8)
        result = run_fidelity(contract.EvalTask(plan=plan, level="low", seed=0, config=cfg))
        results.append((result.eval_loss, result.train_loss))
    assert results[0] == results[1]
    assert recipe_hash(_cfg(fidelity={"torch_threads": 1}), "high") == recipe_hash(_cfg(), "high")


@pytest.mark.parametrize(
    "over",
    [
        {"timeout_s": 10},
        {"workers": 2},
        {"subprocess": False},
        {"layer_cache": "off"},
        {"seeds": [0, 1]},
        {"torch_threads": 1},
    ],
)
def test_scheduling_settings_do_not_change_the_key(over) -> None:
    assert recipe_hash(_cfg(fidelity=over), "high") == recipe_hash(_cfg(), "high")


@pytest.mark.parametrize(
    ("over", "changed"),
    [
        ({"eval_batch": 4}, "fidelity.eval_batch"),
        ({"min_steps": 3}, "fidelity.min_steps"),
        ({"high": {"steps": 24, "eval_examples": 32, "accuracy": True}}, "level.accuracy"),
    ],
)
def test_settings_that_act_on_a_run_change_the_key(over, changed) -> None:
    assert changed in recipe_diff(recipe(_cfg(), "high"), recipe(_cfg(fidelity=over), "high"))


def test_a_confirm_level_has_its_own_key_and_leaves_the_search_levels_keys_alone() -> None:
    """Setting ``fidelity.confirm`` adds a level: every stored low/high score stays valid, and a confirm score is
    never read for a high one (or for a confirm level of other steps)."""
    confirm = _cfg(fidelity={"confirm": {"steps": 40, "eval_examples": 32}})
    assert [recipe_hash(confirm, lv) for lv in ("low", "high")] == [recipe_hash(_cfg(), lv) for lv in ("low", "high")]
    assert recipe_hash(confirm, "confirm") != recipe_hash(confirm, "high")
    longer = _cfg(fidelity={"confirm": {"steps": 48, "eval_examples": 32}})
    assert "level.steps" in recipe_diff(recipe(confirm, "confirm"), recipe(longer, "confirm"))
    with pytest.raises(QRAError, match="fidelity.confirm is not set"):
        recipe_hash(_cfg(), "confirm")
    with pytest.raises(ValueError, match=r"fidelity.confirm.steps \(24\) must exceed fidelity.high.steps \(24\)"):
        _cfg(fidelity={"confirm": {"steps": 24, "eval_examples": 32}})


# ---------------------------------------------------------------------------------------------- layer cache
def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 32, bias=False)


def test_layer_key_covers_torch_and_the_backends_own_settings(monkeypatch) -> None:
    linear, mp = _linear(), ModulePlan(bits=4, rank=8)
    base = quantized.layer_key(linear, mp, torch.float32)
    # the default group resolved: a plan naming the default group is the same layer
    assert quantized.layer_key(linear, ModulePlan(bits=4, rank=8, group_size=64), torch.float32) == base
    assert quantized.layer_key(linear, ModulePlan(bits=4, rank=8, group_size=32), torch.float32) != base
    monkeypatch.setitem(hqq.SETTINGS, "view_as_float", True)
    assert quantized.layer_key(linear, mp, torch.float32) != base
    monkeypatch.setitem(hqq.SETTINGS, "view_as_float", False)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert quantized.layer_key(linear, mp, torch.float32) != base


def test_the_settings_the_key_names_are_the_ones_the_quantizer_uses(monkeypatch) -> None:
    """``hqq.SETTINGS`` is what ``quantize`` passes: change it and the quantized layer changes with the key."""
    mp = ModulePlan(bits=4, rank=8)
    plain = hqq.quantize(_linear(), mp, torch.float32)
    monkeypatch.setitem(hqq.SETTINGS, "view_as_float", True)
    viewed = hqq.quantize(_linear(), mp, torch.float32)
    assert plain.W_q.dtype == torch.uint8 and viewed.W_q.dtype == torch.float32


def test_layer_cache_read_and_write_failures_are_one_line_each(tmp_path, caplog) -> None:
    linear, mp = _linear(), ModulePlan(bits=4, rank=8)
    key = quantized.layer_key(linear, mp, torch.float32)
    quantized.clear_memory()
    with quantized.directory_in_use(tmp_path / "layers"):
        (tmp_path / "layers").mkdir()
        (tmp_path / "layers" / f"{key}.pt").write_bytes(b"not a pickle")
        with caplog.at_level(logging.WARNING, logger=quantized.__name__):
            layer = quantized.quantized_layer(linear, mp, torch.float32, keep=False)
        assert layer is not None
        read = [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()]
        assert len(read) == 1 and key in read[0] and "\n" not in read[0]
        assert (tmp_path / "layers" / f"{key}.pt").stat().st_size > 100  # overwritten with the real layer
    caplog.clear()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    with quantized.directory_in_use(blocked), caplog.at_level(logging.WARNING, logger=quantized.__name__):
        quantized.quantized_layer(linear, ModulePlan(bits=3, rank=8), torch.float32, keep=False)
    wrote = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(wrote) == 1 and "\n" not in wrote[0]


# ---------------------------------------------------------------------------------------------- object caches
def test_pruning_memo_never_hands_one_importance_to_another() -> None:
    """A new ChannelImportance that reuses a freed one's ``id`` got the freed one's pruning from the old
    id-keyed memo; keyed by values it cannot."""
    from planner.priors.pruning import ChannelImportance, pruning_for_ratios

    for trial in range(20):  # CPython hands a freed object's address to the next one of its size
        scores = tuple(float((i * (trial + 3)) % 7) for i in range(16))
        importance = ChannelImportance(mlp=(scores,), kv=((1.0, 2.0),), group=1)
        kept = pruning_for_ratios(importance, [0.5])[0].mlp_keep
        expected = sorted(sorted(range(16), key=lambda i: (-scores[i], i))[:8])
        assert kept == expected, trial
        del importance


def test_model_info_memos_live_with_their_object() -> None:
    from planner.model_info import load_model_info, pruned_info
    from planner.tiny import build_tiny_model
    from qra_plugin.plan import BlockPruning, Plan

    shapes = []
    for hidden, inter in ((64, 128), (64, 96)):
        model = build_tiny_model("llama", layers=2, hidden=hidden, intermediate_size=inter, seed=0)
        info = load_model_info(model)
        plan = Plan.uniform(model, bits=4, rank=4)
        plan.pruning = {0: BlockPruning(mlp_keep=list(range(inter // 2)))}
        pruned = pruned_info(info, plan)
        assert pruned_info(info, plan) is pruned  # memoised on the object
        up = next(s for s in pruned.linears if s.name.endswith("layers.0.mlp.up_proj"))
        shapes.append((up.out_features, up.in_features))
        del info, pruned
    assert shapes == [(64, 64), (48, 64)]
