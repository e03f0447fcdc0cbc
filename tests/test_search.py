"""The whole search on a tiny model with tiny real SFT fidelities: both stages, budget, resume, failures.

Every evaluation here is a real TRL SFTTrainer run (planner.fidelity) on a tiny Llama built from
``example_configs/tiny-search.yaml``. Evaluations run in-process (``fidelity.subprocess: false``) to
keep the file within a few minutes on 2 cores; the child-process path is the executors' own test.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from planner.config import QRAConfig
from planner.fidelity.contract import EvalResult, EvalTask
from planner.fidelity.sft import run_fidelity
from planner.orchestration.search_run import PARETO_FILE, PLAN_FILE, REPORT_FILE, TRACE_FILE, run_search
from planner.orchestration.setup import STORE_FILE
from planner.search.space import allocation_key
from qra_plugin.plan import Plan, block_pairs

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "example_configs" / "tiny-search.yaml"


def _write_config(path: Path, **over: dict) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data["fidelity"]["subprocess"] = False
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values}
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(store: Path) -> list[dict]:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30) as db:
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM evaluations ORDER BY id")]
        except sqlite3.OperationalError:  # polled between the file's creation and its schema
            return []


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "planner.cli", *args]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted search (in this process)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg_path = _write_config(tmp / "cfg.yaml")
    cfg = QRAConfig.load(cfg_path)
    out = tmp / "out"
    result = run_search(cfg, out, seed=0, executor_kind="local", progress=False)
    return cfg_path, cfg, out, result


def test_full_search_runs_both_stages_on_real_sft_and_fits_the_budget(reference) -> None:
    from planner.memory import Budget, plan_bytes
    from planner.model_info import load_model_info
    from planner.settings import TrainingSettings

    _, cfg, out, result = reference
    for name in (PLAN_FILE, PARETO_FILE, REPORT_FILE, STORE_FILE, "pareto.png", "plan.png", "trace.png"):
        assert (out / name).is_file(), name
    stages = {(r["stage"], r["level"]) for r in result.trace}
    assert {("stage1", "low"), ("stage1", "high"), ("stage2", "high")} <= stages
    assert stages <= {("stage1", "low"), ("stage1", "high"), ("stage2", "high"), ("baseline", "high")}
    uniform = tuple((4, 16) for _ in range(cfg.model.tiny.layers))  # the plan the budget names
    assert any(r["config"] == allocation_key(uniform) and r["level"] == "high" for r in result.trace)
    s = cfg.search
    assert sum(r["level"] == "low" for r in result.trace) == s.population + s.generations * s.offspring
    assert sum(r["stage"] == "stage2" for r in result.trace) == s.tr_iterations * s.tr_batch

    rows = _rows(out / STORE_FILE)
    assert len(rows) == len(result.trace) and all(r["status"] == "ok" for r in rows)
    for r in rows:  # real SFT runs: the level's optimizer steps, a finite train loss, measured memory
        level = getattr(cfg.fidelity, r["level"])
        assert r["steps"] == level.steps and r["train_loss"] is not None and r["memory_measured"] > 0

    info = load_model_info(cfg.model)
    budget = Budget.parse(cfg.budget)
    plan = Plan.load(out / PLAN_FILE)
    settings = TrainingSettings.of(cfg)
    assert plan_bytes(info, plan, settings, budget.kind) <= budget.resolve(info, settings)
    assert block_pairs(plan) == list(result.best)
    best_high = min(r["score"] for r in result.trace if r["level"] == "high" and r["score"] is not None)
    assert plan.meta["qra_search"]["score"] == result.best_score == best_high

    pareto = json.loads((out / PARETO_FILE).read_text())
    mems = [p["memory_bytes"] for p in pareto["points"]]
    scores = [p["score"] for p in pareto["points"]]
    assert mems == sorted(mems) and scores == sorted(scores, reverse=True)  # a front: more memory, lower loss
    assert any(p["fits_budget"] and p["score"] == result.best_score for p in pareto["points"])
    Plan.parse(pareto["points"][0]["plan"])
    html = (out / REPORT_FILE).read_text()
    assert "pareto.png" in html and "Spearman" in html
    trace = json.loads((out / TRACE_FILE).read_text())
    assert "surrogate_spearman" in trace and trace["search_steps"] > 0
    # the planner's own compute is what is left of the stages' wall time after the evaluations
    assert trace["planner_s"] > 0 and trace["planner_s_per_proposal"] * len(trace["evaluations"]) == pytest.approx(
        trace["planner_s"], rel=0.01
    )


def test_the_first_generation_starts_from_the_budget_plan_and_both_prior_allocations(reference) -> None:
    """The greedy and ILP allocations cost no evaluation; the benchmark showed they must not be left to luck."""
    from planner.orchestration.setup import SearchSetup
    from planner.priors.profile import profile
    from planner.search.allocation import Importance, greedy_priors, ilp

    _, cfg, out, result = reference
    setup = SearchSetup.build(cfg)
    importance = Importance.from_priors(profile(cfg, out, progress=False), setup.space)
    greedy = greedy_priors(setup.space, setup.cost, setup.budget_bytes, importance)
    by_ilp = ilp(setup.space, setup.cost, setup.budget_bytes, importance, rank=16)
    first = [r["config"] for r in result.trace[: cfg.search.population]]
    assert all(r["stage"] == "stage1" and r["level"] == "low" for r in result.trace[: cfg.search.population])
    uniform = tuple((4, 16) for _ in range(cfg.model.tiny.layers))
    for config in (uniform, greedy, by_ilp):
        assert allocation_key(config) in first
    assert len(set(first)) == len(first)


def test_killed_search_resumes_recomputes_at_most_one_and_ends_with_the_same_plan(reference, tmp_path) -> None:
    cfg_path, _, ref_out, ref_result = reference
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = _cli("search", str(cfg_path), "--out", str(out), "--seed", "0", "--no-progress")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
    store = out / STORE_FILE
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if store.is_file() and sum(r["status"] == "ok" for r in _rows(store)) >= 8:
                break
            assert proc.poll() is None, "search ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("the search never stored 8 evaluations")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {(r["plan_hash"], r["level"], r["seed"]): r for r in _rows(store) if r["status"] == "ok"}
    assert not (out / PLAN_FILE).exists()

    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    after = {(r["plan_hash"], r["level"], r["seed"]): r for r in _rows(store)}
    for key, row in before.items():  # nothing finished before the kill was run again
        assert after[key]["finished_at"] == row["finished_at"] and after[key]["attempts"] == row["attempts"]
    assert sum(r["attempts"] - 1 for r in after.values()) <= 1  # at most the one in flight was redone
    ref_keys = {(r["plan_hash"], r["level"], r["seed"]) for r in _rows(ref_out / STORE_FILE)}
    assert set(after) == ref_keys
    assert Plan.load(out / PLAN_FILE).content_hash() == Plan.load(ref_out / PLAN_FILE).content_hash()
    assert block_pairs(Plan.load(out / PLAN_FILE)) == list(ref_result.best)


def test_the_searched_plan_trains_with_the_trl_example(reference, tmp_path) -> None:
    from planner.data.wiki import write_jsonl
    from planner.tiny import save_tiny_model

    _, cfg, out, _ = reference
    tiny = cfg.model.tiny
    model_dir = save_tiny_model(tmp_path / "model", tiny.arch, tiny.seed, layers=tiny.layers, hidden=tiny.hidden,
                                vocab_size=tiny.vocab_size)  # fmt: skip
    data = write_jsonl(tmp_path / "train.jsonl", "train", 16, fmt="messages")  # conversational rows
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--model", str(model_dir), "--plan", str(out / PLAN_FILE), "--data", str(data), "--steps", "2"]
    args += ["--seq-len", "64", "--out", str(tmp_path / "trl")]
    done = subprocess.run(
        [sys.executable, str(ROOT / "example_configs" / "train_trl.py"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "trl" / "rank0.json").read_text())
    assert summary["steps"] == 2 and summary["train_loss"] > 0
    assert (
        Plan.load(tmp_path / "trl" / "adapter" / "qra_plan.yaml").content_hash()
        == Plan.load(out / PLAN_FILE).content_hash()
    )


_CALLS = {"n": 0}


def _third_evaluation_raises(task: EvalTask) -> EvalResult:
    """The real fidelity, except that the third evaluation raises (an injected candidate crash)."""
    _CALLS["n"] += 1
    if _CALLS["n"] == 3:
        raise RuntimeError("injected candidate crash")
    return run_fidelity(task)


def test_a_raising_candidate_is_recorded_as_failed_and_the_search_finishes(tmp_path) -> None:
    small = {"population": 4, "generations": 1, "offspring": 2, "promote": 1, "tr_iterations": 1}
    cfg = QRAConfig.load(_write_config(tmp_path / "cfg.yaml", search=small))
    _CALLS["n"] = 0
    result = run_search(cfg, tmp_path / "out", seed=1, evaluate=_third_evaluation_raises, progress=False)
    rows = _rows(tmp_path / "out" / STORE_FILE)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and "injected candidate crash" in failed[0]["error"]
    assert sum(r["score"] is None for r in result.trace) == 1
    assert (tmp_path / "out" / PLAN_FILE).is_file() and result.best_score > 0
    assert len(rows) == len(result.trace)


def test_cli_rejects_bad_input_with_one_line(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run(
        _cli("search", str(TINY), "--out", str(tmp_path), "--executor", "spark"),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("qra: error: --executor")
    tight = _write_config(tmp_path / "tight.yaml")
    data = yaml.safe_load(tight.read_text())
    data["budget"] = "100KiB"
    tight.write_text(yaml.safe_dump(data))
    too_small = subprocess.run(
        _cli("search", str(tight), "--out", str(tmp_path / "o")), env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert too_small.returncode == 2 and "budget" in too_small.stderr.strip().splitlines()[-1]


def test_ray_executor_runs_the_tiny_search_on_local_ray(tmp_path) -> None:
    ray = pytest.importorskip("ray")
    small = {"population": 3, "generations": 1, "offspring": 2, "promote": 1, "tr_iterations": 1}
    # Ray workers import torch and build the model on first use: allow for a loaded CI machine
    cfg = QRAConfig.load(_write_config(tmp_path / "cfg.yaml", search=small, fidelity={"timeout_s": 1800}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_search(cfg, tmp_path / "out", seed=0, executor_kind="ray", progress=False)
    finally:
        ray.shutdown()
    rows = _rows(tmp_path / "out" / STORE_FILE)
    n_base = sum(r["stage"] == "baseline" for r in result.trace)
    assert len(rows) == len(result.trace) == 3 + 2 + 2 * 1 + 1 + n_base and all(r["status"] == "ok" for r in rows)
    assert {"stage1", "stage2"} <= {r["stage"] for r in result.trace}
    # the local executor finds every Ray result in the store: nothing recomputed, the same plan
    again = run_search(cfg, tmp_path / "out", seed=0, executor_kind="local", progress=False)
    assert again.computed == 0 and again.best == result.best


def test_pareto_front_and_best_for_budget() -> None:
    from planner.search.pareto import Point, best_for_budget, front

    pts = [
        Point(((4, 16),), 2.0, 100),
        Point(((8, 16),), 1.5, 200),
        Point(((8, 32),), 1.6, 250),  # dominated by the 200-byte point
        Point(((2, 4),), 3.0, 50),
        Point(((3, 4),), 3.0, 60),  # dominated: same score, more memory
    ]
    assert [p.memory for p in front(pts)] == [50, 100, 200]
    assert best_for_budget(pts, 150).memory == 100
    assert best_for_budget(pts, 1000).memory == 200
    assert best_for_budget(pts, 10) is None


def test_a_changed_fidelity_recipe_never_reuses_a_score(reference, tmp_path) -> None:
    """Same --out, ``fidelity.high.steps`` 6 → 7: the low rows are reused, no high score is."""
    import shutil

    _, _, ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    old_rows = _rows(out / STORE_FILE)
    cfg = QRAConfig.load(_write_config(tmp_path / "cfg7.yaml", fidelity={"high": {"steps": 7, "eval_examples": 8}}))
    result = run_search(cfg, out, seed=0, executor_kind="local", progress=False)
    high = [r for r in result.trace if r["level"] == "high"]
    assert high and all(r["steps"] == 7 for r in high if r["status"] == "ok")
    rows = _rows(out / STORE_FILE)
    old_high = {r["recipe"] for r in old_rows if r["level"] == "high"}
    new_high = {r["recipe"] for r in rows if r["level"] == "high"} - old_high
    assert len(new_high) == 1 and sum(r["recipe"] in new_high for r in rows) == len({r["config"] for r in high})
    old_low = {r["id"]: r for r in old_rows if r["level"] == "low"}
    assert all(r["finished_at"] == old_low[r["id"]]["finished_at"] for r in rows if r["id"] in old_low)  # reused
    summary = json.loads((out / TRACE_FILE).read_text())
    assert summary["failures"] == {"transient": 0, "deterministic": 0} and "gp_fit_failures" in summary


def test_the_search_says_whether_it_beat_the_allocations_that_cost_no_evaluation(reference) -> None:
    _, _, out, result = reference
    trace = json.loads((out / TRACE_FILE).read_text())
    scored = trace["free_allocation_scores"]
    assert "uniform" in scored and trace["best_free_allocation"] in scored
    assert trace["gain_over_best_free"] == pytest.approx(min(scored.values()) - result.best_score, abs=1e-6)
    assert trace["gain_over_best_free"] >= 0  # the best plan is the best of everything scored at high, free ones too
    free_hit = trace["best_is_free_allocation"]
    assert free_hit is None or trace["gain_over_best_free"] == 0
    report = (out / REPORT_FILE).read_text()
    assert ("already the best found" in report) == (free_hit is not None)


def test_a_best_plan_inside_min_gain_of_a_free_allocation_gives_way_to_it(reference, tmp_path) -> None:
    """``search.min_gain`` is the seed noise: a searched plan that beats the best zero-evaluation allocation by
    less is noise, so the free allocation is the plan (same stored evaluations, nothing recomputed)."""
    import shutil

    _, _, ref_out, ref_result = reference
    ref_trace = json.loads((ref_out / TRACE_FILE).read_text())
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    cfg = QRAConfig.load(_write_config(tmp_path / "cfg.yaml", search={"min_gain": 10.0}))
    result = run_search(cfg, out, seed=0, executor_kind="local", progress=False)
    trace = json.loads((out / TRACE_FILE).read_text())
    assert trace["computed_this_run"] == 0
    best_free = ref_trace["best_free_allocation"]
    assert trace["best_is_free_allocation"] == best_free and trace["gain_over_best_free"] == 0
    assert result.best_score == ref_trace["free_allocation_scores"][best_free]
    set_aside = trace["within_noise_of_free"]
    if ref_trace["best_is_free_allocation"] is None:  # the reference search had found something else
        assert set_aside["score"] == ref_result.best_score and set_aside["gain"] == ref_trace["gain_over_best_free"]
    else:
        assert set_aside is None
    assert "already the best found" in (out / REPORT_FILE).read_text()
    assert ref_trace["within_noise_of_free"] is None  # min_gain 0 (the default) never replaces a plan


@pytest.mark.parametrize(
    ("best", "free", "min_gain", "gives_way"),
    [
        (2.0, 2.0 + 2**-8, 2**-8, True),  # a gain of exactly min_gain is noise (binary fractions: exact)
        (2.0, 2.0 + 2**-8 + 2**-20, 2**-8, False),  # just beyond it is a real gain
        (2.0, 2.0, 2**-8, True),
        (2.0, 1.99, 2**-8, True),  # the free allocation scored better outright
        (2.0, 2.0 + 2**-8, 0.0, False),  # min_gain 0 never replaces a plan
    ],
)
def test_min_gain_boundary(best, free, min_gain, gives_way) -> None:
    from planner.search.pareto import within_noise

    assert within_noise(best, free, min_gain) is gives_way


def test_with_error_init_the_search_starts_from_and_measures_itself_against_the_tables_allocation(tmp_path) -> None:
    """``adapter.init: error``: the error table's allocation (cached next to the priors) is in the first
    population and among the zero-evaluation allocations the report compares the best plan with; the
    performance models read the same table (``surrogate_features: table`` fails without it)."""
    from planner.orchestration.setup import SearchSetup
    from planner.priors.error_table import TABLE_FILE, cached_error_table
    from planner.search.allocation import table_allocation

    small = {"population": 4, "generations": 1, "offspring": 2, "promote": 1, "tr_iterations": 1,
             "surrogate_features": "table"}  # fmt: skip
    cfg = QRAConfig.load(_write_config(tmp_path / "cfg.yaml", search=small, adapter={"init": "error"}))
    out = tmp_path / "out"
    result = run_search(cfg, out, seed=0, executor_kind="local", progress=False)
    setup = SearchSetup.build(cfg)
    chosen = table_allocation(setup.space, setup.cost, setup.budget_bytes, cached_error_table(cfg, setup.space, out))
    assert (out / TABLE_FILE).is_file()
    assert allocation_key(chosen) in [r["config"] for r in result.trace[: cfg.search.population]]
    trace = json.loads((out / TRACE_FILE).read_text())
    assert "table_alloc" in trace["free_allocation_scores"]
    plan = Plan.load(out / PLAN_FILE)
    assert plan.init_file and any(m.init == "error" for m in plan.modules.values())


def test_a_closing_plan_fills_the_worker_a_lone_candidate_leaves_idle_and_is_read_back_from_the_store(tmp_path):
    """Two workers, one high-fidelity candidate: the budget's uniform plan (scored when the search ends) runs
    beside it; the search's closing call then finds it stored and records it once."""
    from planner.executors import make_executor
    from planner.orchestration.setup import SearchSetup
    from planner.store import Store

    cfg = QRAConfig.load(_write_config(tmp_path / "cfg.yaml", fidelity={"subprocess": True, "workers": 2}))
    setup = SearchSetup.build(cfg)
    uniform, candidate = setup.budget_plan(), setup.space.uniform(8, 4)
    with Store(tmp_path / STORE_FILE) as store:
        executor = make_executor("local", subprocess=True, store=store, workers=2, timeout_s=300)
        evaluator = setup.evaluator(executor, lambda *_: None)
        evaluator.closing = [(uniform, "baseline")]
        with executor:
            (score,) = evaluator.run([candidate], "high", "stage2")
            rows = {r["tag"].split(":")[0]: r for r in store.records()}
            assert set(rows) == {"stage2", "baseline"} and evaluator.closing == []
            first, second = rows["stage2"], rows["baseline"]
            assert first["started_at"] < second["finished_at"] and second["started_at"] < first["finished_at"]
            assert [e["stage"] for e in evaluator.trace] == ["stage2"]  # recorded when the search asks for it
            (baseline_score,) = evaluator.run([uniform], "high", "baseline")
        assert len(store.records()) == 2 and [e["stage"] for e in evaluator.trace] == ["stage2", "baseline"]
        assert score is not None and baseline_score == round(rows["baseline"]["eval_loss"], 6)


def test_a_confirm_fidelity_rescores_the_finalists_and_the_lowest_longer_run_is_the_plan(reference, tmp_path) -> None:
    """``fidelity.confirm`` on the reference's stored evaluations: only the finalists' longer runs are computed
    (top by high score, the best free allocation), the plan is the finalist with the lowest confirm score, the
    front keeps the high scores, and a re-run replays everything from the store."""
    import shutil

    _, _, ref_out, ref_result = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    confirm = {"confirm": {"steps": 9, "eval_examples": 8}}
    cfg = QRAConfig.load(_write_config(tmp_path / "cfg.yaml", fidelity=confirm, search={"confirm_top": 1}))
    result = run_search(cfg, out, seed=0, executor_kind="local", progress=False)
    trace = json.loads((out / TRACE_FILE).read_text())
    finalists = trace["confirm"]["finalists"]
    assert trace["computed_this_run"] == len(finalists) and 2 <= len(finalists) <= 3  # top 1, best free, greedy
    assert finalists[0]["config"] == allocation_key(ref_result.best)  # the high-fidelity best comes first
    assert finalists[0]["high"] == min(r["high"] for r in finalists)
    assert "greedy_priors" in {r["free_allocation"] for r in finalists}  # zero init: the fast path's plan
    confirmed = {r["config"]: r["confirm"] for r in finalists}
    assert allocation_key(result.best) == min(confirmed, key=confirmed.get)
    assert trace["confirm"]["changed_choice"] == (result.best != ref_result.best)
    assert result.best_score == next(r["high"] for r in finalists if r["config"] == allocation_key(result.best))
    assert Plan.load(out / PLAN_FILE).meta["qra_search"]["confirm_score"] == confirmed[allocation_key(result.best)]
    rows = [r for r in _rows(out / STORE_FILE) if r["level"] == "confirm"]
    assert len(rows) == len(finalists) and all(r["steps"] == 9 for r in rows)
    assert "chosen by 9-step runs" in (out / REPORT_FILE).read_text()
    again = run_search(cfg, out, seed=0, executor_kind="local", progress=False)
    assert json.loads((out / TRACE_FILE).read_text())["computed_this_run"] == 0 and again.best == result.best


def test_confirm_picks_the_finalists_and_gives_way_to_a_free_allocation_inside_min_gain() -> None:
    from planner.orchestration.confirm import choose, finalists
    from planner.search.pareto import Point

    a, b, c, table, over = ((3, 4),), ((4, 4),), ((8, 4),), ((8, 8),), ((16, 16),)
    points = [Point(a, 2.0, 90), Point(b, 2.1, 80), Point(c, 2.2, 70), Point(table, 2.5, 95), Point(over, 1.0, 200)]
    free = {"greedy_priors": c, "table_alloc": table}
    assert finalists(points, free, 100, 1, "error") == [a, c, table]  # over budget never; the fast path always
    assert finalists(points, free, 100, 2, "zero") == [a, b, c]
    best, said = choose(points, {a: 2.40, c: 2.45, table: 2.30}, free, points[0], 0.0, 40)
    assert best.config == table and said["changed_choice"] and said["gain_over_best_free"] == 0
    best, said = choose(points, {a: 2.30, c: 2.31, table: 2.40}, free, points[0], 0.02, 40)
    assert best.config == c and said["score"] == 2.31  # a gain inside min_gain is noise: the free one is the plan
    best, said = choose(points, {a: 2.30, c: 2.35}, free, points[0], 0.02, 40)
    assert best.config == a and said["gain_over_best_free"] == pytest.approx(0.05)
    best, said = choose(points, {a: None, c: None}, free, points[0], 0.0, 40)
    assert best.config == a and said["score"] is None and not said["changed_choice"]


def test_an_error_init_search_without_a_confirm_fidelity_is_told_so() -> None:
    from planner.orchestration.confirm import unconfirmed_note

    cfg = QRAConfig.load(TINY)
    assert unconfirmed_note(cfg) is None  # zero init: the short runs compare like with like
    error = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"init": "error"})})
    assert "set fidelity.confirm" in unconfirmed_note(error)
    confirmed = error.model_copy(deep=True)
    confirmed.fidelity.confirm = confirmed.fidelity.high.model_copy(update={"steps": 30})
    assert unconfirmed_note(confirmed) is None
