"""lm-evaluation-harness tasks qra ships (YAML here, package data) and the jsonl each reads, written on first use.

A shipped task's rows are one held-out split of the shipped wiki data (``selection`` while a search scores
candidates, ``test`` for final fine-tunes). ``shipped_task_dir`` writes, once per (task, split, data), a
directory holding the task's YAML with ``data_files`` pointing at that split's jsonl beside it; lm-eval reads
it with ``TaskManager(include_path=that_dir, include_defaults=False)``. Files are written atomically, so two
workers generating the same directory at once both leave complete, identical files.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import yaml

from planner.data.wiki import wiki_summaries_path, write_jsonl
from planner.demo_model import default_cache_dir
from qra_plugin.errors import QRAError
from qra_plugin.io import write_text_atomic

TASKS_DIR = Path(__file__).parent
#: task name -> (YAML file here, wiki export format of its rows)
SHIPPED = {"qra_wiki_topic": ("qra_wiki_topic.yaml", "lm-eval-topic")}
#: bump when the rows a shipped task's jsonl holds change for the same wiki file (prompt, labels, order)
ROWS_VERSION = 1


def shipped_yaml(task: str) -> Path:
    if task not in SHIPPED:
        raise QRAError(f"unknown shipped lm-eval task {task!r}: qra ships {', '.join(sorted(SHIPPED))}")
    return TASKS_DIR / SHIPPED[task][0]


@lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Content hash of a file, read once per (size, mtime)."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def shipped_identity(task: str) -> str:
    """What a shipped task's score depends on besides the model: its YAML, the wiki file and ``ROWS_VERSION``."""
    parts = f"{ROWS_VERSION};{file_digest(shipped_yaml(task))};{file_digest(wiki_summaries_path())}"
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


def shipped_task_dir(task: str, split: str, cache_dir: Path | None = None) -> Path:
    """The include directory of ``task`` over ``split`` (selection or test), generated on first use under
    ``cache_dir`` (default ``$QRA_CACHE`` or ``~/.cache/qra``)."""
    if split not in ("selection", "test"):
        raise QRAError(f"the shipped lm-eval tasks score held-out rows only: split {split!r} is not selection/test")
    root = (cache_dir or default_cache_dir()) / "lm_eval_tasks" / f"{task}-{split}-{shipped_identity(task)}"
    config_path = root / f"{task}.yaml"
    if config_path.is_file():
        return root
    rows = write_jsonl(root / f"{task}.jsonl", split, fmt=SHIPPED[task][1])
    config = yaml.safe_load(shipped_yaml(task).read_text(encoding="utf-8"))
    config["dataset_kwargs"] = {"data_files": {"test": str(rows)}, "cache_dir": str(root / "hf_datasets")}
    write_text_atomic(config_path, yaml.safe_dump(config, sort_keys=False))  # last: its presence means complete
    return root


class _AnyTagLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs for their names only: ``!function`` and other tags load as None."""


_AnyTagLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def task_names(include_path: Path) -> set[str]:
    """Task, group and tag names the YAMLs under ``include_path`` define (lm-eval scans it recursively too)."""
    names: set[str] = set()
    for path in sorted(include_path.rglob("*.y*ml")):
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTagLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # lm-eval skips an unreadable file too; the task is then reported unknown
        if not isinstance(config, dict):
            continue
        for key in ("task", "group", "tag"):
            value = config.get(key)
            names.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
    return names
