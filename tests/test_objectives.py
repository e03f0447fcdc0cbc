"""Named objectives: eval loss (today's) and an lm-evaluation-harness task run offline on the trained model.

The lm-eval runs here are real (``HFLM`` over a tiny Llama with real HQQ layers and a real PEFT adapter, a task
YAML over a local jsonl); the search test is a real tiny ``qra search`` through the CLI.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from planner.config import LMEvalSection, QRAConfig
from planner.data.lm_eval_tasks import shipped_task_dir, task_names
from planner.data.wiki import split_of, topic_row, wiki_split, write_jsonl
from planner.fidelity import contract
from planner.fidelity.contract import EvalResult, recipe, recipe_diff, recipe_hash
from planner.objectives import OBJECTIVES, objective_for
from qra_plugin.errors import QRAError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"tiny": {"layers": 2, "hidden": 32, "vocab_size": 128}}
LONG = "a much longer answer that runs on for many more tokens than the short one ever could"


def _cfg(**over) -> QRAConfig:
    return QRAConfig.model_validate({"model": TINY, **over})


def _tiny_task(directory: Path, name: str = "tiny_choice") -> Path:
    """4 rows: the gold answer is the 1-token choice in 3 of them, the ~20-token one in the last. Unnormalised
    log-likelihood (lm-eval's ``acc``) of a random model prefers the short choice by ~100 nats, so acc = 0.75."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"q": f"Question {i}?", "choices": ["yes", LONG], "gold": int(i == 3)} for i in range(4)]
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{q}}",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return directory


# ---------------------------------------------------------------------------------------------- registry
def test_each_objective_says_its_direction_and_the_search_minimises_its_score() -> None:
    ok = EvalResult(status="ok", eval_loss=2.5, objective_value=0.4)
    assert OBJECTIVES["eval_loss"].direction == "minimize" and OBJECTIVES["lm_eval"].direction == "maximize"
    assert OBJECTIVES["eval_loss"].search_score(ok) == 2.5
    assert OBJECTIVES["lm_eval"].search_score(ok) == -0.4 and OBJECTIVES["lm_eval"].shown(-0.4) == 0.4
    assert OBJECTIVES["lm_eval"].search_score(EvalResult(status="ok", eval_loss=2.5)) is None  # never a loss
    assert OBJECTIVES["lm_eval"].search_score(ok.model_copy(update={"status": "stopped"})) is None
    assert objective_for(_cfg(fidelity={"objective": "lm_eval"})).label == "qra_wiki_topic acc_norm"


@pytest.mark.parametrize(
    ("fidelity", "says"),
    [
        ({"objective": "accuracy"}, "fidelity.objective: Input should be 'eval_loss' or 'lm_eval'"),
        ({"objective": "lm_eval", "lm_eval": {"task": "mmlu"}}, "fidelity.lm_eval: unknown task 'mmlu'"),
        ({"objective": "lm_eval", "lm_eval": {"include_path": "no/such/dir"}}, "include_path not found"),
        ({"objective": "lm_eval", "lm_eval": {"include_path": "TASKS", "task": "nope"}}, "unknown task 'nope' in"),
        ({"lm_eval": {"limit": 4}}, "lm_eval is set but objective is eval_loss"),
    ],
)
def test_a_bad_objective_is_one_line(tmp_path, fidelity, says) -> None:
    tasks = _tiny_task(tmp_path / "tasks")
    if fidelity.get("lm_eval", {}).get("include_path") == "TASKS":
        fidelity["lm_eval"]["include_path"] = str(tasks)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": TINY, "fidelity": fidelity}))
    with pytest.raises(QRAError) as err:
        QRAConfig.load(path)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_task_names_are_read_from_an_include_path(tmp_path) -> None:
    _tiny_task(tmp_path, "one")
    (tmp_path / "group.yaml").write_text("group: both\ntask: [one]\nprocess: !function utils.process\n")
    assert task_names(tmp_path) == {"one", "both"}


# ---------------------------------------------------------------------------------------------- recipe key
@pytest.fixture
def fixed_environment(monkeypatch):
    """The recipe's environment parts (library versions, device, data-file digest) pinned, so a hash is stable."""
    monkeypatch.setattr(contract, "library_versions", lambda: {"torch": "pinned"})
    monkeypatch.setattr(contract, "device_identity", lambda: "cpu")
    monkeypatch.setattr(contract, "data_identity", lambda data_json: "pinned-data")


#: recipe hashes (high, low) computed before the objective hook existed (commit 397bfad)
TUNED = {
    "data": {"source": "wiki_mix", "eval_split": "test"},
    "train": {"lr": 1e-4, "batch": 2},
    "fidelity": {
        "eval_batch": 4,
        "stop_if_loss_above": 9.0,
        "high": {"steps": 40, "eval_examples": 96, "accuracy": True},
    },
}
PINNED = [({}, ("eead02a66442d11b", "856907f424ffc80d")), (TUNED, ("81efdce9f13134bb", "090d68d5327c85c6"))]


@pytest.mark.parametrize(("over", "hashes"), PINNED)
def test_the_default_objective_keeps_todays_recipe_hash(fixed_environment, over, hashes) -> None:
    assert (recipe_hash(_cfg(**over), "high"), recipe_hash(_cfg(**over), "low")) == hashes
    explicit = {**over, "fidelity": {**over.get("fidelity", {}), "objective": "eval_loss"}}
    assert (recipe_hash(_cfg(**explicit), "high"), recipe_hash(_cfg(**explicit), "low")) == hashes


def test_an_lm_eval_objective_never_reuses_an_eval_loss_score(fixed_environment, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QRA_CACHE", str(tmp_path / "cache"))
    base = _cfg()
    lm = _cfg(fidelity={"objective": "lm_eval"})
    assert recipe_diff(recipe(base, "high"), recipe(lm, "high")) == ["objective"]
    assert set(recipe(lm, "high")["objective"]) == {"name", "lm_eval", "task_files", "lm_eval_version"}
    limited = _cfg(fidelity={"objective": "lm_eval", "lm_eval": {"limit": 8}})
    assert "objective.lm_eval.limit" in recipe_diff(recipe(lm, "high"), recipe(limited, "high"))
    own = {"objective": "lm_eval", "lm_eval": {"include_path": str(_tiny_task(tmp_path / "t")), "task": "tiny_choice"}}
    before = recipe_hash(_cfg(fidelity=own), "high")
    (tmp_path / "t" / "tiny_choice.jsonl").write_text('{"q": "Other?", "choices": ["a", "b"], "gold": 1}\n')
    assert recipe_hash(_cfg(fidelity=own), "high") != before  # the task's data is part of the key


# ---------------------------------------------------------------------------------------------- shipped task
def test_the_shipped_topic_task_holds_every_held_out_topic_row_and_no_train_row(tmp_path) -> None:
    root = shipped_task_dir("qra_wiki_topic", "selection", tmp_path)
    rows = [json.loads(line) for line in (root / "qra_wiki_topic.jsonl").read_text().splitlines()]
    assert len(rows) == sum(topic_row(r) is not None for r in wiki_split("selection")) == 423
    assert {split_of(r["title"]) for r in rows} == {"selection"}
    records = {r["title"]: r for r in wiki_split("selection")}
    assert all((r["query"], r["choices"][r["gold"]]) == topic_row(records[r["title"]]) for r in rows)
    config = yaml.safe_load((root / "qra_wiki_topic.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str(root / "qra_wiki_topic.jsonl")
    assert shipped_task_dir("qra_wiki_topic", "selection", tmp_path) == root  # generated once
    with pytest.raises(QRAError, match="never 'train'"):
        write_jsonl(tmp_path / "x.jsonl", "train", fmt="lm-eval-topic")
    with pytest.raises(QRAError, match="held-out rows only"):
        shipped_task_dir("qra_wiki_topic", "train", tmp_path)


# ---------------------------------------------------------------------------------------------- end to end
def test_lm_eval_scores_a_tiny_peft_model_offline(tmp_path, monkeypatch, tiny_tokenizer) -> None:
    """Real HQQ 4-bit layers + a real LoRA adapter, scored by lm-eval from a local task with the network cut."""
    from planner.tiny import build_tiny_model
    from qra_plugin import Plan, apply_plan

    def no_network(*args, **kwargs):
        raise OSError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    base = build_tiny_model("llama", layers=2, hidden=32, vocab_size=512)
    model = apply_plan(base, Plan.uniform(base, bits=4, rank=8))
    cfg = _cfg(fidelity={"objective": "lm_eval", "lm_eval": {"include_path": str(_tiny_task(tmp_path)),
                                                             "task": "tiny_choice", "metric": "acc"}})  # fmt: skip
    rng = (random.getstate(), torch.get_rng_state())
    assert objective_for(cfg).measure(model, tiny_tokenizer, cfg) == 0.75
    assert random.getstate() == rng[0] and torch.equal(torch.get_rng_state(), rng[1])  # lm-eval seeds, then gives back
    cfg = cfg.model_copy(update={"fidelity": cfg.fidelity.model_copy(update={"lm_eval": LMEvalSection(
        include_path=str(tmp_path), task="tiny_choice", metric="f1")})})  # fmt: skip
    with pytest.raises(QRAError, match="reports no metric 'f1' .*acc, acc_norm"):
        objective_for(cfg).measure(model, tiny_tokenizer, cfg)


def test_a_tiny_qra_search_with_the_lm_eval_objective_writes_a_plan(tmp_path) -> None:
    """The issue's must-show: ``qra search`` scores every candidate with the shipped lm-eval task (8 rows)."""
    data = yaml.safe_load((ROOT / "example_configs" / "tiny-search.yaml").read_text())
    data["fidelity"] |= {"subprocess": False, "objective": "lm_eval", "lm_eval": {"limit": 8}}
    data["search"] |= {"population": 4, "generations": 1, "offspring": 2, "promote": 1, "tr_iterations": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "QRA_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "planner.cli", "search", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "out")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "plan.yaml").is_file() and "best qra_wiki_topic acc_norm" in done.stdout
    pareto = json.loads((tmp_path / "out" / "pareto.json").read_text())
    said = "minus the high-fidelity lm-eval qra_wiki_topic acc_norm"
    assert pareto["objective"].startswith(said) and said in (tmp_path / "out" / "report.html").read_text()
    with sqlite3.connect(tmp_path / "out" / "store.sqlite") as db:
        results = [json.loads(r[0]) for r in db.execute("SELECT result_json FROM evaluations WHERE status = 'ok'")]
    values = [r["objective_value"] for r in results]
    assert values and all(v is not None and 0 <= v <= 1 and v * 8 == round(v * 8) for v in values)
    assert all(-1 <= p["score"] <= 0 for p in pareto["points"])  # the search minimised minus the accuracy


def test_a_dumped_default_config_reloads() -> None:
    """model_dump() writes the default lm_eval section; reloading it is not "lm_eval set without its objective"
    (benchmarks rebuild configs this way)."""
    cfg = QRAConfig.model_validate({"model": {"tiny": {"arch": "llama"}}})
    assert QRAConfig.model_validate(cfg.model_dump()).fidelity == cfg.fidelity
