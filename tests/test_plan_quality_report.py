"""The plan-quality benchmark's arithmetic: gap closure, paired seed statistics, resolvability, step-time ratio."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from benchmarks.harness.report import (
    budget_summary,
    comparisons,
    gap_closure,
    markdown,
    per_seed,
    plot,
    reread,
    summarize_method,
)

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _finals(losses: list[float], step_s: float = 0.5, memory: int = 1000, accs: list[float] | None = None):
    accs = accs or [0.5] * len(losses)
    return [
        {"seed": i, "status": "ok", "eval_loss": v, "accuracy": a, "train_s": step_s * 10, "steps": 10,
         "memory_measured": memory + i}
        for i, (v, a) in enumerate(zip(losses, accs, strict=True))
    ]  # fmt: skip


def test_gap_closure_endpoints_and_overshoot() -> None:
    assert gap_closure(2.5, 2.5, 2.0) == 0.0
    assert gap_closure(2.0, 2.5, 2.0) == 1.0
    assert gap_closure(2.25, 2.5, 2.0) == pytest.approx(0.5)
    assert gap_closure(2.6, 2.5, 2.0) == pytest.approx(-0.2)  # worse than the uniform plan
    assert gap_closure(2.0, 2.5, 2.5) is None  # no gap to close: G undefined, not infinite
    assert gap_closure(None, 2.5, 2.0) is None


def test_summarize_method_skips_failed_seeds() -> None:
    finals = _finals([2.30, 2.32, 2.34])
    finals.append({"seed": 3, "status": "failed", "eval_loss": None})
    s = summarize_method(finals)
    assert s["final_eval_loss_mean"] == pytest.approx(2.32)
    assert s["final_eval_loss_sd"] == pytest.approx(0.02)
    assert s["seeds"] == [0, 1, 2] and s["failed_seeds"] == [3]
    assert s["memory_measured"] == 1002
    assert s["step_s"] == pytest.approx(0.5)


def test_budget_summary_g_resolvability_and_step_ratio(tmp_path: Path) -> None:
    methods = {
        "unquantized_r16": summarize_method(_finals([2.000, 2.003, 1.997], accs=[0.60, 0.62, 0.58])),
        "uniform4_r16": summarize_method(_finals([2.100, 2.102, 2.098], step_s=0.40, accs=[0.40, 0.42, 0.38])),
        "qra": summarize_method(_finals([2.050, 2.051, 2.049], step_s=0.44, accs=[0.55, 0.56, 0.54])),
    }
    for m in methods.values():
        m.update({"memory_predicted": 1000, "search_cost": 1.0, "evaluations": 3, "wall_s": 10.0})
    s = budget_summary(methods, "uniform4_r16")
    assert s["methods"]["qra"]["G"] == pytest.approx(0.5)
    assert s["methods"]["unquantized_r16"]["G"] == pytest.approx(1.0)
    assert s["gap_nats"] == pytest.approx(0.1)  # per seed 0.100, 0.099, 0.101: sd 0.001
    assert s["gap_standard_error"] == pytest.approx(0.001 / math.sqrt(3), abs=1e-5)
    assert s["gap_resolvable"] is True
    assert s["step_time_ratio_qra_vs_uniform"] == pytest.approx(1.1)
    assert s["methods"]["qra"]["memory_error"] == pytest.approx((1000 - 1002) / 1002, abs=1e-5)
    assert s["methods"]["qra"]["G_accuracy"] == pytest.approx(0.75)
    # qra − uniform per seed: −0.050, −0.051, −0.049 → mean −0.05, sd 0.001, t = −0.05 / (0.001/√3) = −86.6
    loss = s["paired"]["qra-uniform4_r16"]
    assert loss["mean"] == pytest.approx(-0.05) and loss["sd"] == pytest.approx(0.001)
    assert loss["t"] == pytest.approx(-50 * math.sqrt(3), rel=1e-4) and loss["df"] == 2 and loss["n"] == 3
    assert loss["p"] == pytest.approx(1 - 50 * math.sqrt(3) / math.sqrt(7500 + 2), rel=1e-3) and loss["resolved"]
    assert loss["perm_p"] == 0.25 and loss["seeds"] == [0, 1, 2]
    accuracy = s["paired_accuracy"]["qra-uniform4_r16"]  # 0.15, 0.14, 0.16
    assert accuracy["mean"] == pytest.approx(0.15) and accuracy["sd"] == pytest.approx(0.01) and accuracy["resolved"]
    vs_uniform = s["qra_minus"]["uniform4_r16"]  # the round-2 shape, now from the paired test
    assert vs_uniform["eval_loss"] == {
        "diff": pytest.approx(-0.05),
        "se": pytest.approx(loss["se"], abs=1e-5),
        "resolved": True,
    }
    assert vs_uniform["accuracy"]["diff"] == pytest.approx(0.15) and vs_uniform["accuracy"]["resolved"]

    noisy = {  # per seed the gap is +0.05, −0.10, +0.20: a mean of 0.05 that the seeds do not support
        "unquantized_r16": summarize_method(_finals([2.0, 2.2, 1.8])),
        "uniform4_r16": summarize_method(_finals([2.05, 2.10, 2.00])),
    }
    assert budget_summary(noisy, "uniform4_r16")["gap_resolvable"] is False

    results = {
        "command": "x",
        "recipe": "test",
        "budgets": {"uniform4_r16": {"budget": "uniform:4bit:r16", "budget_bytes": 2**20, "budget_kind": "peak", **s}},
    }
    text = markdown(results)
    assert "| qra | 2.0500 ± 0.0010 | 0.550 ± 0.010 | 3 | 0.50 | 0.75 |" in text
    assert "| uniform4_r16 | -0.0500 ± 0.0006 (t -86.60, df 2, p 1.3e-04)* | 0.250 | +0.150 ± 0.006 (t +25.98" in text
    plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(results)  # the summary is plain JSON


def test_paired_comparisons_use_the_seeds_both_methods_finished() -> None:
    finals = _finals([2.0, 2.2, 1.8], accs=[0.5, 0.6, 0.4])
    finals[1] = {"seed": 1, "status": "failed", "eval_loss": None}  # seed 1 failed for qra only
    finals[2]["accuracy"] = None  # and seed 2 has a loss but no accuracy
    qra = summarize_method(finals)
    other = summarize_method(_finals([2.01, 2.21, 1.81], accs=[0.4, 0.5, 0.3]))
    assert per_seed(qra) == {0: 2.0, 2: 1.8} and per_seed(qra, "final_accuracy") == {0: 0.5}
    fresh = comparisons({"qra": qra, "uniform4_r16": other, "unquantized_r16": other}, "uniform4_r16")
    assert fresh["paired"]["qra-uniform4_r16"]["seeds"] == [0, 2]
    assert fresh["paired_accuracy"]["qra-uniform4_r16"]["n"] == 1
    assert fresh["paired_accuracy"]["qra-uniform4_r16"]["t"] is None


def test_committed_result_is_the_paired_reread_of_its_own_finals(tmp_path: Path) -> None:
    """plan_quality.json carries the paired statistics of the per-seed finals it holds, and --reread on a copy
    without them writes the same file (names other checks rely on: budgets.*.paired."qra-<method>")."""
    committed = json.loads((RESULTS / "plan_quality.json").read_text())
    u4 = committed["budgets"]["uniform4_r16"]
    assert set(u4["paired"]) == {f"qra-{m}" for m in u4["methods"] if m != "qra"}
    assert {"mean", "se", "t", "p", "n"} <= set(u4["paired"]["qra-greedy_priors"])
    assert u4["paired"]["qra-greedy_priors"]["resolved"] is False  # issue 21: t −3.24, p 0.084
    assert u4["qra_minus"]["greedy_priors"]["eval_loss"]["resolved"] is False
    stale = json.loads(json.dumps(committed))
    for budget in stale["budgets"].values():
        for key in ("paired", "paired_accuracy", "gap_paired", "statistics"):
            budget.pop(key)
    copy = tmp_path / "plan_quality.json"
    copy.write_text(json.dumps(stale))
    assert reread(copy) == committed
    assert copy.with_suffix(".md").read_text() == (RESULTS / "plan_quality.md").read_text()


def test_reread_refuses_a_round_1_result(tmp_path: Path) -> None:
    copy = tmp_path / "v1.json"
    shutil.copyfile(RESULTS / "plan_quality_v1.json", copy)
    with pytest.raises(SystemExit, match="no unquantized_r16"):
        reread(copy)
    assert copy.read_bytes() == (RESULTS / "plan_quality_v1.json").read_bytes()


# ---------------------------------------------------------------------------------------------- priors cost
def test_priors_cost_is_what_the_profile_measured_wall_and_cpu_apart() -> None:
    from benchmarks.harness.benchmark import cost_with_priors, priors_seconds

    timings = {"I_q": 339.2, "I_q_cpu": 475.8, "I_r": 68.7, "I_r_cpu": 62.0}
    assert priors_seconds(timings) == (407.9, 537.8)  # wall and CPU seconds are never added together
    assert priors_seconds(None) == (0.0, 0.0)
    assert cost_with_priors(96, 0.0, None, 40) == 2.4
    assert cost_with_priors(96, 407.9, 10.0, 40) == round((96 + 40.79) / 40, 3)
    assert cost_with_priors(96, 407.9, None, 40) is None


def test_a_parallel_child_reports_the_priors_cost_not_its_cache_hit(tmp_path) -> None:
    """``--parallel`` children find the priors cached by their parent: they must report the seconds the
    profile took, not the ~0 s of their own cache hit (it made search_cost_with_priors ~20x too low)."""
    from benchmarks.harness.benchmark import RECIPES, Benchmark, priors_seconds

    out = tmp_path / "work"
    parent = Benchmark(RECIPES["tiny"], "tiny", out, tmp_path / "r.json", "test")
    parent._priors()
    child = Benchmark(RECIPES["tiny"], "tiny", out, tmp_path / "r.part-x.json", "test", part="uniform4_r16")
    child._priors()
    measured = parent.progress["priors_measured_s"]
    assert measured > 0 and child.progress["priors_measured_s"] == measured
    assert child.progress["priors_measured_cpu_s"] == parent.progress["priors_measured_cpu_s"] > 0
    priors = json.loads((out / "priors" / "priors.json").read_text())
    assert child.priors_cost_s == parent.priors_cost_s == priors_seconds(priors["timings_s"])[0]
