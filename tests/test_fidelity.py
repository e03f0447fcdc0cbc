"""Real short SFT runs on a tiny Llama: the fidelity score responds to training, plan and seed."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from torch import nn

from planner.config import QRAConfig
from planner.fidelity.contract import EvalResult, EvalTask
from planner.fidelity.sft import _base_model_cached, run_fidelity
from planner.loading import load_meta_model
from qra_plugin import Plan
from qra_plugin.errors import QRAError


def tiny_config(**over) -> QRAConfig:
    data = {
        "name": "tiny-fidelity",
        "model": {"tiny": {"layers": 4, "hidden": 64, "vocab_size": 512}},
        "data": {"train_examples": 32},
        "train": {"batch": 4, "seq_len": 64, "lr": 5e-3},
        "fidelity": {
            "low": {"steps": 6, "eval_examples": 8},
            "high": {"steps": 0, "eval_examples": 8},
            "torch_threads": 1,
        },
    }
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return QRAConfig.model_validate(data)


@pytest.fixture(scope="module")
def cfg() -> QRAConfig:
    return tiny_config()


@pytest.fixture(scope="module")
def meta(cfg: QRAConfig) -> nn.Module:
    return load_meta_model(cfg.model)


def task(cfg: QRAConfig, plan: Plan, level: str = "low", seed: int = 0) -> EvalTask:
    return EvalTask(plan=plan, level=level, seed=seed, config=cfg, tag="test")


def test_training_lowers_eval_loss_and_reports_real_measurements(cfg, meta):
    plan = Plan.uniform(meta, bits=4, rank=8)
    before = run_fidelity(task(cfg, plan, "high"))  # 0 steps: just the eval
    after = run_fidelity(task(cfg, plan, "low"))
    assert before.status == after.status == "ok"
    assert before.steps == 0 and before.train_loss is None
    assert after.steps == 6 and after.train_loss is not None and math.isfinite(after.train_loss)
    assert before.train_s is None and 0 < after.train_s < after.wall_s  # train time alone: step time = train_s / steps
    assert after.eval_loss < before.eval_loss - 0.02
    # training holds LoRA grads, optimizer states and activations on top of the weights
    assert after.memory_measured > before.memory_measured >= before.weight_bytes > 0
    assert after.token_accuracy is not None and 0.0 <= after.token_accuracy <= 1.0


def test_same_seed_same_score_and_seed_changes_the_run(cfg, meta):
    plan = Plan.uniform(meta, bits=4, rank=8)
    a = run_fidelity(task(cfg, plan, seed=0))
    b = run_fidelity(task(cfg, plan, seed=0))
    c = run_fidelity(task(cfg, plan, seed=1))
    assert a.eval_loss == b.eval_loss and a.train_loss == b.train_loss
    assert c.eval_loss != a.eval_loss  # data order and LoRA init follow the seed


def test_plan_changes_score_and_weight_bytes(cfg, meta):
    low_bits = Plan.uniform(meta, bits=2, rank=4)
    mixed = Plan.from_blocks(meta, [(8, 16), (4, 8), (3, 8), (8, 16)])
    r_low = run_fidelity(task(cfg, low_bits))
    r_mixed = run_fidelity(task(cfg, mixed))
    assert r_low.status == r_mixed.status == "ok"
    assert r_low.eval_loss != r_mixed.eval_loss
    assert r_low.weight_bytes < r_mixed.weight_bytes


def test_cached_base_model_is_never_mutated(cfg, meta):
    run_fidelity(task(cfg, Plan.uniform(meta, bits=2, rank=4), "high"))
    cached = _base_model_cached(cfg.model.model_dump_json())
    layer = cached.model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear and not hasattr(cached, "peft_config")


def test_non_finite_training_is_a_failed_result(meta):
    cfg = tiny_config(train={"lr": 1e30})
    result = run_fidelity(task(cfg, Plan.uniform(meta, bits=4, rank=8)))
    assert result.status == "failed"
    assert "non-finite" in result.error and result.eval_loss is None


def test_hopeless_loss_stops_early(meta):
    cfg = tiny_config(fidelity={"stop_if_loss_above": 0.5, "min_steps": 2})
    result = run_fidelity(task(cfg, Plan.uniform(meta, bits=4, rank=8)))
    assert result.status == "stopped"
    assert result.steps == 2 and "above 0.5" in result.stop_reason
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)


def test_jsonl_alpaca_data(tmp_path, meta):
    from planner.data.wiki import write_alpaca_jsonl

    path = write_alpaca_jsonl(tmp_path / "train.jsonl", "train", 40)
    eval_path = tmp_path / "eval.jsonl"
    rows = [{"prompt": "Say the colour of the sky.", "completion": f"Blue, number {i}."} for i in range(8)]
    eval_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tiny_config(data={"source": "jsonl", "path": str(path), "eval_path": str(eval_path)})
    result = run_fidelity(task(cfg, Plan.uniform(meta, bits=4, rank=8)))
    assert result.status == "ok" and math.isfinite(result.eval_loss)
    wiki = run_fidelity(task(tiny_config(), Plan.uniform(meta, bits=4, rank=8)))
    assert wiki.eval_loss != result.eval_loss  # a different eval set really was used


def test_task_accuracy_where_rows_have_answers(tmp_path, meta):
    rows = [
        {"prompt": f"Question {i}: what colour is the sky?", "completion": "Blue", "answer": "Blue"} for i in range(80)
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = {"source": "jsonl", "path": str(path), "train_examples": 64}
    plan = Plan.uniform(meta, bits=4, rank=8)
    low = {"eval_examples": 8, "accuracy": True}
    untrained = run_fidelity(task(tiny_config(data=data, fidelity={"low": {"steps": 0, **low}}), plan))
    trained = run_fidelity(
        task(tiny_config(data=data, train={"lr": 1e-2}, fidelity={"low": {"steps": 8, **low}}), plan)
    )
    assert untrained.accuracy == 0.0  # a random tiny model does not say "Blue"
    assert trained.accuracy == 1.0 and trained.eval_loss < untrained.eval_loss
    no_metric = run_fidelity(task(tiny_config(data=data, fidelity={"low": {"steps": 0, "eval_examples": 8}}), plan))
    assert no_metric.accuracy is None and no_metric.eval_loss == untrained.eval_loss  # searches skip generation
    high = {"high": {"steps": 0, "eval_examples": 8, "accuracy": True}}
    wiki = run_fidelity(task(tiny_config(fidelity=high), plan, "high"))
    assert wiki.accuracy is None  # wiki summaries have no short answers


def test_answer_matching_rule():
    from planner.fidelity.metrics import answer_matches

    assert answer_matches(" Blue.", "blue") and answer_matches("Paris is the capital", "Paris")
    assert not answer_matches("Parisian food", "Paris") and not answer_matches("", "x") and not answer_matches("a", "")


def test_bad_rows_and_levels_are_one_line_errors(tmp_path, cfg, meta):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(QRAError, match="rows need text, prompt/completion, messages or instruction"):
        run_fidelity(task(tiny_config(data={"source": "jsonl", "path": str(bad)}), Plan.uniform(meta)))
    with pytest.raises(QRAError, match="unknown fidelity level"):
        run_fidelity(EvalTask.model_construct(plan=Plan.uniform(meta), level="mid", seed=0, config=cfg))


def test_task_and_result_are_picklable_and_json(cfg, meta):
    t = task(cfg, Plan.uniform(meta, bits=3, rank=16))
    assert pickle.loads(pickle.dumps(t)).key == t.key
    assert EvalTask.model_validate_json(t.model_dump_json()).key == t.key
    assert t.key == (t.plan.content_hash(), "low", 0, t.recipe_hash)
    r = EvalResult.failed("Traceback ...\nValueError: boom\n")
    assert r.error == "ValueError: boom" and r.status == "failed"


@pytest.mark.slow
def test_smollm2_low_fidelity_is_a_real_short_finetune():
    """SmolLM2-135M, uniform HQQ-4 r8, 2 steps at seq 64: a sane score and real memory numbers."""
    cfg = QRAConfig.model_validate(
        {
            "model": {"path": "demo"},
            "data": {"train_examples": 16},
            "train": {"batch": 2, "seq_len": 64, "lr": 5e-4},
            "fidelity": {"low": {"steps": 2, "eval_examples": 8}},
        }
    )
    plan = Plan.uniform(load_meta_model(cfg.model), bits=4, rank=8)
    result = run_fidelity(task(cfg, plan))
    assert result.status == "ok" and result.steps == 2
    # a pretrained 135M model with 4-bit weights: ≈ 3 nats; a broken quantization or LoRA gives > 6
    assert 1.0 < result.eval_loss < 4.5
    # 4-bit planned linears + fp32 embeddings: well under the 538 MB of the fp32 model
    assert 50e6 < result.weight_bytes < 300e6 < 538e6
    assert result.memory_measured > result.weight_bytes


def test_plan_budget_bytes_predicted_equal_the_real_tensors_of_a_run(cfg, meta):
    """A ``plan:`` budget counts planned modules + LoRA + grads + optimizer states: a real run holds exactly that."""
    from planner.memory import plan_bytes
    from planner.model_info import load_model_info
    from planner.settings import TrainingSettings

    info = load_model_info(cfg.model)
    mixed = Plan.from_module_pairs(  # HQQ 2/3/4/8 and 16-bit modules, ranks 0..16
        info.fingerprint,
        info.linears,
        [((2, 3, 4, 8, 16)[i % 5], (0, 4, 8, 16)[i % 4]) for i in range(len(info.linears))],
    )
    for plan in (Plan.uniform(meta, bits=4, rank=8), mixed):
        result = run_fidelity(task(cfg, plan, "low"))
        assert result.plan_bytes_measured == plan_bytes(info, plan, TrainingSettings.of(cfg), "plan")


def test_the_three_splits_are_disjoint_and_the_task_has_exact_answers():
    from planner.config import DataSection
    from planner.data.sources import examples
    from planner.data.wiki import TOPICS

    for source in ("wiki", "wiki_topic", "wiki_mix"):
        data = DataSection(source=source)
        rows = {split: examples(data, split, 400) for split in ("train", "selection", "test")}
        prompts = {split: {e.prompt for e in r} for split, r in rows.items()}
        assert all(len(r) == 400 for r in rows.values())
        assert not prompts["train"] & prompts["selection"] and not prompts["train"] & prompts["test"]
        assert not prompts["selection"] & prompts["test"]
    mix = examples(DataSection(source="wiki_mix"), "test", 40)
    answers = [e.answer for e in mix if e.answer is not None]
    assert 10 <= len(answers) <= 30 and set(answers) <= set(TOPICS)
    assert examples(DataSection(source="wiki", eval_split="test"), "eval", 5) == examples(DataSection(), "test", 5)


@pytest.mark.parametrize(("backend", "pruned"), [("hqq", False), ("bnb", False), ("hqq", True)])
def test_a_cached_quantized_layer_is_the_layer_a_fresh_quantization_makes(backend, pruned):
    """The worker-level cache (planner.fidelity.quantized) must change set-up time, never a score."""
    import copy

    import torch

    from planner.fidelity.quantized import STATS, clear_memory, prequantize
    from planner.tiny import build_tiny_model
    from qra_plugin import apply_plan
    from qra_plugin.weight_memory import memory_report

    clear_memory()  # layers are keyed by their weights: another test's tiny model may share some
    base = build_tiny_model("llama", layers=2, hidden=64, vocab_size=128, seed=3)
    plan = Plan.uniform(base, bits=4, rank=4, backend=backend)
    if pruned:  # the cache holds each block's slice: same kept channels, same layer
        from qra_plugin.plan import BlockPruning

        plan = plan.model_copy(update={"pruning": {1: BlockPruning(mlp_keep=list(range(0, 128, 2)), kv_keep=[0])}})
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    outputs = []
    for use_cache in (False, True, True):  # a fresh quantization, then the cache's first miss and a hit
        model = copy.deepcopy(base)
        hits = STATS["hits"]
        if use_cache:
            prequantize(model, plan, f"test-{backend}-{pruned}", torch.float32)
        torch.manual_seed(0)
        peft = apply_plan(model, plan)
        outputs.append((peft(input_ids=ids).logits.detach(), memory_report(peft).total_bytes, STATS["hits"] - hits))
    (fresh, fresh_bytes, _), (miss, miss_bytes, miss_hits), (hit, hit_bytes, hit_hits) = outputs
    assert miss_hits == 0 and hit_hits == len(plan.modules)
    assert torch.equal(fresh, miss) and torch.equal(fresh, hit)
    assert fresh_bytes == miss_bytes == hit_bytes
    if pruned:  # another kept set for block 1 is another layer: a miss for its slices, hits for block 0
        other = plan.model_copy(update={"pruning": {1: BlockPruning(mlp_keep=list(range(64)), kv_keep=[1])}})
        hits, misses = STATS["hits"], STATS["misses"]
        prequantize(copy.deepcopy(base), other, f"test-{backend}-{pruned}", torch.float32)
        block1 = sum(name.split(".")[2] == "1" for name in plan.modules)
        assert STATS["misses"] - misses == block1 and STATS["hits"] - hits == len(plan.modules) - block1


@pytest.mark.parametrize("backend", ["hqq", "bnb"])
def test_a_layer_stored_on_disk_is_the_layer_a_fresh_quantization_makes(tmp_path, backend):
    """Workers and resumed runs share layers through a directory: a loaded layer must score the same."""
    import copy

    import torch

    from planner.fidelity import quantized
    from planner.tiny import build_tiny_model
    from qra_plugin import apply_plan

    base = build_tiny_model("qwen2", layers=2, hidden=64, vocab_size=128, seed=5)
    plan = Plan.uniform(base, bits=4, rank=4, backend=backend)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

    def logits(prepare) -> tuple[torch.Tensor, dict[str, int]]:
        model, before = copy.deepcopy(base), dict(quantized.STATS)
        prepare(model)
        torch.manual_seed(0)
        out = apply_plan(model, plan)(input_ids=ids).logits.detach()
        return out, {k: quantized.STATS[k] - before[k] for k in before}

    fresh, _ = logits(lambda m: None)
    with quantized.directory_in_use(tmp_path / "layers"):
        quantized.clear_memory()
        written, first = logits(lambda m: quantized.prequantize(m, plan, "disk-test", torch.float32))
        quantized.clear_memory()  # as a second worker or a resumed run: nothing in memory, all on disk
        loaded, second = logits(lambda m: quantized.prequantize(m, plan, "disk-test", torch.float32))
        files = sorted((tmp_path / "layers").glob("*.pt"))
        if files:
            files[0].write_bytes(b"damaged")  # a damaged file is a miss, quantized again
        quantized.clear_memory()
        _, third = logits(lambda m: quantized.prequantize(m, plan, "disk-test", torch.float32))
    n = len(plan.modules)
    assert torch.equal(fresh, written) and torch.equal(fresh, loaded)
    if backend == "bnb":  # its layers do not survive a pickle: memory only, quantized again by another worker
        assert files == [] and first["misses"] == second["misses"] == n
        return
    assert first["misses"] == n and len(files) == n
    assert second == {"hits": 0, "disk_hits": n, "misses": 0}
    assert third["misses"] == 1 and third["disk_hits"] == n - 1


def test_the_profile_fills_the_layer_cache_the_search_reads(tmp_path):
    """The I_q pass quantizes every block at the profiled bits: a fidelity run at those bits makes no layer."""
    from planner.priors import profile

    cfg = tiny_config(profile={"bits": [4], "calibration_examples": 2, "seq_len": 16, "plasticity_draws": 1})
    profile(cfg, tmp_path, progress=False)
    stored = list((tmp_path / "layers").glob("*.pt"))
    plan = Plan.uniform(load_meta_model(cfg.model), bits=4, rank=4)
    # a fresh worker process that loads every layer and quantizes none (HQQ sets its forward at class level
    # when it builds a layer: an unpickled one must work without that)
    from planner.executors import make_executor
    from planner.store import Store

    store = Store(tmp_path / "store.sqlite")
    with make_executor("local", subprocess=True, store=store, layer_cache=tmp_path / "layers") as executor:
        (result,) = executor.run([task(cfg, plan)])
    assert result.status == "ok", result.error
    assert len(stored) == len(plan.modules)
    assert result.layers_quantized == 0 and result.layers_loaded == len(plan.modules)
    assert result.setup_s is not None and result.eval_s is not None and result.train_s is not None
    assert result.setup_s + result.train_s + result.eval_s <= result.wall_s


def test_closed_set_answers_are_scored_by_log_likelihood(tmp_path, meta):
    """Rows with ``choices`` (like the wiki topic task) are scored as lm-eval's multiple choice."""
    pairs = [("the sky", "Blue"), ("grass", "Green"), ("blood", "Red")]
    rows = [
        {"prompt": f"Question {i}: what colour is {pairs[i % 3][0]}?", "completion": pairs[i % 3][1],
         "answer": pairs[i % 3][1], "choices": ["Blue", "Red", "Green"]}
        for i in range(120)
    ]  # fmt: skip
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = {"source": "jsonl", "path": str(path), "train_examples": 96}
    plan = Plan.uniform(meta, bits=4, rank=8)
    level = {"eval_examples": 12, "accuracy": True}
    untrained = run_fidelity(task(tiny_config(data=data, fidelity={"low": {"steps": 0, **level}}), plan))
    trained = run_fidelity(
        task(tiny_config(data=data, train={"lr": 1e-2}, fidelity={"low": {"steps": 24, **level}}), plan)
    )
    assert trained.accuracy > untrained.accuracy + 0.15  # training moves the scored choice towards the answers
    from planner.config import DataSection
    from planner.data.sources import examples

    topic = [e for e in examples(DataSection(source="wiki_topic"), "test", 5)]
    assert all(e.choices and e.answer in e.choices and len(e.choices) == 11 for e in topic)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reusing_dequantized_weights_gives_bit_identical_runs(arch):
    """``fidelity.reuse_dequantized`` (CPU): a frozen HQQ layer dequantizes once per run instead of at every
    forward. Same math on the same tensors: training and eval losses, measured memory and weight bytes equal
    to the last bit, for a plan mixing HQQ 3/4/8-bit, bnb nf4 (no such path: unchanged) and 16-bit modules."""
    from planner.fidelity.contract import recipe_hash

    runs, keys = [], []
    for reuse in (False, True):
        cfg = tiny_config(model={"tiny": {"arch": arch, "layers": 4, "hidden": 64, "vocab_size": 512}},
                          fidelity={"low": {"steps": 4, "eval_examples": 8}, "torch_threads": 1,
                                    "reuse_dequantized": reuse})  # fmt: skip
        meta_model = load_meta_model(cfg.model)
        base = Plan.uniform(meta_model, bits=4, rank=8)
        choices = [(3, "hqq"), (4, "hqq"), (8, "hqq"), (4, "bnb"), (16, "none")]
        modules = {
            name: mp.model_copy(update={"bits": choices[i % 5][0], "backend": choices[i % 5][1]})
            for i, (name, mp) in enumerate(base.modules.items())
        }
        plan = Plan(fingerprint=base.fingerprint, modules=modules)
        result = run_fidelity(task(cfg, plan, "low"))
        assert result.status == "ok"
        runs.append((result.train_loss, result.eval_loss, result.memory_measured, result.weight_bytes))
        keys.append(recipe_hash(cfg, "low"))
    assert runs[0] == runs[1]
    assert keys[0] == keys[1]  # a speed setting: stored scores are shared between both


def test_fidelity_runs_start_error_init_plans_from_the_quantization_error(tmp_path):
    """``adapter.init: error``: a candidate's fidelity run starts its adapters from the same closed form the
    search writes to the final plan's init file, so the search scores plans as they will train."""
    import copy

    from safetensors.torch import load_file

    from planner.fidelity.adapter_start import error_init_for
    from planner.fidelity.sft import _base_model_cached
    from planner.priors.adapter_init import plan_for_config
    from qra_plugin import apply_plan

    cfg = tiny_config(adapter={"init": "error"}, profile={"calibration_examples": 4, "seq_len": 64})
    meta_model = load_meta_model(cfg.model)
    zero = Plan.uniform(meta_model, bits=3, rank=8)
    error = zero.model_copy(
        update={"modules": {n: m.model_copy(update={"init": "error"}) for n, m in zero.modules.items()}}
    )
    assert error.content_hash() != zero.content_hash()  # never one stored score for both
    start = {name: run_fidelity(task(cfg, p, "high")).eval_loss for name, p in (("zero", zero), ("error", error))}
    assert start["error"] != start["zero"]  # 0 steps: the starting loss, and the run applied the init

    model_json = cfg.model.model_dump_json()
    base = _base_model_cached(model_json)
    in_run = error_init_for(cfg, error, base, model_json)
    # what the run trains from: logits closer to the unquantized model's than zero init's (a random tiny model's
    # loss hardly moves with 3-bit error, its logits do)
    tokens = torch.randint(4, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(tokens).logits
        gaps = {}
        for name, plan, tensors in (("zero", zero, None), ("error", error, in_run)):
            model = apply_plan(copy.deepcopy(base), plan, init_tensors=tensors).eval()
            gaps[name] = float((model(tokens).logits - reference).norm())
    assert gaps["error"] < 0.8 * gaps["zero"]
    written = plan_for_config(cfg, zero, tmp_path / "plan.init.safetensors", tmp_path)
    from_file = load_file(str(written.init_path()))
    assert set(in_run) == set(from_file)
    for name, tensor in in_run.items():  # the file's moments went through float32 on disk
        assert torch.allclose(tensor, from_file[name], rtol=1e-3, atol=1e-5), name
