"""Whether packed rows stay apart in a model's attention: the rule that lets a fidelity run pack.

TRL 1.9's ``packing=True`` (best-fit decreasing) makes its collator padding-free: a batch becomes one row of
concatenated samples with ``position_ids`` restarting at 0 per sample and no attention mask. TRL only warns
when the attention is not flash attention ("may lead to cross-contamination between samples"). transformers
(5.x ``masking_utils.find_packed_sequence_indices``) rebuilds a block-diagonal causal mask from those position
ids for SDPA/eager attention, so models built on its mask utilities keep samples apart without flash attention;
a model that does not would let one sample attend to another. Rather than trust either by name, a fidelity
run with ``train.packing`` checks it on the model itself: two rows run apart and packed must give the same
logits, else the run is refused with one line (qra never trains a different job than the one asked for).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from planner.config import ModelSection, QRAConfig


def rows_kept_apart(model: torch.nn.Module, lengths: tuple[int, int] = (7, 5), atol: float = 1e-4) -> bool:
    """True when the logits of two rows packed into one (position ids restarting) equal their logits apart."""
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (1, n), generator=generator) for n in lengths]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the comparison must be exact up to rounding
    try:
        with torch.no_grad():
            apart = [model(input_ids=r.to(device), use_cache=False).logits for r in rows]
            packed_ids = torch.cat(rows, dim=1).to(device)
            positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
            packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits
    finally:
        model.train(was_training)
    return torch.allclose(packed, torch.cat(apart, dim=1), atol=atol, rtol=1e-4)


@lru_cache(maxsize=4)
def _mixing_attention(model_json: str) -> str | None:
    """The attention implementation's name when packed rows mix in this model; None when they stay apart."""
    from planner.fidelity.sft import _base_model_cached  # cycle: fidelity.sft imports this module

    model = _base_model_cached(model_json)
    return None if rows_kept_apart(model) else str(getattr(model.config, "_attn_implementation", None))


def packing_refusal(section: ModelSection, key: str = "train.packing") -> str | None:
    """One line when packing (or ``train.padding_free``, the same flattened rows: ``key``) would let rows of this
    model attend across each other; None when it is safe. Checked once per process and model."""
    attn = _mixing_attention(section.model_dump_json())
    if attn is None:
        return None
    return (
        f"{key}: packed rows attend to each other in this model (attention {attn}; TRL's packing keeps "
        f"them apart only through position ids): turn {key.split('.')[-1]} off or use flash attention"
    )


def flattening_refusal(cfg: QRAConfig) -> str | None:
    """``packing_refusal`` for whichever of ``train.packing`` / ``train.padding_free`` flattens this config's
    rows (named in the line); None when neither is on or rows stay apart."""
    key = "train.packing" if cfg.train.packing else "train.padding_free" if cfg.train.padding_free else None
    return packing_refusal(cfg.model, key) if key else None
