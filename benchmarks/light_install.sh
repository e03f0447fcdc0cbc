#!/usr/bin/env bash
# The light runtime install, end to end: a fresh venv (no --system-site-packages, so nothing of the dev venv or
# the system is seen), torch 2.13.0 first (the local CPU build, as `make setup` installs it), then `pip install .`
# with no extras. Passes when none of botorch, gpytorch, hyperopt, matplotlib, ray is installed, every qra_plugin
# module imports and apply_plan trains a tiny Llama without loading any of them or the planner
# (tests/plugin_import_check.py), and `qra --help` refuses in one line naming `pip install "qra[planner]"`.
#
#     bash benchmarks/light_install.sh [OUT_JSON]     (default benchmarks/results/light_install.json)
#
# Writes the JSON (command, wall time, installed packages, checks, pass) atomically; exits non-zero on a failure.
# wall_s counts the venv, the installs and the checks, not removing the venv afterwards (the EXIT trap).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:-$root/benchmarks/results/light_install.json}")"
heavy="botorch gpytorch hyperopt matplotlib ray"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s.%N)

# the sources the wheel is built from (pyproject's packages), without caches or anything untracked-and-large
mkdir -p "$work/src"
(cd "$root" && tar --exclude=__pycache__ -cf - pyproject.toml README.md qra_plugin planner) | tar -xf - -C "$work/src"
cp "$root/tests/plugin_import_check.py" "$work/"

python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q "$work/src"
install_s=$(python3 -c "import time; print(round(time.time() - $start, 1))")

# run from $work so neither the repository's qra_plugin nor its planner is on sys.path
cd "$work"
"$py" plugin_import_check.py 2>"$work/check.err" | tail -n 1 >"$work/check.json" || true
set +e
"$work/venv/bin/qra" --help >"$work/qra.out" 2>"$work/qra.err"
qra_rc=$?
set -e
wall_s=$(python3 -c "import time; print(round(time.time() - $start, 1))")

"$py" - "$out" "$heavy" "$wall_s" "$install_s" "$qra_rc" <<'EOF'
import importlib.metadata as md, importlib.util, json, os, platform, sys
from pathlib import Path

out, heavy, wall_s, install_s, qra_rc = sys.argv[1], sys.argv[2].split(), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
installed = {d.metadata["Name"].lower(): d.version for d in md.distributions()}
present_heavy = [name for name in heavy if name in installed or importlib.util.find_spec(name)]
text = Path("check.json").read_text().strip()
check = json.loads(text) if text.startswith("{") else {"error": Path("check.err").read_text()[-2000:]}
qra_err = Path("qra.err").read_text().strip().splitlines()
applied = check.get("apply_plan", {})
checks = {
    "heavy_absent": present_heavy == [],
    "plugin_loads_none_of_them": check.get("forbidden_loaded") == [] and check.get("pulled_by_import") == {},
    "installed_copy_used": "site-packages" in check.get("qra_plugin_file", ""),
    "apply_plan_trains": applied.get("lora_grads", 0) > 0 and applied.get("lora_all_lora") is True,
    "qra_one_line_error": qra_rc != 0 and len(qra_err) == 1 and 'pip install "qra[planner]"' in qra_err[0],
}
result = {
    "command": "nice -n 15 bash benchmarks/light_install.sh",
    "what": "fresh venv (no system site packages) + pip install torch==2.13.0 + pip install . (no extras)",
    "python": platform.python_version(),
    "wall_s": wall_s,
    "install_s": install_s,
    "pass": all(checks.values()),
    "checks": checks,
    "heavy_present": present_heavy,
    "planner_extra_absent": sorted(
        n for n in ("scipy", "typer", "rich", "gguf", "datasets", "trl", "botorch", "matplotlib") if n not in installed
    ),
    "plugin_check": check,
    "qra_help": {"exit": qra_rc, "stderr": qra_err},
    "installed": dict(sorted(installed.items())),
}
Path(out).parent.mkdir(parents=True, exist_ok=True)
tmp = Path(f"{out}.tmp")
tmp.write_text(json.dumps(result, indent=1) + "\n")
os.replace(tmp, out)
print(json.dumps({k: result[k] for k in ("pass", "wall_s", "install_s", "checks", "heavy_present")}))
sys.exit(0 if result["pass"] else 1)
EOF
