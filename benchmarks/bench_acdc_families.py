"""Issue 17's ACDC target on every family, interleaved with the unit it is reported in.

The models, data and ACDC settings of ``bench_families.py`` (6 layers, d_model 256, 8 query
heads, 4 key/value heads for grouped-query families, batch 8 x 16 tokens, one thread, KL
objective, tau ``--tau``), but each round runs the plain Hugging Face forward (median of
``--forwards`` calls, CPU time), one whole ACDC exact-mode run, and the forward again, so the
unit is measured beside the run it divides (the machine is shared). Reported per family: the
median over rounds of ``seconds / tests / forward`` (target <= 0.3), the tests, and where the
time goes in the last round: masked passes per start layer (passes, masks, CPU seconds, per
mask in forwards) and the masks per test (speculative batches' wasted candidates). Post-norm
families (gemma2) run on ``PostNormPass``, whose passes are timed the same way.

Usage::

    python benchmarks/bench_acdc_families.py [--families gpt2 llama ...] [--rounds 3]
        [--out benchmarks/results/acdc_families]

Measures and reports; asserts nothing about times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, machine, utc_now, write_results  # noqa: E402
from bench_families import GROUPED, SHAPE  # noqa: E402

LINEAR = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"]
FAMILIES = LINEAR + ["gemma2"]  # gemma2: the post-norm pass (patching/post_norm_pass.py)


def _forward_median(plain: Any, tokens: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        plain(tokens)
        for _ in range(repeats):
            start = time.process_time()
            plain(tokens)
            times.append(time.process_time() - start)
    return statistics.median(times)


def setup(family: str, tmp: Path) -> tuple[Any, Any, Any]:
    """The family's benchmark model under ``tmp``: ``(engine, plain HF model, data)``, the
    engine's caches built (as at the start of a search)."""
    from transformers import AutoModelForCausalLM

    import circuitfind as cf
    from circuitfind.testing import ToyTask
    from circuitfind.testing.tiny import make_tiny_model_dir

    kv = 4 if family in GROUPED else None
    path = make_tiny_model_dir(tmp / family, arch=family, n_kv_heads=kv, seed=0, **SHAPE)
    model = cf.load_model(path, device="cpu")
    engine = cf.PatchingEngine(model)
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    data = ToyTask(seq_len=15).build(model.tokenizer, 8, seed=0)
    engine.evaluate(data, engine.graph.full_mask())
    return engine, plain, data


def timed_acdc(engine: Any, plain: Any, data: Any, tau: float, forwards: int
               ) -> tuple[Any, float, float, int]:
    """One whole ACDC exact-mode run (KL, ``tau``) between two medians of ``forwards`` plain
    HF forwards: ``(circuit, CPU seconds, forward seconds (the mean of the two medians),
    tests (tested edges plus q/k/v node tests))``."""
    from circuitfind.algorithms import ACDC

    hf_before = _forward_median(plain, data.clean, forwards)
    start = time.process_time()
    circuit = ACDC(threshold=tau, progress=False).discover(engine, data)
    seconds = time.process_time() - start
    hf_after = _forward_median(plain, data.clean, forwards)
    meta = circuit.metadata["acdc"]
    tests = int(meta["tested_edges"]) + int(meta["node_tests"])
    return circuit, seconds, (hf_before + hf_after) / 2, tests


def measure(family: str, rounds: int, forwards: int, tau: float, tmp: Path) -> dict[str, Any]:
    """ACDC per test in forwards, ``rounds`` times, and the last round's pass breakdown."""
    import circuitfind.patching.masked_pass as masked_pass
    import circuitfind.patching.post_norm_pass as post_norm_pass

    engine, plain, data = setup(family, tmp)

    passes: dict[str, list[float]] = {}
    # the pass class the runner uses for this family (post-norm families: PostNormPass)
    cls = (post_norm_pass.PostNormPass if engine.runner is not None
           and engine.runner.arch.attn_post_norm else masked_pass.MaskedPass)
    logits = cls.logits

    def timed(self: Any) -> torch.Tensor:  # per start layer: passes, masks, seconds
        start = time.process_time()
        out = logits(self)
        row = passes.setdefault(str(self.start), [0, 0, 0.0])
        row[0] += 1
        row[1] += getattr(self, "k_masks", None) or self.k
        row[2] += time.process_time() - start
        return out

    per_test, runs = [], []
    for r in range(rounds):
        passes.clear()
        cls.logits = timed  # type: ignore[method-assign]
        try:
            circuit, seconds, hf, tests = timed_acdc(engine, plain, data, tau, forwards)
        finally:
            cls.logits = logits  # type: ignore[method-assign]
        per_test.append(seconds / tests / hf)
        runs.append({"round": r, "acdc_s": seconds, "hf_forward_s": hf, "tests": tests,
                     "kept": circuit.n_edges, "per_test_hf": seconds / tests / hf})
    hf = runs[-1]["hf_forward_s"]
    masks = sum(int(v[1]) for v in passes.values())
    breakdown = {layer: {"passes": int(v[0]), "masks": int(v[1]), "seconds": v[2],
                         "per_mask_hf": v[2] / v[1] / hf,
                         "share": v[2] / runs[-1]["acdc_s"]}
                 for layer, v in sorted(passes.items(), key=lambda kv: int(kv[0]))}
    return {"family": family, "hf_class": type(plain).__name__, "n_edges": engine.graph.n_edges,
            "per_test_hf": statistics.median(per_test), "per_test_hf_rounds": per_test,
            "tests": runs[-1]["tests"], "kept": runs[-1]["kept"], "runs": runs,
            "masks": masks, "masks_per_test": masks / runs[-1]["tests"],
            "pass_share": sum(v[2] for v in passes.values()) / runs[-1]["acdc_s"],
            "by_start_layer": breakdown}


def markdown(result: dict[str, Any]) -> str:
    """The results table and the pass breakdown."""
    lines = [
        "# ACDC exact mode per test on every family (issue 17)", "",
        f"{result['date']}, commit {result['commit']}, {result['machine']}; load average "
        f"{result['load_before']} before, {result['load_after']} after. One thread, CPU time; "
        f"each of {result['rounds']} rounds runs the plain HF forward (median of "
        f"{result['forwards']}), one whole ACDC run (KL, tau {result['tau']}) and the forward "
        "again; per test = seconds / (tested edges + q/k/v node tests) / forward, median over "
        "rounds (target <= 0.3).", "",
        "| family | edges | tests | kept | HF forward (ms) | ACDC / test | rounds | masks / test "
        "| in passes |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in result["families"]:
        rounds = ", ".join(f"{v:.3f}" for v in r["per_test_hf_rounds"])
        lines.append(
            f"| {r['family']} | {r['n_edges']} | {r['tests']} | {r['kept']} "
            f"| {1000 * r['runs'][-1]['hf_forward_s']:.2f} | {r['per_test_hf']:.3f} | {rounds} "
            f"| {r['masks_per_test']:.2f} | {100 * r['pass_share']:.0f}% |")
    lines += ["", "Masked passes by start layer (last round): passes, masks, per mask in "
              "forwards, share of the run's CPU time.", "",
              "| family | " + " | ".join(f"start {i}" for i in range(SHAPE["n_layers"] + 1)) + " |",
              "|---|" + "---:|" * (SHAPE["n_layers"] + 1)]
    for r in result["families"]:
        cells = []
        for i in range(SHAPE["n_layers"] + 1):
            b = r["by_start_layer"].get(str(i))
            cells.append("" if b is None else f"{b['passes']}, {b['masks']}, "
                         f"{b['per_mask_hf']:.2f}, {100 * b['share']:.0f}%")
        lines.append(f"| {r['family']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_families(doc: str, measure_one: Callable[..., dict[str, Any]],
                 markdown_of: Callable[[dict[str, Any]], str], rounds: int, out: str) -> None:
    """The command line of the per-family ACDC benchmarks: ``measure_one(family, rounds,
    forwards, tau, tmp)`` for each ``--families`` family, written with ``markdown_of`` to
    ``--out`` (defaults ``rounds`` and ``out``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--forwards", type=int, default=7)
    parser.add_argument("--tau", type=float, default=1e-3)
    parser.add_argument("--out", default=out)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    commit = git("rev-parse", "--short", "HEAD")
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        families = [measure_one(f, args.rounds, args.forwards, args.tau, Path(tmp))
                    for f in args.families]
    result = {"families": families, "rounds": args.rounds, "forwards": args.forwards,
              "tau": args.tau, "commit": commit,
              "date": utc_now(),
              "load_before": load_before,
              "load_after": " ".join(f"{v:.1f}" for v in os.getloadavg()),
              "machine": machine()}
    write_results(args.out, result, markdown_of)


def main() -> None:
    run_families(__doc__, measure, markdown, 3, "benchmarks/results/acdc_families")


if __name__ == "__main__":
    main()
