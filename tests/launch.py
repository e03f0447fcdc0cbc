"""The environment every subprocess a test launches starts from: this session's, as it was before any test ran.

In-process tests run Axolotl's ``load_cfg``, accelerate and transformers, which export ``ACCELERATE_*``,
``FSDP_*``, ``RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` and more into ``os.environ``; a launch that inherited them
would depend on which tests ran before it (conftest imports this module before any test runs).
"""

from __future__ import annotations

import os

SESSION_ENV = dict(os.environ)


def launch_env(**extra: str) -> dict[str, str]:
    """The session's starting environment plus ``extra``."""
    return {**SESSION_ENV, **extra}


def leaked_keys() -> list[str]:
    """Variables this process gained or changed since the session started (for a failing launch's message)."""
    return sorted(k for k, v in os.environ.items() if SESSION_ENV.get(k) != v)
