"""Budgets: absolute sizes (``22GiB``), or the memory of a uniform plan (``uniform:4bit:r16``, with a backend
as ``uniform:4bit-bnb:r16``), of the peak (default, ``peak:``), of what scales with the plan (``plan:``:
planned weights + quantization metadata + LoRA + its gradients and optimizer states) or of the weights only
(``weights:``).

One syntax for every relative budget, fed by the backend registry: ``uniform:<bits>bit[-<backend>]:r<rank>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from planner.memory.breakdown import min_plan_bytes, plan_bytes, uniform_plan
from planner.model_info import ModelInfo
from planner.settings import TrainingSettings
from qra_plugin.backends import registry
from qra_plugin.errors import QRAError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNIFORM = re.compile(r"^uniform:(\d+)(?:bit)?(?:-([a-z0-9_]+))?:r(\d+)$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"22GiB"``, ``"1.5 GB"``, ``"123456"`` -> bytes."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise QRAError(f"not a memory size: {text!r} (use e.g. 22GiB, 800MiB, 1.5GB or plain bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class Budget:
    """A memory budget: absolute bytes, or relative to a uniform plan; of peak or weight-only memory."""

    kind: str  # "peak", "plan" or "weights"
    bytes: int | None = None  # absolute budgets
    uniform: tuple[int, int, str] | None = None  # (bits, rank, backend) of a relative budget
    text: str = ""

    @classmethod
    def parse(cls, text: str | int) -> Budget:
        """``"22GiB"``, ``12345``, ``"uniform:4bit:r16"``, ``"uniform:4bit-bnb:r16"``, ``"weights:..."``."""
        if isinstance(text, int):
            if text <= 0:
                raise QRAError(f"a memory budget must be positive, got {text}")
            return cls(kind="peak", bytes=text, text=str(text))
        raw = str(text).strip()
        kind, body = "peak", raw
        for prefix in ("weights:", "peak:", "plan:"):
            if raw.lower().startswith(prefix):
                kind, body = prefix[:-1], raw[len(prefix) :].strip()
        m = _UNIFORM.match(body)
        if m:
            bits, backend, rank = int(m.group(1)), (m.group(2) or "hqq").lower(), int(m.group(3))
            _check_uniform(raw, bits, backend)
            return cls(kind=kind, uniform=(bits, rank, backend), text=raw)
        if body.lower().startswith("uniform"):
            raise QRAError(f"bad relative budget {raw!r} (use e.g. uniform:4bit:r16 or uniform:4bit-bnb:r16)")
        size = parse_size(body)
        if size <= 0:
            raise QRAError(f"a memory budget must be positive, got {raw!r}")
        return cls(kind=kind, bytes=size, text=raw)

    def resolve(self, info: ModelInfo, settings: TrainingSettings) -> int:
        """Bytes this budget allows for ``info``'s model under ``settings``."""
        if self.bytes is not None:
            return self.bytes
        assert self.uniform is not None
        bits, rank, backend = self.uniform
        return plan_bytes(info, uniform_plan(info, bits, rank, backend), settings, self.kind)

    def check_feasible(
        self,
        info: ModelInfo,
        settings: TrainingSettings,
        bits_choices: Sequence[int],
        rank_choices: Sequence[int],
        backend: str = "hqq",
    ) -> int:
        """Resolve the budget; raise QRAError naming the minimum if even the cheapest plan exceeds it."""
        from planner.sharding import check_space_shards, is_single_device

        check_space_shards(settings, bits_choices, backend, settings.dtype)
        limit = self.resolve(info, settings)
        minimum = min_plan_bytes(info, settings, bits_choices, rank_choices, backend, self.kind)
        if minimum > limit:
            what = {"peak": "peak training memory", "plan": "plan memory", "weights": "weight memory"}[self.kind]
            if not is_single_device(settings):
                what += f" per rank ({settings.world_size} ranks, {settings.sharding or 'ddp'})"
            raise QRAError(
                f"budget {self.text or limit} = {format_bytes(limit)} is below the cheapest plan's {what} "
                f"{format_bytes(minimum)} ({minimum} bytes); raise the budget or widen the search space"
            )
        return limit


def _check_uniform(raw: str, bits: int, backend: str) -> None:

    backends = registry()
    if backend not in backends or backend == "none":
        known = ", ".join(sorted(b for b in backends if b != "none"))
        raise QRAError(f"budget {raw!r}: unknown backend {backend!r} (known: {known})")
    if bits not in (2, 3, 4, 8, 16):
        raise QRAError(f"budget {raw!r}: bits must be one of 2, 3, 4, 8, 16")
    if bits != 16 and bits not in backends[backend].bits:
        raise QRAError(
            f"budget {raw!r}: {backend} stores only {', '.join(map(str, sorted(backends[backend].bits)))} bits"
        )


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
