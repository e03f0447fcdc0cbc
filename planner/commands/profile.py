"""``qra profile CONFIG``: measure (or reuse) the layer-wise importance priors and chart them."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_command(
        config: Path = typer.Argument(..., help="qra YAML config, or an Axolotl YAML with a qra: section"),
        out: Path | None = typer.Option(None, "--out", help="output directory (default runs/<name>)"),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    ) -> None:
        """Write OUT/priors.json (I_q per bits and I_r per unit) and OUT/priors.png; reuse a matching cache."""
        from rich.console import Console
        from rich.table import Table

        from planner.orchestration.setup import exclusive_run
        from planner.priors.profile import CHART_FILE, PRIORS_FILE, profile
        from planner.run_config import load_run_config

        run = load_run_config(config, out)
        cfg, out_dir = run.config, run.out_dir
        with exclusive_run(out_dir):  # one planner process per directory, as for qra search
            priors = profile(cfg, out_dir, progress=progress)
        table = Table(title=f"priors ({priors.unit} units)")
        table.add_column("unit")
        for b in sorted(priors.I_q):
            table.add_column(f"I_q {b}b", justify="right")
        table.add_column("I_r", justify="right")
        for i, name in enumerate(priors.units):
            row = [f"{priors.I_q[b][i]:.4g}" for b in sorted(priors.I_q)]
            table.add_row(name, *row, f"{priors.I_r[i]:.4g}")
        console = Console()
        console.print(table)
        console.print(f"wrote {out_dir / PRIORS_FILE} and {out_dir / CHART_FILE}")
