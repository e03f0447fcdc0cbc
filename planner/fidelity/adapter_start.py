"""Fidelity runs start each adapter the way the plan says: ``init: error`` modules from their quantization error.

A search with ``adapter.init: error`` scores every candidate as the final plan will train — its adapters start
from the closed-form init the search later writes to the plan's init file (``planner.priors.adapter_init``):
the same base weights, the same calibration rows (the profile's), the same damping, the same quantized layer
(through the layer cache). The worker memoises what candidates share: the input second moments (one forward pass
per process), the whitening of each distinct input (``adapter_init``'s own memo), and each (module, quantization)
SVD truncated to the ranks asked so far (one SVD per module and bits serves every rank).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from planner.config import QRAConfig
from planner.priors.adapter_init import ErrorSVD, Whitening, adapter_pair, module_error_svd
from planner.priors.calibration import calibration_batch
from planner.priors.moments import second_moments
from qra_plugin.modules import quantizable_linears
from qra_plugin.plan import ModulePlan, Plan
from qra_plugin.prune import prune_model

#: (model, pruning, calibration) -> module name -> H; a pruned plan's moments are its own
_MOMENTS: dict[str, dict[str, torch.Tensor]] = {}
#: (model, pruning, module, quantization, damping) -> (truncated svd, whitening); least recently used dropped
_SVDS: OrderedDict[tuple, tuple[ErrorSVD, Whitening]] = OrderedDict()
MAX_SVDS = 512
#: singular directions kept per (module, quantization): every rank a search offers fits (more: recomputed)
KEEP_DIRECTIONS = 64


def wants_error_init(plan: Plan) -> bool:
    return any(m.init == "error" and m.quantized_with_adapter for m in plan.modules.values())


def error_init_for(cfg: QRAConfig, plan: Plan, base: nn.Module, model_key: str) -> dict[str, torch.Tensor]:
    """``<module>.lora_A`` / ``.lora_B`` for every ``init: error`` module of ``plan`` (float32), computed from
    ``base`` (the unquantized, unpruned base model, left untouched)."""

    model = base
    if plan.pruning:  # a pruned module is initialised on its pruned shape, from its pruned inputs
        model = copy.deepcopy(base)
        prune_model(model, plan)
    pruning_key = plan.model_dump_json(include={"pruning"}) if plan.pruning else ""
    targets = [n for n, m in plan.modules.items() if m.init == "error" and m.quantized_with_adapter]
    moments = _moments(cfg, model, f"{model_key}|{pruning_key}", targets)
    tensors: dict[str, torch.Tensor] = {}
    damping = cfg.adapter.damping
    for name in targets:
        mp = plan.modules[name]
        key = (model_key, pruning_key, name, mp.bits, mp.backend, mp.group_size, mp.axis, damping)
        svd, white = _svd(key, model.get_submodule(name), mp, moments[name], damping)
        a, b = adapter_pair(svd, white, mp.rank, mp.lora_alpha / mp.rank)
        tensors[f"{name}.lora_A"] = a.float().contiguous()
        tensors[f"{name}.lora_B"] = b.float().contiguous()
    return tensors


def _moments(cfg: QRAConfig, model: nn.Module, key: str, names: list[str]) -> dict[str, torch.Tensor]:

    p = cfg.profile
    full_key = f"{key}|{p.calibration_examples}|{p.seq_len}|{p.calibration_offset}|{cfg.seed}|{cfg.data}"
    cached = _MOMENTS.get(full_key)
    if cached is None or not set(names) <= set(cached):
        every = [s.name for s in quantizable_linears(model)]
        cached = _MOMENTS[full_key] = second_moments(model.eval(), _calibration_tokens(cfg), every, p.batch)
    return cached


def _calibration_tokens(cfg: QRAConfig) -> torch.Tensor:
    """The profile's calibration rows (what ``qra search`` computes the init file's moments on)."""

    p = cfg.profile
    from planner.fidelity.sft import cached_tokenizer  # cycle: fidelity.sft imports this module

    tokenizer = cached_tokenizer(cfg.model)
    return calibration_batch(tokenizer, cfg.data, p.calibration_examples, p.seq_len, p.calibration_offset, cfg.seed)


def _svd(
    key: tuple, linear: nn.Linear, mp: ModulePlan, moments: torch.Tensor, damping: float
) -> tuple[ErrorSVD, Whitening]:
    """``module_error_svd`` (the init file's own), memoised truncated to the ranks a search asks for."""
    hit = _SVDS.get(key)
    if hit is not None and hit[0].sigma.numel() >= min(mp.rank, min(linear.weight.shape)):
        _SVDS.move_to_end(key)
        return hit
    full, white = module_error_svd(linear, mp, moments, damping)
    keep = max(KEEP_DIRECTIONS, mp.rank)
    svd = ErrorSVD(u=full.u[:, :keep].clone(), sigma=full.sigma[:keep].clone(), vh=full.vh[:keep].clone(),
                   weight=full.weight[:keep].clone())  # fmt: skip
    _SVDS[key] = (svd, white)
    while len(_SVDS) > MAX_SVDS:
        _SVDS.popitem(last=False)
    return svd, white
