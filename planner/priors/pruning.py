"""Which MLP channels and key/value groups to keep: a per-channel importance on the calibration tokens.

A channel's score is ``||W_out[:, c]||_2 * ||x_c||_2``: the norm of its column in the output projection
times the norm of the activation that feeds it over the calibration tokens (Wanda's weight x activation
criterion, taken per input channel of ``down_proj`` / ``o_proj``). A key/value group scores the sum over
the columns of its query heads. One forward pass, no gradients. ``pruning_for_ratio`` turns the scores into
the plan's kept indices: the same fraction removed in every block (the LLM-Pruner-style uniform reference
and RankAdaptor's fixed pruning).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from planner.config import QRAConfig
from planner.loading import load_model, load_tokenizer
from planner.priors.calibration import calibration_batch
from qra_plugin.errors import QRAError
from qra_plugin.modules import find_blocks
from qra_plugin.plan import BlockPruning
from qra_plugin.prune import block_layouts, head_geometry, prune_block


@dataclass(frozen=True)
class ChannelImportance:
    mlp: tuple[tuple[float, ...], ...]  # per block, per intermediate channel
    kv: tuple[tuple[float, ...], ...]  # per block, per key/value group
    group: int  # query heads per key/value group


def channel_importance(model: nn.Module, tokens: torch.Tensor) -> ChannelImportance:
    """Scores of every MLP channel and key/value group of every block, from one pass over ``tokens``."""
    geo = head_geometry(model.config)
    layouts = block_layouts(model, geo)
    _, blocks = find_blocks(model)
    sq_sums: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, (block, layout) in enumerate(zip(blocks, layouts, strict=True)):
        for part, name in (("mlp", layout.mlp_out), ("attn", layout.attn_out)):

            def record(module, args, key=(index, part)):  # noqa: ANN001, ANN202
                x = args[0].detach().float()
                sq_sums[key] = sq_sums.get(key, 0) + x.pow(2).sum(dim=tuple(range(x.dim() - 1)))

            hooks.append(block.get_submodule(name).register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(input_ids=tokens.to(next(model.parameters()).device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    mlp, kv = [], []
    for index, (block, layout) in enumerate(zip(blocks, layouts, strict=True)):
        for part, name, out in (("mlp", layout.mlp_out, mlp), ("attn", layout.attn_out, kv)):
            weight = block.get_submodule(name).weight.detach().float()
            score = weight.norm(dim=0) * sq_sums[(index, part)].sqrt()
            if part == "attn":  # columns of one key/value group: its query heads' head_dim columns
                score = score.view(geo.kv_heads, geo.group * geo.head_dim).sum(dim=1)
            out.append(tuple(float(v) for v in score))
    return ChannelImportance(tuple(mlp), tuple(kv), geo.group)


def _top(scores: tuple[float, ...], keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, ascending (ties: the lower index, so it is deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:keep])


def pruning_for_ratio(importance: ChannelImportance, ratio: float) -> dict[int, BlockPruning]:
    """Remove ``ratio`` of every block's MLP channels and (rounded, at least one kept) key/value groups."""
    return pruning_for_ratios(importance, [ratio] * len(importance.mlp))


def pruning_for_ratios(importance: ChannelImportance, ratios: list[float]) -> dict[int, BlockPruning]:
    """Block b loses ``ratios[b]`` of its MLP channels and key/value groups, the least important first (a
    searched per-block pruning; memoised by the block's scores and ratio — values, never an object's ``id``,
    which a freed object hands on — as a search asks for the same ones often)."""
    if len(ratios) != len(importance.mlp):
        raise QRAError(f"{len(ratios)} pruning ratios for a model of {len(importance.mlp)} blocks")
    out = {}
    for index, ratio in enumerate(ratios):
        keep = _block_keep(importance.mlp[index], importance.kv[index], float(ratio))
        if keep is not None:
            out[index] = keep
    return out


@lru_cache(maxsize=4096)
def _block_keep(mlp: tuple[float, ...], kv: tuple[float, ...], ratio: float) -> BlockPruning | None:
    if ratio <= 0:
        return None
    keep_mlp = max(1, round(len(mlp) * (1 - ratio)))
    keep_kv = max(1, round(len(kv) * (1 - ratio)))
    keep = BlockPruning(
        mlp_keep=_top(mlp, keep_mlp) if keep_mlp < len(mlp) else None,
        kv_keep=_top(kv, keep_kv) if keep_kv < len(kv) else None,
    )
    return keep if keep.mlp_keep is not None or keep.kv_keep is not None else None


@lru_cache(maxsize=4)
def _importance_cached(config_json: str) -> ChannelImportance:

    cfg = QRAConfig.model_validate_json(config_json)
    p = cfg.profile
    model = load_model(cfg.model).eval()
    tokens = calibration_batch(load_tokenizer(cfg.model), cfg.data, p.calibration_examples, p.seq_len, 0, cfg.seed)
    return channel_importance(model, tokens)


def _channel_importance(cfg: QRAConfig) -> ChannelImportance:
    parts = {"model": cfg.model.model_dump(), "data": cfg.data.model_dump(), "profile": cfg.profile.model_dump()}
    return _importance_cached(json.dumps({**parts, "seed": cfg.seed, "name": "pruning"}, sort_keys=True))


def searched_channels(cfg: QRAConfig) -> ChannelImportance | None:
    """The channel importance a search over per-block pruning ratios keeps channels by (None: not searched)."""
    return _channel_importance(cfg) if cfg.space.searched_prune else None


def fixed_pruning(cfg: QRAConfig) -> dict[int, BlockPruning]:
    """The pruning every candidate of a search shares (``space.prune: [ratio]``): RankAdaptor's setting,
    where ranks (and bits) are searched for an already pruned model. Computed once per process."""
    ratio = cfg.space.prune[0] if len(cfg.space.prune) == 1 else 0.0
    if ratio <= 0:
        return {}
    return pruning_for_ratio(_channel_importance(cfg), ratio)


@torch.no_grad()
def prune_damage(model: nn.Module, tokens: torch.Tensor, batch: int, ref_loss: float, ratios: list[float]) -> dict:
    """The pruning-sensitivity prior: loss increase (nats/token) when only block b is pruned by each ratio,
    keeping the channels ``channel_importance`` ranks highest. ``{ratio: [per block]}``; the model is restored."""
    importance = channel_importance(model, tokens)
    geo = head_geometry(model.config)
    layouts = block_layouts(model, geo)
    _, blocks = find_blocks(model)
    out: dict[float, list[float]] = {}
    for ratio in ratios:
        keep = pruning_for_ratio(importance, ratio)
        out[ratio] = []
        for index, block in enumerate(blocks):
            layout = layouts[index]
            names = [*layout.q, *layout.kv, layout.attn_out, *layout.mlp_in, layout.mlp_out]
            originals = {n: block.get_submodule(n) for n in names}
            loss_sum, count = 0.0, 0
            try:
                if index in keep:
                    prune_block(block, layout, geo, keep[index])
                for start in range(0, tokens.shape[0], batch):
                    chunk = tokens[start : start + batch]
                    log_q = torch.log_softmax(model(input_ids=chunk, use_cache=False).logits.float(), dim=-1)
                    loss_sum -= float(log_q[:, :-1].gather(-1, chunk[:, 1:].unsqueeze(-1)).sum())
                    count += chunk.shape[0] * (chunk.shape[1] - 1)
            finally:
                for n, module in originals.items():
                    parent, _, child = n.rpartition(".")
                    setattr(block.get_submodule(parent) if parent else block, child, module)
            out[ratio].append(loss_sum / count - ref_loss)
    return out
