"""Rows that are already token ids: ``input_ids`` and ``labels`` (-100 where no loss is taken).

This is how a search trains on an Axolotl config's own data: ``qra`` lets Axolotl load, template and
tokenize the user's datasets once (``planner.axolotl.data``) and exports the rows here, so every
fidelity run sees exactly the tokens and loss masks ``axolotl train`` will, without importing Axolotl
in the evaluation workers.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from planner.config import DataSection
from qra_plugin.errors import QRAError


@lru_cache(maxsize=8)
def _rows(path: str, mtime_ns: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ids, labels = tuple(int(t) for t in row["input_ids"]), tuple(int(t) for t in row["labels"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise QRAError(f"{path}:{number}: a tokenized row needs integer lists input_ids and labels") from None
        if len(ids) != len(labels) or not ids:
            raise QRAError(f"{path}:{number}: input_ids and labels must be non-empty and of one length")
        rows.append((ids, labels))
    if not rows:
        raise QRAError(f"{path}: no rows")
    return tuple(rows)


def _split_file(data: DataSection, split: str) -> str:
    path = {"train": data.path, "selection": data.eval_path, "test": data.test_path}[split]
    if not path:
        raise QRAError(f"data.source 'tokenized' has no {split} file (set data.test_path for final fine-tunes)")
    return path


def tokenized_rows(data: DataSection, split: str, n: int) -> list[dict[str, list[int]]]:
    """The first ``n`` rows of a split as TRL takes pre-tokenized data (its collator pads and keeps labels)."""
    path = _split_file(data, split)
    rows = _rows(path, Path(path).stat().st_mtime_ns)[:n]
    return [{"input_ids": list(ids), "labels": list(labels)} for ids, labels in rows]


def tokenized_ids(data: DataSection, offset: int, n_rows: int) -> list[int]:
    """Train-split token ids of rows ``offset`` .. ``offset + n_rows``, concatenated (priors' calibration)."""
    path = _split_file(data, "train")
    return [t for ids, _ in _rows(path, Path(path).stat().st_mtime_ns)[offset : offset + n_rows] for t in ids]


def check_tokenized(data: DataSection) -> None:
    """Read the train and selection files once, so a bad file fails before any run starts."""
    for split in ("train", "selection"):
        tokenized_rows(data, split, 1)
