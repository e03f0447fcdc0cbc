"""The two per-unit measurements behind the priors, on real quantized layers and real PEFT adapters.

I_q (fidelity sensitivity): quantize only one unit with the backend training will use (same
``ModulePlan`` defaults: bits, group size, axis) and measure the mean per-token KL(p_ref || p_q) of the
next-token distribution, plus the increase of the next-token loss, against the unquantized model.

Cost: the unquantized model runs once. Its log-probabilities and the output of every block are cached;
when a unit inside block j is quantized, blocks 0..j-1 would compute exactly what they computed before,
so they are swapped for a module that replays the cached output of block j-1 and only blocks j..N-1 and
the head run (about half the model on average). The quantized layers are swapped in and the original
``nn.Linear`` modules put back afterwards, so the fp weights never leave the model.

I_r (plasticity): the squared norm of the gradient of the loss w.r.t. the unit's LoRA B matrices at
initialisation (B = 0, A random as PEFT initialises it), on the calibration text. Why this measure:
with B = 0 the first SGD step of size η on the adapter lowers the loss by η·||∇_B L||² to first order,
so it is exactly "how much an adapter here can reduce the loss, right now". Averaged over the random A
(``draws``) it is proportional to r·||∇_W L||²_F, a gradient (Fisher-like) measure of the whole weight,
yet it is computed through the real adapter that training attaches. One backward pass gives it for
every unit at once, so it costs ``draws`` forward+backward passes — far less than training each unit's
adapter separately (N short trainings), which would also be dominated by optimizer noise at a few steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.fidelity.quantized import quantized_layer
from qra_plugin.modules import find_blocks
from qra_plugin.plan import ModulePlan


@dataclass
class Reference:
    """What one unquantized forward pass leaves behind for the per-unit passes."""

    log_probs: list[torch.Tensor]  # per batch: (b, T, V) float32 next-token log-probabilities
    block_outputs: list[list[object]]  # per batch, per block: the block's raw output
    loss: float  # mean next-token loss


class _Replay(nn.Module):
    """Stands in for an early block: returns the cached output of the last skipped block."""

    def __init__(self, original: nn.Module, output: object) -> None:
        super().__init__()
        self.output = output
        for attr in ("attention_type", "layer_idx"):  # some models read these off the layer
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.output


def _batches(tokens: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [tokens[i : i + batch] for i in range(0, tokens.shape[0], batch)]


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a packed batch (every position is real text)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), reduction="sum"
    )


def kl_and_loss(logits: torch.Tensor, log_p: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """Summed KL(p || softmax(logits)) over positions and summed next-token loss, from one log_softmax.

    Computed as sum p·(log p − log q) with float32 pairwise sums (the shortcut through logsumexp and
    sum p·logits cancels badly: ~1e-3 nats of error per token at V = 49k, as large as a 4-bit signal).
    """
    log_q = torch.log_softmax(logits.float(), dim=-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum())
    loss = -float(log_q[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).sum())
    return kl, loss


@torch.no_grad()
def reference_pass(model: nn.Module, tokens: torch.Tensor, batch: int) -> Reference:
    """One unquantized forward over the calibration tokens, caching log-probs and block outputs."""
    _, blocks = find_blocks(model)
    outputs: list[list[object]] = []
    log_probs: list[torch.Tensor] = []
    current: list[object] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: current.append(out)) for b in blocks]
    loss_sum, count = 0.0, 0
    try:
        for chunk in _batches(tokens, batch):
            current.clear()
            logits = model(input_ids=chunk, use_cache=False).logits
            outputs.append(list(current))
            log_probs.append(torch.log_softmax(logits.float(), dim=-1))
            loss_sum -= float(log_probs[-1][:, :-1].gather(-1, chunk[:, 1:].unsqueeze(-1)).sum())
            count += chunk.shape[0] * (chunk.shape[1] - 1)
    finally:
        for hook in hooks:
            hook.remove()
    return Reference(log_probs=log_probs, block_outputs=outputs, loss=loss_sum / count)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _quantized_copy(linear: nn.Linear, plan: ModulePlan, dtype: torch.dtype) -> nn.Module:
    """Quantize through the runtime backend without touching ``linear``; stored in the search's layer cache
    (``planner.fidelity.quantized``), where the evaluations find the layers the priors already made."""

    return quantized_layer(linear, plan, dtype, keep=False)


@torch.no_grad()
def unit_damage(
    model: nn.Module,
    tokens: torch.Tensor,
    batch: int,
    ref: Reference,
    module_names: Sequence[str],
    block: int,
    plan: ModulePlan,
    dtype: torch.dtype,
) -> tuple[float, float]:
    """(mean KL per token, loss increase) when only ``module_names`` (all in ``block``) are quantized."""
    _, blocks = find_blocks(model)
    originals = {name: getattr(*_parent(model, name)) for name in module_names}
    early = [blocks[i] for i in range(block)]
    kl_sum, loss_sum, tokens_kl, tokens_loss = 0.0, 0.0, 0, 0
    try:
        for name, linear in originals.items():
            parent, child = _parent(model, name)
            setattr(parent, child, _quantized_copy(linear, plan, dtype))
        for b, chunk in enumerate(_batches(tokens, batch)):
            if block > 0:
                replay = ref.block_outputs[b][block - 1]
                for i in range(block):
                    blocks[i] = _Replay(early[i], replay)
            logits = model(input_ids=chunk, use_cache=False).logits
            kl, loss = kl_and_loss(logits, ref.log_probs[b], chunk)
            kl_sum += kl
            loss_sum += loss
            tokens_kl += chunk.numel()
            tokens_loss += chunk.shape[0] * (chunk.shape[1] - 1)
            del logits
    finally:
        for i, original in enumerate(early):
            blocks[i] = original
        for name, linear in originals.items():
            parent, child = _parent(model, name)
            setattr(parent, child, linear)
    return kl_sum / tokens_kl, loss_sum / tokens_loss - ref.loss


def plasticity(
    model: nn.Module,
    tokens: torch.Tensor,
    batch: int,
    unit_modules: Sequence[Sequence[str]],
    rank: int,
    draws: int,
    seed: int,
    on_draw: Callable[[], None] | None = None,
) -> list[float]:
    """Per unit: E_A ||∇_B L||² of real PEFT LoRA adapters at init (see the module docstring).

    Wraps ``model`` in PEFT and unloads it again, leaving the original modules in place.
    """
    from peft import LoraConfig, get_peft_model

    targets = [name for names in unit_modules for name in names]
    totals = {name: 0.0 for name in targets}
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    for draw in range(draws):
        torch.manual_seed(seed + draw)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, bias="none")
        peft_model = get_peft_model(model, config)
        try:
            peft_model.eval()  # no dropout; gradients still flow
            for chunk in _batches(tokens, batch):
                logits = peft_model(input_ids=chunk, use_cache=False).logits
                (_next_token_loss(logits, chunk) / n_tokens).backward()
                del logits
            base = peft_model.get_base_model()
            for name in targets:
                grad = base.get_submodule(name).lora_B["default"].weight.grad
                totals[name] += float(grad.pow(2).sum()) / draws
        finally:
            model = peft_model.unload()
        if on_draw is not None:
            on_draw()
    return [sum(totals[n] for n in names) for names in unit_modules]
