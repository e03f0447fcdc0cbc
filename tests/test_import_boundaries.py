"""Import boundaries: the runtime (``qra_plugin``) loads nothing of the planner's, and ``planner/search/`` (the
algorithms) does not import orchestration. ``pip install qra`` without the ``planner`` extra is the runtime."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what a training node must never load for qra_plugin (tests/plugin_import_check.py checks the same names)
FORBIDDEN = ("botorch", "gpytorch", "hyperopt", "matplotlib", "ray", "planner")
#: qra_plugin's third-party imports: the runtime dependencies (pyyaml is ``yaml``) and optional integrations
RUNTIME_MODULES = {"torch", "transformers", "peft", "hqq", "bitsandbytes", "safetensors", "pydantic", "yaml"}
INTEGRATIONS = {"axolotl", "deepspeed"}
#: what the search algorithms must never import: running them (set-up, runs, report, progress), the store, the
#: executors and the fidelity runs they schedule
ORCHESTRATION = ("planner.orchestration", "planner.store", "planner.executors", "planner.fidelity")


def _imported_names(path: Path, package: str) -> list[str]:
    """Every module a file imports, at module level or in a function body (relative ones resolved), plus the
    string given to ``importlib.import_module``; ``from X import y`` yields both X and X.y."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            first = node.args[0]
            names += [first.value] if isinstance(first, ast.Constant) and isinstance(first.value, str) else []
    return names


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _distribution(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_every_plugin_module_and_apply_plan_load_nothing_of_the_planner(tmp_path: Path) -> None:
    """In a fresh process (outside the repository): import each qra_plugin module, then apply a mixed plan to a
    tiny Llama and take a training step, so lazily imported modules are loaded too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "plugin_import_check.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pulled_by_import"] == {}
    assert result["forbidden_loaded"] == []
    assert Path(result["qra_plugin_file"]).parent == ROOT / "qra_plugin"
    assert result["apply_plan"]["lora_grads"] > 0 and result["apply_plan"]["backends"] == ["bnb", "hqq"]


def test_plugin_source_imports_only_the_runtime_dependencies() -> None:
    """Every import statement in qra_plugin, in function bodies too: stdlib, the runtime dependencies, Axolotl or
    DeepSpeed (optional integrations), or qra_plugin itself — so the light install can run every code path."""
    allowed = set(sys.stdlib_module_names) | RUNTIME_MODULES | INTEGRATIONS | {"qra_plugin"}
    offenders = []
    for path in sorted((ROOT / "qra_plugin").rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for name in _imported_names(path, package):
            if name.split(".")[0] not in allowed:
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def test_runtime_dependencies_are_what_qra_plugin_imports() -> None:
    """``pip install qra`` brings exactly the plugin's third-party imports; nothing heavy of the planner's."""
    runtime = {_distribution(r) for r in _pyproject()["dependencies"]}
    assert runtime == (RUNTIME_MODULES - {"yaml"}) | {"pyyaml"}
    assert not runtime & set(FORBIDDEN)


def test_the_cli_checks_exactly_the_planner_extra() -> None:
    from planner.cli import PLANNER_EXTRA

    extra = {_distribution(r) for r in _pyproject()["optional-dependencies"]["planner"]}
    assert set(PLANNER_EXTRA) == extra
    assert {"botorch", "gpytorch", "hyperopt", "matplotlib"} <= extra


def test_qra_without_the_planner_extra_says_how_to_install_it() -> None:
    """One line on stderr naming the missing modules and the extra, exit 2, no traceback."""
    code = (
        "import sys; sys.modules['botorch'] = sys.modules['hyperopt'] = None; sys.argv = ['qra', 'search', '--help']\n"
        "from planner.cli import main; main()"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "(botorch, hyperopt)" in lines[0] and 'pip install "qra[planner]"' in lines[0]
    assert proc.stdout == ""


def _orchestration_imports() -> list[str]:
    targets = ORCHESTRATION
    found = []
    for path in sorted((ROOT / "planner" / "search").glob("*.py")):
        for name in _imported_names(path, "planner.search"):
            if any(name == t or name.startswith(f"{t}.") for t in targets):
                found.append(f"{path.relative_to(ROOT)}: {name}")
    return sorted(set(found))


def test_the_scan_sees_relative_and_lazy_imports(tmp_path: Path) -> None:
    source = "from . import run\ndef f():\n    from .setup import x\n"
    source += "    importlib.import_module('planner.search.progress')\n"
    (tmp_path / "mod.py").write_text(source)
    names = _imported_names(tmp_path / "mod.py", "planner.search")
    assert {"planner.search.run", "planner.search.setup", "planner.search.progress"} <= set(names)


def test_search_imports_no_orchestration() -> None:
    """``planner/search/`` keeps the algorithms; run set-up, the search run and progress live in
    ``planner.orchestration`` and are never imported back from ``search/`` (issue 22 item 3)."""
    assert _orchestration_imports() == []


def _module_level_graph() -> dict[str, set[str]]:
    """planner module -> the planner modules its module-level imports run (parent packages included)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "planner").rglob("*.py")}  # fmt: skip
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.parse(path.read_text()).body:  # module level only: function bodies run later
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    target = ".".join(parts[:i])
                    if target in files and target != module and not module.startswith(f"{target}."):
                        graph[module].add(target)
    return graph


def test_planner_has_no_module_level_import_cycle() -> None:
    """Imports sit at module top (issue 22): a cycle among them would fail at import time in some order."""
    graph = _module_level_graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.slow
def test_light_install_in_a_fresh_venv(tmp_path: Path) -> None:
    """benchmarks/light_install.sh: fresh venv, torch 2.13.0, ``pip install .`` with no extras, then the plugin
    check and ``qra --help`` there (≈ 2.5 min of installs; needs the package registry)."""
    out = tmp_path / "light_install.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "light_install.sh"), str(out)], capture_output=True, text=True, timeout=1500
    )
    assert out.is_file(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["checks"] == dict.fromkeys(result["checks"], True), result["checks"]
    assert not set(FORBIDDEN) & set(result["installed"])
    assert proc.returncode == 0
