"""Calibration tokens for ``qra profile``: packed real text, and a hash that keys the priors cache.

Texts are joined with the tokenizer's EOS and cut into ``n`` rows of exactly ``seq_len`` tokens, so no
position is padding and every token counts the same in the KL / loss averages. The hash is taken over
the token ids themselves: it changes whenever the text, the tokenizer, the offset or the sizes change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from planner.config import DataSection
from planner.data.tokenized import tokenized_ids
from planner.data.wiki import as_plain_text, wiki_split
from qra_plugin.errors import QRAError


def _jsonl_texts(path: str) -> list[str]:
    """Plain text of each row of a prompt/completion, alpaca or ``text`` jsonl file."""
    texts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise QRAError(f"{path}:{number}: not a JSON line") from None
        parts = []
        for key in ("text", "instruction", "input", "output", "prompt", "completion"):
            value = row.get(key) if isinstance(row, dict) else None
            if isinstance(value, str):
                parts.append(value)
            elif isinstance(value, list):  # conversational messages
                parts.extend(str(m.get("content", "")) for m in value if isinstance(m, dict))
        if parts:
            texts.append("\n".join(p for p in parts if p))
    return texts


def calibration_texts(data: DataSection, n_texts: int, offset: int, seed: int) -> list[str]:
    """Up to ``n_texts`` training texts starting at ``offset`` (wiki: the shuffled train split)."""
    if data.source == "jsonl":
        return _jsonl_texts(str(data.path))[offset : offset + n_texts]

    return [as_plain_text(r) for r in wiki_split("train", n_texts, seed=seed, offset=offset)]


def calibration_batch(
    tokenizer, data: DataSection, n_rows: int, seq_len: int, offset: int = 0, seed: int = 0
) -> torch.Tensor:
    """``(n_rows, seq_len)`` token ids packed from consecutive texts; offset counts texts, not tokens."""
    need = n_rows * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    if data.source == "tokenized":  # already tokenized (by Axolotl): pack the train rows' ids as they are
        ids = tokenized_ids(data, offset, need)  # rows hold >= 1 token each: enough rows
        if len(ids) < need:
            raise QRAError(f"calibration data too short: {len(ids)} tokens for {n_rows} x {seq_len}")
        return torch.tensor(ids[:need], dtype=torch.long).view(n_rows, seq_len)
    n_texts = max(4, n_rows)
    texts = calibration_texts(data, n_texts * 64, offset, seed)
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise QRAError(
            f"calibration data too short: {len(ids)} tokens for {n_rows} x {seq_len} "
            "(lower profile.calibration_examples or profile.seq_len)"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_rows, seq_len)


def tokens_hash(tokens: torch.Tensor) -> str:
    """Stable hash of the calibration token ids (shape included)."""
    digest = hashlib.sha256(str(tuple(tokens.shape)).encode())
    digest.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
