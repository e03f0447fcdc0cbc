"""Turn the plan-quality benchmark's measurements into its JSON summary, a markdown table and a plot.

Pure functions over plain dicts, so the arithmetic (gap closure, seed noise, step-time ratios) is unit
tested without running anything (tests/test_plan_quality_report.py).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

ORDER = ("unquantized_r16", "uniform4_r16", "uniform3_r16", "qra", "random", "tpe", "ilp", "greedy_priors")
CEILING = "unquantized_r16"  # LoRA r16 on the unquantized model, in the benchmark's compute dtype


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def gap_closure(loss: float | None, uniform: float | None, ceiling: float | None) -> float | None:
    """G = (L_uniform − L) / (L_uniform − L_ceiling): 0 = no better than the budget's uniform plan, 1 = the
    unquantized ceiling. Works for accuracy too (both differences change sign together)."""
    if loss is None or uniform is None or ceiling is None or uniform == ceiling:
        return None
    return (uniform - loss) / (uniform - ceiling)


def summarize_method(finals: list[dict[str, Any]], memory_key: str = "memory_measured") -> dict[str, Any]:
    """Mean/sd of the final eval loss and task accuracy over seeds, measured memory (max over seeds, the
    ``memory_key`` field of each result) and step time."""
    ok = [f for f in finals if f.get("status") == "ok" and f.get("eval_loss") is not None]
    mean, sd = mean_sd([float(f["eval_loss"]) for f in ok])
    accs = [float(f["accuracy"]) for f in ok if f.get("accuracy") is not None]
    acc_mean, acc_sd = mean_sd(accs)
    step_times = [f["train_s"] / f["steps"] for f in ok if f.get("train_s") and f.get("steps")]
    measured = [int(f[memory_key]) for f in ok if f.get(memory_key)]
    return {
        "final_eval_loss_mean": _r(mean),
        "final_eval_loss_sd": _r(sd),
        "final_eval_losses": [_r(float(f["eval_loss"])) for f in ok],
        "final_accuracy_mean": _r(acc_mean),
        "final_accuracy_sd": _r(acc_sd),
        "final_accuracies": [_r(a) for a in accs],
        "seeds": [int(f["seed"]) for f in ok],
        "failed_seeds": [int(f["seed"]) for f in finals if f not in ok],
        "memory_measured": max(measured) if measured else None,
        "step_s": _r(statistics.fmean(step_times)) if step_times else None,
        "final_wall_s": round(sum(float(f.get("wall_s") or 0.0) for f in ok), 1),
    }


def difference(a: dict[str, Any], b: dict[str, Any], metric: str = "final_eval_loss") -> dict[str, Any] | None:
    """a − b in ``metric`` with the standard error of the difference (independent seeds); ``resolved`` when
    |a − b| > 2 s.e."""
    ma, mb = a.get(f"{metric}_mean"), b.get(f"{metric}_mean")
    if ma is None or mb is None:
        return None
    se = math.sqrt(_standard_error(a, metric) ** 2 + _standard_error(b, metric) ** 2)
    diff = ma - mb
    return {"diff": _r(diff), "se": _r(se), "resolved": bool(abs(diff) > 2 * max(se, 1e-12))}


def budget_summary(
    methods: dict[str, dict[str, Any]], uniform_name: str, *, ceiling_name: str = CEILING
) -> dict[str, Any]:
    """Add G (eval loss) and G_accuracy to every method, qra's difference to every other method, and say
    whether the budget's quality gap is resolvable given seed noise (> 2 standard errors).

    ``methods[name]`` holds ``summarize_method`` output plus search facts (memory_predicted, search_cost,
    evaluations, wall_s).
    """
    uniform = methods.get(uniform_name, {})
    ceiling = methods.get(ceiling_name, {})
    lu, lb = uniform.get("final_eval_loss_mean"), ceiling.get("final_eval_loss_mean")
    au, ab = uniform.get("final_accuracy_mean"), ceiling.get("final_accuracy_mean")
    for m in methods.values():
        m["G"] = _r(gap_closure(m.get("final_eval_loss_mean"), lu, lb))
        m["G_accuracy"] = _r(gap_closure(m.get("final_accuracy_mean"), au, ab))
        pred, meas = m.get("memory_predicted"), m.get("memory_measured")
        m["memory_error"] = _r((pred - meas) / meas) if pred and meas else None
    gap = difference(uniform, ceiling)
    step_ratio = None
    qra_step, uni_step = methods.get("qra", {}).get("step_s"), uniform.get("step_s")
    if qra_step and uni_step:
        step_ratio = qra_step / uni_step
    qra = methods.get("qra", {})
    versus = {
        name: {"eval_loss": difference(qra, m), "accuracy": difference(qra, m, "final_accuracy")}
        for name, m in methods.items()
        if name != "qra" and qra
    }
    return {
        "uniform_method": uniform_name,
        "gap_nats": gap["diff"] if gap else None,
        "gap_standard_error": gap["se"] if gap else None,
        "gap_resolvable": bool(gap and gap["diff"] > 2 * max(gap["se"], 1e-12)),
        "step_time_ratio_qra_vs_uniform": _r(step_ratio),
        "qra_minus": versus,
        "methods": methods,
    }


def _standard_error(method: dict[str, Any], metric: str = "final_eval_loss") -> float:
    sd, n = method.get(f"{metric}_sd") or 0.0, len(method.get("seeds") or [])
    return sd / math.sqrt(n) if n else float("inf")


def _r(value: float | None, digits: int = 5) -> float | None:
    return None if value is None else round(float(value), digits)


# ------------------------------------------------------------------------------------------ outputs
def markdown(results: dict[str, Any]) -> str:
    """The protocol, then one table per budget (methods in a fixed order), then planner compute."""
    proto = results.get("protocol", {})
    lines = [f"# Plan quality ({results.get('recipe', '?')} recipe)", "", f"Command: `{results['command']}`", ""]
    if proto:
        rows = proto.get("split_rows", {})
        lines += [
            f"Protocol: train {rows.get('train')} / selection {rows.get('selection')} / test {rows.get('test')} rows "
            f"(disjoint: {proto.get('splits_disjoint')}; fidelities score on selection, finals on test only); "
            f"finals {proto.get('final_steps')} steps (high fidelity {proto.get('high_steps')}); "
            f"compute dtype {proto.get('compute_dtype')}; TPE start-up {proto.get('tpe_startup')} trials; "
            f"task: {proto.get('task')}. Model: {results.get('model_provenance', '?')}",
            "",
        ]
    for name, budget in results["budgets"].items():
        lines += _budget_table(name, budget)
    extra = results.get("planner")
    if extra:
        lines += ["## Planner compute", "", "| budget | planner s / proposal | one evaluation (s, mean) | ratio |"]
        lines.append("|---|---|---|---|")
        for name, p in extra.items():
            lines.append(
                f"| {name} | {_f(p['planner_s_per_proposal'], 3)} | {_f(p['evaluation_s_mean'], 1)} | "
                f"{_f(p['ratio'], 4)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _budget_table(name: str, budget: dict[str, Any]) -> list[str]:
    kind = budget["budget_kind"]
    lines = [
        f"## Budget {name} ({budget['budget']}: {budget['budget_bytes'] / 2**20:.2f} MiB, kind {kind})",
        "",
        f"Gap {budget['uniform_method']} − {CEILING}: {_f(budget['gap_nats'], 4)} nats "
        f"(± {_f(budget['gap_standard_error'], 4)} s.e.; resolvable at 2 s.e.: {budget['gap_resolvable']}). "
        f"Step-time ratio qra / {budget['uniform_method']}: {_f(budget['step_time_ratio_qra_vs_uniform'], 3)}.",
        "",
        "| method | test eval loss (mean ± sd) | task accuracy (mean ± sd) | seeds | G | G_acc | "
        f"{kind} memory predicted / measured (MiB) | search cost (finals; with priors) | evaluations | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in sorted(budget["methods"], key=lambda m: ORDER.index(m) if m in ORDER else 99):
        m = budget["methods"][method]
        lines.append(
            f"| {method} | {_f(m['final_eval_loss_mean'], 4)} ± {_f(m['final_eval_loss_sd'], 4)} | "
            f"{_f(m.get('final_accuracy_mean'), 3)} ± {_f(m.get('final_accuracy_sd'), 3)} | {len(m['seeds'])} | "
            f"{_f(m['G'], 2)} | {_f(m.get('G_accuracy'), 2)} | "
            f"{_mib(m['memory_predicted'])} / {_mib(m['memory_measured'])} | "
            f"{_f(m['search_cost'], 2)}; {_f(m.get('search_cost_with_priors'), 2)} | {m['evaluations']} | "
            f"{_f(m['wall_s'], 0)} |"
        )
    versus = budget.get("qra_minus") or {}
    if versus:
        lines += [
            "",
            "qra − method (negative loss / positive accuracy difference = qra better; * = beyond 2 s.e.):",
            "",
        ]
        for other, d in versus.items():
            loss, acc = d.get("eval_loss"), d.get("accuracy")
            shown = [
                f"loss {_f(loss['diff'], 4)} ± {_f(loss['se'], 4)}{'*' if loss['resolved'] else ''}" if loss else "",
                f"accuracy {_f(acc['diff'], 3)} ± {_f(acc['se'], 3)}{'*' if acc['resolved'] else ''}" if acc else "",
            ]
            lines.append(f"- vs {other}: " + "; ".join(x for x in shown if x))
    return [*lines, ""]


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
            "tab:green" if m == "qra" else "tab:gray" if m.startswith(("unquantized", "uniform")) else "tab:blue"
            for m in names
        ]
        ax.bar(range(len(names)), means, yerr=sds, color=colors, capsize=3)
        finite = [v for v in means if v == v]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3) - 0.01, hi + 0.15 * (hi - lo + 1e-3) + 0.01)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_ylabel("final test eval loss")
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
