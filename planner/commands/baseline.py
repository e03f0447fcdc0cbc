"""``qra baseline METHOD CONFIG --out DIR``: run one baseline planner under the config's budget."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("baseline")
    def baseline(
        method: str = typer.Argument(..., help="uniform | random | tpe | ilp | greedy_priors | table_alloc"),
        config: Path = typer.Argument(..., help="the same YAML config qra search takes (qra or Axolotl)"),
        out: Path = typer.Option(..., "--out", help="output directory (store.sqlite is shared and resumable)"),
        evaluations: int = typer.Option(8, help="high-fidelity evaluations for random / tpe"),
        rank: int | None = typer.Option(None, help="uniform rank for uniform / ilp (default: 16 if the space has it)"),
        bits: int | None = typer.Option(None, help="uniform bits (default: the most that fits the budget)"),
        seed: int | None = typer.Option(None, help="defaults to the config's seed"),
        executor: str | None = typer.Option(None, help="local | ray (default: the config's)"),
        score: bool = typer.Option(True, help="fine-tune the chosen plan once at the high fidelity (its score)"),
    ) -> None:
        """Choose a plan with a baseline method; writes OUT/METHOD/plan.yaml and result.json.

        ``table_alloc`` is the fast path: the error table (minutes, no fine-tuning) and its allocation, adapters
        starting from the quantization error (the init file beside the plan); ``--no-score`` skips its one run."""
        from planner.orchestration.baseline_run import run_baseline
        from planner.run_config import load_run_config

        run_baseline(
            load_run_config(config, out).config,
            out,
            method,
            evaluations=evaluations,
            rank=rank,
            bits=bits,
            seed=seed,
            executor_kind=executor,
            score_choice=score,
        )
