"""Score a trained in-memory model on an lm-evaluation-harness task, offline.

lm-eval's ``HFLM`` wraps the PEFT model and its tokenizer as they are (nothing is loaded by name, so nothing
comes from a hub); the task comes from ``TaskManager(include_path=..., include_defaults=False)``: the user's
directory of task YAMLs over local files, or a task qra ships, whose jsonl is written on first use
(``planner.data.lm_eval_tasks``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from planner.config import LMEvalSection
from planner.data.lm_eval_tasks import file_digest, shipped_identity, shipped_task_dir
from qra_plugin.errors import QRAError


def task_directory(section: LMEvalSection, split: str) -> Path:
    """The include path lm-eval reads: the user's, or the shipped task's over ``split`` (generated once)."""
    if section.include_path is not None:
        return Path(section.include_path)
    return shipped_task_dir(section.task, split)


def _data_files(config: Any) -> list[str]:
    files = ((config or {}).get("dataset_kwargs") or {}).get("data_files") if isinstance(config, dict) else None
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in (v if isinstance(v, list) else [v]) if isinstance(f, str)]
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


def task_identity(section: LMEvalSection) -> str:
    """Content hash of what the task's score depends on besides the model: for a user's include path every
    file under it and the local data files its YAMLs name; for a shipped task its YAML and the wiki data."""
    if section.include_path is None:
        return shipped_identity(section.task)
    root = Path(section.include_path)
    files = {p for p in root.rglob("*") if p.is_file()}
    for path in root.rglob("*.y*ml"):
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            continue  # a YAML with lm-eval's !function tags: its own bytes are hashed above
        files |= {Path(f) for f in _data_files(config) if Path(f).is_file()}
    parts = "".join(f"{p}:{file_digest(p)};" for p in sorted(files))
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


def _metric(results: dict[str, Any], section: LMEvalSection) -> float:
    metrics = results.get(section.task) or {}
    for key, value in metrics.items():
        if key == section.metric or key.startswith(section.metric + ","):
            return float(value)
    reported = sorted({k.split(",")[0] for k in metrics if "," in k and not k.split(",")[0].endswith("_stderr")})
    raise QRAError(
        f"lm-eval task {section.task!r} reports no metric {section.metric!r} (it reports {', '.join(reported)})"
    )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """lm-eval draws tqdm bars on stderr for every scored model (no switch reaches them): a search runs dozens.
    Errors still raise; only the bars and lm-eval's own chatter are dropped."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if shown:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _caller_rng_kept() -> Iterator[None]:
    """lm-eval seeds python, numpy and torch's global generators (as its CLI does); an in-process search's own
    draws after an evaluation must not depend on which objective scored it."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def run_task(model: Any, tokenizer: Any, section: LMEvalSection, split: str) -> float:
    """``section.metric`` of ``section.task`` for ``model`` as it is now (eval mode on return)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise QRAError(f"objective lm_eval needs lm-evaluation-harness here: {exc}") from None

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # HFLM warns on every in-memory model
    chat = section.apply_chat_template
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    # HFLM may set a pad token on the tokenizer it gets: hand it a copy, never the worker's cached one
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=section.batch_size)
    manager = TaskManager(include_path=str(task_directory(section, split)), include_defaults=False)
    with _no_progress_bars(), _caller_rng_kept():
        out = simple_evaluate(
            model=lm,
            tasks=[section.task],
            task_manager=manager,
            limit=section.limit,
            bootstrap_iters=0,
            log_samples=False,
            apply_chat_template=chat,
        )
    if out is None:
        raise QRAError(f"lm-eval returned no results for task {section.task!r}")
    return _metric(out["results"], section)
