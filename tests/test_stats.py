"""planner.stats against hand-computed values: paired t, Welch, the exact sign-flip p, the resolved rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from planner.stats import T_CRIT_DF2, independent, markdown, paired, sign_flip_p

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _p_df2(t: float) -> float:
    """Two-sided p of Student's t with 2 df in closed form: 1 − |t| / √(t² + 2)."""
    return 1 - abs(t) / math.sqrt(t * t + 2)


def test_paired_t_by_hand() -> None:
    # d = (-1, 0, +4): mean 1, sd √7, se √(7/3), t = 1 / √(7/3)
    c = paired({0: 2.0, 1: 3.0, 2: 9.0}, {0: 3.0, 1: 3.0, 2: 5.0})
    assert c.mean == pytest.approx(1.0) and c.sd == pytest.approx(math.sqrt(7))
    assert c.se == pytest.approx(math.sqrt(7 / 3)) and c.t == pytest.approx(1 / math.sqrt(7 / 3))
    assert c.df == 2 and c.n == 3 and c.seeds == (0, 1, 2)
    assert c.p == pytest.approx(_p_df2(c.t))
    assert c.perm_p == 1.0  # |Σ ±d| over the 8 assignments is 3 or 5: none is smaller than the observed 3
    assert not c.resolved


def test_only_seeds_on_both_sides_count() -> None:
    c = paired({0: 1.0, 1: 2.0, 2: 4.0, 7: 100.0}, {0: 0.0, 1: 1.5, 2: 3.0, 9: -100.0})
    assert c.seeds == (0, 1, 2) and c.n == 3 and c.mean == pytest.approx((1.0 + 0.5 + 1.0) / 3)


def test_resolved_needs_t_beyond_4_30_at_three_seeds() -> None:
    assert _p_df2(T_CRIT_DF2) == pytest.approx(0.05, abs=1e-9)
    for t, resolved in ((4.31, True), (4.29, False)):
        m = t / math.sqrt(3)  # d = (m − 1, m, m + 1): sd 1, se 1/√3, t = m√3
        c = paired({0: m - 1, 1: m, 2: m + 1}, {0: 0.0, 1: 0.0, 2: 0.0})
        assert c.t == pytest.approx(t) and c.resolved is resolved
        assert c.perm_p == 0.25  # the sign-flip test cannot go below 2/8 at n = 3, whatever t is


def test_sign_flip_p_is_exact() -> None:
    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25  # only all-plus and all-minus reach |Σ| = 6
    assert sign_flip_p([3.0, -1.0, -1.0]) == 1.0  # every assignment has |Σ| ≥ 1
    assert sign_flip_p([1.0] * 5) == 2 / 32
    assert sign_flip_p([1.0] * 6) == 2 / 64  # n = 6 is the first n whose smallest p is below 0.05
    assert sign_flip_p([]) is None and sign_flip_p([1.0] * 21) is None


def test_too_few_seeds_and_no_spread() -> None:
    one = paired({0: 1.0, 1: 5.0}, {0: 0.5})
    assert one.n == 1 and one.mean == pytest.approx(0.5) and one.t is None and one.p is None and not one.resolved
    assert paired({0: 1.0}, {1: 1.0}).mean is None  # no seed in common
    same = paired({0: 2.24943, 1: 2.24426, 2: 2.24886}, {0: 2.24943, 1: 2.24426, 2: 2.24886})
    assert same.mean == 0 and same.t is None and same.p is None and same.perm_p == 1.0 and not same.resolved
    # a constant non-zero difference (float noise included): t undefined, not resolved, sign-flip p 2/8
    shift = paired({0: 2.050, 1: 2.052, 2: 2.048}, {0: 2.100, 1: 2.102, 2: 2.098})
    assert shift.mean == pytest.approx(-0.05) and shift.t is None and not shift.resolved and shift.perm_p == 0.25
    assert "t undefined" in shift.note


def test_welch_by_hand() -> None:
    # b has no spread: se² = var(a)/3 = 1/3, df = (1/3)² / ((1/3)²/2) = 2, t = 1/√(1/3)
    c = independent([1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0])
    assert c.mean == pytest.approx(1.0) and c.se == pytest.approx(math.sqrt(1 / 3)) and c.df == pytest.approx(2.0)
    assert c.t == pytest.approx(math.sqrt(3)) and c.p == pytest.approx(_p_df2(math.sqrt(3)))
    # equal sizes and variances: df = 2(n − 1) = 4
    assert independent([1.0, 2.0, 3.0], [3.0, 4.0, 5.0]).df == pytest.approx(4.0)
    assert independent([1.0], [2.0, 3.0]).t is None


def test_pairing_removes_the_seed_effect_the_independent_test_keeps() -> None:
    # a big per-seed offset shared by both methods, and a consistent 0.01 gain
    a, b = {0: 2.000, 1: 2.200, 2: 1.800}, {0: 2.010, 1: 2.211, 2: 1.809}
    assert paired(a, b).resolved and not independent(a.values(), b.values()).resolved


def test_issue_21_numbers_from_the_committed_finals() -> None:
    """qra − greedy_priors at uniform-4: −0.0039, paired t ≈ −3.24, p ≈ 0.08 (not resolved); the lever bundle −
    greedy_priors: −0.0040, t ≈ −13.9, p ≈ 0.005 (resolved)."""
    pq = json.loads((RESULTS / "plan_quality.json").read_text())["budgets"]["uniform4_r16"]["methods"]
    levers = json.loads((RESULTS / "search_levers.json").read_text())["budgets"]["uniform4_r16"]["methods"]

    def by_seed(m: dict) -> dict[int, float]:
        return dict(zip(m["seeds"], m["final_eval_losses"], strict=True))

    c = paired(by_seed(pq["qra"]), by_seed(pq["greedy_priors"]))
    # by hand: d = (−0.00322, −0.00229, −0.00632); mean −0.0039433, sd 0.0021101, se 0.0012183
    assert c.mean == pytest.approx(-0.0039433, abs=1e-7) and c.sd == pytest.approx(0.0021101, abs=1e-7)
    assert c.t == pytest.approx(-3.2368, abs=1e-3) and c.p == pytest.approx(0.0836, abs=1e-3) and not c.resolved
    c = paired(by_seed(levers["qra_levers"]), by_seed(levers["greedy_priors"]))
    assert c.mean == pytest.approx(-0.0039767, abs=1e-7) and c.t == pytest.approx(-13.89, abs=0.01)
    assert c.p == pytest.approx(0.00514, abs=1e-4) and c.resolved


def test_markdown_cell() -> None:
    c = paired({0: 2.0, 1: 3.0, 2: 9.0}, {0: 3.0, 1: 3.0, 2: 5.0})
    assert markdown(c, 2) == "+1.00 ± 1.53 (t +0.65, df 2, p 0.580)"
    assert markdown(c.as_dict(), 2) == markdown(c, 2)  # a stored dict renders the same
    resolved = paired({0: 1.1, 1: 1.0, 2: 1.2}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert markdown(resolved, 2).endswith("*")
    assert markdown(None) == "—" and markdown(paired({0: 1.0}, {0: 0.0})) == "+1.0000 (n 1: no spread)"
    json.dumps(c.as_dict())  # plain JSON
