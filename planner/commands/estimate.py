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
        config: Path | None = typer.Argument(
            None, help="a qra or Axolotl YAML: model and training settings come from it (options below are ignored)"
        ),
        model: str | None = typer.Option(None, "--model", help="local model dir, or 'demo' for SmolLM2-135M"),
        plan: Path | None = typer.Option(None, "--plan", help="plan YAML/JSON"),
        uniform: str | None = typer.Option(None, "--uniform", help="BITS:RANK for a uniform plan, e.g. 4:16"),
        backend: str = typer.Option("hqq", help="backend of --uniform below 16 bits (hqq, bnb)"),
        batch: int = typer.Option(4, "--batch", min=1),
        seq_len: int = typer.Option(128, "--seq-len", min=1),
        optimizer: str = typer.Option(
            "adamw_torch", help="HF optim name (adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, adamw_torch_4bit, ...)"
        ),
        grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing/--no-grad-checkpointing"),
        loss_path: str = typer.Option(
            "trl_chunked", "--loss-path", help="the loss the trainer runs: trl_chunked, hf_full, liger, cce"
        ),
        grad_accum: int = typer.Option(1, "--gradient-accumulation-steps", min=1),
        dtype: str = typer.Option("float32", help="dtype the model is loaded and trained in"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object of integer byte fields"),
        world_size: int | None = typer.Option(
            None, "--world-size", min=1, help="ranks the job trains on (per-rank bytes; default: a CONFIG's, else 1)"
        ),
        sharding: str | None = typer.Option(
            None,
            "--sharding",
            help="ddp, zero1, zero2, zero3 or fsdp2 (default: a CONFIG's deepspeed/fsdp keys, else ddp)",
        ),
    ) -> None:
        """Predict peak training memory of a plan, part by part (no weights are loaded).

        With CONFIG and no --plan/--uniform: the plan at the config's qra_plan if it exists, else the
        budget's uniform plan. Rows are taken as full (micro batch x sequence_len tokens): exact under
        sample packing, an upper bound for padded batches.
        """
        from planner.config import LOSS_PATHS
        from planner.memory import estimate
        from planner.settings import TrainingSettings
        from planner.sharding import SHARDINGS, per_rank
        from qra_plugin.backends import quantizing_backends

        if plan is not None and uniform is not None:
            raise QRAError("give exactly one of --plan and --uniform (or neither, with a CONFIG)")
        names = sorted(b.name for b in quantizing_backends())
        if backend not in names:
            raise QRAError(f"--backend must be one of {', '.join(names)}, not {backend!r}")
        _check_choice("--sharding", sharding, SHARDINGS)
        ranks = {"world_size": world_size} if world_size else {}
        ranks |= {"sharding": sharding} if sharding else {}
        if config is not None:
            info, the_plan, settings = _from_config(config, plan, uniform, backend, ranks)
        else:
            if model is None:
                raise QRAError("give a CONFIG, or --model with --plan or --uniform")
            _check_choice("--loss-path", loss_path, LOSS_PATHS)
            info, the_plan = _from_options(model, dtype, plan, uniform, backend)
            settings = TrainingSettings(batch=batch, seq_len=seq_len, optimizer=optimizer,
                                        grad_checkpointing=grad_checkpointing, loss_path=loss_path,
                                        gradient_accumulation_steps=grad_accum, precision=info.dtype,
                                        **ranks)  # fmt: skip
        result = estimate(info, the_plan, settings)
        rank_bytes = None
        if settings.sharding is not None or settings.world_size > 1:
            rank_bytes = per_rank(
                info, the_plan, result, world_size=settings.world_size, sharding=settings.sharding or "ddp"
            )
        if as_json:
            typer.echo(json.dumps({**result.to_dict(), **({"per_rank": rank_bytes} if rank_bytes else {})}))
            return
        setting = f"batch {settings.batch}, seq {settings.seq_len}, loss {settings.loss_path}"
        _print_table(result, f"{info.architecture}, {the_plan.summary()}, {setting}")
        if rank_bytes:
            _print_rank_table(rank_bytes)


def _check_choice(flag: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise QRAError(f"{flag} must be one of {', '.join(choices)}, not {value!r}")


def _plan_of(info, plan: Path | None, uniform: str | None, backend: str):  # noqa: ANN001, ANN202
    from planner.memory import uniform_plan
    from qra_plugin.plan import Plan

    if plan is not None:
        return Plan.load(plan)
    bits, rank = _parse_uniform(uniform or "")
    return uniform_plan(info, bits, rank, backend)


def _from_options(model: str, dtype: str, plan: Path | None, uniform: str | None, backend: str):  # noqa: ANN202
    from planner.model_info import load_model_info

    if (plan is None) == (uniform is None):
        raise QRAError("give exactly one of --plan and --uniform")
    info = load_model_info(model, dtype)
    return info, _plan_of(info, plan, uniform, backend)


def _from_config(config: Path, plan: Path | None, uniform: str | None, backend: str, ranks: dict):  # noqa: ANN202
    """Model info, plan and training settings of a qra or Axolotl config (Axolotl validates its YAML); ``ranks``:
    the --world-size / --sharding given, which win over the config's."""
    from planner.memory import Budget, uniform_plan
    from planner.model_info import load_model_info
    from planner.run_config import load_run_config
    from planner.settings import TrainingSettings

    run = load_run_config(config, prepare_data=False)
    cfg = run.config
    info = load_model_info(cfg.model)
    settings = TrainingSettings.of(cfg, **ranks)
    if plan is not None or uniform is not None:
        return info, _plan_of(info, plan, uniform, backend), settings
    if run.plan_target is not None and run.plan_target.is_file():
        return info, _plan_of(info, run.plan_target, None, backend), settings
    budget = Budget.parse(cfg.budget)
    if budget.uniform is None:
        raise QRAError(f"{config}: no plan yet (qra_plan) and budget {cfg.budget!r} names no uniform plan: give --plan")
    bits, rank, uniform_backend = budget.uniform
    return info, uniform_plan(info, bits, rank, uniform_backend), settings


def _print_rank_table(rank_bytes: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from planner.memory import format_bytes

    table = Table(title=f"one of {rank_bytes['world_size']} ranks under {rank_bytes['sharding']}")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("size", justify="right")
    for key, value in rank_bytes.items():
        if isinstance(value, int) and key != "world_size":
            table.add_row(key.replace("_", " "), str(value), format_bytes(value))
    Console().print(table)


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
