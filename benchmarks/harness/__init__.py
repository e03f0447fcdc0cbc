"""What every benchmark script shares: the repository root, the command line it records, result writing and
the run of a batch of fidelity tasks through one store.

Scripts run as ``python -m benchmarks.<name>`` from the repository root; they import this harness, ``planner``,
``qra_plugin`` and libraries, never each other.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from qra_plugin.io import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The exact command a result records: ``python -m benchmarks.<script>`` and its arguments."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([f"python -m benchmarks.{script}", *(shlex.quote(a) for a in args)])


def write_result(path: Path, result: dict[str, Any], markdown: str | None = None) -> None:
    """The result JSON and, beside it, its markdown table (atomic writes, so a killed run leaves the old ones)."""
    write_json_atomic(path, result)
    if markdown is not None:
        write_text_atomic(path.with_suffix(".md"), markdown)


def run_tasks(store_path: Path, tasks: list[Any]) -> list[Any]:
    """Run fidelity tasks through the store at ``store_path`` on a local executor; finished ones are read back."""
    from planner.orchestration.setup import open_executor
    from planner.store import Store

    store = Store(store_path)
    executor = open_executor(tasks[0].config, store, kind="local")
    try:
        return executor.run(tasks)
    finally:
        executor.close()
        store.close()


def mean(values: list[float | None], digits: int = 3) -> float | None:
    """Mean of the values that are not None, rounded; None when there are none."""
    present = [float(v) for v in values if v is not None]
    return round(sum(present) / len(present), digits) if present else None


def speed_run_config(steps: int, reuse: bool, threads: int, model: str, padding_free: bool = False) -> Any:
    """The short fidelity run the speed benchmarks time and profile (throughput, profile_fidelity)."""
    from planner.config import QRAConfig

    return QRAConfig.model_validate(
        {
            "name": "throughput",
            "model": {"path": model, "dtype": "float32"} if model != "tiny" else {"tiny": {"layers": 4}},
            "data": {"source": "wiki", "train_examples": 64, "eval_examples": 16},
            "train": {"batch": 4, "seq_len": 128, "lr": 5e-4, "padding_free": padding_free},
            "fidelity": {
                "low": {"steps": steps, "eval_examples": 16},
                "high": {"steps": steps, "eval_examples": 16},
                "torch_threads": threads,
                "reuse_dequantized": reuse,
                "layer_cache": "off",
            },
        }
    )
