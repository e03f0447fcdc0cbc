"""planner.priors on tiny real Llama models: real HQQ layers, real PEFT adapters, real files."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from planner.config import DataSection, ModelSection, ProfileSection, QRAConfig, SpaceSection, TinyModel
from planner.priors.profile import PARTIAL_FILE, PRIORS_FILE, Priors, profile
from planner.search.allocation import warm_start
from qra_plugin.errors import QRAError


@pytest.fixture(autouse=True)
def _one_thread():
    """2 shared cores: one thread is many times faster for tiny ops than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(layers: int = 3, offset: int = 0, unit: str | None = None, bits: list[int] | None = None) -> QRAConfig:
    return QRAConfig(
        name="tiny-priors",
        model=ModelSection(tiny=TinyModel(layers=layers, hidden=64)),
        data=DataSection(source="wiki"),
        profile=ProfileSection(
            bits=bits or [2, 3, 4],
            unit=unit,
            calibration_examples=4,
            calibration_offset=offset,
            seq_len=32,
            batch=2,
            plasticity_draws=1,
        ),
    )


def test_profile_writes_contract_files(tmp_path: Path) -> None:
    priors = profile(_cfg(), tmp_path, progress=False)
    data = json.loads((tmp_path / PRIORS_FILE).read_text())
    assert data["units"] == ["block.0", "block.1", "block.2"]
    assert sorted(data["I_q"]) == ["2", "3", "4"]
    assert all(len(v) == 3 for v in data["I_q"].values()) and len(data["I_r"]) == 3
    assert data["fingerprint"]["num_layers"] == 3
    assert (tmp_path / "priors.png").stat().st_size > 1000
    assert not (tmp_path / PARTIAL_FILE).exists()
    # real damage: every block hurts, and fewer bits hurt more
    for i in range(3):
        assert priors.I_q[2][i] > priors.I_q[3][i] > priors.I_q[4][i] > 0
    assert all(v > 0 for v in priors.I_r)
    assert Priors.load(tmp_path / PRIORS_FILE) == priors
    for b in (2, 3, 4):
        norm = priors.normalised_iq(b)
        assert min(norm) == 0.0 and max(norm) == 1.0
    assert all(0.0 <= v <= 1.0 for v in priors.normalised_ir())


def test_replayed_prefix_matches_full_model_and_weights_survive() -> None:
    """The cached-prefix shortcut must give exactly the full model's output, and fp weights stay put."""
    from planner.loading import load_model, load_tokenizer
    from planner.priors.calibration import calibration_batch
    from planner.priors.measure import reference_pass, unit_damage
    from qra_plugin.plan import ModulePlan

    cfg = _cfg()
    model = load_model(cfg.model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = calibration_batch(load_tokenizer(cfg.model), cfg.data, 4, 32)
    ref = reference_pass(model, tokens, 2)
    kl, dloss = unit_damage(model, tokens, 2, ref, [], 2, ModulePlan(bits=2), torch.float32)
    assert kl == pytest.approx(0.0, abs=1e-7) and dloss == pytest.approx(0.0, abs=1e-6)
    kl2, _ = unit_damage(model, tokens, 2, ref, ["model.layers.2.mlp.down_proj"], 2, ModulePlan(bits=2), torch.float32)
    assert kl2 > 1e-6
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m).__name__ != "HQQLinear" for m in model.modules())


def test_cache_hit_reuses_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = profile(_cfg(), tmp_path, progress=False)
    stamp = (tmp_path / PRIORS_FILE).stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="qra"):
        second = profile(_cfg(), tmp_path, progress=False)
    assert second == first
    assert (tmp_path / PRIORS_FILE).stat().st_mtime_ns == stamp
    assert any("cache hit" in r.message for r in caplog.records)


def test_calibration_change_invalidates_cache(tmp_path: Path) -> None:
    first = profile(_cfg(offset=0), tmp_path, progress=False)
    second = profile(_cfg(offset=200), tmp_path, progress=False)
    assert second.calibration_hash != first.calibration_hash
    assert second.I_q[2] != first.I_q[2]
    assert Priors.load(tmp_path / PRIORS_FILE).calibration_hash == second.calibration_hash


def test_other_weights_invalidate_cache(tmp_path: Path) -> None:
    """Same architecture (same fingerprint), different weights: the cache must not be reused."""
    first = profile(_cfg(), tmp_path, progress=False)
    cfg = _cfg()
    cfg.model.tiny.seed = 1
    second = profile(cfg, tmp_path, progress=False)
    assert second.fingerprint == first.fingerprint
    assert second.settings["weights_hash"] != first.settings["weights_hash"]
    assert second.I_q[2] != first.I_q[2]


def test_partial_profile_resumes(tmp_path: Path) -> None:
    """A partial file with the same key is continued: its entries are kept, only the rest is measured."""
    full = profile(_cfg(), tmp_path / "full", progress=False)
    data = json.loads((tmp_path / "full" / PRIORS_FILE).read_text())
    sentinel = 123.0  # a value no real measurement gives: proves block.0 @ 2 bits was not recomputed
    partial = {
        "fingerprint": data["fingerprint"],
        "calibration_hash": data["calibration_hash"],
        "settings": data["settings"],
        "units": data["units"],
        "I_q": {"2": {"block.0": sentinel, "block.1": data["I_q"]["2"][1]}, "3": {"block.0": data["I_q"]["3"][0]}},
        "loss_increase": {"2": {"block.0": 0.5, "block.1": 0.5}, "3": {"block.0": 0.5}},
        "I_r": None,
        "timings_s": {"I_q": 1.0},
        "reference_loss": data["reference_loss"],
    }
    out = tmp_path / "resumed"
    out.mkdir()
    (out / PARTIAL_FILE).write_text(json.dumps(partial))
    resumed = profile(_cfg(), out, progress=False)
    assert resumed.I_q[2][0] == sentinel
    assert resumed.I_q[2][1:] == pytest.approx(full.I_q[2][1:], rel=1e-5)
    assert resumed.I_q[4] == pytest.approx(full.I_q[4], rel=1e-5)
    assert resumed.I_r == pytest.approx(full.I_r, rel=1e-5)
    assert not (out / PARTIAL_FILE).exists()


def test_partial_with_other_key_is_discarded(tmp_path: Path) -> None:
    (tmp_path / PARTIAL_FILE).write_text(json.dumps({"fingerprint": {}, "I_q": {"2": {"block.0": 123.0}}}))
    priors = profile(_cfg(), tmp_path, progress=False)
    assert priors.I_q[2][0] != 123.0


def test_module_granularity(tmp_path: Path) -> None:
    priors = profile(_cfg(layers=1, unit="module", bits=[2]), tmp_path, progress=False)
    assert priors.unit == "module"
    assert priors.units[0] == "model.layers.0.self_attn.q_proj" and len(priors.units) == 7
    assert all(v > 0 for v in priors.I_q[2]) and len(priors.I_r) == 7


def test_bad_inputs_raise_one_line_errors(tmp_path: Path) -> None:
    cfg = _cfg()
    cfg.space = SpaceSection(backend="bnb", bits=[4, 8])
    with pytest.raises(QRAError, match="bnb"):
        profile(cfg, tmp_path, progress=False)  # profile.bits 2/3 cannot be stored by bitsandbytes
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "only a few words"}) + "\n")
    cfg = _cfg()
    cfg.data = DataSection(source="jsonl", path=str(short))
    with pytest.raises(QRAError, match="calibration data too short"):
        profile(cfg, tmp_path, progress=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"tiny": {"layers": 2}}, "profile": {"bitz": [2]}}))
    with pytest.raises(QRAError, match="profile.bitz"):
        QRAConfig.load(bad)
    with pytest.raises(QRAError, match="not found"):
        Priors.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(QRAError, match="malformed"):
        Priors.load(tmp_path / "broken.json")


def test_cli_profile_and_bad_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planner.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"tiny": {"layers": 2, "hidden": 64}},
                "profile": {"bits": [2, 4], "calibration_examples": 2, "seq_len": 32, "plasticity_draws": 1},
            }
        )
    )
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["qra", "profile", str(config), "--out", str(out), "--no-progress"])
    main()
    data = json.loads((out / PRIORS_FILE).read_text())
    assert data["units"] == ["block.0", "block.1"] and sorted(data["I_q"]) == ["2", "4"]
    assert (out / "priors.png").is_file()
    config.write_text(yaml.safe_dump({"model": {"tiny": {"layers": 2}}, "profile": {"bits": [5]}}))
    monkeypatch.setattr(sys, "argv", ["qra", "profile", str(config), "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------- warm start


def _priors(iq2: list[float], ir: list[float]) -> Priors:
    from qra_plugin.plan import Fingerprint

    fp = Fingerprint(architecture="LlamaForCausalLM", num_layers=len(ir), hidden_size=64, modules_hash="x")
    return Priors(
        units=[f"block.{i}" for i in range(len(ir))],
        unit="block",
        I_q={2: iq2, 4: [v / 10 for v in iq2]},
        I_r=ir,
        fingerprint=fp,
        calibration_hash="h",
    )


def _space(layers: int, unit: str = "block", bits=(2, 3, 4, 8), ranks=(4, 8, 16, 32)):
    """A real search space of a tiny Llama and a byte cost where every unit weighs the same."""
    from planner.config import SpaceSection
    from planner.search.space import BudgetCost, SearchSpace
    from planner.tiny import build_tiny_model
    from qra_plugin.modules import quantizable_linears
    from qra_plugin.plan import fingerprint

    model = build_tiny_model("llama", layers=layers, hidden=32, vocab_size=128)
    section = SpaceSection(unit=unit, bits=list(bits), ranks=list(ranks))
    space = SearchSpace.from_parts(section, fingerprint(model), quantizable_linears(model))
    return space, BudgetCost(space, lambda c: sum(1000 * b / 8 + 2 * 64 * r * 2 for b, r in c))


def _warm(iq, ir, space, cost, limit, n, seed):
    from planner.search.allocation import Importance

    return warm_start(Importance.from_priors(_priors(iq, ir), space), space, cost, limit, n, seed)


def test_warm_start_maps_importance_and_fits() -> None:
    iq = [0.9, 0.01, 0.5, 0.02, 0.3, 0.001, 0.7, 0.05]
    ir = [0.01, 0.9, 0.02, 0.5, 0.03, 0.8, 0.04, 0.6]
    space, cost = _space(8)
    limit = 8 * (1000 * 4 / 8 + 2 * 64 * 16 * 2)  # uniform 4 bits, rank 16
    configs = _warm(iq, ir, space, cost, limit, 8, 0)
    assert len(configs) == 8 and len(set(configs)) == 8
    assert all(cost(c) <= limit and len(c) == 8 for c in configs)
    assert all(b in space.bits and r in space.ranks for c in configs for b, r in c)
    first = configs[0]  # the noiseless mapping
    assert first[0][0] > first[5][0]  # most quantization-sensitive unit keeps more bits than the least
    assert first[1][1] > first[0][1]  # most plastic unit gets more rank than the least
    assert _warm(iq, ir, space, cost, limit, 8, 0) == configs
    assert _warm(iq, ir, space, cost, limit, 8, 1) != configs


def test_warm_start_budget_too_small_raises() -> None:
    space, cost = _space(3, bits=(2, 4), ranks=(8, 16))
    with pytest.raises(QRAError, match="budget is too small"):
        _warm([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], space, cost, 10, 2, 0)


def test_warm_start_broadcasts_block_priors_to_modules() -> None:
    space, cost = _space(2, unit="module", bits=(2, 4), ranks=(8, 16))
    (config,) = _warm([0.9, 0.01], [0.01, 0.9], space, cost, 1e9, 1, 0)
    blocks = space.unit_blocks
    assert {config[u] for u in range(space.n_units) if blocks[u] == 0} == {(4, 8)}
    assert {config[u] for u in range(space.n_units) if blocks[u] == 1} == {(2, 16)}


@pytest.mark.slow
def test_smollm2_fewer_bits_hurt_more_and_replay_is_exact() -> None:
    """The real demo model: a cheap slice of the profile (2 blocks, 2 x 64 tokens)."""
    from planner.loading import load_model, load_tokenizer
    from planner.priors.calibration import calibration_batch
    from planner.priors.measure import reference_pass, unit_damage
    from planner.priors.profile import _units
    from qra_plugin.plan import ModulePlan

    section = ModelSection(path="demo")
    model = load_model(section).eval()
    tokens = calibration_batch(load_tokenizer(section), DataSection(), 2, 64)
    ref = reference_pass(model, tokens, 2)
    _, modules, _ = _units(model, "block")
    assert unit_damage(model, tokens, 2, ref, [], 20, ModulePlan(bits=2), torch.float32)[0] == pytest.approx(
        0, abs=1e-7
    )
    for block in (0, 20):
        kl2, loss2 = unit_damage(model, tokens, 2, ref, modules[block], block, ModulePlan(bits=2), torch.float32)
        kl4, _ = unit_damage(model, tokens, 2, ref, modules[block], block, ModulePlan(bits=4), torch.float32)
        assert kl2 > kl4 > 0
        if block == 0:  # the loss change is noisy on 128 tokens; block 0 at 2 bits is far above the noise
            assert loss2 > 0


def test_pruning_sensitivity_prior_is_measured_cached_and_leaves_the_model_whole(tmp_path: Path) -> None:
    from planner.loading import load_model, load_tokenizer
    from planner.priors.calibration import calibration_batch
    from planner.priors.measure import reference_pass
    from planner.priors.pruning import prune_damage

    cfg = _cfg(bits=[4])
    cfg = cfg.model_copy(update={"profile": cfg.profile.model_copy(update={"prune_ratios": [0.25, 0.75]})})
    priors = profile(cfg, tmp_path, progress=False)
    assert sorted(priors.I_p) == [0.25, 0.75] and all(len(v) == 3 for v in priors.I_p.values())
    # a random tiny model has no structure to lose, so only: real, different per block and ratio
    values = [v for per_block in priors.I_p.values() for v in per_block]
    assert all(math.isfinite(v) for v in values) and len(set(values)) == len(values)
    assert Priors.load(tmp_path / PRIORS_FILE).I_p == priors.I_p
    plain = profile(_cfg(bits=[4]), tmp_path / "plain", progress=False)
    assert plain.I_p == {} and "prune_ratios" not in plain.settings  # no ratios: the key is as before
    model = load_model(cfg.model).eval()
    tokens = calibration_batch(load_tokenizer(cfg.model), cfg.data, 4, 32)
    before = reference_pass(model, tokens, 2).loss
    prune_damage(model, tokens, 2, before, [0.5])
    assert reference_pass(model, tokens, 2).loss == before  # every pruned block was put back
