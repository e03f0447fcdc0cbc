"""Generated malformed inputs for ``benchmarks.reliability``: plans, configs, budgets and jsonl data.

Every input is malformed by construction (a wrong type, an unknown name, a negative rank, bits a backend
cannot store, truncated YAML, a foreign fingerprint, a bad budget, a broken data file …). Each is fed to the
real CLI in this process (``planner.cli.main``) and must end with a non-zero exit, one stderr line and no
traceback, and must leave no new file in the output directory it was given.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import ROOT

TINY = ROOT / "example_configs" / "tiny-search.yaml"


def _run_cli(argv: list[str]) -> tuple[int, str, bool]:
    """(exit status, stderr, escaped) of ``qra ARGV`` run in this process; escaped: an exception got out."""
    from planner.cli import main

    err = io.StringIO()
    old_argv = sys.argv
    sys.argv = ["qra", *argv]
    code, escaped = 0, False
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
    except SystemExit as exc:
        code = int(exc.code) if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - what the benchmark counts: an exception a user would see
        code, escaped = 1, True
        err.write(f"Traceback (most recent call last):\n{type(exc).__name__}: {exc}\n")
    finally:
        sys.argv = old_argv
    return code, err.getvalue(), escaped


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


# ---------------------------------------------------------------------------------------------- plans
def _plan_inputs(rng: random.Random, model_dir: Path, other_dir: Path) -> list[tuple[str, str]]:
    """(name, file text) of malformed plans for the tiny model at ``model_dir``."""
    from transformers import AutoModelForCausalLM

    from qra_plugin.plan import Plan

    plan = Plan.uniform(AutoModelForCausalLM.from_pretrained(str(model_dir)), bits=4, rank=8).to_dict()
    foreign = Plan.uniform(AutoModelForCausalLM.from_pretrained(str(other_dir)), bits=4, rank=8).to_dict()
    names = sorted(plan["modules"])
    edits: list[tuple[str, Callable[[dict], Any]]] = [
        ("bits-string", lambda m: m.update(bits="four")),
        ("bits-5", lambda m: m.update(bits=5)),
        ("bits-float", lambda m: m.update(bits=4.5)),
        ("rank-negative", lambda m: m.update(rank=-rng.randint(1, 64))),
        ("rank-string", lambda m: m.update(rank="sixteen")),
        ("rank-list", lambda m: m.update(rank=[8])),
        ("group-negative", lambda m: m.update(group_size=-32)),
        ("group-zero", lambda m: m.update(group_size=0)),
        ("axis-2", lambda m: m.update(axis=2)),
        ("alpha-negative", lambda m: m.update(alpha=-1.0)),
        ("unknown-field", lambda m: m.update(sparsity=0.5)),
        ("bnb-2bit", lambda m: m.update(bits=2, backend="bnb")),
        ("bnb-3bit", lambda m: m.update(bits=3, backend="bnb")),
        ("hqq-16bit", lambda m: m.update(bits=16, backend="hqq")),
        ("none-4bit", lambda m: m.update(bits=4, backend="none")),
        ("unknown-backend", lambda m: m.update(backend="gptq")),
        ("nf4-group-32", lambda m: m.update(bits=4, backend="bnb", group_size=32)),
        ("module-null", lambda m: m.clear()),
    ]
    out: list[tuple[str, str]] = []
    for name, edit in edits:
        for _ in range(4):
            bad = copy.deepcopy(plan)
            target = bad["modules"][rng.choice(names)]
            edit(target)
            if name == "module-null":
                bad["modules"][rng.choice(names)] = None
            out.append((f"plan:{name}", yaml.safe_dump(bad)))
    for _ in range(6):
        bad = copy.deepcopy(plan)
        bad["modules"][f"model.layers.{rng.randint(50, 99)}.mlp.gate_proj"] = {"bits": 4, "rank": 8}
        out.append(("plan:unknown-module", yaml.safe_dump(bad)))
    for _ in range(6):
        out.append(("plan:foreign-fingerprint", yaml.safe_dump({**foreign, "modules": foreign["modules"]})))
    text = yaml.safe_dump(plan)
    for _ in range(10):
        cut = rng.randint(1, len(text) - 1)
        out.append(("plan:truncated-yaml", text[:cut] + "\n  bits: [4\n"))
    out += [
        ("plan:empty", ""),
        ("plan:list", "- 1\n- 2\n"),
        ("plan:scalar", "42\n"),
        ("plan:no-modules", yaml.safe_dump({"version": 1, "fingerprint": plan["fingerprint"]})),
        ("plan:fingerprint-string", yaml.safe_dump({**plan, "fingerprint": "llama"})),
        ("plan:modules-list", yaml.safe_dump({**plan, "modules": names})),
        ("plan:binary", "\x00\x01\x02\xff garbage"),
        ("plan:tabs", "fingerprint:\n\t- bad\n"),
    ]
    return out


# ---------------------------------------------------------------------------------------------- configs
def _config_inputs(rng: random.Random, tmp: Path) -> list[tuple[str, str]]:
    base = yaml.safe_load(TINY.read_text())
    edits: list[tuple[str, Callable[[dict], None]]] = [
        ("unknown-top-key", lambda c: c.update(optimiser="adam")),
        ("unknown-search-key", lambda c: c["search"].update(popsize=4)),
        ("unknown-train-key", lambda c: c["train"].update(epochs=3)),
        ("population-string", lambda c: c["search"].update(population="many")),
        ("population-1", lambda c: c["search"].update(population=1)),
        ("steps-negative", lambda c: c["fidelity"]["low"].update(steps=-1)),
        ("eval-examples-0", lambda c: c["fidelity"]["high"].update(eval_examples=0)),
        ("batch-0", lambda c: c["train"].update(batch=0)),
        ("lr-negative", lambda c: c["train"].update(lr=-0.1)),
        ("seq-len-4", lambda c: c["train"].update(seq_len=4)),
        ("bits-5", lambda c: c["space"].update(bits=[4, 5])),
        ("ranks-negative", lambda c: c["space"].update(ranks=[-4, 8])),
        ("backend-gptq", lambda c: c["space"].update(backend="gptq")),
        ("bnb-with-2bit", lambda c: c["space"].update(backend="bnb")),
        ("unit-layer", lambda c: c["space"].update(unit="layer")),
        ("model-two-sources", lambda c: c["model"].update(path="demo")),
        ("model-no-source", lambda c: c.update(model={})),
        ("model-missing-dir", lambda c: c.update(model={"path": str(tmp / "no-such-model")})),
        ("model-arch-gpt2", lambda c: c["model"]["tiny"].update(arch="gpt2")),
        ("dtype-int8", lambda c: c["model"].update(dtype="int8")),
        ("jsonl-without-path", lambda c: c.update(data={"source": "jsonl"})),
        ("data-missing-file", lambda c: c.update(data={"source": "jsonl", "path": str(tmp / "missing.jsonl")})),
        ("data-source-csv", lambda c: c["data"].update(source="csv")),
        ("seeds-string", lambda c: c["fidelity"].update(seeds="zero")),
        ("timeout-0", lambda c: c["fidelity"].update(timeout_s=0)),
        ("executor-spark", lambda c: c["search"].update(executor="spark")),
        ("profile-bits-16", lambda c: c["profile"].update(bits=[16])),
        ("section-list", lambda c: c.update(train=[1, 2])),
    ]
    out: list[tuple[str, str]] = []
    for name, edit in edits:
        for _ in range(3):
            bad = copy.deepcopy(base)
            edit(bad)
            bad["seed"] = rng.randint(0, 99)  # variety that keeps each input malformed
            out.append((f"config:{name}", yaml.safe_dump(bad)))
    text = TINY.read_text()
    for _ in range(8):
        cut = rng.randint(1, len(text) - 1)
        out.append(("config:truncated-yaml", text[:cut] + "\nsearch: {population: [\n"))
    out += [("config:empty", ""), ("config:scalar", "tiny\n"), ("config:list", "- model\n")]
    return out


def _budget_inputs(rng: random.Random) -> list[tuple[str, str]]:
    base = yaml.safe_load(TINY.read_text())
    budgets = [
        "uniform:5bit:r16", "uniform:4bit-gptq:r16", "uniform:2bit-bnb:r16", "uniform:3bit-bnb:r8", "uniform:4bit:r",
        "uniform:4bit", "uniform::r16", "12 parsecs", "-5GiB", "0", "0 MiB", "1KiB", "100 B", "weights:", "peak:abc",
        "weights:1KiB", "GiB", "1.2.3GiB", "uniformly:4bit:r16", "peak:uniform:9bit:r16",
    ]  # fmt: skip
    out = []
    for budget in budgets:
        for _ in range(2):
            bad = copy.deepcopy(base)
            bad["budget"], bad["seed"] = budget, rng.randint(0, 99)
            out.append((f"budget:{budget}", yaml.safe_dump(bad)))
    return out


def _data_inputs(rng: random.Random, tmp: Path) -> list[tuple[str, str]]:
    row = {"prompt": "Name a colour.", "completion": "Blue."}
    files = {
        "not-json": "this is not json\n" * 5,
        "json-array-lines": "[1, 2, 3]\n" * 5,
        "missing-fields": json.dumps({"question": "q", "reply": "a"}) + "\n",
        "prompt-only": json.dumps({"prompt": "q"}) + "\n",
        "half-alpaca": json.dumps({"instruction": "q"}) + "\n",
        "empty": "",
        "blank-lines": "\n\n\n",
        "one-row-no-eval": json.dumps(row) + "\n",
        "truncated-line": json.dumps(row) + "\n" + json.dumps(row)[:17] + "\n",
        "bad-in-the-middle": (json.dumps(row) + "\n") * 30 + "{oops\n" + (json.dumps(row) + "\n") * 5,
    }
    base = yaml.safe_load(TINY.read_text())
    out = []
    for name, text in files.items():
        for i in range(2):
            path = tmp / f"data-{name}-{i}.jsonl"
            path.write_text(text)
            bad = copy.deepcopy(base)
            bad["data"] = {"source": "jsonl", "path": str(path), "train_examples": 8, "eval_examples": 2}
            bad["seed"] = rng.randint(0, 99)
            out.append((f"data:{name}", yaml.safe_dump(bad)))
    return out


# ---------------------------------------------------------------------------------------------- driver
def fuzz(work: Path, n: int, seed: int) -> dict[str, Any]:
    from planner.tiny import save_tiny_model

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny_model(work / "model", layers=2, hidden=32, vocab_size=128)
    other_dir = save_tiny_model(work / "other", arch="qwen2", layers=2, hidden=32, vocab_size=128)
    plans = _plan_inputs(rng, model_dir, other_dir)
    configs = _config_inputs(rng, work) + _budget_inputs(rng) + _data_inputs(rng, work)
    inputs = [("plan", name, text) for name, text in plans] + [("config", name, text) for name, text in configs]
    rng.shuffle(inputs)
    inputs = inputs[:n] if n < len(inputs) else inputs
    failures: list[dict[str, Any]] = []
    counts = {"tracebacks": 0, "partial_files": 0, "zero_exit": 0, "multi_line": 0}
    for i, (kind, name, text) in enumerate(inputs):
        path = work / f"input-{i}.yaml"
        path.write_text(text)
        out = work / f"out-{i}"
        argv = (
            ["estimate", "--model", str(model_dir), "--plan", str(path), "--batch", "2", "--seq-len", "16"]
            if kind == "plan"
            else ["search", str(path), "--out", str(out), "--no-progress"]
        )
        before = _files(out)
        code, err, escaped = _run_cli(argv)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        problems = {
            "tracebacks": escaped or "Traceback" in err,
            "partial_files": _files(out) != before,
            "zero_exit": code == 0,
            "multi_line": len(lines) != 1,
        }
        for key, bad in problems.items():
            counts[key] += bool(bad)
        if any(problems.values()):
            failures.append(
                {"input": name, "exit": code, "stderr": err[-400:], **{k: v for k, v in problems.items() if v}}
            )
    by_kind: dict[str, int] = {}
    for _, name, _ in inputs:
        by_kind[name.split(":")[0]] = by_kind.get(name.split(":")[0], 0) + 1
    return {"inputs": len(inputs), "by_kind": by_kind, **counts, "failures": failures[:20]}
