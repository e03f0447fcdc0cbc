"""Entry point of the long-lived child process that runs evaluations for the local executor.

The child imports torch/transformers and caches base weights once, then serves (evaluate, task)
requests over a pipe. Anything a candidate does to the child (a crash, an OOM kill, a hang) ends
only the child; the executor records the evaluation as failed and starts a new child.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from planner.fidelity.contract import EvalResult, one_line
from planner.fidelity.quantized import use_directory
from planner.quiet import quiet_libraries


def call_one(evaluate: Callable[[Any], EvalResult], task: Any) -> tuple[str, Any]:
    """Run one evaluation; an exception becomes ("error", one line) instead of killing the caller."""
    try:
        result = evaluate(task)
    except Exception as exc:  # noqa: BLE001 - any failure of a candidate is data, not a crash
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
        return "error", one_line(f"{type(exc).__name__}: {exc}") + where
    if not isinstance(result, EvalResult):
        return "error", f"evaluate returned {type(result).__name__}, not EvalResult"
    return "ok", result


def serve(conn: Connection, layer_cache: Path | None = None) -> None:
    """Answer requests until the pipe closes or a ``None`` request arrives; quantized layers are shared with
    the other workers of the search through ``layer_cache`` (``planner.fidelity.quantized``)."""

    quiet_libraries()
    use_directory(layer_cache)
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            request = pickle.loads(raw)
        except Exception as exc:  # noqa: BLE001 - e.g. an evaluate function the child cannot import
            reply: tuple[str, Any] = ("error", one_line(f"cannot load the evaluation in the worker: {exc}"))
        else:
            if request is None:
                return
            evaluate, task = request
            reply = call_one(evaluate, task)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):  # the parent is gone (killed): nothing left to serve
            return
