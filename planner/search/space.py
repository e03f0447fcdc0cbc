"""The search space: one (bits, rank) choice per unit, and the ordinal geometry the optimisers move in.

A *config* is a tuple of ``(bits, rank)`` pairs, one per unit (a transformer block by default, or a single
linear module). Both stages and the store see configs only through this module: the ordinal encoding
(index of a choice scaled to [0, 1]) is what the GPs model, one-step neighbours are what mutation and the
trust region walk along, and ``to_plan`` turns a config into the exact ``Plan`` training will apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qra_plugin.errors import QRAError
from qra_plugin.modules import LinearSpec
from qra_plugin.plan import Fingerprint, Plan

Pair = tuple[int, int]
Config = tuple[Pair, ...]


@dataclass(frozen=True)
class SearchSpace:
    """Per-unit bit and rank choices for one model (``unit`` is ``block`` or ``module``)."""

    fingerprint: Fingerprint
    specs: tuple[LinearSpec, ...]
    unit: str
    bits: tuple[int, ...]
    ranks: tuple[int, ...]
    backend: str = "hqq"
    #: structured pruning every candidate shares (``space.prune``), as the plan stores it; empty: none
    pruning: tuple[tuple[int, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.unit not in ("block", "module"):
            raise QRAError(f"space.unit must be 'block' or 'module', not {self.unit!r}")
        if not self.bits or not self.ranks:
            raise QRAError("space.bits and space.ranks need at least one choice each")
        if list(self.bits) != sorted(set(self.bits)) or list(self.ranks) != sorted(set(self.ranks)):
            raise QRAError("space.bits and space.ranks must be sorted and without repeats")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: Any, info: Any, pruning: dict[int, Any] | None = None) -> SearchSpace:
        """From a ``QRAConfig`` and a ``planner.memory.ModelInfo`` (``.fingerprint``, ``.linears``); ``pruning``
        (``BlockPruning`` per block) is applied to every candidate's plan."""
        space = cls.from_parts(cfg.space, info.fingerprint, info.linears)
        return replace(space, pruning=tuple(sorted((pruning or {}).items())))

    @classmethod
    def from_parts(cls, section: Any, fp: Fingerprint, specs: Sequence[LinearSpec]) -> SearchSpace:
        """From a ``SpaceSection``-like object, a fingerprint and the model's quantizable linears."""
        return cls(
            fingerprint=fp,
            specs=tuple(specs),
            unit=section.unit,
            bits=tuple(sorted(set(int(b) for b in section.bits))),
            ranks=tuple(sorted(set(int(r) for r in section.ranks))),
            backend=section.backend,
        )

    # ---------------------------------------------------------------- units
    @property
    def n_units(self) -> int:
        return len(self.specs) if self.unit == "module" else max(s.block for s in self.specs) + 1

    @property
    def unit_names(self) -> list[str]:
        if self.unit == "module":
            return [s.name for s in self.specs]
        return [f"block.{i}" for i in range(self.n_units)]

    @property
    def unit_blocks(self) -> list[int]:
        """The transformer block each unit belongs to (maps block-level priors onto module units)."""
        return [s.block for s in self.specs] if self.unit == "module" else list(range(self.n_units))

    def unit_numel(self) -> np.ndarray:
        """Weight parameters per unit (how much memory a unit's choice moves)."""
        out = np.zeros(self.n_units, dtype=np.int64)
        for i, s in enumerate(self.specs):
            out[i if self.unit == "module" else s.block] += s.numel
        return out

    @property
    def dim(self) -> int:
        """Length of the ordinal encoding: a bits and a rank coordinate per unit."""
        return 2 * self.n_units

    # ---------------------------------------------------------------- indices and encoding
    def indices(self, config: Config) -> np.ndarray:
        """(n_units, 2) int array of choice indices; raises QRAError on a choice outside the space."""
        self.check(config)
        bi = {b: i for i, b in enumerate(self.bits)}
        ri = {r: i for i, r in enumerate(self.ranks)}
        return np.array([[bi[b], ri[r]] for b, r in config], dtype=np.int64)

    def from_indices(self, idx: np.ndarray) -> Config:
        return tuple((self.bits[int(b)], self.ranks[int(r)]) for b, r in np.asarray(idx).reshape(-1, 2))

    def check(self, config: Config) -> None:
        if len(config) != self.n_units:
            raise QRAError(f"a config needs {self.n_units} (bits, rank) pairs, got {len(config)}")
        for b, r in config:
            if b not in self.bits or r not in self.ranks:
                raise QRAError(f"({b}, {r}) is outside the space (bits {list(self.bits)}, ranks {list(self.ranks)})")

    def encode(self, config: Config) -> np.ndarray:
        """Ordinal encoding in [0, 1]^dim: bits index then rank index per unit, each scaled by its max."""
        idx = self.indices(config).astype(np.float64)
        idx[:, 0] /= max(len(self.bits) - 1, 1)
        idx[:, 1] /= max(len(self.ranks) - 1, 1)
        return idx.reshape(-1)

    def decode(self, x: np.ndarray) -> Config:
        """Nearest config to a point of [0, 1]^dim (inverse of ``encode`` on the grid)."""
        x = np.clip(np.asarray(x, dtype=np.float64).reshape(-1, 2), 0.0, 1.0)
        bi = np.rint(x[:, 0] * (len(self.bits) - 1)).astype(np.int64)
        ri = np.rint(x[:, 1] * (len(self.ranks) - 1)).astype(np.int64)
        return self.from_indices(np.stack([bi, ri], axis=1))

    def distance(self, a: Config, b: Config) -> int:
        """L1 distance in choice indices: how many one-step moves separate two configs."""
        return int(np.abs(self.indices(a) - self.indices(b)).sum())

    # ---------------------------------------------------------------- moves
    def neighbours(self, config: Config) -> list[Config]:
        """Every config one ordinal step away in one coordinate (a unit's bits or its rank)."""
        idx = self.indices(config)
        sizes = (len(self.bits), len(self.ranks))
        out: list[Config] = []
        for u in range(self.n_units):
            for d in (0, 1):
                for step in (-1, 1):
                    v = idx[u, d] + step
                    if 0 <= v < sizes[d]:
                        moved = idx.copy()
                        moved[u, d] = v
                        out.append(self.from_indices(moved))
        return out

    def sample(self, rng: np.random.Generator) -> Config:
        """A uniformly random config."""
        bi = rng.integers(0, len(self.bits), size=self.n_units)
        ri = rng.integers(0, len(self.ranks), size=self.n_units)
        return self.from_indices(np.stack([bi, ri], axis=1))

    def uniform(self, bits: int, rank: int) -> Config:
        """Every unit at the same choice (the uniform baselines)."""
        config = tuple((bits, rank) for _ in range(self.n_units))
        self.check(config)
        return config

    # ---------------------------------------------------------------- plans
    def to_plan(self, config: Config, meta: dict[str, Any] | None = None) -> Plan:
        """The plan training applies for ``config`` (per block or per module, with the space's backend)."""
        self.check(config)
        pairs = [(int(b), int(r)) for b, r in config]
        if self.unit == "block":
            plan = Plan.from_block_pairs(self.fingerprint, self.specs, pairs, self.backend)
        else:
            plan = Plan.from_module_pairs(self.fingerprint, self.specs, pairs, self.backend)
        if self.pruning:
            plan = plan.model_copy(update={"pruning": dict(self.pruning)})
        if meta:
            plan.meta.update(meta)
        return plan


def config_key(config: Config) -> str:
    """A compact, stable text form of a config (for JSON output and logs): ``4/16,8/8,...``."""
    return ",".join(f"{b}/{r}" for b, r in config)


def parse_config_key(text: str) -> Config:
    return tuple((int(b), int(r)) for b, r in (p.split("/") for p in text.split(",")))


class BudgetCost:
    """Bytes of a config: exact (memoised) for budget decisions, per-unit marginals for ranking moves.

    ``total`` is the real memory model (``planner.memory.plan_bytes`` of ``space.to_plan(config)``).
    Budget repair needs the bytes each one-step move saves for every unit at every step; asking the
    full model for all of them is slow on 30 blocks × 7 modules, so the marginal bytes of each unit's
    choices are measured once against a reference config and used to *rank* moves, while every
    fits/does-not-fit decision still uses the exact total.
    """

    def __init__(self, space: SearchSpace, total: Any, reference: Config | None = None) -> None:
        self.space = space
        self._total = total
        self._cache: dict[Config, int] = {}
        ref = reference or space.uniform(space.bits[-1], space.ranks[-1])
        ref_cost = self(ref)
        self.marginal: list[dict[Pair, int]] = []
        for u in range(space.n_units):
            row: dict[Pair, int] = {}
            for b in space.bits:
                for r in space.ranks:
                    row[(b, r)] = self(ref[:u] + ((b, r),) + ref[u + 1 :]) - ref_cost
            self.marginal.append(row)

    def __call__(self, config: Config) -> int:
        config = tuple(config)
        if config not in self._cache:
            self._cache[config] = int(self._total(config))
        return self._cache[config]

    def saving(self, unit: int, old: Pair, new: Pair) -> int:
        """Bytes saved (approximately) by changing one unit's choice from ``old`` to ``new``."""
        return self.marginal[unit][old] - self.marginal[unit][new]
