"""Importance priors (``qra profile``): ``measure`` (I_q: damage when one unit is quantized; I_r: LoRA
gradient signal), ``calibration`` (the token batch), ``profile`` (orchestration + the cached priors.json)
and ``plot`` (the chart)."""

from planner.priors.profile import CHART_FILE, PARTIAL_FILE, PRIORS_FILE, Priors, profile, weights_hash

__all__ = ["CHART_FILE", "PARTIAL_FILE", "PRIORS_FILE", "Priors", "profile", "weights_hash"]
