"""``qra demo-model``: materialise SmolLM2-135M-Instruct from its registry package and print the path."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo-model")
    def demo_model(
        cache_dir: Path | None = typer.Option(None, help="where to keep the converted model (default ~/.cache/qra)"),
    ) -> None:
        """Convert the bundled SmolLM2-135M GGUF to a transformers directory once; print its path."""
        from planner.demo_model import materialize_demo_model

        typer.echo(str(materialize_demo_model(cache_dir)))
