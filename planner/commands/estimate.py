"""``qra estimate``: the predicted training-memory breakdown of a plan (or a uniform plan) as a table or JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from qra_plugin.errors import QRAError


def _parse_uniform(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise QRAError(f"--uniform takes BITS:RANK, e.g. 4:16 (got {text!r})")
    return int(m.group(1)), int(m.group(2))


def register(app: typer.Typer) -> None:
    @app.command("estimate")
    def estimate_cmd(
        model: str = typer.Option(..., "--model", help="local model dir, or 'demo' for SmolLM2-135M"),
        plan: Path | None = typer.Option(None, "--plan", help="plan YAML/JSON"),
        uniform: str | None = typer.Option(None, "--uniform", help="BITS:RANK for a uniform plan, e.g. 4:16"),
        backend: str = typer.Option("hqq", help="backend of --uniform below 16 bits (hqq, bnb)"),
        batch: int = typer.Option(4, "--batch", min=1),
        seq_len: int = typer.Option(128, "--seq-len", min=1),
        optimizer: str = typer.Option("adamw_torch", help="HF optim name"),
        grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing/--no-grad-checkpointing"),
        dtype: str = typer.Option("float32", help="dtype the model is loaded and trained in"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object of integer byte fields"),
    ) -> None:
        """Predict peak training memory of a plan, part by part (no weights are loaded)."""
        from planner.memory import estimate, uniform_plan
        from planner.model_info import load_model_info
        from qra_plugin.plan import Plan

        if (plan is None) == (uniform is None):
            raise QRAError("give exactly one of --plan and --uniform")
        from qra_plugin.backends import quantizing_backends

        names = sorted(b.name for b in quantizing_backends())
        if backend not in names:
            raise QRAError(f"--backend must be one of {', '.join(names)}, not {backend!r}")
        info = load_model_info(model, dtype)
        if plan is not None:
            the_plan = Plan.load(plan)
        else:
            bits, rank = _parse_uniform(uniform or "")
            the_plan = uniform_plan(info, bits, rank, backend)
        result = estimate(
            info,
            the_plan,
            batch=batch,
            seq_len=seq_len,
            optimizer=optimizer,
            grad_checkpointing=grad_checkpointing,
            compute_dtype=info.dtype,
        )
        if as_json:
            typer.echo(json.dumps(result.to_dict()))
            return
        _print_table(result, f"{info.architecture}, {the_plan.summary()}, batch {batch}, seq {seq_len}")


def _print_table(result, title: str) -> None:  # noqa: ANN001 - MemoryBreakdown
    from rich.console import Console
    from rich.table import Table

    from planner.memory import PART_LABELS, format_bytes

    table = Table(title=title)
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("size", justify="right")
    table.add_column("share", justify="right")
    data = result.to_dict()
    for key, label in PART_LABELS:
        table.add_row(label, str(data[key]), format_bytes(data[key]), f"{100 * data[key] / max(1, result.total):.1f}%")
    table.add_row("[bold]peak total[/bold]", str(result.total), format_bytes(result.total), "100.0%")
    Console().print(table)
