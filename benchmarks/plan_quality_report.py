"""Turn the plan-quality benchmark's measurements into its JSON summary, a markdown table and a plot.

Pure functions over plain dicts, so the arithmetic (gap closure, seed noise, step-time ratios) is unit
tested without running anything (tests/test_plan_quality_report.py).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

ORDER = ("bf16_r16", "uniform4_r16", "uniform3_r16", "qra", "random", "tpe", "ilp", "greedy_priors")


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gap_closure(loss: float | None, uniform: float | None, ceiling: float | None) -> float | None:
    """G = (L_uniform − L) / (L_uniform − L_bf16): 0 = no better than the budget's uniform plan, 1 = bf16."""
    if loss is None or uniform is None or ceiling is None or uniform == ceiling:
        return None
    return (uniform - loss) / (uniform - ceiling)


def summarize_method(finals: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/sd of the final eval loss over seeds, measured memory (max over seeds) and step time."""
    ok = [f for f in finals if f.get("status") == "ok" and f.get("eval_loss") is not None]
    mean, sd = mean_sd([float(f["eval_loss"]) for f in ok])
    step_times = [f["train_s"] / f["steps"] for f in ok if f.get("train_s") and f.get("steps")]
    measured = [int(f["memory_measured"]) for f in ok if f.get("memory_measured")]
    return {
        "final_eval_loss_mean": _r(mean),
        "final_eval_loss_sd": _r(sd),
        "final_eval_losses": [_r(float(f["eval_loss"])) for f in ok],
        "seeds": [int(f["seed"]) for f in ok],
        "failed_seeds": [int(f["seed"]) for f in finals if f not in ok],
        "memory_measured": max(measured) if measured else None,
        "step_s": _r(statistics.fmean(step_times)) if step_times else None,
        "final_wall_s": round(sum(float(f.get("wall_s") or 0.0) for f in ok), 1),
    }


def budget_summary(
    methods: dict[str, dict[str, Any]], uniform_name: str, *, ceiling_name: str = "bf16_r16"
) -> dict[str, Any]:
    """Add G to every method and say whether the budget's quality gap is resolvable given seed noise.

    ``methods[name]`` holds ``summarize_method`` output plus search facts (memory_predicted, search_cost,
    evaluations, wall_s). The gap is called resolvable when L_uniform − L_bf16 exceeds three standard
    errors of that difference (independent seeds).
    """
    uniform = methods.get(uniform_name, {})
    ceiling = methods.get(ceiling_name, {})
    lu, lb = uniform.get("final_eval_loss_mean"), ceiling.get("final_eval_loss_mean")
    for m in methods.values():
        g = gap_closure(m.get("final_eval_loss_mean"), lu, lb)
        m["G"] = _r(g)
        pred, meas = m.get("memory_predicted"), m.get("memory_measured")
        m["memory_error"] = _r((pred - meas) / meas) if pred and meas else None
    gap = se = None
    if lu is not None and lb is not None:
        gap = lu - lb
        se = _standard_error(uniform) ** 2 + _standard_error(ceiling) ** 2
        se = math.sqrt(se)
    step_ratio = None
    qra_step, uni_step = methods.get("qra", {}).get("step_s"), uniform.get("step_s")
    if qra_step and uni_step:
        step_ratio = qra_step / uni_step
    return {
        "uniform_method": uniform_name,
        "gap_nats": _r(gap),
        "gap_standard_error": _r(se),
        "gap_resolvable": bool(gap is not None and se is not None and gap > 3 * max(se, 1e-12)),
        "step_time_ratio_qra_vs_uniform": _r(step_ratio),
        "methods": methods,
    }


def _standard_error(method: dict[str, Any]) -> float:
    sd, n = method.get("final_eval_loss_sd") or 0.0, len(method.get("seeds") or [])
    return sd / math.sqrt(n) if n else float("inf")


def _r(value: float | None, digits: int = 5) -> float | None:
    return None if value is None else round(float(value), digits)


# ------------------------------------------------------------------------------------------ outputs
def markdown(results: dict[str, Any]) -> str:
    """One table per budget, methods in a fixed order, plus the run's facts."""
    lines = [f"# Plan quality ({results.get('recipe', '?')} recipe)", "", f"Command: `{results['command']}`", ""]
    for name, budget in results["budgets"].items():
        lines += [
            f"## Budget {name} ({budget['budget']}: {budget['budget_bytes'] / 2**20:.2f} MiB {budget['budget_kind']})",
            "",
            f"Gap {budget['uniform_method']} − bf16_r16: {_f(budget['gap_nats'], 4)} nats "
            f"(± {_f(budget['gap_standard_error'], 4)} s.e.; resolvable: {budget['gap_resolvable']}). "
            f"Step-time ratio qra / {budget['uniform_method']}: {_f(budget['step_time_ratio_qra_vs_uniform'], 3)}.",
            "",
            "| method | final eval loss (mean ± sd) | seeds | G | memory predicted / measured (MiB) | "
            "search cost (final fine-tunes) | evaluations | wall (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method in sorted(budget["methods"], key=lambda m: ORDER.index(m) if m in ORDER else 99):
            m = budget["methods"][method]
            lines.append(
                f"| {method} | {_f(m['final_eval_loss_mean'], 4)} ± {_f(m['final_eval_loss_sd'], 4)} | "
                f"{len(m['seeds'])} | {_f(m['G'], 2)} | {_mib(m['memory_predicted'])} / {_mib(m['memory_measured'])} | "
                f"{_f(m['search_cost'], 2)} | {m['evaluations']} | {_f(m['wall_s'], 0)} |"
            )
        lines.append("")
    extra = results.get("planner")
    if extra:
        lines += [
            "## Planner compute",
            "",
            "| budget | planner s / proposal | one evaluation (s, mean) | ratio |",
            "|---|---|---|---|",
        ]
        for name, p in extra.items():
            lines.append(
                f"| {name} | {_f(p['planner_s_per_proposal'], 3)} | {_f(p['evaluation_s_mean'], 1)} | "
                f"{_f(p['ratio'], 4)} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Final eval loss (mean ± sd over seeds) per method, one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(results["budgets"].items())
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, (name, budget) in zip(axes[0], budgets, strict=True):
        names = [m for m in sorted(budget["methods"], key=lambda m: ORDER.index(m) if m in ORDER else 99)]
        means = [budget["methods"][m]["final_eval_loss_mean"] or float("nan") for m in names]
        sds = [budget["methods"][m]["final_eval_loss_sd"] or 0.0 for m in names]
        colors = [
            "tab:green" if m == "qra" else "tab:gray" if m.startswith(("bf16", "uniform")) else "tab:blue"
            for m in names
        ]
        ax.bar(range(len(names)), means, yerr=sds, color=colors, capsize=3)
        finite = [v for v in means if v == v]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3) - 0.01, hi + 0.15 * (hi - lo + 1e-3) + 0.01)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_ylabel("final held-out eval loss")
        ax.set_title(f"{name}: {budget['budget_bytes'] / 2**20:.1f} MiB {budget['budget_kind']}")
    fig.tight_layout()
    from io import BytesIO

    from qra_plugin.io import write_bytes_atomic

    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def _f(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mib(value: int | None) -> str:
    return "—" if not value else f"{value / 2**20:.1f}"
