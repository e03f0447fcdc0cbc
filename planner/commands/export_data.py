"""``qra export-data``: write the wiki SFT split as an Axolotl alpaca jsonl."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("export-data")
    def export_data(
        out: Path = typer.Option(..., help="jsonl file to write"),
        split: str = typer.Option("train", help="train or eval (the fixed held-out split)"),
        n: int | None = typer.Option(None, help="number of rows (default: all)"),
        seed: int = typer.Option(0, help="shuffle seed"),
    ) -> None:
        """Export the bundled wiki summaries as instruction rows for `datasets: [{type: alpaca}]`."""
        from planner.data.wiki import write_alpaca_jsonl

        typer.echo(str(write_alpaca_jsonl(out, split, n, seed)))
