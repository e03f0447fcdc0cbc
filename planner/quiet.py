"""Silence library chatter that means nothing to a qra user (on every import or every run), keep real warnings.

torchao logs "Failed to load …so" for CUDA kernels on CPU, torch's pytree warns about torchao's enums,
DeepSpeed announces "Setting accelerator to CPU", bitsandbytes tries a hub kernel offline, transformers
draws progress bars for weight loading. qra's own messages (logger ``qra``) are untouched.
"""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "DeepSpeed", "bitsandbytes", "accelerate.utils.other")


def quiet_libraries() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    if not torch.cuda.is_available():  # DeepSpeed warns on every import that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", message=r".*register_constant\(\) on Enum subclasses.*")
    # kernels >= 0.16 warns once bitsandbytes' CPU backend asks for a hub kernel while HF_HUB_OFFLINE is set
    warnings.filterwarnings("ignore", message=r"Skipping publisher trust check", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl|accelerate)\..*")
