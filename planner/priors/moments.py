"""Calibration statistics: per planned linear, H = XᵀX/n of its input on the calibration rows (float64).

One forward pass with pre-hooks collects them. Linears that read the same tensor (q/k/v, gate/up) share
one H, so a block of a Llama holds four, not seven. The cache (``moments.safetensors`` next to
``priors.json``) stores them in float32 (half the bytes; H's float32 rounding is far below the damping
λ = 0.01·mean diag) and is keyed, like the priors, by the model fingerprint, a hash of the weights and
the calibration-token hash; a key mismatch recomputes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from planner.priors.calibration import tokens_hash
from planner.priors.profile import weights_hash
from qra_plugin.io import write_bytes_atomic
from qra_plugin.plan import fingerprint

log = logging.getLogger("qra")

MOMENTS_FILE = "moments.safetensors"


class _Accumulator:
    """Sums xᵀx per distinct input; a module called on the very tensor the previous one got (q/k/v, gate/up)
    shares its sum. The previous input is held, so its memory cannot be reused by another tensor."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.alias: dict[str, str] = {}  # module -> the module whose sum it shares
        self._last: tuple[str, torch.Tensor] | None = None

    def hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            same = self._last is not None and self._last[1] is x
            owner = self.alias.get(self._last[0], self._last[0]) if same else name
            self._last = (name, x)
            self.alias.setdefault(name, owner)
            if self.alias[name] != name:
                return
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            if name not in self.sums:
                self.sums[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
                self.tokens[name] = 0
            self.sums[name] += (flat.T @ flat).cpu()
            self.tokens[name] += flat.shape[0]

        return pre_hook

    def next_batch(self) -> None:
        self._last = None


def second_moments(
    model: nn.Module, tokens: torch.Tensor, names: Sequence[str], batch: int = 8
) -> dict[str, torch.Tensor]:
    """H = XᵀX/n (float64) of each named linear's input over the calibration rows, one forward pass."""
    acc = _Accumulator()
    handles = [model.get_submodule(n).register_forward_pre_hook(acc.hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch):
                acc.next_batch()
                model(input_ids=tokens[start : start + batch].to(device))
    finally:
        for handle in handles:
            handle.remove()
    shared = {n: acc.sums[n] / acc.tokens[n] for n in acc.sums}
    return {n: shared[acc.alias[n]] for n in names}


def _key(fingerprint: str, weights: str, calibration: str) -> dict[str, str]:
    return {"fingerprint": fingerprint, "weights_hash": weights, "calibration_hash": calibration}


def load_moments(path: Path, key: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The cached H's when the file's key matches (None otherwise: recompute)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if json.loads(meta.get("key", "{}")) != key:
                return None
            stored = {n: handle.get_tensor(n).double() for n in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
            alias = json.loads(meta["alias"])
    except Exception as exc:  # a torn or foreign file is a cache miss, not an error
        log.warning("qra: ignoring unreadable moments cache %s (%s)", path, exc)
        return None
    return {n: stored[a] for n, a in alias.items()}


def save_moments(path: Path, moments: dict[str, torch.Tensor], key: dict[str, str]) -> Path:
    """One float32 tensor per distinct H (shared ones once), the module -> tensor map and the key as metadata."""
    from safetensors.torch import save

    first: dict[int, str] = {}
    alias = {n: first.setdefault(id(h), n) for n, h in moments.items()}
    tensors = {n: moments[n].float().contiguous() for n in set(alias.values())}
    meta = {"key": json.dumps(key, sort_keys=True), "alias": json.dumps(alias)}
    return write_bytes_atomic(path, save(tensors, metadata=meta))


def cached_second_moments(
    model: nn.Module, tokens: torch.Tensor, names: Sequence[str], out_dir: str | Path, batch: int = 8
) -> dict[str, torch.Tensor]:
    """``second_moments`` through the cache next to the priors (same fingerprint / weights / calibration key)."""

    key = _key(fingerprint(model).model_dump_json(), weights_hash(model), tokens_hash(tokens))
    path = Path(out_dir) / MOMENTS_FILE
    cached = load_moments(path, key)
    if cached is not None and set(names) <= set(cached):
        log.info("qra: calibration moments cache hit: %s", path)
        return {n: cached[n] for n in names}
    moments = second_moments(model, tokens, names, batch)
    save_moments(path, moments, key)
    return moments
