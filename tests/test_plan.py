"""Plan schema: constructors, round trips, and a one-line error for every bad input."""

from __future__ import annotations

import json

import pytest
import yaml

from planner.tiny import build_tiny_model
from qra_plugin import Plan, QRAError, fingerprint
from qra_plugin.modules import quantizable_linears
from tests.conftest import mixed_plan


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_uniform_and_from_blocks_cover_every_block_linear(tiny_model):
    names = [s.name for s in quantizable_linears(tiny_model)]
    assert len(names) == 4 * 7  # q,k,v,o,gate,up,down in 4 blocks
    uniform = Plan.uniform(tiny_model, bits=4, rank=16)
    assert list(uniform.modules) == names
    assert {m.bits for m in uniform.modules.values()} == {4}
    per_block = Plan.from_blocks(tiny_model, [(2, 4), (3, 8), (4, 16), (8, 0)])
    assert per_block.modules["model.layers.1.mlp.up_proj"].bits == 3
    assert per_block.modules["model.layers.3.self_attn.q_proj"].rank == 0
    assert per_block.modules["model.layers.0.self_attn.q_proj"].group_size == 16  # small groups at 2 bits
    assert "model.layers.3.self_attn.q_proj" not in per_block.lora_targets()


def test_with_init_starts_only_quantized_modules_with_an_adapter_from_the_error(tiny_model):
    plan = Plan.from_blocks(tiny_model, [(4, 8), (4, 0), (16, 8), (8, 4)])
    error = plan.with_init("error")
    started = {n for n, m in error.modules.items() if m.init == "error"}
    assert started == {n for n in plan.modules if n.startswith(("model.layers.0.", "model.layers.3."))}
    assert error.content_hash() != plan.content_hash()  # another run: its key must differ
    assert error.with_init("zero").content_hash() == plan.content_hash()


def test_yaml_and_json_round_trip(tmp_path, tiny_model):
    plan = mixed_plan(tiny_model)
    for suffix in ("yaml", "json"):
        path = plan.save(tmp_path / f"plan.{suffix}")
        again = Plan.load(path)
        assert again == plan
        assert again.content_hash() == plan.content_hash()
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    assert (path.stat().st_mode & 0o044) == 0o044  # readable like any written file, not mkstemp's 0600


def test_fingerprint_differs_between_models():
    a = fingerprint(build_tiny_model("llama", layers=4))
    b = fingerprint(build_tiny_model("llama", layers=3))
    c = fingerprint(build_tiny_model("qwen2", layers=4))
    assert len({a, b, c}) == 3


def test_plan_from_another_model_is_refused(tiny_model):
    other = build_tiny_model("llama", hidden=96)
    plan = Plan.uniform(other, bits=4, rank=8)
    with pytest.raises(QRAError) as exc:
        plan.check_model(tiny_model)
    assert "fingerprint does not match" in _one_line(exc)


def test_unknown_module_is_refused(tiny_model):
    data = Plan.uniform(tiny_model).to_dict()
    data["modules"]["model.layers.9.self_attn.q_proj"] = {"bits": 4, "rank": 8}
    plan = Plan.parse(data)
    with pytest.raises(QRAError) as exc:
        plan.check_model(tiny_model)
    assert "model.layers.9.self_attn.q_proj" in _one_line(exc)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ({"bits": 3, "backend": "bnb", "rank": 8}, "cannot store 3-bit"),
        ({"bits": 2, "backend": "bnb", "rank": 8}, "cannot store 2-bit"),
        ({"bits": 16, "backend": "hqq", "rank": 8}, "cannot store 16-bit"),
        ({"bits": 4, "rank": -1}, "greater than or equal to 0"),
        ({"bits": 5, "rank": 8}, "bits"),
        ({"bits": 4, "rank": 8, "colour": "red"}, "colour"),
    ],
)
def test_bad_module_entries_give_one_line(tmp_path, tiny_model, module, message):
    data = Plan.uniform(tiny_model).to_dict()
    data["modules"]["model.layers.0.self_attn.q_proj"] = module
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(QRAError) as exc:
        Plan.load(path)
    text = _one_line(exc)
    assert message in text and str(path) in text


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fingerprint: [unclosed\nmodules: {")
    with pytest.raises(QRAError) as exc:
        Plan.load(bad)
    assert "malformed plan file" in _one_line(exc)
    with pytest.raises(QRAError) as exc:
        Plan.load(tmp_path / "nope.yaml")
    assert "plan file not found" in _one_line(exc)
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(QRAError) as exc:
        Plan.load(tmp_path / "list.json")
    assert "must be a mapping" in _one_line(exc)


def test_from_blocks_needs_one_pair_per_block(tiny_model):
    with pytest.raises(QRAError) as exc:
        Plan.from_blocks(tiny_model, [(4, 8)] * 3)
    assert "needs 4" in _one_line(exc) or "need 4" in _one_line(exc)
