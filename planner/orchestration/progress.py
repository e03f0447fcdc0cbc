"""One progress bar for a search: evaluations done of planned, the current stage and fidelity, elapsed, ETA.

The plan is an estimate from the search settings (stage 1 low and high runs, stage 2 iterations, the budget's
uniform plan, times the seeds): a search that stops early or promotes fewer configs finishes below it, and the
total grows if it is passed. The ETA comes from the measured pace of this run's evaluations (cached ones
count as done). Log lines print above the bar; with ``enabled`` false nothing is drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def planned_evaluations(cfg: Any) -> int:
    s = cfg.search
    low = s.population + s.generations * s.offspring
    table = cfg.adapter.init == "error" and s.table_start  # the error table's allocation, scored at high
    high = s.promote * (s.generations + 1) + s.tr_iterations * s.tr_batch + 1 + int(table)
    confirm = s.confirm_top + 2 if cfg.fidelity.confirm is not None else 0  # at most: top, best free, fast path
    return (low + high + confirm) * len(cfg.fidelity.seeds)


class SearchProgress:
    def __init__(self, console: Any, total: int, enabled: bool) -> None:
        self.total, self.done = total, 0
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("evaluations"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
            )  # fmt: skip
            self._task = self._bar.add_task("priors", total=total)

    def __enter__(self) -> SearchProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def stage(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance(self) -> None:
        self.done += 1
        if self.done > self.total:
            self.total = self.done
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total)

    def wrap(self, stage: str, evaluate: Callable) -> Callable:
        """``evaluate(configs, level)`` that names the stage and fidelity on the bar while it runs."""

        def run(configs: list, level: str) -> list:
            self.stage(f"{stage} · {level} fidelity")
            return evaluate(configs, level)

        return run
