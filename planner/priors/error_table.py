"""The error table behind the zero-evaluation plan (``qra baseline table_alloc``), cached next to the priors.

Per (unit, bits, rank) of the search space: the starting output error an error-aware init leaves
(``planner.priors.adapter_init.error_table``: one SVD per module and bits gives every rank), on the same
calibration rows and second moments ``qra search`` computes the init file from. Minutes on SmolLM2-135M, no
fine-tuning. ``error_table.json`` is keyed by the model, its weights, the calibration tokens, the space's
bits / ranks / backend / unit, the damping and the init code's version; another key measures again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from planner.config import QRAConfig
from planner.fidelity.contract import ADAPTER_INIT_VERSION
from planner.loading import load_model, load_tokenizer
from planner.priors.adapter_init import error_table
from planner.priors.calibration import calibration_batch, tokens_hash
from planner.priors.moments import cached_second_moments
from planner.priors.profile import _read_json, weights_hash
from qra_plugin.io import write_json_atomic
from qra_plugin.plan import fingerprint

if TYPE_CHECKING:  # the space is searched later in the data flow; the table only reads its axes
    from planner.search.space import SearchSpace

log = logging.getLogger("qra")

TABLE_FILE = "error_table.json"
Table = dict[tuple[int, int, int], float]


def cached_error_table(cfg: QRAConfig, space: SearchSpace, out_dir: str | Path) -> Table:
    """The error table of ``space`` on ``cfg``'s model, from ``<out_dir>/error_table.json`` when its key matches."""
    p = cfg.profile
    model = load_model(cfg.model).eval()
    tokens = calibration_batch(
        load_tokenizer(cfg.model), cfg.data, p.calibration_examples, p.seq_len, p.calibration_offset, cfg.seed
    )
    key = _key(cfg, space, fingerprint(model).model_dump_json(), weights_hash(model), tokens_hash(tokens))
    path = Path(out_dir) / TABLE_FILE
    stored = _read_json(path)  # the priors' reader: None for a missing, unreadable or non-object file
    if stored is not None and stored.get("key") == key and isinstance(stored.get("table"), dict):
        log.info("qra: error table cache hit: %s", path)
        return table_from_rows(stored["table"])
    names = [s.name for s in space.specs]
    moments = cached_second_moments(model, tokens, names, out_dir, p.batch)
    table = error_table(model, space, moments, cfg.adapter.damping)
    write_json_atomic(path, {"key": key, "table": {f"{u}/{b}/{r}": v for (u, b, r), v in sorted(table.items())}})
    return table


def _key(cfg: QRAConfig, space: SearchSpace, model_fp: str, weights: str, tokens: str) -> dict[str, Any]:
    return {
        "model": model_fp,
        "weights": weights,
        "calibration": tokens,
        "bits": list(space.bits),
        "ranks": list(space.ranks),
        "backend": space.backend,
        "unit": space.unit,
        "damping": cfg.adapter.damping,
        "init_version": ADAPTER_INIT_VERSION,
    }


def read_table(path: str | Path) -> Table:
    """The table a file holds under ``"table"`` (this cache, or a benchmark's committed table), keys parsed."""
    return table_from_rows(json.loads(Path(path).read_text())["table"])


def table_from_rows(rows: dict[str, float]) -> Table:
    """``{"unit/bits/rank": error}`` as stored → ``{(unit, bits, rank): error}``."""
    return {_parse(k): float(v) for k, v in rows.items()}


def _parse(key: str) -> tuple[int, int, int]:
    unit, bits, rank = (int(x) for x in key.split("/"))
    return unit, bits, rank
