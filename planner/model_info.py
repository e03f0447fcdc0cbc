"""What the planner needs to know about a model, read from its structure on the meta device.

No weights are loaded: the model is built from its config under ``torch.device("meta")``, so listing
the quantizable linears of a 70B model costs as little as for a tiny one. Nothing here names an
architecture: blocks and roles come from ``qra_plugin.modules.quantizable_linears``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.config import ModelSection
from planner.loading import DTYPES, load_meta_model
from qra_plugin.errors import QRAError
from qra_plugin.modules import LinearSpec, quantizable_linears
from qra_plugin.plan import BlockPruning, Fingerprint, fingerprint
from qra_plugin.prune import prune_blocks


@dataclass(frozen=True)
class TensorSpec:
    """A parameter or buffer outside the planned linears (embeddings, norms, lm_head, rotary tables)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_buffer: bool

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelInfo:
    """Structure and config facts of a causal LM; enough to price any plan without its weights."""

    fingerprint: Fingerprint
    linears: list[LinearSpec]
    n_blocks: int
    architecture: str
    hidden_size: int
    intermediate_size: int | None
    num_layers: int
    num_heads: int | None
    num_kv_heads: int | None
    vocab_size: int
    tied_embeddings: bool
    dtype: torch.dtype
    others: list[TensorSpec]
    config: Any = field(default=None, repr=False, compare=False)
    #: the structured pruning these shapes already include (``pruned_info``); None: the model as loaded
    pruning: dict | None = field(default=None, repr=False, compare=False)
    #: per block, the uniformly pruned ModelInfo that block's shapes and activations come from (a pruning
    #: that differs between blocks); None: one model, traced as a whole
    block_sources: tuple[ModelInfo, ...] | None = field(default=None, repr=False, compare=False)
    #: what was derived from this object (pruned infos, activation traces): it lives and dies with the object,
    #: so no cache can hand one object's results to another (an ``id()`` key can, once the first is freed)
    memo: dict[tuple[Any, ...], Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def other_param_numel(self) -> int:
        """Elements of non-planned parameters (tied embedding/lm_head counted once)."""
        return sum(t.numel for t in self.others if not t.is_buffer)

    def other_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of non-planned parameters (cast to ``dtype`` if given, else as built) plus buffers as stored."""
        params = 0
        for t in self.others:
            if not t.is_buffer:
                cast = dtype is not None and t.dtype.is_floating_point
                params += t.numel * _elem(dtype if cast else t.dtype)
        buffers = sum(t.numel * _elem(t.dtype) for t in self.others if t.is_buffer)
        return params + buffers

    @property
    def other_param_bytes(self) -> int:
        """Bytes of everything outside the planned linears, as the model is loaded (``other_bytes()``)."""
        return self.other_bytes()

    @property
    def linear_numel(self) -> int:
        return sum(s.numel for s in self.linears)

    def blocks(self) -> list[list[LinearSpec]]:
        """Linears grouped by block index."""
        out: list[list[LinearSpec]] = [[] for _ in range(self.n_blocks)]
        for s in self.linears:
            out[s.block].append(s)
        return out


def _elem(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _cfg(config: Any, *names: str) -> Any:
    """First attribute of ``config`` that exists and is not None (architectures name things differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def info_from_model(model: nn.Module) -> ModelInfo:
    """ModelInfo of an instantiated model (meta, real, quantized or PEFT-wrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    specs = quantizable_linears(base)
    planned = {s.name for s in specs}
    taken: set[str] = set()
    for name, module in base.named_modules():
        if name in planned:
            taken.update(f"{name}.{p}" for p, _ in module.named_parameters())
            taken.update(f"{name}.{b}" for b, _ in module.named_buffers())
    others: list[TensorSpec] = []
    for name, p in base.named_parameters():
        if name not in taken and "lora_" not in name:
            others.append(TensorSpec(name, tuple(p.shape), p.dtype, False))
    for name, b in base.named_buffers():
        if name not in taken:
            others.append(TensorSpec(name, tuple(b.shape), b.dtype, True))
    config = getattr(base, "config", None)
    floating = [p.dtype for p in base.parameters() if p.is_floating_point()]
    hidden = int(_cfg(config, "hidden_size", "n_embd", "d_model") or 0)
    return ModelInfo(
        fingerprint=fingerprint(base),
        linears=specs,
        n_blocks=max(s.block for s in specs) + 1,
        architecture=fingerprint(base).architecture,
        hidden_size=hidden,
        intermediate_size=_cfg(config, "intermediate_size", "n_inner", "ffn_dim"),
        num_layers=int(_cfg(config, "num_hidden_layers", "n_layer", "num_layers") or 0),
        num_heads=_cfg(config, "num_attention_heads", "n_head"),
        num_kv_heads=_cfg(config, "num_key_value_heads", "num_attention_heads", "n_head"),
        vocab_size=int(_cfg(config, "vocab_size") or 0),
        tied_embeddings=bool(_cfg(config, "tie_word_embeddings")),
        dtype=floating[0] if floating else torch.float32,
        others=others,
        config=config,
    )


def meta_model_from_config(config: Any, dtype: torch.dtype) -> nn.Module:
    """Build the causal LM of ``config`` on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.architectures = [type(model).__name__]
    return model


def load_model_info(source: Any, dtype: torch.dtype | str | None = None) -> ModelInfo:
    """ModelInfo from a model, a ``ModelSection``, a local model directory, ``"demo"`` or an HF config.

    ``dtype`` overrides the dtype the weights would be loaded in (a section's ``dtype`` otherwise,
    float32 for a bare path or config).
    """

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise QRAError(f"unknown dtype {dtype!r} (one of {sorted(DTYPES)})")
        dtype = DTYPES[dtype]
    if isinstance(source, nn.Module):
        return info_from_model(source)
    if isinstance(source, ModelSection):
        if dtype is not None:
            source = source.model_copy(update={"dtype": {v: k for k, v in DTYPES.items()}[dtype]})
        return info_from_model(load_meta_model(source))
    if isinstance(source, (str, Path)):
        section = ModelSection(path=str(source))
        return load_model_info(section, dtype or torch.float32)
    if hasattr(source, "to_dict") and hasattr(source, "model_type"):
        return info_from_model(meta_model_from_config(source, dtype or torch.float32))
    raise QRAError(f"cannot read model structure from {type(source).__name__}")


#: what one block keeps, as counts: (MLP channels kept or None, key/value groups kept or None)
Kept = tuple[int | None, int | None]


def kept_counts(pruning: dict[int, Any], n_blocks: int) -> tuple[Kept, ...]:
    """Per block, how many MLP channels and key/value groups a pruning keeps (None: all). Memory depends on
    these counts only, never on which indices are kept."""
    out: list[Kept] = [(None, None)] * n_blocks
    for index, keep in pruning.items():
        out[int(index)] = (
            None if keep.mlp_keep is None else len(keep.mlp_keep),
            None if keep.kv_keep is None else len(keep.kv_keep),
        )
    return tuple(out)


def pruned_info(info: ModelInfo, plan: Any) -> ModelInfo:
    """``info`` of the model after ``plan.pruning`` (itself for an unpruned plan): pruned linear shapes, and
    the per-block sources the activation trace is composed from, so weights, LoRA and activations all shrink.

    A block's shapes and saved activations depend only on its own kept counts (its input is always the
    hidden state), so each block is taken from the model pruned *uniformly* to that block's counts: a
    search over per-block ratios builds one meta model and one trace per distinct count, not per plan.
    """
    if not plan.pruning or info.pruning is not None:
        return info
    counts = kept_counts(plan.pruning, info.n_blocks)
    key = ("pruned", counts)
    if key not in info.memo:
        sources = tuple(info if c == (None, None) else _uniformly_pruned(info, c) for c in counts)
        linears = [s for block, src in enumerate(sources) for s in src.linears if s.block == block]
        info.memo[key] = replace(info, linears=linears, pruning=dict(plan.pruning), block_sources=sources)
    return info.memo[key]


def _uniformly_pruned(info: ModelInfo, kept: Kept) -> ModelInfo:
    """``info`` of the model with every block pruned to the same counts (its first indices: shapes only)."""
    key = ("uniform", kept)
    if key not in info.memo:
        mlp, kv = kept
        keep = BlockPruning(
            mlp_keep=None if mlp is None else list(range(mlp)), kv_keep=None if kv is None else list(range(kv))
        )
        pruning = dict.fromkeys(range(info.n_blocks), keep)
        from planner.memory.activations import meta_model_for_trace  # cycle: memory.activations imports this module

        meta = meta_model_for_trace(info, info.dtype)
        prune_blocks(meta, pruning)
        meta.qra_source_fingerprint = info.fingerprint  # still the model the plan was made for
        pruned = info_from_model(meta)
        pruned.config, pruned.pruning = info.config, pruning
        info.memo[key] = pruned
    return info.memo[key]
