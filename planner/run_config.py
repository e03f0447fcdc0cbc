"""The config a ``qra`` command runs: a qra-native YAML, or an Axolotl YAML with a ``qra:`` section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from planner.axolotl import is_axolotl_yaml, load_axolotl
from planner.config import QRAConfig, read_yaml


@dataclass(frozen=True)
class RunConfig:
    config: QRAConfig
    out_dir: Path
    #: where ``axolotl train`` reads the plan (the YAML's ``qra_plan``); None for a qra-native config
    plan_target: Path | None = None
    axolotl: bool = False


def load_run_config(path: Path, out: Path | None = None, *, prepare_data: bool = True) -> RunConfig:
    """Read either kind of config; an Axolotl one (it names ``base_model``) has Axolotl validate it and,
    with ``prepare_data``, prepare the data its fidelity runs train on under ``OUT/axolotl_data``."""

    raw = read_yaml(Path(path))
    if not is_axolotl_yaml(raw):
        cfg = QRAConfig.load(path)
        return RunConfig(cfg, out if out is not None else Path("runs") / cfg.name)
    cfg, out_dir, plan_target = load_axolotl(Path(path), raw, out, prepare_data=prepare_data)
    return RunConfig(cfg, out_dir, plan_target, axolotl=True)
