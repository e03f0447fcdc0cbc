"""``qra search CONFIG --out DIR``: the two-stage planner; re-running with the same DIR resumes."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_command(
        config: Path = typer.Argument(..., help="qra YAML config, or an Axolotl YAML with a qra: section"),
        out: Path | None = typer.Option(None, "--out", help="output directory (default runs/<name>)"),
        seed: int | None = typer.Option(
            None, "--seed", help="search seed (default: the config's seed); the priors keep the config's seed"
        ),
        executor: str | None = typer.Option(None, "--executor", help="local or ray (default: search.executor)"),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress"),
    ) -> None:
        """Write DIR/plan.yaml, DIR/pareto.json, DIR/report.html and DIR/store.sqlite (and an Axolotl YAML's
        qra_plan, so `axolotl train CONFIG` then trains with the plan)."""
        from planner.objectives import objective_for
        from planner.orchestration.search_run import PARETO_FILE, REPORT_FILE, run_search
        from planner.orchestration.setup import STORE_FILE
        from planner.run_config import load_run_config
        from qra_plugin.errors import QRAError

        if executor is not None and executor not in ("local", "ray"):
            raise QRAError(f"--executor must be 'local' or 'ray', not {executor!r}")
        run = load_run_config(config, out)
        cfg, out_dir = run.config, run.out_dir
        axolotl = config if run.axolotl else None
        result = run_search(
            cfg, out_dir, seed, executor, progress=progress, axolotl_config=axolotl, plan_target=run.plan_target
        )
        typer.echo(f"plan:   {run.plan_target or result.plan_path}")
        typer.echo(f"pareto: {out_dir / PARETO_FILE}")
        typer.echo(f"report: {out_dir / REPORT_FILE}")
        typer.echo(f"store:  {out_dir / STORE_FILE}")
        split, objective = cfg.data.eval_split, objective_for(cfg)
        typer.echo(
            f"best {objective.label} {objective.shown(result.best_score):.4f} on the {split} split at "
            f"{result.best_memory / 2**20:.2f} MiB "
            f"(budget {result.budget_bytes / 2**20:.2f} MiB); {result.evaluations} evaluations, "
            f"{result.computed} computed in this run"
        )
        if result.baseline_score is not None:
            gain = result.baseline_score - result.best_score
            unit = "nats" if objective.name == "eval_loss" else objective.label
            typer.echo(
                f"the budget's uniform plan: {objective.shown(result.baseline_score):.4f} at the same fidelity "
                f"→ gain {gain:+.4f} {unit} on {split} rows no run trained on (one seed; a final fine-tune decides)"
            )
        if run.axolotl:
            hint = "" if run.plan_target else f"  (first add `qra_plan: {result.plan_path}` to {config})"
            typer.echo(f"next:   axolotl train {config}{hint}")
