"""Baselines: each returns a feasible config under the budget; evaluating ones spend their evaluation count.

The objective here is a real, cheap one: the HQQ reconstruction error of each unit's actual weights at its
bit-width (computed with the real backend on the tiny model), minus a small bonus for rank.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from planner.config import QRAConfig
from planner.memory import Budget, plan_bytes
from planner.model_info import load_model_info
from planner.search.allocation import Importance, flat_importance
from planner.search.baselines import METHODS, choose
from planner.search.space import BudgetCost, SearchSpace
from planner.settings import TrainingSettings
from planner.tiny import build_tiny_model
from qra_plugin import QRAError
from qra_plugin.backends import get_backend
from qra_plugin.plan import ModulePlan


@pytest.fixture(scope="module")
def setting():
    cfg = QRAConfig.model_validate({"model": {"tiny": {"layers": 4}}, "budget": "uniform:4bit:r8"})
    info = load_model_info(cfg.model)
    budget = Budget.parse(cfg.budget)
    space = SearchSpace.from_config(cfg, info)
    settings = TrainingSettings.of(cfg)
    budget_bytes = int(budget.check_feasible(info, settings, space.bits, space.ranks, space.backend))
    cost = BudgetCost(space, lambda c: plan_bytes(info, space.to_plan(c), settings, budget.kind))
    model = build_tiny_model("llama", seed=0)

    @cache
    def unit_error(unit: int, bits: int) -> float:
        layers = [m for n, m in model.named_modules() if f"layers.{unit}." in n and isinstance(m, torch.nn.Linear)]
        total = 0.0
        for layer in layers:
            copy = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
            copy.weight.data = layer.weight.data.clone()
            q = get_backend("hqq").quantize(copy, ModulePlan(bits=bits, rank=0), torch.float32)
            total += float((q.dequantize() - layer.weight).norm() / layer.weight.norm())
        return total

    calls: list[int] = []

    def evaluate(configs, level):
        calls.append(len(configs))
        return [sum(unit_error(u, b) - 0.01 * np.log2(1 + r) for u, (b, r) in enumerate(c)) for c in configs]

    importance = Importance.from_arrays(
        space, {b: [unit_error(u, b) for u in range(space.n_units)] for b in (2, 3, 4)}, [1.0] * space.n_units
    )
    return space, cost, budget_bytes, evaluate, importance, calls, _error_table(model, space)


def _error_table(model, space):
    """The real error table of the tiny model (second moments of random token rows)."""
    from planner.priors.adapter_init import error_table
    from planner.priors.moments import second_moments

    tokens = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    return error_table(model, space, second_moments(model, tokens, [s.name for s in space.specs]))


@pytest.mark.parametrize("method", METHODS)
def test_every_baseline_fits_the_budget(setting, method):
    space, cost, budget, evaluate, importance, calls, table = setting
    calls.clear()
    result = choose(
        method, space, cost, budget, evaluate, importance=importance, table=table, evaluations=6, rank=8, seed=0
    )
    assert cost(result.config) <= budget
    assert result.score is not None
    assert len(result.config) == space.n_units
    if method in ("random", "tpe"):
        assert 1 < result.evaluations <= 6 and sum(calls) == result.evaluations
        assert result.score == min(s for _, s in result.history if s is not None)
    else:
        assert result.evaluations == 1


@pytest.mark.parametrize("method", ["uniform", "ilp", "greedy_priors", "table_alloc"])
def test_choosing_without_scoring_spends_no_evaluation(setting, method):
    space, cost, budget, evaluate, importance, calls, table = setting
    calls.clear()
    scored = choose(method, space, cost, budget, evaluate, importance=importance, table=table, rank=8)
    calls.clear()
    unscored = choose(
        method, space, cost, budget, evaluate, importance=importance, table=table, rank=8, score_choice=False
    )
    assert calls == [] and unscored.evaluations == 0 and unscored.score is None
    assert unscored.config == scored.config  # the choice never depends on its own score


def test_baselines_are_deterministic_for_a_seed(setting):
    space, cost, budget, evaluate, importance, _, _ = setting
    for method in ("random", "tpe"):
        a = choose(method, space, cost, budget, evaluate, evaluations=5, seed=3)
        b = choose(method, space, cost, budget, evaluate, evaluations=5, seed=3)
        assert a.config == b.config and a.history == b.history


def test_ilp_minimises_summed_iq_better_than_uniform(setting):
    space, cost, budget, evaluate, importance, _, _ = setting
    ilp = choose("ilp", space, cost, budget, evaluate, importance=importance, rank=8)
    uniform = choose("uniform", space, cost, budget, evaluate, rank=8)

    def summed(config):
        return sum(importance.quant[b][u] for u, (b, _) in enumerate(config))

    assert summed(ilp.config) <= summed(uniform.config) + 1e-9


def test_priors_methods_need_priors_and_unknown_method_errors(setting):
    space, cost, budget, evaluate, _, _, _ = setting
    with pytest.raises(QRAError, match="needs the priors"):
        choose("ilp", space, cost, budget, evaluate)
    with pytest.raises(QRAError, match="needs the error table"):
        choose("table_alloc", space, cost, budget, evaluate)
    with pytest.raises(QRAError, match="unknown baseline"):
        choose("magic", space, cost, budget, evaluate)
    assert flat_importance(space).plasticity.tolist() == [1.0] * space.n_units


def test_qra_baseline_cli_runs_real_fidelities_on_the_tiny_search(tmp_path):
    """`qra baseline` end to end: same budget, store and executor as qra search, real tiny SFT runs."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from planner.store import Store
    from qra_plugin import Plan

    config = Path(__file__).resolve().parents[1] / "example_configs" / "tiny-search.yaml"
    for method, extra in (("greedy_priors", []), ("random", ["--evaluations", "2"])):
        proc = subprocess.run(
            [sys.executable, "-m", "planner.cli", "baseline", method, str(config), "--out", str(tmp_path), *extra],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((tmp_path / method / "result.json").read_text())
        assert result["memory_bytes"] <= result["budget_bytes"]
        assert result["score"] is not None and result["score"] > 0
        Plan.load(tmp_path / method / "plan.yaml")
    store = Store(tmp_path / "store.sqlite")
    rows = store.records()
    store.close()
    assert 2 <= len(rows) <= 3 and all(r["status"] == "ok" for r in rows)  # greedy's pick may recur in random
    bad = subprocess.run(
        [sys.executable, "-m", "planner.cli", "baseline", "magic", str(config), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown baseline" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_tpe_leaves_its_random_start_up_and_models_the_rest(setting, monkeypatch) -> None:
    """``planner.search.baselines.tpe`` with 12 evaluations must not stay random: after tpe_startup(12) = 4 random
    trials its proposals follow TPE's density model, so they differ from the same call kept random throughout
    (what hyperopt's default start-up of 20 trials would do) and score better."""
    import planner.search.baselines as baselines

    space, cost, budget_bytes, evaluate, _, _, _ = setting
    assert baselines.tpe_startup(12) == 4 and baselines.tpe_startup(3) == 2
    guided = baselines.tpe(space, cost, budget_bytes, evaluate, 12, seed=0)
    monkeypatch.setattr(baselines, "tpe_startup", lambda evaluations: 20)  # hyperopt's default start-up
    random_only = baselines.tpe(space, cost, budget_bytes, evaluate, 12, seed=0)
    g = [c for c, _ in guided.history]
    r = [c for c, _ in random_only.history]
    assert g[:3] == r[:3]  # the same seeded start-up draws
    assert g[4:] != r[4:]
    late = lambda history: np.mean([score for _, score in history[6:]])  # noqa: E731
    assert late(guided.history) < late(random_only.history)  # it learns


# ---------------------------------------------------------------------------------------------- defects
def test_random_search_ends_on_a_space_with_fewer_configs_than_asked(setting) -> None:
    """A space with one choice per unit has one config: random search returns it after a bounded number of
    draws instead of drawing for ever (``qra baseline random`` on ``bits: [4]``, ``ranks: [16]`` hung)."""
    from planner.search.baselines import random_search

    _, _, _, evaluate, _, _, _ = setting
    cfg = QRAConfig.model_validate(
        {"model": {"tiny": {"layers": 4}}, "budget": "uniform:4bit:r16", "space": {"bits": [4], "ranks": [16]}}
    )
    info = load_model_info(cfg.model)
    space = SearchSpace.from_config(cfg, info)
    settings = TrainingSettings.of(cfg)
    budget = Budget.parse(cfg.budget).resolve(info, settings)
    cost = BudgetCost(space, lambda c: plan_bytes(info, space.to_plan(c), settings, "peak"))
    result = random_search(space, cost, budget, evaluate, evaluations=8, seed=0)
    assert result.evaluations == 1 and result.config == space.uniform(4, 16)
    with pytest.raises(QRAError, match="no sampled config fits the budget"):
        random_search(space, cost, budget - 1, evaluate, evaluations=8, seed=0)


def test_a_uniform_rank_outside_the_space_is_a_one_line_error(setting) -> None:
    from planner.search.baselines import default_rank

    space, cost, budget_bytes, evaluate, importance, _, _ = setting
    assert 16 not in space.ranks or default_rank(space) == 16
    for method in ("ilp", "uniform"):
        with pytest.raises(QRAError, match=r"rank 5 is not in the search space's ranks"):
            choose(method, space, cost, budget_bytes, evaluate, importance=importance, rank=5, score_choice=False)
    with pytest.raises(QRAError, match=r"bits 5 is not in the search space's bits"):
        choose("uniform", space, cost, budget_bytes, evaluate, bits=5, rank=space.ranks[0], score_choice=False)
    roomy = cost(space.richest())  # every rank fits: the default rank is what gets chosen
    for method in ("ilp", "uniform"):
        chosen = choose(method, space, cost, roomy, evaluate, importance=importance, score_choice=False)
        assert {r for _, r in chosen.config} == {default_rank(space)}


def test_default_rank_is_16_if_the_space_has_it_else_the_largest_below() -> None:
    from types import SimpleNamespace

    from planner.search.baselines import default_rank

    assert default_rank(SimpleNamespace(ranks=(4, 8, 16, 32))) == 16
    assert default_rank(SimpleNamespace(ranks=(4, 8, 32))) == 8
    assert default_rank(SimpleNamespace(ranks=(0, 32, 64))) == 32
    assert default_rank(SimpleNamespace(ranks=(0,))) == 0
    assert default_rank(SimpleNamespace(ranks=(32, 64))) == 32


def test_table_alloc_is_the_zero_evaluation_fast_path_with_its_init_file(tmp_path) -> None:
    """`qra baseline table_alloc --no-score`: no fine-tuning run, error-init adapters (the init file beside the
    plan, its hash in the plan), the error table cached next to the priors and read back on a second call."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from qra_plugin import Plan

    config = Path(__file__).resolve().parents[1] / "example_configs" / "tiny-search.yaml"
    cmd = [sys.executable, "-m", "planner.cli", "baseline", "table_alloc", str(config), "--out", str(tmp_path)]
    first = subprocess.run([*cmd, "--no-score"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "table_alloc" / "result.json").read_text())
    assert result["evaluations"] == 0 and result["score"] is None
    assert result["memory_bytes"] <= result["budget_bytes"]
    plan = Plan.load(tmp_path / "table_alloc" / "plan.yaml")
    assert plan.init_file and (tmp_path / "table_alloc" / plan.init_file).is_file()
    assert any(m.init == "error" for m in plan.modules.values())
    table = tmp_path / "error_table.json"
    stamp = table.stat().st_mtime_ns
    if (tmp_path / "store.sqlite").exists():
        from planner.store import Store

        store = Store(tmp_path / "store.sqlite")
        assert store.records() == []  # no fidelity run
        store.close()
    second = subprocess.run([*cmd, "--no-score"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and table.stat().st_mtime_ns == stamp  # the cached table, not measured again
    assert Plan.load(tmp_path / "table_alloc" / "plan.yaml").modules == plan.modules
