"""Peak memory and wall time of gradient attribution (EAP, EAP-IG, clean-corrupted) on CPU.

Each configuration runs in a fresh subprocess on a random model of a given shape (the weights do
not matter for memory): GPT-2 small (12 layers, 12 heads, d_model 768, vocab 50257) and a
24-layer, 16-head, d_model 1024 shape (GPT-2 medium; vocab 50257), prompts of 16 tokens.
After loading the model and paging in its (memory-mapped) weights, freed heap is returned to the
OS (``malloc_trim``) and the resident set size is sampled every millisecond during one
``algorithm.score(engine, data)`` call. Reported: the process's peak RSS during the call (model
included: the figure the 4 GB target refers to), the peak minus the RSS just before the call
(what attribution allocates), the wall time, and the engine's plan (examples per chunk, points
per pass, whether the corrupted outputs are cached) under its ``memory_budget``.

Usage (from the repository root, with ``PYTHONPATH=.`` to measure this checkout)::

    PYTHONPATH=. python benchmarks/bench_attribution_memory.py [--threads 1] \
        [--out benchmarks/results/attribution_memory] [--model-root DIR] [--quick]

``--quick`` runs a tiny shape only (a smoke test of the script). The script measures and
reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _results import write_results  # benchmarks/_results.py (scripts run from benchmarks/)
from bench_eap import _malloc_trim, _rss, machine_info, peak_rss_delta

SHAPES = {
    "gpt2-small": dict(n_layers=12, n_heads=12, d_model=768, vocab_size=50257),
    "24L-d1024": dict(n_layers=24, n_heads=16, d_model=1024, vocab_size=50257),
    "tiny": dict(n_layers=2, n_heads=4, d_model=64, vocab_size=512),
}
GiB = 2**30
# (shape, algorithm, params, batch, memory_budget)
FULL = [("gpt2-small", "eap", {}, b, 2 * GiB) for b in (8, 32, 64)]
FULL += [("gpt2-small", "eap_ig", {"steps": 5}, b, 2 * GiB) for b in (8, 32, 64)]
FULL += [("gpt2-small", "eap_ig", {"steps": 5}, 32, budget) for budget in (GiB, 4 * GiB)]
FULL += [("gpt2-small", "clean_corrupted", {}, 32, 2 * GiB)]
FULL += [("24L-d1024", "eap", {}, 8, 2 * GiB), ("24L-d1024", "eap_ig", {"steps": 5}, 8, 2 * GiB)]
QUICK = [("tiny", "eap", {}, 8, GiB), ("tiny", "eap_ig", {"steps": 5}, 8, GiB)]


def model_dir(root: Path, shape: str) -> Path:
    """A saved random model of ``shape`` under ``root`` (created on first use)."""
    from circuitfind.testing.tiny import make_tiny_model_dir

    path = root / shape
    if not (path / "config.json").exists():
        make_tiny_model_dir(path, arch="gpt2", n_ctx=64, seed=0, **SHAPES[shape])
    return path


def child(args: argparse.Namespace) -> None:
    """Subprocess entry: one configuration, printed as one JSON line."""
    import circuitfind as cf
    from circuitfind.testing.tiny import ToyTask

    torch.set_num_threads(args.threads)
    spec = json.loads(args.child)
    model = cf.load_model(spec["model_dir"], device="cpu")
    engine = cf.PatchingEngine(model, memory_budget=spec["budget"])
    data = ToyTask(seq_len=15).build(model.tokenizer, spec["batch"], seed=0)  # BOS + 15 = 16
    algo = cf.get_algorithm(spec["algorithm"], **spec["params"])
    n_points = len(algo.points(engine.graph)) if hasattr(algo, "points") else (
        2 if spec["algorithm"] == "clean_corrupted" else 1)
    with torch.no_grad():  # page in the weights: not attribution's memory
        for p in model.parameters():
            float(p.sum())
    gc.collect()
    _malloc_trim()
    base = _rss()
    start = time.perf_counter()
    delta = peak_rss_delta(lambda: algo.score(engine, data))
    wall = time.perf_counter() - start
    n, p, cache = engine.attribution_plan(data.n, data.seq_len, n_points)
    print(json.dumps({"rss_before": base, "peak_rss": base + delta, "peak_rss_delta": delta,
                      "wall_s": wall, "examples_per_chunk": n, "points_per_pass": p,
                      "corrupted_cached": cache, "n_points": n_points,
                      "row_bytes_estimate": engine.gradient_row_bytes(data.seq_len),
                      "n_edges": engine.graph.n_edges}))


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Attribution memory (CPU)",
        "",
        f"Random models, prompts of 16 tokens, {m['torch_threads']} torch thread(s); "
        f"{m['cpu']}, torch {m['torch']}, {m['date']}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average'])} (a shared machine: wall times are "
        "indicative only). Each row is a fresh process; *peak RSS* is the process's resident "
        "set during the `score` call, model included; *extra* is that peak minus the RSS just "
        "before the call. *plan*: examples per chunk × gradient runs per pass (of the total), "
        "and whether the corrupted sender outputs of all examples are cached.",
        "",
        "| shape | algorithm | batch | memory_budget | peak RSS (GiB) | extra (GiB) | wall (s) "
        "| plan |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        algo = r["algorithm"] + (f" ({params})" if params else "")
        plan = (f"{r['examples_per_chunk']} × {r['points_per_pass']}/{r['n_points']}"
                f"{', cached' if r['corrupted_cached'] else ''}")
        lines.append(f"| {r['shape']} | {algo} | {r['batch']} | {r['budget'] / GiB:g} GiB | "
                     f"{r['peak_rss'] / GiB:.2f} | {r['peak_rss_delta'] / GiB:.2f} | "
                     f"{r['wall_s']:.1f} | {plan} |")
    target = [r for r in result["rows"] if r["shape"] == "gpt2-small" and r["batch"] == 32
              and r["algorithm"] == "eap_ig" and r["budget"] == 2 * GiB]
    if target:
        lines += ["", f"Target (issue 9): GPT-2-small EAP-IG, batch 32 × 16 tokens, 5 steps, "
                      f"within 4 GB peak RSS: measured {target[0]['peak_rss'] / 1e9:.2f} GB "
                      f"with the default 2 GiB budget."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/attribution_memory")
    parser.add_argument("--model-root", default=None, help="Keep the random models here.")
    parser.add_argument("--quick", action="store_true", help="Tiny shape only (smoke test).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    root = Path(args.model_root or tempfile.mkdtemp(prefix="cf-attr-mem-"))
    machine = machine_info(args.threads)
    rows = []
    for shape, algorithm, params, batch, budget in (QUICK if args.quick else FULL):
        spec = {"model_dir": str(model_dir(root, shape)), "algorithm": algorithm,
                "params": params, "batch": batch, "budget": budget}
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child",
               json.dumps(spec)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
        row = {"shape": shape, "algorithm": algorithm, "params": params, "batch": batch,
               "budget": budget, **json.loads(res.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"{shape} {algorithm} {params} batch {batch} budget {budget / GiB:g} GiB: peak "
              f"{row['peak_rss'] / GiB:.2f} GiB (+{row['peak_rss_delta'] / GiB:.2f}), "
              f"{row['wall_s']:.1f} s", flush=True)
    write_results(args.out, {"machine": machine, "seq_len": 16, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
