"""How two methods' final scores are compared: one module every benchmark uses.

Every benchmark here fine-tunes each plan with the same seeds, and a seed fixes the data order and the LoRA
init, so two methods' runs with the same seed are **paired**: compare the per-seed differences (``paired``),
not two independent means. ``independent`` (Welch's t) is for runs that share no seed.

What n = 3 seeds can resolve: the paired t has df = 2, so p < 0.05 needs |t| > 4.30 (``T_CRIT_DF2``) — a
mean difference over four times its standard error. The exact sign-flip test over the 2^3 = 8 sign
assignments can never give a two-sided p below 2/8 = 0.25, so at n = 3 it can only say "not excluded"; it
is reported as a check on the t-test's normality assumption, not as the rule.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: the significance level of ``resolved``
ALPHA = 0.05
#: two-sided 5 % critical value of Student's t with 2 degrees of freedom (n = 3 paired seeds)
T_CRIT_DF2 = 4.302652729911275
#: the exact sign-flip test enumerates 2^n assignments up to this n (2^20 ≈ 1e6); above it perm_p is None
MAX_EXACT_PERMUTATION_N = 20


@dataclass(frozen=True)
class Comparison:
    """a − b: the mean difference, its spread and the test's verdict.

    ``sd`` is the sd of the per-seed differences (paired; None for Welch), ``se`` the standard error of
    ``mean``; ``t``/``p`` (two-sided) are None when undefined (n < 2, or every difference equal);
    ``perm_p`` is the exact sign-flip p (paired only); ``seeds`` the seeds both sides had (paired only).
    """

    test: str
    mean: float | None
    sd: float | None
    se: float | None
    t: float | None
    df: float | None
    p: float | None
    n: int
    seeds: tuple[int, ...] = ()
    perm_p: float | None = None
    note: str = ""

    @property
    def resolved(self) -> bool:
        """The rule every benchmark reports: two-sided p < 0.05 (paired t for paired runs)."""
        return self.p is not None and self.p < ALPHA

    def as_dict(self, digits: int = 6) -> dict[str, Any]:
        """Plain JSON (floats to ``digits`` significant digits, so a small p keeps its size), ``resolved`` included."""
        out = {k: (_round(v, digits) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        out["seeds"] = list(self.seeds)
        out["resolved"] = self.resolved
        return out


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Comparison:
    """a − b over the seeds both have (``seeds`` says which; a seed on one side only is left out).

    Paired t: mean d̄ of d_s = a[s] − b[s], sd s_d, se = s_d/√n, t = d̄/se, df = n − 1, two-sided p from
    Student's t. n < 2: t = p = None. Every difference equal (s_d = 0): t is 0/0 or ±∞ and we report
    t = p = None, not resolved — identical plans give d = 0 exactly, and on a coarse metric (accuracy over
    44 rows moves in steps of 1/44) a constant difference over 3 seeds is a 1-in-4 sign-flip event.
    perm_p: exact sign-flip p, the share of the 2^n sign assignments whose |Σ ±d_s| ≥ |Σ d_s|; at n = 3 its
    smallest possible value is 0.25, so it can never resolve anything at n = 3 by itself.
    """
    seeds = tuple(sorted(set(a) & set(b)))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(diffs)
    if n == 0:
        return Comparison("paired t", None, None, None, None, None, None, 0, note="no seed on both sides")
    mean = statistics.fmean(diffs)
    perm = sign_flip_p(diffs)
    if n < 2:
        return Comparison("paired t", mean, None, None, None, None, None, n, seeds, perm, note="n < 2: no spread")
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    scale = [float(x) for s in seeds for x in (a[s], b[s])]
    if _is_zero(sd, scale):
        note = "all differences zero" if _is_zero(mean, scale) else "every difference equal: t undefined"
        return Comparison("paired t", mean, 0.0, 0.0, None, n - 1, None, n, seeds, perm, note=note)
    t = mean / se
    return Comparison("paired t", mean, sd, se, t, n - 1, _two_sided_p(t, n - 1), n, seeds, perm)


def independent(a_values: Iterable[float], b_values: Iterable[float]) -> Comparison:
    """mean(a) − mean(b) for runs that share no seed: Welch's t (unequal variances, Welch–Satterthwaite df).

    Either side with fewer than 2 values, or both without spread: t = p = None.
    """
    a, b = [float(v) for v in a_values], [float(v) for v in b_values]
    if not a or not b:
        return Comparison("welch t", None, None, None, None, None, None, 0, note="an empty side")
    mean = statistics.fmean(a) - statistics.fmean(b)
    n = len(a) + len(b)
    if len(a) < 2 or len(b) < 2:
        return Comparison("welch t", mean, None, None, None, None, None, n, note="a side with n < 2")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if _is_zero(se, a + b):
        return Comparison("welch t", mean, None, 0.0, None, None, None, n, note="no spread: t undefined")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = mean / se
    return Comparison("welch t", mean, None, se, t, df, _two_sided_p(t, df), n)


def sign_flip_p(diffs: list[float]) -> float | None:
    """Exact two-sided sign-flip (paired permutation) p of the mean difference; None above 20 values."""
    n = len(diffs)
    if n == 0 or n > MAX_EXACT_PERMUTATION_N:
        return None
    observed = abs(sum(diffs))
    tolerance = 1e-12 * max(1.0, sum(abs(d) for d in diffs))
    hits = sum(
        abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - tolerance
        for signs in itertools.product((1, -1), repeat=n)
    )
    return hits / 2**n


def markdown(c: Comparison | dict[str, Any] | None, digits: int = 4) -> str:
    """Mean ± se (t, df, p) for a table cell, * when resolved; "—" when there is nothing to compare."""
    d = c.as_dict() if isinstance(c, Comparison) else c
    if not d or d.get("mean") is None:
        return "—"
    head = f"{d['mean']:+.{digits}f}"
    if d.get("se") is None:
        return f"{head} (n {d['n']}: no spread)"
    head += f" ± {d['se']:.{digits}f}"
    if d.get("t") is None:
        return f"{head} ({d.get('note') or 't undefined'})"
    df = d["df"]
    df_text = f"{df:.0f}" if abs(df - round(df)) < 1e-9 else f"{df:.1f}"
    star = "*" if d.get("resolved") else ""
    return f"{head} (t {d['t']:+.2f}, df {df_text}, p {_p_text(d['p'])}){star}"


def _two_sided_p(t: float, df: float) -> float:
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df))


def _is_zero(value: float, scale_of: list[float]) -> bool:
    """Zero up to float noise relative to the compared values (differences of rounded values are not exact)."""
    return abs(value) <= 1e-12 * max(1.0, max(abs(x) for x in scale_of))


def _p_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else float(f"{value:.{digits}g}")
