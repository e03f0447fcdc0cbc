"""Structured pruning from a plan: keep the planned MLP channels and key/value head groups of each block.

Index selection on the model's own ``nn.Linear`` modules (no torch-pruning dependency graph: the graph of
a decoder block is known, and plain slicing keeps HF modules intact, works on any device and needs no
example inputs). Which linear plays which part is found without architecture names: one short forward
pass records which linears read the same tensor. Two such groups per block are the attention input
projections (q, k, v: outputs of ``heads x head_dim``) and the gated MLP's input projections (gate, up);
the linear called next after each group is its output projection (o, down). HF attention reshapes with
``view(..., -1, head_dim)``, so fewer heads need no attribute changes; whole key/value groups are kept
with their query heads, so ``num_key_value_groups`` stays right under GQA.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from qra_plugin.errors import QRAError
from qra_plugin.modules import find_blocks
from qra_plugin.plan import BlockPruning, Plan, fingerprint


@dataclass(frozen=True)
class BlockLayout:
    """Names (inside one block) of the linears structured pruning changes."""

    q: tuple[str, ...]
    kv: tuple[str, ...]
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str


@dataclass(frozen=True)
class HeadGeometry:
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def head_geometry(config) -> HeadGeometry:  # noqa: ANN001 - a transformers PretrainedConfig
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return HeadGeometry(heads, kv, head_dim, int(config.intermediate_size))


def to_fake_cpu(model: nn.Module, mode) -> None:  # noqa: ANN001 - a FakeTensorMode
    """Swap every meta parameter/buffer for a fake CPU tensor: CPU kernels get chosen, nothing is allocated."""
    with mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cpu")
                    module._parameters[name] = nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cpu")


def _call_groups(model: nn.Module) -> list[list[list[str]]]:
    """Per block, the names of its linears grouped by the tensor they read, in call order (one 2-token forward;
    a meta-device model runs it on fake tensors, as the planner prices pruned plans without weights)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    on_meta = next(model.parameters()).device.type == "meta"
    mode = FakeTensorMode() if on_meta else None
    probe = copy.deepcopy(model) if on_meta else model
    if on_meta:
        to_fake_cpu(probe, mode)
    _, blocks = find_blocks(probe)
    # the input tensors themselves are kept until the end, so no two distinct inputs can share an id()
    calls: list[list[tuple[torch.Tensor, str]]] = [[] for _ in blocks]
    hooks = []
    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                hooks.append(module.register_forward_pre_hook(
                    lambda m, args, i=index, n=name: calls[i].append((args[0], n))))  # fmt: skip
    device = "cpu" if on_meta else next(model.parameters()).device
    try:
        with torch.no_grad(), mode if mode is not None else contextlib.nullcontext():
            probe(input_ids=torch.tensor([[1, 2]], device=device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    groups = []
    for block_calls in calls:
        by_input: dict[int, list[str]] = {}
        for tensor, name in block_calls:
            by_input.setdefault(id(tensor), []).append(name)
        groups.append(list(by_input.values()))
    return groups


def block_layouts(model: nn.Module, geo: HeadGeometry) -> list[BlockLayout]:
    """The attention and gated-MLP projections of every block; one-line error where a block has other parts."""
    _, blocks = find_blocks(model)
    layouts = []
    for block, groups in zip(blocks, _call_groups(model), strict=True):
        attn = mlp = None
        for i, group in enumerate(groups[:-1]):
            out = groups[i + 1]
            if len(group) < 2 or len(out) != 1:
                continue
            outs = {block.get_submodule(n).out_features for n in group}
            out_in = block.get_submodule(out[0]).in_features
            if len(group) == 3 and outs <= {geo.heads * geo.head_dim, geo.kv_heads * geo.head_dim}:
                q = [n for n in group if block.get_submodule(n).out_features == geo.heads * geo.head_dim][:1]
                attn = (tuple(q), tuple(n for n in group if n not in q), out[0])
            elif len(group) == 2 and outs == {geo.intermediate} and out_in == geo.intermediate:
                mlp = (tuple(group), out[0])
        if attn is None or mlp is None:
            raise QRAError("structured pruning needs blocks with separate q/k/v projections and a gated MLP")
        layouts.append(BlockLayout(*attn, *mlp))
    return layouts


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the kept rows (outputs) or columns (inputs) of ``linear``'s weight (and bias)."""
    weight = linear.weight.detach()
    weight = weight.index_select(0, rows) if rows is not None else weight
    weight = weight.index_select(1, cols) if cols is not None else weight
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias.detach().index_select(0, rows)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return new


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


def prune_block(block: nn.Module, layout: BlockLayout, geo: HeadGeometry, keep: BlockPruning) -> None:
    """Slice one block's projections to what ``keep`` keeps (index_select works on meta tensors: shapes only)."""
    device = next(block.parameters()).device
    if keep.mlp_keep is not None:
        if keep.mlp_keep[-1] >= geo.intermediate:
            raise QRAError(f"mlp_keep index {keep.mlp_keep[-1]} is outside the {geo.intermediate} MLP channels")
        idx = torch.tensor(keep.mlp_keep, device=device)
        for name in layout.mlp_in:
            _replace(block, name, _sliced(block.get_submodule(name), rows=idx))
        _replace(block, layout.mlp_out, _sliced(block.get_submodule(layout.mlp_out), cols=idx))
    if keep.kv_keep is not None:
        if keep.kv_keep[-1] >= geo.kv_heads:
            raise QRAError(f"kv_keep index {keep.kv_keep[-1]} is outside the {geo.kv_heads} key/value heads")
        d, g = geo.head_dim, geo.group
        kv_rows = torch.tensor([h * d + j for h in keep.kv_keep for j in range(d)], device=device)
        q_heads = [h * g + r for h in keep.kv_keep for r in range(g)]
        q_rows = torch.tensor([h * d + j for h in q_heads for j in range(d)], device=device)
        for name in layout.q:
            _replace(block, name, _sliced(block.get_submodule(name), rows=q_rows))
        for name in layout.kv:
            rows = q_rows if geo.group == 1 else kv_rows  # MHA: q, k and v look alike and keep the same heads
            _replace(block, name, _sliced(block.get_submodule(name), rows=rows))
        _replace(block, layout.attn_out, _sliced(block.get_submodule(layout.attn_out), cols=q_rows))


def prune_blocks(model: nn.Module, pruning: dict[int, BlockPruning]) -> None:
    """Slice every block ``pruning`` names, in place (works on the meta device: the planner's shapes)."""
    geo = head_geometry(model.config)
    layouts = block_layouts(model, geo)
    _, blocks = find_blocks(model)
    for index, keep in sorted(pruning.items()):
        if not 0 <= index < len(blocks):
            raise QRAError(f"plan prunes block {index}; the model has {len(blocks)} blocks")
        prune_block(blocks[index], layouts[index], geo, keep)


def prune_model(model: nn.Module, plan: Plan) -> None:
    """Apply ``plan.pruning`` in place (before quantization); the model keeps the fingerprint it had.

    Idempotent (Axolotl may call hooks twice). A plan without pruning changes nothing.
    """
    if not plan.pruning or getattr(model, "qra_pruned", False):
        return
    source = fingerprint(model)
    if source != plan.fingerprint:
        raise QRAError(f"plan is for {plan.fingerprint.describe()}, not for this model ({source.describe()})")
    prune_blocks(model, plan.pruning)
    model.qra_source_fingerprint = source
    model.qra_pruned = True
