"""apply_plan on a tiny Llama with every bits/backend mix: real HQQ/bnb layers, real PEFT adapters."""

from __future__ import annotations

import math

import pytest
import torch

from qra_plugin import apply_plan, load_for_inference, memory_report
from qra_plugin.modules import quantizable_linears
from tests.conftest import mixed_plan

EXPECTED_BASE = {
    (2, "hqq"): "HQQLinear",
    (3, "hqq"): "HQQLinear",
    (4, "hqq"): "HQQLinear",
    (8, "hqq"): "HQQLinear",
    (4, "bnb"): "Linear4bit",
    (8, "bnb"): "Linear8bitLt",
    (16, "none"): "Linear",
}


def _base_layer(peft_model, name):
    module = peft_model.get_base_model().get_submodule(name)
    return module, getattr(module, "base_layer", module)


def test_module_types_and_ranks_are_exactly_as_planned(tiny_model):
    plan = mixed_plan(tiny_model)
    model = apply_plan(tiny_model, plan)
    for name, mp in plan.modules.items():
        module, base = _base_layer(model, name)
        assert type(base).__name__ == EXPECTED_BASE[(mp.bits, mp.backend)], name
        if mp.bits < 16:
            assert type(base).__module__.startswith(("hqq.", "bitsandbytes.")), name
        if mp.rank == 0:
            assert not hasattr(module, "lora_A"), f"{name} has an adapter but rank 0"
        else:
            assert module.lora_A["default"].out_features == mp.rank, name
            assert module.scaling["default"] == pytest.approx(mp.lora_alpha / mp.rank)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_forward_backward_finite_and_only_lora_gets_gradients(tiny_model):
    model = apply_plan(tiny_model, mixed_plan(tiny_model))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # B starts at zero, so A gets no gradient on step 0 but B must.
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_memory_report_measures_quantized_bytes(tiny_model):
    bf16_like = memory_report(tiny_model)
    model = apply_plan(tiny_model, mixed_plan(tiny_model))
    report = memory_report(model)
    by_name = {m.name: m for m in report.modules}
    assert len(by_name) == len(quantizable_linears(tiny_model))
    # fp32 tiny model: a 16-bit module holds 4 bytes per weight, 2-bit HQQ far fewer
    q2 = by_name["model.layers.0.self_attn.q_proj"]
    assert q2.kind == "HQQLinear" and q2.bytes < q2.bf16_bytes / 2
    assert report.planned_bytes < bf16_like.planned_bytes
    assert report.lora_bytes > 0 and bf16_like.lora_bytes == 0
    assert report.total_bytes == report.planned_bytes + report.other_bytes + report.lora_bytes


def test_sft_trainer_loss_falls_over_20_steps(tiny_model, tiny_tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from planner.data.wiki import sft_dataset
    from qra_plugin import QRACallback

    model = apply_plan(tiny_model, mixed_plan(tiny_model))
    callback = QRACallback(metrics_path=tmp_path / "metrics.json")
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=20,
            per_device_train_batch_size=4,
            learning_rate=3e-3,
            max_length=96,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,  # TRL defaults to bf16 autocast; HQQ's fp32 dequant would clash
            seed=0,
            disable_tqdm=True,
        ),
        train_dataset=sft_dataset("train", 80),
        processing_class=tiny_tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05
    assert (tmp_path / "metrics.json").is_file()
    assert callback.metrics["memory"]["lora_bytes"] > 0


def test_save_then_load_for_inference_gives_same_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plan = mixed_plan(base)
    model = apply_plan(base, plan)
    with torch.no_grad():  # make the adapters non-trivial, as after training
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    ids = torch.arange(5, 37).reshape(2, 16)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    plan.save(tmp_path / "plan.yaml")
    loaded = load_for_inference(tiny_model_dir, tmp_path / "plan.yaml", tmp_path / "adapter")
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    generated = loaded.generate(input_ids=ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def test_load_for_inference_without_adapter_is_one_line_error(tiny_model_dir, tmp_path):
    from qra_plugin import Plan, QRAError

    Plan.uniform(__import__("planner.tiny", fromlist=["x"]).build_tiny_model()).save(tmp_path / "plan.yaml")
    with pytest.raises(QRAError, match="no PEFT adapter"):
        load_for_inference(tiny_model_dir, tmp_path / "plan.yaml", tmp_path / "missing")


def test_public_names_stay_functions_after_every_submodule_is_imported():
    import importlib
    import pkgutil

    import qra_plugin

    for info in pkgutil.walk_packages(qra_plugin.__path__, "qra_plugin."):
        importlib.import_module(info.name)
    for name in qra_plugin.__all__:
        value = getattr(qra_plugin, name)
        assert not isinstance(value, type(qra_plugin)), f"qra_plugin.{name} is shadowed by a submodule"
