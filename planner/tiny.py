"""Tiny real models built in code: fast tests and the tiny search config need no weights file.

The tokenizer is a real byte-level BPE trained in a second on the wiki summaries, with the ChatML
template SmolLM2 uses, so tiny runs exercise the same chat/SFT code path as the real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from planner.data.wiki import as_plain_text, wiki_split

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def tiny_tokenizer(vocab_size: int = 512, n_texts: int = 600):
    """Byte-level BPE trained on wiki summaries, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([as_plain_text(r) for r in wiki_split("train", n_texts, seed=0)], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 512, hidden: int = 64, layers: int = 4, **over: Any):
    """A small config of a real architecture (``llama`` or ``qwen2``) with grouped-query attention."""
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    common.update(over)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny architecture {arch!r} (llama or qwen2)")


def build_tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config: Any):
    """A freshly initialised causal LM; the seed fixes its weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config), dtype=dtype)
    model.config.architectures = [type(model).__name__]
    return model


def save_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, **config: Any) -> Path:
    """Write a tiny model + tokenizer as a normal HF directory (for Axolotl and load_for_inference)."""
    out = Path(out_dir)
    tokenizer = tiny_tokenizer(config.get("vocab_size", 512))
    model = build_tiny_model(arch, seed=seed, **config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
