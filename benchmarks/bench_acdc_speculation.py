"""How much of ACDC exact mode's cost per test is its speculation's: a run with perfect predictions.

ACDC's exact mode (``circuitfind.algorithms.acdc``) batches candidates speculatively: each
mask of a pass assumes every earlier candidate of the batch is decided as predicted, and a
wrong prediction wastes the rest of the batch; batch lengths trade a pass's fixed cost against
that waste. This benchmark bounds what better predictions could buy. Per family (the models,
data and settings of ``bench_acdc_families.py``) it records one run's decisions, then runs, in
interleaved rounds, ACDC as shipped and ACDC whose predictions are those decisions with zero
miss probability (an *oracle*: batches run to the pass's mask limit or the group's end and are
never cut). Decisions are the same in both (the counts of tests and kept edges are compared).
Reported: per test in plain Hugging Face forwards (median over rounds, each bracketed by the
forward's median), passes and masks per test, and how many first predictions (from the
category priors) missed.

Usage::

    python benchmarks/bench_acdc_speculation.py [--families qwen3 gemma2 ...] [--rounds 2]
        [--out benchmarks/results/acdc_speculation]

Measures and reports; asserts nothing about times. The oracle replaces a private method of
the ACDC run (``_Run._guess``); it exists only here.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_acdc_families import run_families, setup, timed_acdc  # noqa: E402


def measure(family: str, rounds: int, forwards: int, tau: float, tmp: Path) -> dict[str, Any]:
    """Per test of ACDC as shipped and with oracle predictions, ``rounds`` times each."""
    import circuitfind.algorithms.acdc as acdc

    engine, plain, data = setup(family, tmp)

    run_cls = acdc._Run
    learn, guess, values = run_cls._learn, run_cls._guess, run_cls._values
    truth: dict[Any, bool] = {}
    counts = {"passes": 0, "masks": 0, "prior": 0, "prior_missed": 0}

    def recording_learn(self: Any, item: Any, guessed: bool, removed: bool) -> None:
        truth[item] = removed
        if item not in self.predictions:  # a first prediction, from the category priors
            counts["prior"] += 1
            counts["prior_missed"] += guessed != removed
        learn(self, item, guessed, removed)

    def counting_values(self: Any, masks: torch.Tensor) -> torch.Tensor:
        counts["passes"] += 1
        counts["masks"] += masks.shape[0]
        return values(self, masks)

    def oracle_guess(self: Any, item: Any) -> tuple[bool, float]:
        known = truth.get(item)  # (every test of a run is one of the recorded run's)
        return guess(self, item) if known is None else (known, 0.0)

    def one_run(oracle: bool) -> dict[str, Any]:
        for key in counts:
            counts[key] = 0
        run_cls._learn = recording_learn  # type: ignore[method-assign, assignment]
        run_cls._values = counting_values  # type: ignore[method-assign]
        if oracle:
            run_cls._guess = oracle_guess  # type: ignore[method-assign]
        try:
            circuit, seconds, hf, tests = timed_acdc(engine, plain, data, tau, forwards)
        finally:
            run_cls._learn, run_cls._guess, run_cls._values = learn, guess, values  # type: ignore[method-assign]
        return {"seconds": seconds, "hf_forward_s": hf, "tests": tests, "kept": circuit.n_edges,
                "per_test_hf": seconds / tests / hf, **counts}

    first = one_run(oracle=False)  # records the decisions the oracle predicts
    shipped, oracle = [], []
    for _ in range(rounds):
        shipped.append(one_run(oracle=False))
        oracle.append(one_run(oracle=True))
    for run in shipped + oracle:
        if (run["tests"], run["kept"]) != (first["tests"], first["kept"]):
            raise AssertionError(f"{family}: predictions changed a decision: {run} vs {first}")

    def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        last = runs[-1]
        return {"per_test_hf": statistics.median(r["per_test_hf"] for r in runs),
                "per_test_hf_rounds": [r["per_test_hf"] for r in runs],
                "passes": last["passes"], "masks_per_test": last["masks"] / last["tests"],
                "prior": last["prior"], "prior_missed": last["prior_missed"], "runs": runs}

    return {"family": family, "tests": first["tests"], "kept": first["kept"],
            "n_edges": engine.graph.n_edges, "shipped": summary(shipped),
            "oracle": summary(oracle)}


def markdown(result: dict[str, Any]) -> str:
    """The results table."""
    lines = [
        "# ACDC exact mode: shipped predictions against perfect ones (issue 17)", "",
        f"{result['date']}, commit {result['commit']}, {result['machine']}; load average "
        f"{result['load_before']} before, {result['load_after']} after. One thread, CPU time; "
        f"each of {result['rounds']} rounds runs ACDC as shipped and with oracle predictions "
        f"(KL, tau {result['tau']}), each between two medians of {result['forwards']} plain HF "
        "forwards; per test = seconds / (tested edges + q/k/v node tests) / forward, median "
        "over rounds. Same tests and kept edges in every run.", "",
        "| family | tests | kept | shipped / test | oracle / test | oracle / shipped "
        "| passes (shipped, oracle) | masks / test (shipped) | prior misses |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in result["families"]:
        s, o = r["shipped"], r["oracle"]
        lines.append(
            f"| {r['family']} | {r['tests']} | {r['kept']} | {s['per_test_hf']:.3f} "
            f"| {o['per_test_hf']:.3f} | {o['per_test_hf'] / s['per_test_hf']:.2f} "
            f"| {s['passes']}, {o['passes']} | {s['masks_per_test']:.2f} "
            f"| {s['prior_missed']} of {s['prior']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    run_families(__doc__, measure, markdown, 2, "benchmarks/results/acdc_speculation")


if __name__ == "__main__":
    main()
