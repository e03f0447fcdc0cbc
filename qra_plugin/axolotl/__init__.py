"""Axolotl integration, thin like Axolotl's ``integrations/spectrum``: ``args`` (the YAML keys) and
``plugin`` (hooks that call ``qra_plugin`` functions). ``plugins: [qra_plugin.QRAPlugin]`` loads it."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # lazy: the args model must not import axolotl itself
    if name == "QRAPlugin":
        from qra_plugin.axolotl.plugin import QRAPlugin

        return QRAPlugin
    if name == "QRAArgs":
        from qra_plugin.axolotl.args import QRAArgs

        return QRAArgs
    raise AttributeError(f"module 'qra_plugin.axolotl' has no attribute {name!r}")
