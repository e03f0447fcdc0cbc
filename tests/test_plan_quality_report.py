"""The plan-quality benchmark's arithmetic: gap closure, seed statistics, resolvability, step-time ratio."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from plan_quality_report import budget_summary, gap_closure, markdown, plot, summarize_method  # noqa: E402


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
        "unquantized_r16": summarize_method(_finals([2.000, 2.002, 1.998], accs=[0.60, 0.62, 0.58])),
        "uniform4_r16": summarize_method(_finals([2.100, 2.102, 2.098], step_s=0.40, accs=[0.40, 0.41, 0.39])),
        "qra": summarize_method(_finals([2.050, 2.052, 2.048], step_s=0.44, accs=[0.55, 0.56, 0.54])),
    }
    for m in methods.values():
        m.update({"memory_predicted": 1000, "search_cost": 1.0, "evaluations": 3, "wall_s": 10.0})
    s = budget_summary(methods, "uniform4_r16")
    assert s["methods"]["qra"]["G"] == pytest.approx(0.5)
    assert s["methods"]["unquantized_r16"]["G"] == pytest.approx(1.0)
    assert s["gap_nats"] == pytest.approx(0.1)
    assert s["gap_resolvable"] is True
    assert s["step_time_ratio_qra_vs_uniform"] == pytest.approx(1.1)
    assert s["methods"]["qra"]["memory_error"] == pytest.approx((1000 - 1002) / 1002, abs=1e-5)
    assert s["methods"]["qra"]["G_accuracy"] == pytest.approx(0.75)
    vs_uniform = s["qra_minus"]["uniform4_r16"]
    assert vs_uniform["eval_loss"]["diff"] == pytest.approx(-0.05) and vs_uniform["eval_loss"]["resolved"]
    assert vs_uniform["accuracy"]["diff"] == pytest.approx(0.15) and vs_uniform["accuracy"]["resolved"]

    noisy = {
        "unquantized_r16": summarize_method(_finals([2.0, 2.2, 1.8])),
        "uniform4_r16": summarize_method(_finals([2.05, 2.25, 1.85])),
    }
    assert budget_summary(noisy, "uniform4_r16")["gap_resolvable"] is False

    results = {
        "command": "x",
        "recipe": "test",
        "budgets": {"uniform4_r16": {"budget": "uniform:4bit:r16", "budget_bytes": 2**20, "budget_kind": "peak", **s}},
    }
    text = markdown(results)
    assert "| qra | 2.0500 ± 0.0020 | 0.550 ± 0.010 | 3 | 0.50 | 0.75 |" in text
    assert "- vs uniform4_r16: loss -0.0500 ±" in text
    plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(results)  # the summary is plain JSON
