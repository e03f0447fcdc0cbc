"""The data formats a TRL user has (text, prompt/completion, messages, alpaca) and Axolotl-tokenized rows."""

from __future__ import annotations

import json
import math

import pytest

from planner.config import DataSection
from planner.data.sources import as_example, examples, sft_rows
from planner.fidelity.sft import run_fidelity
from planner.loading import load_meta_model
from qra_plugin import Plan
from qra_plugin.errors import QRAError
from tests.test_fidelity import task, tiny_config


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_row_format_becomes_the_trl_row_it_means():
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"},
                         {"role": "assistant", "content": "Blue."}]}  # fmt: skip
    rows = [{"text": "plain text"}, {"prompt": "P", "completion": "C"}, chat,
            {"instruction": "I", "input": "X", "output": "O"}]  # fmt: skip
    items = tuple(as_example(r, "t") for r in rows)
    # all of a text row is trained on, chat template or not
    assert sft_rows(items[:1], conversational=True).to_list() == [{"prompt": "", "completion": "plain text"}]
    pc, msgs, alpaca = sft_rows(items[1:], conversational=True).to_list()
    assert pc["completion"] == [{"role": "assistant", "content": "C"}]
    # a conversation keeps its roles; the loss is on the last assistant turn
    assert msgs["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}]
    assert msgs["completion"] == [{"role": "assistant", "content": "Blue."}]
    assert alpaca["prompt"] == [{"role": "user", "content": "I\n\nX"}]
    with pytest.raises(QRAError, match="chat template"):
        sft_rows(items[2:3], conversational=False)
    with pytest.raises(QRAError, match="end with an assistant turn"):
        as_example({"messages": [{"role": "user", "content": "only a question"}]}, "row 1")


def test_messages_jsonl_trains_through_the_chat_template(tmp_path):
    def chat(i: int) -> dict:
        answer = " ".join(map(str, range(i)))
        return {"messages": [{"role": "user", "content": f"Count to {i}."}, {"role": "assistant", "content": answer}]}

    turns = [chat(i) for i in range(2, 42)]
    path = _write(tmp_path / "chat.jsonl", turns)
    cfg = tiny_config(data={"source": "jsonl", "path": path, "train_examples": 32})
    result = run_fidelity(task(cfg, Plan.uniform(load_meta_model(cfg.model), bits=4, rank=8)))
    assert result.status == "ok" and math.isfinite(result.eval_loss)


def test_tokenized_rows_train_on_their_labels_only(tmp_path):
    rows = [{"input_ids": list(range(5, 45)), "labels": [-100] * 20 + list(range(25, 45))} for _ in range(24)]
    train, sel = _write(tmp_path / "train.jsonl", rows), _write(tmp_path / "sel.jsonl", rows[:4])
    cfg = tiny_config(data={"source": "tokenized", "path": train, "eval_path": sel})
    plan = Plan.uniform(load_meta_model(cfg.model), bits=4, rank=8)
    result = run_fidelity(task(cfg, plan))
    assert result.status == "ok" and math.isfinite(result.eval_loss)
    # the same ids scored on every position give another loss: the labels' mask was used, not input_ids
    full = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows]
    cfg_full = tiny_config(data={"source": "tokenized", "path": _write(tmp_path / "f.jsonl", full),
                                 "eval_path": _write(tmp_path / "fs.jsonl", full[:4])})  # fmt: skip
    assert run_fidelity(task(cfg_full, plan)).eval_loss != pytest.approx(result.eval_loss, abs=1e-6)
    with pytest.raises(QRAError, match="no answers"):
        examples(cfg.data, "selection", 2)


def test_bad_tokenized_rows_are_one_line_errors(tmp_path):
    from planner.data.sources import check_data

    bad = _write(tmp_path / "bad.jsonl", [{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(QRAError, match=r"bad.jsonl:1: input_ids and labels must be non-empty and of one length"):
        check_data(DataSection(source="tokenized", path=bad, eval_path=bad))
    with pytest.raises(ValueError, match="needs data.eval_path"):
        DataSection(source="tokenized", path=bad)
