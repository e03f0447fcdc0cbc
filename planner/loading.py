"""Build the model and tokenizer a config names: a local dir, the bundled demo model, or a tiny model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from planner.config import ModelSection
from planner.demo_model import materialize_demo_model
from planner.tiny import build_tiny_model, tiny_config, tiny_tokenizer
from qra_plugin.errors import QRAError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(section: ModelSection) -> Path | None:
    """The local directory of a ``path`` model (``demo`` materialises SmolLM2); None for tiny models."""
    if section.tiny is not None:
        return None
    if section.path == "demo":
        return materialize_demo_model()
    path = Path(section.path or "")
    if not (path / "config.json").is_file():
        raise QRAError(f"model.path is not a local transformers model directory: {path}")
    return path


def load_model(section: ModelSection, device: str = "cpu") -> nn.Module:
    """Real weights on ``device`` (tiny models get their seeded random init)."""
    dtype = DTYPES[section.dtype]
    if section.tiny is not None:
        t = section.tiny
        model = build_tiny_model(
            t.arch, seed=t.seed, dtype=dtype, vocab_size=t.vocab_size, hidden=t.hidden, layers=t.layers
        )
        return model.to(device)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(resolve_model_path(section)), dtype=dtype).to(device)


def load_meta_model(section: ModelSection) -> nn.Module:
    """The model's structure on the meta device: shapes and names without loading any weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if section.tiny is not None:
        t = section.tiny
        config = tiny_config(t.arch, vocab_size=t.vocab_size, hidden=t.hidden, layers=t.layers)
    else:
        config = AutoConfig.from_pretrained(str(resolve_model_path(section)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[section.dtype])
    model.config.architectures = [type(model).__name__]
    return model


def load_tokenizer(section: ModelSection):
    """The model's tokenizer; tiny models get the BPE tokenizer trained on the wiki summaries."""
    if section.tiny is not None:
        return tiny_tokenizer(section.tiny.vocab_size)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path(section)))
