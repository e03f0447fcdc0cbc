"""Turn the plan-quality benchmark's measurements into its JSON summary, a markdown table and a plot.

Pure functions over plain dicts, so the arithmetic (gap closure, paired seed statistics, step-time ratios) is unit
tested without running anything (tests/test_plan_quality_report.py). Every comparison is paired by seed
(``planner.stats``): the same seed gives two methods the same data order and LoRA init.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from planner.stats import T_CRIT_DF2, Comparison, paired
from planner.stats import markdown as comparison_text

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
    """Mean/sd of the final eval loss and task accuracy over seeds, the per-seed values (what the paired
    comparisons read), measured memory (max over seeds, the ``memory_key`` field of each result) and step time."""
    ok = [f for f in finals if f.get("status") == "ok" and f.get("eval_loss") is not None]
    mean, sd = mean_sd([float(f["eval_loss"]) for f in ok])
    with_acc = [f for f in ok if f.get("accuracy") is not None]
    accs = [float(f["accuracy"]) for f in with_acc]
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
        "final_accuracy_seeds": [int(f["seed"]) for f in with_acc],
        "seeds": [int(f["seed"]) for f in ok],
        "failed_seeds": [int(f["seed"]) for f in finals if f not in ok],
        "memory_measured": max(measured) if measured else None,
        "step_s": _r(statistics.fmean(step_times)) if step_times else None,
        "final_wall_s": round(sum(float(f.get("wall_s") or 0.0) for f in ok), 1),
    }


def per_seed(method: dict[str, Any], metric: str = "final_eval_loss") -> dict[int, float]:
    """seed -> final value of a ``summarize_method`` summary; ``metric`` is final_eval_loss or final_accuracy.

    Results written before ``final_accuracy_seeds`` existed align accuracies with ``seeds`` when the counts agree.
    """
    if metric == "final_eval_loss":
        values, seeds = method.get("final_eval_losses") or [], method.get("seeds") or []
    else:
        values = method.get("final_accuracies") or []
        seeds = method.get("final_accuracy_seeds", method.get("seeds")) or []
    if len(values) != len(seeds):
        return {}
    return {int(s): float(v) for s, v in zip(seeds, values, strict=True) if v is not None}


def compare(a: dict[str, Any], b: dict[str, Any], metric: str = "final_eval_loss") -> Comparison:
    """a − b in ``metric``, paired by seed (the seeds both have)."""
    return paired(per_seed(a, metric), per_seed(b, metric))


def short(c: Comparison) -> dict[str, Any] | None:
    """The round-2 shape ``{diff, se, resolved}`` (``qra_minus`` keeps it), now from the paired test."""
    if c.mean is None:
        return None
    return {"diff": _r(c.mean), "se": _r(c.se), "resolved": c.resolved}


def comparisons(
    methods: dict[str, dict[str, Any]], uniform_name: str, *, ceiling_name: str = CEILING
) -> dict[str, Any]:
    """The budget's statistics, all paired by seed: the quality gap (uniform − ceiling), qra − every method on
    test loss (``paired``) and task accuracy (``paired_accuracy``), and the round-2 keys in their old shape."""
    gap = compare(methods.get(uniform_name, {}), methods.get(ceiling_name, {}))
    qra = methods.get("qra")
    others = [name for name in methods if name != "qra"] if qra else []
    loss = {name: compare(qra, methods[name]) for name in others}
    accuracy = {name: compare(qra, methods[name], "final_accuracy") for name in others}
    return {
        "statistics": STATISTICS,
        "gap_nats": _r(gap.mean),
        "gap_standard_error": _r(gap.se),
        "gap_resolvable": bool(gap.resolved and gap.mean is not None and gap.mean > 0),
        "gap_paired": gap.as_dict(),
        "qra_minus": {name: {"eval_loss": short(loss[name]), "accuracy": short(accuracy[name])} for name in others},
        "paired": {f"qra-{name}": c.as_dict() for name, c in loss.items()},
        "paired_accuracy": {f"qra-{name}": c.as_dict() for name, c in accuracy.items()},
    }


STATISTICS = (
    f"paired by seed (planner.stats): mean ± s.e. of the per-seed difference, paired t with df = n − 1; resolved "
    f"= two-sided p < 0.05 (at n = 3, df 2: |t| > {T_CRIT_DF2:.2f}); perm_p = exact sign-flip p (≥ 0.25 at n = 3)"
)


def budget_summary(
    methods: dict[str, dict[str, Any]], uniform_name: str, *, ceiling_name: str = CEILING
) -> dict[str, Any]:
    """Add G (eval loss) and G_accuracy to every method, then the budget's paired statistics (``comparisons``):
    whether the quality gap is resolvable and qra − every other method.

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
    step_ratio = None
    qra_step, uni_step = methods.get("qra", {}).get("step_s"), uniform.get("step_s")
    if qra_step and uni_step:
        step_ratio = qra_step / uni_step
    return {
        "uniform_method": uniform_name,
        **comparisons(methods, uniform_name, ceiling_name=ceiling_name),
        "step_time_ratio_qra_vs_uniform": _r(step_ratio),
        "methods": methods,
    }


def reread(path: Path) -> dict[str, Any]:
    """Recompute every budget's statistics of a written result from the per-seed finals it holds (no run, no
    store), keep every other key, and rewrite the JSON and its markdown (the plot shows means and sds only)."""
    from qra_plugin.io import write_json_atomic, write_text_atomic

    results = json.loads(path.read_text())
    lacking = [name for name, budget in results["budgets"].items() if CEILING not in budget["methods"]]
    if lacking:  # round 1 named its ceiling bf16_r16 and had no accuracy: its tables are kept as written
        raise SystemExit(f"error: {path}: budget {lacking[0]} has no {CEILING} (a round-1 result?); nothing rewritten")
    for name, budget in results["budgets"].items():
        fresh = comparisons(budget["methods"], budget["uniform_method"])
        rewritten = {k: fresh.get(k, v) for k, v in budget.items() if k != "methods"}  # old keys keep their place
        results["budgets"][name] = {**rewritten, **fresh, "methods": budget["methods"]}
    write_json_atomic(path, results)
    write_text_atomic(path.with_suffix(".md"), markdown(results))
    return results


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
        f"Gap {budget['uniform_method']} − {CEILING}: {_gap_text(budget)} nats (paired by seed; resolvable: "
        f"{budget['gap_resolvable']}). "
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
    lines += _paired_table(budget)
    return [*lines, ""]


def _gap_text(budget: dict[str, Any]) -> str:
    gap = budget.get("gap_paired")
    return comparison_text(gap) if gap else f"{_f(budget['gap_nats'], 4)} ± {_f(budget['gap_standard_error'], 4)}"


def _paired_table(budget: dict[str, Any]) -> list[str]:
    """qra − every method, loss and accuracy, paired by seed."""
    loss, accuracy = budget.get("paired") or {}, budget.get("paired_accuracy") or {}
    if not loss:
        return []
    lines = [
        "",
        "qra − method, paired by seed: mean ± s.e. of the per-seed difference (paired t, df, two-sided p); "
        f"* = p < 0.05 (at n = 3 that needs |t| > {T_CRIT_DF2:.2f}); sign-flip p is exact and ≥ 0.25 at n = 3. "
        "Negative loss / positive accuracy = qra better.",
        "",
        "| qra − | test loss | sign-flip p | task accuracy |",
        "|---|---|---|---|",
    ]
    for key, d in loss.items():
        lines.append(
            f"| {key.removeprefix('qra-')} | {comparison_text(d)} | {_f(d.get('perm_p'), 3)} | "
            f"{comparison_text(accuracy.get(key), 3)} |"
        )
    return lines


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


# ------------------------------------------------------------------------------------------ method differences
DIFFERENCES_NOTE = (
    "Differences, paired by seed: mean ± s.e. of the per-seed difference (paired t, df, two-sided p); * = p < 0.05 "
    "(|t| > 4.30 at n = 3). Loss: negative = first better; accuracy: positive = first better."
)


def loss_and_accuracy(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a − b on test loss and on task accuracy, each paired by seed (``summarize_method`` summaries)."""
    return {"eval_loss": compare(a, b).as_dict(), "accuracy": compare(a, b, "final_accuracy").as_dict()}


def final_cells(method: dict[str, Any]) -> tuple[str, str]:
    """A method's table cells: final test loss as ``mean ± sd`` (4 decimals) and task accuracy (3), ``—`` if none."""
    loss, acc = method["final_eval_loss_mean"], method.get("final_accuracy_mean")
    shown = f"{loss:.4f} ± {method['final_eval_loss_sd']:.4f}" if loss is not None else "—"
    return shown, "—" if acc is None else f"{acc:.3f}"


def differences_table(differences: dict[str, dict[str, Any]], first: str = "first − second") -> list[str]:
    """Markdown rows of ``loss_and_accuracy`` results: loss, its sign-flip p, accuracy."""
    lines = [f"| {first} | test loss | sign-flip p | accuracy |", "|---|---|---|---|"]
    for name, both in differences.items():
        loss, acc = both["eval_loss"], both["accuracy"]
        perm = loss.get("perm_p") if loss else None
        lines.append(f"| {name} | {comparison_text(loss)} | {_f(perm, 3)} | {comparison_text(acc, 3)} |")
    return lines
