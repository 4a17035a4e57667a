"""Bootstrap confidence intervals and ranks with ties for the leaderboard.

A leaderboard row aggregates the cells of one algorithm variant on one (task, model, examples,
ablation) over seeds. Its uncertainty has two sources: which examples the task drew, and the
seed (which also changes the examples, and any randomness of the algorithm). The intervals
here resample both, hierarchically (Davison & Hinkley 1997, §3.8, "multistage sampling"):

1. draw the seeds with replacement;
2. for every drawn seed, draw its N examples with replacement, and recompute the cell's
   faithfulness curve from the resampled examples' metrics: at each circuit size
   ``f = (m̄(C) − m̄(∅)) / (m̄(M) − m̄(∅))`` with ``m̄`` the mean over the drawn examples
   (the per-example metrics are what :func:`~circuitfind.evaluation.faithfulness.faithfulness_curve`
   keeps with ``per_example=True``), then CPR (area under f over the edge fraction) and CMD
   (area under |1 − f|), exactly as the point estimate;
3. average the drawn seeds' CPR (CMD).

The 95% interval is the 2.5th–97.5th percentile of that average over ``n_boot`` replicates
(percentile bootstrap, Efron & Tibshirani 1993, §13.3). The edge scores, hence the circuits,
stay those the algorithm found on all of a seed's examples: the interval measures how well the
examples pin down the faithfulness of those circuits and how much seeds differ, not the
algorithm's variance under resampled discovery data (which would need a discovery run per
replicate). Quantities with no per-example part (AUROC, cost, time) resample seeds only, and
have no interval with one seed.

Ranks: within a table, a row's rank is one more than the number of rows whose interval lies
entirely on the better side of its own; rows that share a rank are tied (their intervals
overlap those of the same better rows), marked ``=`` in tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.integrate import trapezoid

N_BOOT = 1000
"""Bootstrap replicates per interval."""
LEVEL = 0.95
"""Coverage of the intervals."""


def _areas(means: np.ndarray, fractions: np.ndarray, n_points: int,
           two_rankings: bool) -> tuple[np.ndarray, np.ndarray]:
    """CPR and CMD of curves given as mean metrics ``[..., P]`` (CPR ranking's ``n`` points,
    the CMD ranking's ``n`` when ``two_rankings``, then m(M), m(∅))."""
    full, empty = means[..., -2:-1], means[..., -1:]
    gap = full - empty
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(gap == 0, np.nan, (means[..., :-2] - empty) / gap)
    f_cpr = f[..., :n_points]
    f_cmd = f[..., n_points:2 * n_points] if two_rankings else f_cpr
    if len(fractions) < 2:
        nan = np.full(means.shape[:-1], np.nan)
        return nan, nan
    return (trapezoid(f_cpr, fractions, axis=-1),
            trapezoid(np.abs(1 - f_cmd), fractions, axis=-1))


def _quantiles(values: np.ndarray) -> tuple[float, float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def curve_intervals(example_metrics: Sequence[Sequence[Sequence[float]]],
                    fractions: Sequence[float], n_boot: int = N_BOOT, seed: int = 0
                    ) -> dict[str, tuple[float, float] | None]:
    """95% intervals of the seed-mean CPR and CMD, resampling seeds and examples.

    Args:
        example_metrics: One ``[P][N_s]`` list per seed: every example's metric (task metric
            units) at each point of the seed's curve, ``P = 2n + 2`` for the MIB convention's
            two rankings over ``n`` fractions or ``n + 2`` for one ranking (the last two rows:
            the full model and the empty circuit), as in
            :attr:`~circuitfind.evaluation.faithfulness.FaithfulnessCurve.example_metrics`.
        fractions: The curve's ``n`` edge fractions, ascending.
        n_boot: Bootstrap replicates.
        seed: Seed of the resampling (the intervals are reproducible).

    Returns:
        ``{"cpr": (low, high), "cmd": (low, high)}``; a value is ``None`` when no replicate
        is finite (e.g. m(M) = m(∅) in every draw).

    Raises:
        ValueError: seeds whose curves have different numbers of points, or a point count
            that fits neither convention.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    n = len(fr)
    mats = [np.asarray(m, dtype=np.float64) for m in example_metrics]
    points = {m.shape[0] for m in mats}
    if len(points) != 1 or points.pop() not in (n + 2, 2 * n + 2):
        raise ValueError(f"Per-example curves need {n + 2} or {2 * n + 2} points for {n} "
                         f"fractions; got {[m.shape[0] for m in mats]}.")
    two = mats[0].shape[0] == 2 * n + 2
    rng = np.random.default_rng(seed)
    n_seeds = len(mats)
    cpr = np.empty((n_seeds, n_seeds, n_boot))  # [seed, draw slot, replicate]
    cmd = np.empty_like(cpr)
    for s, m in enumerate(mats):
        n_ex = m.shape[1]
        for slot in range(n_seeds):  # an independent example draw for every slot it may fill
            idx = rng.integers(0, n_ex, size=(n_boot, n_ex))
            means = m[:, idx].mean(-1).T  # [B, P]
            cpr[s, slot], cmd[s, slot] = _areas(means, fr, n, two)
    draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    slots = np.arange(n_seeds)
    reps = np.arange(n_boot)[:, None]
    return {"cpr": _quantiles(cpr[draws, slots, reps].mean(-1)),
            "cmd": _quantiles(cmd[draws, slots, reps].mean(-1))}


def seed_interval(values: Sequence[Any], n_boot: int = N_BOOT, seed: int = 0
                  ) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of the mean of per-seed ``values`` (seeds resampled).

    Args:
        values: One value per seed; ``None`` and non-finite values are left out.
        n_boot: Bootstrap replicates.
        seed: Seed of the resampling.

    Returns:
        ``(low, high)``, or ``None`` with fewer than two finite values (one seed says nothing
        about the spread between seeds).
    """
    xs = np.array([float(v) for v in values
                   if v is not None and not isinstance(v, bool) and math.isfinite(float(v))])
    if xs.size < 2:
        return None
    rng = np.random.default_rng(seed)
    return _quantiles(xs[rng.integers(0, xs.size, size=(n_boot, xs.size))].mean(-1))


def ranks_with_ties(intervals: Sequence[tuple[float, float] | None],
                    larger_is_better: bool) -> list[tuple[int, bool] | None]:
    """Rank rows by their intervals: one more than the number of rows clearly better.

    A row is clearly better than another when its whole interval lies on the better side of the
    other's (no overlap). Rows sharing a rank are tied.

    Args:
        intervals: One ``(low, high)`` per row, or ``None`` (unranked).
        larger_is_better: Whether larger values are better (CPR, AUROC) or smaller (CMD, cost).

    Returns:
        Per row ``(rank, tied)`` — ``tied`` when another ranked row has the same rank — or
        ``None`` for a row without an interval.
    """
    def better(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] > b[1] if larger_is_better else a[1] < b[0]

    ranks = [None if iv is None else 1 + sum(1 for other in intervals
                                             if other is not None and better(other, iv))
             for iv in intervals]
    return [None if r is None else (r, ranks.count(r) > 1) for r in ranks]


def format_rank(rank: tuple[int, bool] | None) -> str:
    """``"2"``, ``"2="`` (tied) or ``"—"`` (unranked)."""
    if rank is None:
        return "—"
    return f"{rank[0]}{'=' if rank[1] else ''}"
