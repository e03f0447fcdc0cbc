"""The search space: one (bits, rank[, prune]) choice per unit, and the ordinal geometry the optimisers move in.

A *config* is a tuple of choices, one per unit (a transformer block by default, or a single linear module):
``(bits, rank)``, or ``(bits, rank, prune ratio)`` when ``space.prune`` offers several ratios (AutoMixQ's
third dimension, per block). Both stages and the store see configs only through this module: the ordinal
encoding (index of a choice scaled to [0, 1]) is what the GPs model, one-step neighbours are what mutation
and the trust region walk along, and ``to_plan`` turns a config into the exact ``Plan`` training will apply.
Every axis is ordered cheapest first (pruning: the largest ratio first), so "one index down" always saves
memory and "one index up" always buys quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

import numpy as np

from planner.priors.pruning import pruning_for_ratios
from planner.scale import with_alpha_rule
from qra_plugin.errors import QRAError
from qra_plugin.modules import LinearSpec
from qra_plugin.plan import Fingerprint, Plan

Pair = tuple  # one unit's choice: (bits, rank) or (bits, rank, prune ratio)
#: a candidate allocation: one choice per unit (the word "config" means the settings, ``QRAConfig``)
Allocation = tuple[Pair, ...]


@dataclass(frozen=True)
class SearchSpace:
    """Per-unit bit, rank (and pruning) choices for one model (``unit`` is ``block`` or ``module``)."""

    fingerprint: Fingerprint
    specs: tuple[LinearSpec, ...]
    unit: str
    bits: tuple[int, ...]
    ranks: tuple[int, ...]
    backend: str = "hqq"
    #: structured pruning every candidate shares (``space.prune: [ratio]``), as the plan stores it; empty: none
    pruning: tuple[tuple[int, Any], ...] = ()
    #: searched pruning ratios, largest first (``space.prune`` with several); empty: not a dimension
    prune: tuple[float, ...] = ()
    #: per-channel importance that turns a block's ratio into its kept indices (with ``prune``)
    channels: Any = None
    #: the LoRA scale each module gets (``planner.scale``): rule and the user's lora_r / lora_alpha
    alpha_rule: str = "sqrt"
    lora_r: int = 16
    lora_alpha: float = 32.0
    #: how each quantized module's adapter starts (``adapter.init``): "error" plans carry ``init: error``, so
    #: their fidelity runs start from the quantization error, as the final plan's init file will
    init: str = "zero"

    def __post_init__(self) -> None:
        if self.unit not in ("block", "module"):
            raise QRAError(f"space.unit must be 'block' or 'module', not {self.unit!r}")
        if not self.bits or not self.ranks:
            raise QRAError("space.bits and space.ranks need at least one choice each")
        if list(self.bits) != sorted(set(self.bits)) or list(self.ranks) != sorted(set(self.ranks)):
            raise QRAError("space.bits and space.ranks must be sorted and without repeats")
        if self.prune and (list(self.prune) != sorted(set(self.prune), reverse=True) or self.channels is None):
            raise QRAError("searched pruning ratios must be distinct, largest first, with a channel importance")
        if self.prune and (self.unit != "block" or self.pruning):
            raise QRAError("a searched pruning ratio is per block and excludes a fixed pruning")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(
        cls, cfg: Any, info: Any, pruning: dict[int, Any] | None = None, channels: Any = None
    ) -> SearchSpace:
        """From a ``QRAConfig`` and a ``planner.memory.ModelInfo`` (``.fingerprint``, ``.linears``); ``pruning``
        (``BlockPruning`` per block) is applied to every candidate's plan; ``channels`` (a
        ``ChannelImportance``) is needed when ``space.prune`` offers several ratios."""
        space = cls.from_parts(cfg.space, info.fingerprint, info.linears)
        searched = tuple(sorted(cfg.space.searched_prune, reverse=True))
        adapter = cfg.adapter
        return replace(
            space,
            pruning=tuple(sorted((pruning or {}).items())),
            prune=searched,
            channels=channels if searched else None,
            alpha_rule=adapter.alpha_rule,
            lora_r=adapter.lora_r,
            lora_alpha=adapter.lora_alpha,
            init=adapter.init,
        )

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

    # ---------------------------------------------------------------- axes
    @property
    def axes(self) -> tuple[tuple, ...]:
        """The choices of each coordinate of a unit, cheapest first: bits, ranks (and pruning ratios)."""
        return (self.bits, self.ranks, self.prune) if self.prune else (self.bits, self.ranks)

    @property
    def n_axes(self) -> int:
        return 3 if self.prune else 2

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(a) for a in self.axes)

    def choices(self) -> list[Pair]:
        """Every choice one unit can take."""
        return list(product(*self.axes))

    def choice(self, bits: int, rank: int, prune: float | None = None) -> Pair:
        """One unit's choice in this space's shape (a pruning ratio only where it is searched; by default the
        least pruning the space offers)."""
        if not self.prune:
            return (bits, rank)
        return (bits, rank, self.prune[-1] if prune is None else float(prune))

    # ---------------------------------------------------------------- units
    @property
    def n_units(self) -> int:
        return len(self.specs) if self.unit == "module" else max(s.block for s in self.specs) + 1

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
        """Length of the ordinal encoding: a bits, a rank (and a pruning) coordinate per unit."""
        return self.n_axes * self.n_units

    # ---------------------------------------------------------------- indices and encoding
    def indices(self, config: Allocation) -> np.ndarray:
        """(n_units, n_axes) int array of choice indices; raises QRAError on a choice outside the space."""
        self.check(config)
        lookup = [{v: i for i, v in enumerate(axis)} for axis in self.axes]
        return np.array([[lookup[d][v] for d, v in enumerate(c)] for c in config], dtype=np.int64)

    def from_indices(self, idx: np.ndarray) -> Allocation:
        rows = np.asarray(idx).reshape(-1, self.n_axes)
        return tuple(tuple(axis[int(i)] for axis, i in zip(self.axes, row, strict=True)) for row in rows)

    def check(self, config: Allocation) -> None:
        if len(config) != self.n_units:
            shape = "(bits, rank, prune) choices" if self.prune else "(bits, rank) pairs"
            raise QRAError(f"a config needs {self.n_units} {shape}, one per unit, got {len(config)}")
        for c in config:
            if len(c) != self.n_axes or any(v not in axis for v, axis in zip(c, self.axes, strict=True)):
                raise QRAError(
                    f"{tuple(c)} is outside the space (bits {list(self.bits)}, ranks {list(self.ranks)}"
                    + (f", prune {list(self.prune)})" if self.prune else ")")
                )

    def encode(self, config: Allocation) -> np.ndarray:
        """Ordinal encoding in [0, 1]^dim: each coordinate's index per unit, scaled by its max."""
        idx = self.indices(config).astype(np.float64)
        idx /= np.maximum(np.array(self.sizes) - 1, 1)
        return idx.reshape(-1)

    def decode(self, x: np.ndarray) -> Allocation:
        """Nearest config to a point of [0, 1]^dim (inverse of ``encode`` on the grid)."""
        x = np.clip(np.asarray(x, dtype=np.float64).reshape(-1, self.n_axes), 0.0, 1.0)
        return self.from_indices(np.rint(x * (np.array(self.sizes) - 1)).astype(np.int64))

    def distance(self, a: Allocation, b: Allocation) -> int:
        """L1 distance in choice indices: how many one-step moves separate two configs."""
        return int(np.abs(self.indices(a) - self.indices(b)).sum())

    # ---------------------------------------------------------------- moves
    def neighbours(self, config: Allocation) -> list[Allocation]:
        """Every config one ordinal step away in one coordinate (a unit's bits, rank or pruning)."""
        idx = self.indices(config)
        out: list[Allocation] = []
        for u in range(self.n_units):
            for d, size in enumerate(self.sizes):
                for step in (-1, 1):
                    v = idx[u, d] + step
                    if 0 <= v < size:
                        moved = idx.copy()
                        moved[u, d] = v
                        out.append(self.from_indices(moved))
        return out

    def sample(self, rng: np.random.Generator) -> Allocation:
        """A uniformly random config."""
        cols = [rng.integers(0, size, size=self.n_units) for size in self.sizes]
        return self.from_indices(np.stack(cols, axis=1))

    def uniform(self, bits: int, rank: int, prune: float | None = None) -> Allocation:
        """Every unit at the same choice (the uniform baselines; least pruned unless ``prune`` is given)."""
        config = tuple(self.choice(bits, rank, prune) for _ in range(self.n_units))
        self.check(config)
        return config

    def richest(self) -> Allocation:
        """The most expensive config: most bits, most rank, least pruning everywhere."""
        return self.from_indices(np.tile(np.array(self.sizes) - 1, (self.n_units, 1)))

    def cheapest(self) -> Allocation:
        return self.from_indices(np.zeros((self.n_units, self.n_axes), dtype=np.int64))

    # ---------------------------------------------------------------- plans
    def to_plan(self, config: Allocation, meta: dict[str, Any] | None = None) -> Plan:
        """The plan training applies for ``config`` (per block or per module, with the space's backend)."""
        self.check(config)
        pairs = [(int(c[0]), int(c[1])) for c in config]
        if self.unit == "block":
            plan = Plan.from_block_pairs(self.fingerprint, self.specs, pairs, self.backend)
        else:
            plan = Plan.from_module_pairs(self.fingerprint, self.specs, pairs, self.backend)
        if (self.alpha_rule, self.lora_alpha / self.lora_r) != ("rank", 2.0):
            plan = with_alpha_rule(plan, self.alpha_rule, self.lora_r, self.lora_alpha)
        if self.init == "error":  # quantized modules with an adapter start from their quantization error
            plan = plan.with_init("error")
        pruning = dict(self.pruning) or self._searched_pruning(config)
        if pruning:
            plan = plan.model_copy(update={"pruning": pruning})
        if meta:
            plan.meta.update(meta)
        return plan

    def _searched_pruning(self, config: Allocation) -> dict[int, Any]:
        """Each block's kept channels for its chosen ratio (none when the ratio is not searched)."""
        if not self.prune:
            return {}

        return pruning_for_ratios(self.channels, [float(c[2]) for c in config])


def allocation_key(config: Allocation) -> str:
    """A compact, stable text form of an allocation (for JSON output and logs): ``4/16,8/8,...`` (with a pruning
    ratio: ``4/16/0.25,...``)."""
    return ",".join("/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in c) for c in config)


def parse_allocation_key(text: str) -> Allocation:
    def one(part: str) -> Pair:
        values = part.split("/")
        return (int(values[0]), int(values[1]), *(float(v) for v in values[2:]))

    return tuple(one(p) for p in text.split(","))


class BudgetCost:
    """Bytes of a config: exact (memoised) for budget decisions, per-unit marginals for ranking moves.

    ``total`` is the real memory model (``planner.memory.plan_bytes`` of ``space.to_plan(config)``).
    Budget repair needs the bytes each one-step move saves for every unit at every step; asking the
    full model for all of them is slow on 30 blocks × 7 modules, so the marginal bytes of each unit's
    choices are measured once against a reference config and used to *rank* moves, while every
    fits/does-not-fit decision still uses the exact total.
    """

    def __init__(self, space: SearchSpace, total: Any, reference: Allocation | None = None) -> None:
        self.space = space
        self._total = total
        self._cache: dict[Allocation, int] = {}
        ref = reference or space.richest()
        ref_cost = self(ref)
        self.marginal: list[dict[Pair, int]] = []
        for u in range(space.n_units):
            row = {c: self(ref[:u] + (c,) + ref[u + 1 :]) - ref_cost for c in space.choices()}
            self.marginal.append(row)

    def __call__(self, config: Allocation) -> int:
        config = tuple(config)
        if config not in self._cache:
            self._cache[config] = int(self._total(config))
        return self._cache[config]

    def saving(self, unit: int, old: Pair, new: Pair) -> int:
        """Bytes saved (approximately) by changing one unit's choice from ``old`` to ``new``."""
        return self.marginal[unit][old] - self.marginal[unit][new]
