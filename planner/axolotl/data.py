"""The rows fidelity runs train and score on, prepared by Axolotl from the user's datasets.

Axolotl loads, templates (prompt strategies, chat templates) and tokenizes the datasets once, with its
``dataset_prepared_path`` cache; the selection rows are its eval split (``val_set_size`` or
``test_datasets``). qra keeps ``input_ids`` and ``labels`` (Axolotl's loss mask) of a fixed sample and
writes them as ``tokenized`` jsonl, whose digest is part of every evaluation's recipe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from planner.config import QRAConfig
from qra_plugin.errors import QRAError
from qra_plugin.io import write_text_atomic

DATA_DIR = "axolotl_data"


def _jsonl(dataset: Any, n: int) -> str:
    lines = []
    for row in dataset.select(range(min(n, len(dataset)))):
        lines.append(json.dumps({"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}))
    return "\n".join(lines) + "\n"


def export_rows(ax: Any, out_dir: Path, config: QRAConfig) -> dict[str, str]:
    """Write ``OUT/axolotl_data/{train,selection}.jsonl`` from Axolotl's prepared datasets; their paths."""
    from axolotl.common.datasets import load_datasets

    levels = [lv for lv in (config.fidelity.low, config.fidelity.high, config.fidelity.confirm) if lv is not None]
    n_train = max([config.data.train_examples] + [lv.train_examples or 0 for lv in levels])
    n_eval = max([config.data.eval_examples] + [lv.eval_examples for lv in levels])
    import datasets

    progress = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        meta = load_datasets(cfg=ax)
    finally:
        if progress:
            datasets.enable_progress_bars()
    if meta.eval_dataset is None or len(meta.eval_dataset) == 0:
        raise QRAError(
            "val_set_size: qra scores candidates on rows no run trains on: set val_set_size (e.g. 0.05) "
            "or test_datasets"
        )
    files = {}
    for key, split, dataset, n in (
        ("path", "train", meta.train_dataset, n_train),
        ("eval_path", "selection", meta.eval_dataset, n_eval),
    ):
        target = out_dir / DATA_DIR / f"{split}.jsonl"
        text = _jsonl(dataset, n)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:  # same rows: same file, same recipe
            write_text_atomic(target, text)
        files[key] = str(target)
    return files
