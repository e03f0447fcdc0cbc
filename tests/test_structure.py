"""The code stays readable: modules under ~400 lines, functions that fit on a screen, one-way imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qra_plugin", "planner")
#: held to the same caps as the packages
CAPPED = (*PACKAGES, "benchmarks")
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    return sorted(p for pkg in CAPPED for p in (ROOT / pkg).rglob("*.py"))


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
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


def _imported_modules(tree: ast.AST) -> list[str]:
    """Every absolute module an import names (``from a import b`` names ``a`` and ``a.b``)."""
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return names


def test_benchmark_scripts_share_only_the_harness() -> None:
    """A script imports the harness, planner, qra_plugin and libraries: never another script, never ``sys.path``
    edits (each runs as ``python -m benchmarks.<name>`` from the repository root)."""
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__"}
    offenders = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        text, where = path.read_text(), path.relative_to(ROOT)
        if "sys.path" in text:
            offenders.append(f"{where}: edits sys.path")
        for name in _imported_modules(ast.parse(text)):
            parts = name.split(".")
            if parts[0] in scripts or (parts[:1] == ["benchmarks"] and len(parts) > 1 and parts[1] in scripts):
                offenders.append(f"{where}: imports the script {name}")
    assert offenders == []


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
