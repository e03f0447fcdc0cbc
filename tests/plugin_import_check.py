"""Run as a script in a fresh process: import every ``qra_plugin`` module, apply a plan to a tiny Llama built in
code, and print one JSON line saying which planner-side modules that pulled into ``sys.modules``.

Shared by tests/test_import_boundaries.py (the dev venv) and benchmarks/light_install.sh (a fresh venv with
``pip install .`` and no extras), so it imports nothing but qra_plugin's runtime dependencies — no pytest.
Run it from outside the repository, or the source tree's ``planner`` would be importable.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import tempfile
from pathlib import Path

#: what a training node must never load for qra_plugin: the planner and its heavy search/report dependencies
FORBIDDEN = ("botorch", "gpytorch", "hyperopt", "matplotlib", "ray", "planner")
#: integrations a training node may lack; their qra_plugin modules are skipped when they are absent
OPTIONAL = ("axolotl", "deepspeed")


def forbidden_loaded() -> list[str]:
    return sorted({name.split(".")[0] for name in sys.modules} & set(FORBIDDEN))


def import_every_module() -> tuple[dict[str, list[str]], list[str]]:
    """Import each qra_plugin module in turn; map each to the forbidden modules it was first to load."""
    import qra_plugin

    pulled: dict[str, list[str]] = {}
    skipped: list[str] = []
    names = ["qra_plugin"] + [m.name for m in pkgutil.walk_packages(qra_plugin.__path__, "qra_plugin.")]
    for name in names:
        before = set(forbidden_loaded())
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in OPTIONAL:
                raise
            skipped.append(f"{name} (no {exc.name})")
        new = sorted(set(forbidden_loaded()) - before)
        if new:
            pulled[name] = new
    return pulled, skipped


def tiny_llama():
    """A 2-block Llama with grouped-query attention, random weights (transformers only)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config)


def apply_mixed_plan() -> dict[str, object]:
    """apply_plan with HQQ 4/3-bit, bitsandbytes 4-bit and unquantized modules, from a plan file; one train step."""
    import torch

    from qra_plugin import Plan, apply_plan
    from qra_plugin.plan import ModulePlan

    model = tiny_llama()
    choices = [ModulePlan(bits=4, rank=8), ModulePlan(bits=3, rank=4), ModulePlan(bits=4, backend="bnb", rank=8)]
    choices.append(ModulePlan(bits=16, rank=0))
    base = Plan.uniform(model, bits=4, rank=8)
    modules = {name: choices[i % len(choices)] for i, name in enumerate(base.modules)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Plan(fingerprint=base.fingerprint, modules=modules).save(Path(tmp) / "plan.yaml")
        peft_model = apply_plan(model, path)
    ids = torch.randint(0, 128, (2, 16))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    return {
        "loss": float(loss.detach()),
        "lora_tensors": len(trained),
        "lora_all_lora": all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad),
        "lora_grads": sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trained),
        "backends": sorted(peft_model.qra_plan.backends_used()),
    }


def main() -> None:
    pulled, skipped = import_every_module()
    applied = apply_mixed_plan()
    import qra_plugin

    print(
        json.dumps(
            {
                "qra_plugin_file": qra_plugin.__file__,
                "pulled_by_import": pulled,
                "skipped": skipped,
                "apply_plan": applied,
                "forbidden_loaded": forbidden_loaded(),
            }
        )
    )


if __name__ == "__main__":
    main()
