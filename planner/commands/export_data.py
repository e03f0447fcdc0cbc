"""``qra export-data``: write a split of the shipped wiki data as jsonl for Axolotl or a TRL script."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("export-data")
    def export_data(
        out: Path = typer.Option(..., help="jsonl file to write"),
        split: str = typer.Option("train", help="train, selection or test (fixed, disjoint splits)"),
        n: int | None = typer.Option(None, help="number of rows (default: all)"),
        seed: int = typer.Option(0, help="shuffle seed"),
        fmt: str = typer.Option(
            "alpaca",
            "--format",
            help="alpaca (Axolotl type: alpaca), prompt-completion, messages, or lm-eval-topic (the rows of the "
            "shipped lm-eval task qra_wiki_topic; selection or test split only)",
        ),
    ) -> None:
        """Export the bundled wiki summaries as jsonl rows: Axolotl alpaca, or TRL prompt/completion or messages."""
        from planner.data.wiki import FORMATS, write_jsonl

        if fmt not in FORMATS:
            from qra_plugin.errors import QRAError

            raise QRAError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        typer.echo(str(write_jsonl(out, split, n, seed, fmt)))
