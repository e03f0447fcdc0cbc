"""Quantize each distinct layer once per search and reuse it across candidates, workers and resumes.

HQQ and bitsandbytes quantization is deterministic: the same weights with the same (bits, backend, group
size, axis, compute dtype) give the same layer, so a copy of a stored layer is exactly what a fresh
quantization makes — scores do not change. A layer is keyed by a digest of its *input weights* and those
settings (a pruned slice is simply other weights), kept in this process's memory and, when a directory is
set (``fidelity.layer_cache``, default ``OUT/layers``) and the backend's layers pickle (HQQ), on disk,
where the profile's I_q pass, both evaluation workers and a resumed search find it. Quantizing one
SmolLM2 projection on one CPU thread takes seconds (≈ 210 per candidate); a stored one loads in ms.

CPU only: on CUDA the cache would sit in device memory and count in the measured peak (and HQQ's
scale/zero dict does not follow ``.to()``), so there every evaluation quantizes for itself.
Stored layers are pickles (``torch.load(weights_only=False)``) written by this process's own search: the
directory has the trust of the store next to it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from planner.fidelity.contract import one_line
from qra_plugin.backends import get_backend
from qra_plugin.modules import quantizable_linears
from qra_plugin.plan import ModulePlan, Plan
from qra_plugin.prune import prune_model

_LOG = logging.getLogger(__name__)
_MEMORY: dict[str, nn.Module] = {}
#: (model, module name, kept channels, settings) -> layer key: the weights are hashed once per process
_KEYS: dict[tuple, str] = {}
_DIRECTORY: Path | None = None
#: lookups in this process: found in memory / found on disk / quantized (the fidelity run reports them)
STATS = {"hits": 0, "disk_hits": 0, "misses": 0}
_PACKAGES = {"hqq": "hqq", "bnb": "bitsandbytes"}


def use_directory(path: str | Path | None) -> None:
    """Where this process reads and writes stored layers (None: memory only)."""
    global _DIRECTORY
    _DIRECTORY = Path(path) if path else None


@contextlib.contextmanager
def directory_in_use(path: str | Path | None) -> Iterator[None]:
    """``use_directory`` for a block of work (the profile in a planner process), then the previous one."""
    before = _DIRECTORY
    use_directory(path)
    try:
        yield
    finally:
        use_directory(before)


def clear_memory() -> None:
    """Forget this process's layers and weight digests (disk files stay)."""
    _MEMORY.clear()
    _KEYS.clear()


def cache_directory(setting: str | None, out_dir: str | Path) -> Path | None:
    """``fidelity.layer_cache``: None = ``OUT/layers``, "off" = memory only, else that directory."""
    if setting == "off":
        return None
    return Path(setting).expanduser() if setting else Path(out_dir) / "layers"


def layer_key(linear: nn.Linear, mp: ModulePlan, dtype: torch.dtype) -> str:
    """Digest of the layer's input weights, its quantization settings (the plan's, with the backend's default
    group resolved, and every setting the backend file passes its quantizer) and the backend's and torch's
    versions: whatever can change the quantized tensors."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (linear.weight, linear.bias):
        if tensor is not None:
            data = tensor.detach().contiguous()
            digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
    backend = get_backend(mp.backend or "none")
    package = _PACKAGES.get(backend.name, backend.name)
    group = mp.group_size or backend.default_group.get(mp.bits)
    settings = [mp.bits, backend.name, group, mp.axis, str(dtype), backend.settings, package, _version(package)]
    digest.update(json.dumps([*settings, "torch", torch.__version__], sort_keys=True, default=str).encode())
    return digest.hexdigest()


@functools.cache
def _version(package: str) -> str:
    """The installed version of a backend's package, read once per process (keys are made per module)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def quantized_layer(
    linear: nn.Linear, mp: ModulePlan, dtype: torch.dtype, *, memo: tuple | None = None, keep: bool = True
) -> nn.Module:
    """A private quantized copy of ``linear`` (which is left untouched), from memory, disk or fresh.

    ``memo``: a caller's name for these exact weights (skips re-hashing them); ``keep``: hold the layer in
    this process's memory too (workers do; the profile, which asks for each layer once, does not)."""
    key = _KEYS.get(memo) if memo is not None else None
    if key is None:
        key = layer_key(linear, mp, dtype)
        if memo is not None:
            _KEYS[memo] = key
    layer = _MEMORY.get(key)
    if layer is not None:
        STATS["hits"] += 1
        return copy.deepcopy(layer)
    backend = get_backend(mp.backend)
    layer = _load(key) if backend.picklable else None
    if layer is not None:
        backend.restored(layer)
        STATS["disk_hits"] += 1
    else:
        STATS["misses"] += 1
        with torch.no_grad():  # a copied bias must be a leaf, not a clone tracked back to the base weights
            layer = backend.quantize(_shell(linear), mp, dtype)
        if backend.picklable:
            _save(key, layer)
    if keep:
        _MEMORY[key] = layer
        return copy.deepcopy(layer)
    return layer


def _shell(linear: nn.Linear) -> nn.Linear:
    """A Linear sharing ``linear``'s tensors: backends may delete or rebind their input's attributes."""
    shell = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    shell.weight = linear.weight
    shell.bias = linear.bias
    return shell


def _path(key: str) -> Path | None:
    return _DIRECTORY / f"{key}.pt" if _DIRECTORY is not None else None


def _load(key: str) -> nn.Module | None:
    path = _path(key)
    if path is None or not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file is only a miss: quantize again and overwrite it
        _LOG.warning("layer cache: cannot read %s (%s); quantizing again", path, one_line(repr(exc)))
        return None


def _save(key: str, layer: nn.Module) -> None:
    """Atomic (temp file + rename): a worker killed mid-write leaves no half file for another to read."""
    path = _path(key)
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(layer, tmp)
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - a layer that cannot be pickled, or a full disk, stays memory-only
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _LOG.warning("layer cache: cannot write %s (%s); the layer stays in memory only", path, one_line(repr(exc)))


def prequantize(model: nn.Module, plan: Plan, model_key: str, dtype: torch.dtype) -> None:
    """Put a quantized layer for every planned module below 16 bits into ``model`` (a private copy of the
    base model), stored ones where this search quantized the same weights the same way before.

    A pruned plan prunes ``model`` first; its slices are other weights, so they get other keys."""

    block_of = {s.name: s.block for s in quantizable_linears(model)} if plan.pruning else {}
    prune_model(model, plan)
    for name, mp in plan.modules.items():
        if mp.bits >= 16:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear) or linear.weight.device.type != "cpu":
            continue
        kept = plan.pruning.get(block_of.get(name, -1))
        settings = (mp.bits, mp.backend, mp.group_size, mp.axis, str(dtype))
        memo = (model_key, name, kept.model_dump_json() if kept is not None else "", *settings)
        setattr(parent, child, quantized_layer(linear, mp, dtype, memo=memo))
