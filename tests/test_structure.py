"""The code stays readable: modules under ~400 lines, functions that fit on a screen, one-way imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qra_plugin", "planner")
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_modules_and_functions_fit_on_a_screen() -> None:
    too_long = []
    for path in _sources():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def test_the_runtime_never_imports_the_planner() -> None:
    offenders = []
    for path in sorted((ROOT / "qra_plugin").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "planner"]
    assert offenders == []


def test_benchmarks_import_no_private_names() -> None:
    private = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def test_the_trl_example_is_a_plain_trl_script() -> None:
    """What a TRL user copies: transformers + datasets + TRL + qra_plugin, nothing of the planner."""
    allowed = {
        "transformers",
        "datasets",
        "trl",
        "torch",
        "qra_plugin",
        "argparse",
        "json",
        "os",
        "pathlib",
        "__future__",
    }
    tree = ast.parse((ROOT / "example_configs" / "train_trl.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= allowed, roots - allowed
