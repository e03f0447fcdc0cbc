"""``report.html`` + PNGs of a search: Pareto front, per-unit bits and ranks, search trace, priors.

Plain matplotlib (Agg) images next to one self-contained HTML page, so a search on a headless machine
leaves something a person can open. Every file is rendered in memory and renamed into place.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from planner.memory import PART_LABELS, estimate
from planner.orchestration.setup import PLAN_FILE
from planner.priors.plot import plot_priors
from planner.search.pareto import Point
from planner.search.space import Allocation, SearchSpace, allocation_key
from qra_plugin.io import write_bytes_atomic, write_text_atomic

STAGE_COLOURS = {"stage1": "tab:blue", "stage2": "tab:orange", "baseline": "tab:purple", "confirm": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _plt().close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def plot_pareto(path: Path, points: Sequence[Point], front: Sequence[Point], best: Point, budget: int) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    mib = 2.0**20
    for stage, colour in STAGE_COLOURS.items():
        pts = [p for p in points if p.stage == stage]
        if pts:
            ax.scatter([p.memory / mib for p in pts], [p.score for p in pts], s=18, c=colour, alpha=0.6, label=stage)
    ax.step([p.memory / mib for p in front], [p.score for p in front], where="post", c="k", lw=1, label="Pareto front")
    ax.scatter([best.memory / mib], [best.score], marker="*", s=220, c="gold", edgecolors="k", zorder=5, label="plan")
    ax.axvline(budget / mib, ls="--", c="tab:red", lw=1, label="budget")
    ax.set_xlabel("predicted training memory (MiB)")
    ax.set_ylabel("high-fidelity eval loss")
    ax.legend(fontsize=8)
    ax.set_title("quality / memory")
    fig.tight_layout()
    return _save(fig, path)


def plot_plan(path: Path, space: SearchSpace, best: Point) -> Path:
    plt = _plt()
    n = space.n_units
    rows = 3 if space.prune else 2
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.5, 0.25 * n), 2.4 * rows), sharex=True)
    ax_b, ax_r = axes[0], axes[1]
    ax_b.bar(range(n), [u[0] for u in best.config], color="tab:blue")
    ax_b.set_ylabel("bits")
    ax_b.set_yticks(sorted(set(space.bits)))
    ax_r.bar(range(n), [u[1] for u in best.config], color="tab:green")
    ax_r.set_ylabel("LoRA rank")
    if space.prune:
        axes[2].bar(range(n), [u[2] for u in best.config], color="tab:red")
        axes[2].set_ylabel("pruned fraction")
    axes[-1].set_xlabel(f"{space.unit} index")
    ax_b.set_title("chosen plan per unit")
    fig.tight_layout()
    return _save(fig, path)


def plot_trace(path: Path, trace: Sequence[dict[str, Any]]) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    markers = {"low": "o", "high": "s", "confirm": "*"}
    for stage, colour in STAGE_COLOURS.items():
        for level, marker in markers.items():
            rows = [r for r in trace if r["stage"] == stage and r["level"] == level and r["score"] is not None]
            if rows:
                ax.scatter(
                    [r["index"] for r in rows],
                    [r["score"] for r in rows],
                    c=colour,
                    marker=marker,
                    s=20,
                    label=f"{stage} {level}",
                )
    failed = [r for r in trace if r["score"] is None]
    scores = [r["score"] for r in trace if r["score"] is not None]
    if failed:  # drawn at the worst finished score so they do not stretch the axis
        top = max(scores) if scores else 0.0
        ax.scatter([r["index"] for r in failed], [top] * len(failed), c="tab:red", marker="x", s=40, label="failed")
    best, xs, ys = float("inf"), [], []
    for r in trace:
        if r["level"] == "high" and r["score"] is not None:
            best = min(best, r["score"])
            xs.append(r["index"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", c="k", lw=1, label="best high so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("eval loss")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("search trace by stage and fidelity")
    fig.tight_layout()
    return _save(fig, path)


def write_report(
    out: Path,
    space: SearchSpace,
    priors: Any,
    summary: dict[str, Any],
    points: Sequence[Point],
    front: Sequence[Point],
    best: Point,
) -> Path:
    """Write the PNGs and ``report.html`` into ``out``; return the HTML path."""
    plot_pareto(out / "pareto.png", points, front, best, summary["budget_bytes"])
    plot_plan(out / "plan.png", space, best)
    plot_trace(out / "trace.png", summary["evaluations"])
    priors_png = out / "priors.png"
    if priors is not None and not priors_png.is_file():
        plot_priors(priors, priors_png)
    trace = summary["evaluations"]
    counts: dict[tuple[str, str], int] = {}
    for r in trace:
        counts[(r["stage"], r["level"])] = counts.get((r["stage"], r["level"]), 0) + 1
    failed = sum(r["score"] is None for r in trace)
    fails = summary.get("failures") or {}
    mib = 2.0**20

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    rows = "".join(
        f"<tr><td>{p.score:.4f}</td><td>{p.memory / mib:.2f}</td>"
        f"<td>{'yes' if p.memory <= summary['budget_bytes'] else 'no'}</td>"
        f"<td>{html.escape(p.stage)}</td><td><code>{html.escape(allocation_key(p.config))}</code></td></tr>"
        for p in front
    )
    evals = "".join(f"<li>{s} / {lv}: {n}</li>" for (s, lv), n in sorted(counts.items()))
    ratio = summary["search_steps"] / summary["final_finetune_steps"] if summary["final_finetune_steps"] else None
    name, scored = html.escape(summary["name"]), html.escape(summary.get("objective", "high-fidelity eval loss"))
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>qra search: {name}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td,th{{padding:2px 8px}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}img{{max-width:100%}}</style></head><body>
<h1>qra search: {html.escape(summary["name"])}</h1>
<p>Budget <b>{html.escape(summary["budget"])}</b> = {summary["budget_bytes"] / mib:.2f} MiB.
Chosen plan: {scored} <b>{best.score:.4f}</b> at {best.memory / mib:.2f} MiB
(<code>{html.escape(allocation_key(best.config))}</code>), seed {summary["seed"]}.</p>
<ul><li>evaluations (every one a real SFT run): {len(trace)}, failed {failed}
(in the store for this recipe: {fails.get("transient", 0)} transient — timeout, OOM, dead worker, retried once on
resume — and {fails.get("deterministic", 0)} deterministic — the plan raised or its loss was not finite)</li>{evals}
<li>GP fits that failed (prior hyperparameters used instead): {summary.get("gp_fit_failures", 0)}</li>
<li>performance model held-out Spearman (low→high fidelity): {fmt(summary["surrogate_spearman"])};
screening model: {fmt(summary["screening_spearman"])}</li>
<li>search cost: {summary["search_steps"]} optimizer steps
= {fmt(ratio)} × the high-fidelity run ({summary["final_finetune_steps"]} steps)</li>
<li>stage 2 trust-region restarts: {summary["stage2_restarts"]}</li>
<li>uniform baseline <code>{html.escape(str(summary.get("baseline")))}</code>: high-fidelity eval loss
{fmt(summary.get("baseline_score"))}</li></ul>
<h2>Pareto front</h2><img src="pareto.png" alt="pareto front">
<table><tr><th>eval loss</th><th>MiB</th><th>fits</th><th>stage</th><th>bits/rank per unit</th></tr>{rows}</table>
<h2>Chosen plan</h2><img src="plan.png" alt="bits and ranks per unit">
{_memory_html(summary.get("memory_comparison"))}
{_next_steps_html(summary)}
<h2>Search trace</h2><img src="trace.png" alt="search trace">
<h2>Priors</h2><img src="priors.png" alt="priors">
</body></html>
"""
    return write_text_atomic(out / "report.html", body)


def next_facts(run: Any, best: Allocation, summary: dict[str, Any]) -> dict[str, Any]:
    """What the report tells a fine-tuner: memory of the chosen vs the uniform plan, the gain, next commands
    (``run``: the search's state, ``planner.orchestration.search_run._Run``)."""

    s, job = run.setup, run.setup.settings
    comparison = {
        "setting": f"batch {job.batch} x {job.seq_len} tokens, {job.optimizer}, gradient checkpointing "
        f"{'on' if job.grad_checkpointing else 'off'}, {job.precision}",
        "chosen": estimate(s.info, s.space.to_plan(best), job).to_dict(),
    }
    baseline = s.budget_plan()
    if baseline is not None:
        comparison["uniform"] = estimate(s.info, s.space.to_plan(baseline), job).to_dict()
    base = summary.get("baseline_score")
    model = run.cfg.model.path or "<model dir>"
    facts = {
        "memory_comparison": comparison,
        "predicted_gain": round(base - summary["best_score"], 6) if base is not None else None,
        "eval_split": run.cfg.data.eval_split,
        "seeds": len(run.cfg.fidelity.seeds),
        "plan_path": str(run.plan_target or run.out / PLAN_FILE),
        "estimate_command": f"qra estimate --model {model} --plan {run.out / PLAN_FILE} "
        f"--batch {job.batch} --seq-len {job.seq_len}",
    }
    if run.axolotl_config is not None:
        facts["train_command"] = f"axolotl train {run.axolotl_config}"
        facts["estimate_command"] = f"qra estimate {run.axolotl_config} --plan {facts['plan_path']}"
    return facts


def _confirm_html(confirm: dict[str, Any] | None) -> str:
    """The finalists' scores at the confirm fidelity: the longer runs that chose the plan."""
    if not confirm:
        return ""

    def score(value: float | None) -> str:
        return "failed" if value is None else f"{value:.4f}"

    rows = "".join(
        f"<tr><td><code>{html.escape(r['config'])}</code></td><td>{html.escape(r['free_allocation'] or '')}</td>"
        f"<td>{score(r['high'])}</td><td>{score(r['confirm'])}</td></tr>"
        for r in confirm["finalists"]
    )
    changed = " <b>They changed the choice</b> from the high-fidelity best." if confirm["changed_choice"] else ""
    return (
        f"<p>The plan was chosen by {confirm['steps']}-step runs of the finalists (one seed each).{changed}</p>"
        f"<table><tr><th>plan</th><th>free allocation</th><th>high</th><th>confirm</th></tr>{rows}</table>"
    )


def _parts() -> tuple[tuple[str, str], ...]:

    return (*PART_LABELS, ("plan_scaled", "what scales with the plan"), ("total", "predicted peak"))


def _memory_html(comparison: dict[str, Any] | None) -> str:
    """The chosen plan's predicted memory next to the budget's uniform plan's, part by part (MiB)."""
    if not comparison:
        return ""
    chosen, uniform = comparison["chosen"], comparison.get("uniform")
    mib = 2.0**20
    rows = "".join(
        f"<tr><td>{label}</td><td>{chosen[key] / mib:.2f}</td>"
        + (f"<td>{uniform[key] / mib:.2f}</td><td>{(chosen[key] - uniform[key]) / mib:+.2f}</td>" if uniform else "")
        + "</tr>"
        for key, label in _parts()
    )
    head = "<th>part</th><th>chosen (MiB)</th>" + ("<th>uniform plan (MiB)</th><th>difference</th>" if uniform else "")
    setting = html.escape(comparison.get("setting", ""))
    return f"<h2>Memory, part by part</h2><p>{setting}</p><table><tr>{head}</tr>{rows}</table>"


def _next_steps_html(summary: dict[str, Any]) -> str:
    """What to run next with the plan: Axolotl, TRL, and the memory estimate."""
    plan = html.escape(summary.get("plan_path", "plan.yaml"))
    gain = summary.get("predicted_gain")
    said = (
        f"<p>Predicted gain over the budget's uniform plan: <b>{gain:+.4f}</b> in "
        f"{html.escape(summary.get('objective', 'nats of eval loss'))} on the "
        f"{html.escape(summary.get('eval_split', 'selection'))} split at the high fidelity "
        f"({summary.get('seeds', 1)} seed(s); a final fine-tune with several seeds decides).</p>"
        if gain is not None
        else ""
    )
    if summary.get("best_is_free_allocation"):
        said += (
            f"<p><b>The prior allocation is already the best found</b>: the plan is the "
            f"{html.escape(summary['best_is_free_allocation'])} allocation, which costs no evaluation.</p>"
        )
        if summary.get("within_noise_of_free"):
            said += (
                f"<p>The best evaluated plan beat it by only {summary['within_noise_of_free']['gain']:.4f} nats, "
                "inside <code>search.min_gain</code> (the seed noise): set aside.</p>"
            )
    elif summary.get("gain_over_best_free") is not None and not summary.get("confirm"):
        said += (
            f"<p>Against the best allocation that costs no evaluation "
            f"({html.escape(str(summary['best_free_allocation']))}): <b>{summary['gain_over_best_free']:+.4f}</b> "
            "nats at the high fidelity (one seed).</p>"
        )
    said += _confirm_html(summary.get("confirm"))
    estimate = html.escape(summary.get("estimate_command", ""))
    if summary.get("train_command"):  # planned from an Axolotl YAML: it already reads the plan
        return f"""<h2>Next</h2>{said}
<p>The plan is written where the config's <code>qra_plan</code> points ({plan}); train with it:</p>
<pre>{html.escape(summary["train_command"])}</pre>
<p>Memory of this exact training config: <code>{estimate}</code></p>"""
    return f"""<h2>Next</h2>{said}
<p>Axolotl: add to your training YAML and run <code>axolotl train your.yaml</code>:</p>
<pre>plugins:
  - qra_plugin.QRAPlugin
qra_plan: {plan}
adapter: lora
lora_mlp_kernel: false   # Axolotl's Triton LoRA kernels do not take HQQ base layers
lora_qkv_kernel: false
lora_o_kernel: false</pre>
<p>TRL (<code>example_configs/train_trl.py</code> is a complete script):</p>
<pre>from qra_plugin import Plan, QRACallback, apply_plan
model = apply_plan(AutoModelForCausalLM.from_pretrained(path), Plan.load("{plan}"))
trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, callbacks=[QRACallback()])</pre>
<p>Memory for another batch or sequence length: <code>{estimate}</code></p>"""
