"""PNG bar chart of the priors: I_q per bit-width (log scale) above, I_r below, one bar group per unit."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from qra_plugin.io import write_bytes_atomic

if TYPE_CHECKING:
    from planner.priors.profile import Priors


def plot_priors(priors: Priors, path: str | Path) -> Path:
    """Write the chart atomically (rendered in memory, then renamed into place)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(priors.units)
    bits = sorted(priors.I_q)
    width = 0.8 / max(1, len(bits))
    panels = 3 if priors.I_p else 2
    fig, axes = plt.subplots(panels, 1, figsize=(max(8.0, 0.3 * n), 3.25 * panels), sharex=True)
    ax_q, ax_r = axes[0], axes[-1]
    for k, b in enumerate(bits):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(n)]
        ax_q.bar(xs, [max(v, 1e-9) for v in priors.I_q[b]], width=width, label=f"{b} bits")
    ax_q.set_yscale("log")
    ax_q.set_ylabel("I_q: KL when only this unit is quantized")
    ax_q.legend(loc="upper center", ncol=len(bits), fontsize=8)
    if priors.I_p and priors.unit == "block":
        ratios = sorted(priors.I_p)
        w = 0.8 / len(ratios)
        for k, r in enumerate(ratios):
            axes[1].bar([i - 0.4 + w * (k + 0.5) for i in range(n)], priors.I_p[r], width=w, label=f"prune {r:g}")
        axes[1].set_ylabel("I_p: loss increase, one block pruned")
        axes[1].legend(loc="upper center", ncol=len(ratios), fontsize=8)
    ax_r.bar(range(n), priors.I_r, color="tab:green")
    ax_r.set_yscale("log")
    ax_r.set_ylabel("I_r: ||grad LoRA B||^2 at init")
    ax_r.set_xticks(range(n))
    ax_r.set_xticklabels(priors.units, rotation=90, fontsize=7)
    fig.suptitle(f"qra priors: {priors.fingerprint.describe()}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())
