"""Store and run correctness: recipe-keyed evaluations, transient vs deterministic failures, a bad loss on
the last step, a failed GP fit, and one planner process per output directory."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from planner.config import QRAConfig
from planner.fidelity.contract import EvalResult, EvalTask, classify_failure, recipe, recipe_diff, recipe_hash
from planner.loading import load_meta_model
from planner.orchestration.setup import LOCK_FILE, exclusive_run, stale_recipe_note
from planner.store import Store
from planner.tiny import save_tiny_model
from qra_plugin import Plan, QRACallback
from qra_plugin.errors import QRAError

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"tiny": {"layers": 2, "hidden": 32, "vocab_size": 128}}}


def _cfg(**over) -> QRAConfig:
    data = {**BASE}
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return QRAConfig.model_validate(data)


def _task(cfg: QRAConfig, level: str = "high") -> EvalTask:
    plan = Plan.uniform(load_meta_model(cfg.model), bits=4, rank=4)
    return EvalTask(plan=plan, level=level, seed=0, config=cfg)


# ---------------------------------------------------------------------------------------------- defect 1
@pytest.mark.parametrize(
    ("over", "changed"),
    [
        ({"fidelity": {"high": {"steps": 7, "eval_examples": 32}}}, "level.steps"),
        ({"train": {"lr": 1e-3}}, "train.lr"),
        ({"train": {"seq_len": 64}}, "train.seq_len"),
        ({"data": {"train_examples": 100}}, "level.train_examples"),
        ({"model": {"tiny": {"layers": 2, "hidden": 32, "vocab_size": 128, "seed": 1}}}, "model.tiny.seed"),
        ({"fidelity": {"stop_if_loss_above": 9.0}}, "fidelity.stop_if_loss_above"),
    ],
)
def test_every_recipe_change_changes_the_key_and_is_named(over, changed) -> None:
    base, new = _cfg(), _cfg(**over)
    assert _task(base).key[:3] == _task(new).key[:3]  # same plan, level, seed …
    assert _task(base).key != _task(new).key  # … but never the same stored result
    assert changed in recipe_diff(recipe(base, "high"), recipe(new, "high"))


def test_a_same_shape_checkpoint_and_edited_data_change_the_key(tmp_path) -> None:
    model_dir = tmp_path / "model"
    save_tiny_model(model_dir, layers=2, hidden=32, vocab_size=128, seed=0)
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 20)
    cfg = QRAConfig.model_validate({"model": {"path": str(model_dir)}, "data": {"source": "jsonl", "path": str(data)}})
    before = recipe_hash(cfg, "high")
    save_tiny_model(model_dir, layers=2, hidden=32, vocab_size=128, seed=1)  # same shapes, other weights
    after_weights = recipe_hash(cfg, "high")
    data.write_text('{"prompt": "a", "completion": "c"}\n' * 20)
    after_data = recipe_hash(cfg, "high")
    assert len({before, after_weights, after_data}) == 3


def test_a_changed_recipe_is_not_read_and_the_note_names_it(tmp_path) -> None:
    old, new = _cfg(), _cfg(fidelity={"high": {"steps": 7, "eval_examples": 32}})
    with Store(tmp_path / "store.sqlite") as store:
        store.put(_task(old), EvalResult(status="ok", eval_loss=2.0, steps=24))
        assert store.get(_task(old)) is not None
        assert store.get(_task(new)) is None
        note = stale_recipe_note(store, new)
        assert note is not None and "1 high rows" in note and "level.steps" in note
        assert stale_recipe_note(store, old) is None


def test_a_store_from_before_recipe_keys_is_kept_but_never_reused(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "store.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE evaluations (id INTEGER PRIMARY KEY, plan_hash TEXT, level TEXT, seed INTEGER, "
            "status TEXT, result_json TEXT, UNIQUE (plan_hash, level, seed))"
        )
        db.execute("INSERT INTO evaluations VALUES (1, 'h', 'high', 0, 'ok', '{}')")
    with Store(path) as store:
        assert len(store) == 0 and store.get(_task(_cfg())) is None
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM evaluations_unkeyed").fetchone()[0] == 1


# ---------------------------------------------------------------------------------------------- defect 2
@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("timed out after 8 s", "transient"),
        ("evaluation worker was killed by SIGKILL (out of memory?)", "transient"),
        ("evaluation worker died with exit code 3", "transient"),
        ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB", "transient"),
        ("RuntimeError: injected failure for the 3-bit plan", "deterministic"),
        ("non-finite train loss at step 4", "deterministic"),
    ],
)
def test_failures_are_classified(message, kind) -> None:
    assert classify_failure(message) == kind
    assert EvalResult.failed(message).failure == kind


def test_a_transient_failure_is_retried_once_and_a_deterministic_one_is_kept(tmp_path) -> None:
    cfg = _cfg()
    flaky, broken = _task(cfg, "high"), _task(cfg, "low")
    with Store(tmp_path / "store.sqlite") as store:
        store.mark_running(flaky)
        store.put(flaky, EvalResult.failed("timed out after 60 s"))
        store.mark_running(broken)
        store.put(broken, EvalResult.failed("ValueError: the plan is broken"))
        assert store.get(broken).failure == "deterministic"  # kept: the same plan fails the same way
        assert store.get(flaky) is None  # one retry left: the caller recomputes it
        assert store.failure_counts() == {"transient": 1, "deterministic": 1}
        store.mark_running(flaky)  # the retry
        store.put(flaky, EvalResult.failed("timed out after 60 s"))
        kept = store.get(flaky)
        assert kept is not None and kept.failure == "transient"  # retried once, then final
        assert [r["attempts"] for r in store.records()] == [2, 1]


# ---------------------------------------------------------------------------------------------- defect 3
def _train_with_bad_last_step(tmp_path, bad: str, **callback_kw) -> QRACallback:
    """A real 3-step Trainer run of a tiny Llama whose loss turns bad on the last step only."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from planner.tiny import build_tiny_model

    model = build_tiny_model("llama", layers=2, hidden=32, vocab_size=128)
    calls = {"n": 0}

    def spoil(_module, _args, out):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                return out * float("nan") if bad == "nan" else out * 1e4
        return out

    model.lm_head.register_forward_hook(spoil)
    ids = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    callback = QRACallback(stop_at_step=3, **callback_kw)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert calls["n"] == 3
    return callback


def test_a_non_finite_loss_on_the_last_step_is_caught(tmp_path) -> None:
    from planner.fidelity.sft import _outcome

    callback = _train_with_bad_last_step(tmp_path, "nan")
    assert callback.stop_reason == "non-finite loss"
    assert _outcome(callback.stop_reason, 2.0, 3) == ("failed", "non-finite train loss at step 3")


def test_a_loss_over_the_threshold_on_the_last_step_is_caught(tmp_path) -> None:
    from planner.fidelity.sft import _outcome

    callback = _train_with_bad_last_step(tmp_path, "huge", stop_if_loss_above=50.0)
    assert callback.stop_reason.startswith("loss ") and "above 50.0" in callback.stop_reason
    assert _outcome(callback.stop_reason, 2.0, 3)[0] == "stopped"


# ---------------------------------------------------------------------------------------------- defect 4
def test_a_failed_gp_fit_is_logged_and_counted(monkeypatch, caplog) -> None:
    import botorch.fit

    from planner.search.surrogate import FIT_STATS, fit_gp

    def broken_fit(*_a, **_k):
        raise RuntimeError("injected: the marginal likelihood diverged")

    monkeypatch.setattr(botorch.fit, "fit_gpytorch_mll", broken_fit)
    before = dict(FIT_STATS)
    x = np.random.default_rng(0).random((6, 3))
    with caplog.at_level(logging.WARNING, logger="qra"):
        model = fit_gp(x, x.sum(axis=1), seed=0)
    assert FIT_STATS["failed"] == before["failed"] + 1 and FIT_STATS["fits"] == before["fits"] + 1
    assert any("GP fit failed" in r.message and "diverged" in r.message for r in caplog.records)
    with torch.no_grad():  # still a usable (prior-hyperparameter) GP
        assert torch.isfinite(model.posterior(torch.as_tensor(x)).mean).all()


# ---------------------------------------------------------------------------------------------- defect 5
HOLD = "import sys, time; from pathlib import Path; from planner.orchestration.setup import exclusive_run\n" \
       "with exclusive_run(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)\n"  # fmt: skip


def test_a_second_planner_process_on_one_out_dir_is_refused_and_a_killed_one_frees_it(tmp_path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(QRAError, match=r"in use by another qra run \(pid \d+\)"), exclusive_run(tmp_path):
            pass
        cli = subprocess.run(
            [sys.executable, "-m", "planner.cli", "search", "example_configs/tiny-search.yaml", "--out", str(tmp_path)],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert cli.returncode == 2 and cli.stderr.strip().count("\n") == 0 and "in use by another qra run" in cli.stderr
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    with exclusive_run(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().startswith("pid ")
