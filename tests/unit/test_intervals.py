"""Leaderboard confidence intervals and ranks (circuitfind.benchmark.intervals), against a
slow bootstrap written as loops and against cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import trapezoid

from circuitfind.benchmark.intervals import (curve_intervals, format_rank, ranks_with_ties,
                                             seed_interval)

FRACTIONS = [0.01, 0.1, 0.5, 1.0]


def _curve(rng, n_examples, shift=0.0):
    """Per-example metrics [2n + 2, N] of a noisy curve whose faithfulness rises to 1."""
    n = len(FRACTIONS)
    full, empty = 2.0 + shift, 0.0
    points = np.array([0.2, 0.6, 0.9, 1.0] * 2) * full
    rows = np.concatenate([points, [full, empty]])
    return rows[:, None] + rng.normal(0, 0.5, size=(2 * n + 2, n_examples))


def _slow(mats, n_boot, rng):
    """Hierarchical bootstrap, one replicate at a time: seeds, then examples, then the curve."""
    cprs, cmds = [], []
    n = len(FRACTIONS)
    for _ in range(n_boot):
        cpr_b, cmd_b = [], []
        for s in rng.integers(0, len(mats), size=len(mats)):
            m = mats[s]
            means = m[:, rng.integers(0, m.shape[1], size=m.shape[1])].mean(1)
            f = (means[:-2] - means[-1]) / (means[-2] - means[-1])
            cpr_b.append(trapezoid(f[:n], FRACTIONS))
            cmd_b.append(trapezoid(np.abs(1 - f[n:2 * n]), FRACTIONS))
        cprs.append(np.mean(cpr_b))
        cmds.append(np.mean(cmd_b))
    return {"cpr": np.quantile(cprs, [0.025, 0.975]), "cmd": np.quantile(cmds, [0.025, 0.975])}


def test_curve_intervals_match_a_slow_bootstrap():
    rng = np.random.default_rng(1)
    mats = [_curve(rng, 24), _curve(rng, 24, 0.3), _curve(rng, 16, -0.2)]
    fast = curve_intervals(mats, FRACTIONS, n_boot=4000)
    slow = _slow(mats, 4000, np.random.default_rng(2))
    for key in ("cpr", "cmd"):
        width = slow[key][1] - slow[key][0]
        # two independent Monte Carlo estimates of the same percentiles
        assert np.abs(np.asarray(fast[key]) - slow[key]).max() < 0.08 * width, key


def test_intervals_shrink_with_examples_and_vanish_without_noise():
    rng = np.random.default_rng(0)
    narrow = curve_intervals([_curve(rng, 400)], FRACTIONS)["cpr"]
    wide = curve_intervals([_curve(rng, 25)], FRACTIONS)["cpr"]
    ratio = (wide[1] - wide[0]) / (narrow[1] - narrow[0])
    assert 2.5 < ratio < 6.5  # ~ sqrt(400 / 25) = 4
    exact = _curve(rng, 8)
    exact[:] = exact.mean(1, keepdims=True)  # every example the same: no example noise
    lo, hi = curve_intervals([exact], FRACTIONS)["cpr"]
    f = (exact[:4, 0] - exact[-1, 0]) / (exact[-2, 0] - exact[-1, 0])
    assert lo == pytest.approx(hi) and lo == pytest.approx(trapezoid(f, FRACTIONS))


def test_single_ranking_curves_and_bad_shapes():
    rng = np.random.default_rng(0)
    one = _curve(rng, 10)[[0, 1, 2, 3, 8, 9]]  # n + 2 points: one ranking for CPR and CMD
    out = curve_intervals([one], FRACTIONS)
    assert out["cpr"] is not None and out["cmd"] is not None
    with pytest.raises(ValueError, match="need 6 or 10 points"):
        curve_intervals([one[:5]], FRACTIONS)
    flat = np.ones((10, 5))  # m(M) = m(∅): faithfulness undefined everywhere
    assert curve_intervals([flat], FRACTIONS) == {"cpr": None, "cmd": None}


def test_seed_interval():
    assert seed_interval([0.5]) is None and seed_interval([None, 0.5, float("nan")]) is None
    assert seed_interval([0.5, 0.7]) == pytest.approx((0.5, 0.7))
    lo, hi = seed_interval(list(np.linspace(0, 1, 50)))
    assert 0.38 < lo < 0.5 < hi < 0.62


def test_ranks_with_ties():
    ivs = [(0.8, 0.9), (0.85, 0.95), (0.5, 0.6), None, (0.55, 0.7), (0.1, 0.2)]
    ranks = ranks_with_ties(ivs, larger_is_better=True)
    # the first two overlap (tied 1st); the third and fifth are below both and overlap (3=)
    assert ranks == [(1, True), (1, True), (3, True), None, (3, True), (5, False)]
    assert [format_rank(r) for r in ranks] == ["1=", "1=", "3=", "—", "3=", "5"]
    assert ranks_with_ties(ivs, larger_is_better=False)[5] == (1, False)
