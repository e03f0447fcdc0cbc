"""Axolotl-native planning: an Axolotl YAML with a ``qra:`` section drives ``qra profile|search|estimate|baseline``.

Model, data, batch, sequence length, optimizer, gradient checkpointing, dtype and learning rate come from
Axolotl's own keys, validated and normalised by Axolotl itself (``config``); fidelity runs train on the
rows Axolotl prepares from the user's datasets (``data``), so the plan is tuned on the job that is trained.
"""

from planner.axolotl.config import is_axolotl_yaml, load_axolotl

__all__ = ["is_axolotl_yaml", "load_axolotl"]
