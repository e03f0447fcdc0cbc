"""Shared fixtures: tiny real Llama models built in code and mixed plans over 2/3/4/8/16 bits."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import tests.launch  # noqa: E402,F401  (snapshots the environment launches start from, before any test runs)
from qra_plugin.plan import ModulePlan, Plan  # noqa: E402

#: Cycled over the modules: every bits/backend combination, ranks including 0.
MIXED_CHOICES = [
    ModulePlan(bits=2, rank=4),
    ModulePlan(bits=3, rank=0),
    ModulePlan(bits=4, backend="bnb", rank=8),
    ModulePlan(bits=8, backend="bnb", rank=16),
    ModulePlan(bits=16, rank=8),
    ModulePlan(bits=8, rank=4),
    ModulePlan(bits=4, rank=12),
]


def mixed_plan(model) -> Plan:
    """A plan where consecutive modules cycle through every (bits, backend) and several ranks."""
    base = Plan.uniform(model, bits=4, rank=8)
    modules = {name: MIXED_CHOICES[i % len(MIXED_CHOICES)] for i, name in enumerate(base.modules)}
    return Plan(fingerprint=base.fingerprint, modules=modules)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from planner.tiny import tiny_tokenizer as build

    return build()


@pytest.fixture
def tiny_model():
    from planner.tiny import build_tiny_model

    return build_tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama saved as a normal HF directory with its tokenizer (for Axolotl / load_for_inference)."""
    from planner.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
