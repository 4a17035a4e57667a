"""Gradient attribution methods against exact patching: agreement, faithfulness, AUROC, cost.

For stories260k (``gendered_pronoun``) and every shipped zoo organism (its own task), scores all
edges with ``exact`` and with each attribution method -- EAP, EAP-IG with interpolated inputs and
with interpolated activations (5 steps each), clean-corrupted, and ``path_patching`` when it is
registered -- and reports for each method:

- Spearman (signed and |score|) and Pearson correlation with ``exact`` over all edges;
- normalized faithfulness of the top-n circuits (by |score|, dangling edges pruned) at equal
  sizes for every method (fractions of the graph's edges);
- edge-level ROC AUC of |score| against the zoo organism's reference circuit (none for
  stories260k);
- wall time, and the peak resident memory the scoring call adds (sampled every millisecond
  after returning freed heap to the OS; in-process, so indicative).

Usage (from the repository root, with ``PYTHONPATH=.`` to measure this checkout)::

    PYTHONPATH=. python benchmarks/compare_algorithms.py [--examples 32] [--threads 1] \
        [--out benchmarks/results/algorithm_comparison] [--targets stories260k,zoo]

Writes ``OUT.json`` and ``OUT.md``. It measures and reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import pearsonr, spearmanr

import circuitfind as cf
from _results import write_results  # benchmarks/_results.py (scripts run from benchmarks/)
from bench_eap import _malloc_trim, peak_rss_delta
from circuitfind import zoo
from circuitfind.evaluation import edge_roc, evaluate
from circuitfind.graphs.selection import prune_dangling, select_top_n

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"
METHODS = [("eap", "eap", {}), ("eap_ig_inputs", "eap_ig", {"interpolation": "inputs"}),
           ("eap_ig_activations", "eap_ig", {"interpolation": "activations"}),
           ("clean_corrupted", "clean_corrupted", {}), ("path_patching", "path_patching", {})]
FRACTIONS = (0.02, 0.05, 0.1, 0.2)


def targets(which: list[str]) -> list[tuple[str, str, str, Any]]:
    """(label, model source, task, reference circuit or None)."""
    out = []
    if "stories260k" in which and STORIES.exists():
        out.append(("stories260k", str(STORIES), "gendered_pronoun", None))
    if "zoo" in which:
        for name in zoo.names():
            entry = zoo.ZOO[name]
            if entry.shipped:
                out.append((name, f"zoo:{name}", entry.task, zoo.reference_circuit(name)))
    return out


def measured(fn: Any) -> tuple[Any, float, int]:
    """``fn()``'s result, wall seconds and peak extra RSS (bytes)."""
    gc.collect()
    _malloc_trim()
    box: dict[str, Any] = {}
    start = time.perf_counter()
    delta = peak_rss_delta(lambda: box.setdefault("out", fn()))
    return box["out"], time.perf_counter() - start, delta


def compare(label: str, source: str, task: str, reference: Any, examples: int,
            seed: int) -> dict[str, Any]:
    model = cf.load_model(source, device="cpu")
    data = cf.build_data(model, task, n=examples, seed=seed)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    engine.corrupted_outputs(data)  # shared by every method: not any one method's cost
    exact, exact_s, exact_mem = measured(
        lambda: cf.get_algorithm("exact", progress=False).score(engine, data))
    e_exact = g.to_edges(exact).numpy()
    sizes = sorted({max(1, round(f * g.n_edges)) for f in FRACTIONS})
    methods: dict[str, Any] = {"exact": {"seconds": exact_s, "peak_rss_delta": exact_mem,
                                         "scores": exact}}
    for key, algo_name, params in METHODS:
        if algo_name not in cf.ALGORITHMS:
            continue
        algo = cf.get_algorithm(algo_name, **params)
        scores, seconds, mem = measured(lambda algo=algo: algo.score(engine, data))
        e = g.to_edges(scores).numpy()
        methods[key] = {"seconds": seconds, "peak_rss_delta": mem, "scores": scores,
                        "spearman": float(spearmanr(e, e_exact).statistic),
                        "spearman_abs": float(spearmanr(abs(e), abs(e_exact)).statistic),
                        "pearson": float(pearsonr(e, e_exact).statistic)}
    for m in methods.values():
        scores = m.pop("scores")
        m["faithfulness"] = {str(n): evaluate(engine, prune_dangling(select_top_n(g, scores, n)),
                                              data).faithfulness for n in sizes}
        if reference is not None:
            m["edge_auc"] = edge_roc(scores, reference).auc
    return {"target": label, "task": task, "examples": examples, "seed": seed,
            "n_edges": g.n_edges, "sizes": sizes,
            "reference_edges": None if reference is None else reference.n_edges,
            "methods": methods}


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Attribution methods against exact patching", "",
             f"{r['threads']} CPU thread(s), data seed {r['seed']}; EAP-IG with 5 steps. "
             "Correlations are over all edges of the graph against `exact` (the metric change "
             "when that edge alone is corrupted). Faithfulness: normalized, of the top-n edges "
             "by |score| with dangling edges pruned, at the same n for every method. AUC: edge "
             "ROC AUC of |score| against the zoo organism's reference circuit. Memory: peak extra "
             "RSS of the scoring call, in-process (indicative); the corrupted run's sender "
             "outputs are cached beforehand for all methods.", ""]
    for t in r["targets"]:
        sizes = t["sizes"]
        ref = (f", reference {t['reference_edges']} edges" if t["reference_edges"] else "")
        lines += [f"## {t['target']} ({t['task']}, {t['examples']} examples, {t['n_edges']} "
                  f"edges{ref})", "",
                  "| method | Spearman | Spearman abs | Pearson | "
                  + " | ".join(f"faith. top-{n}" for n in sizes)
                  + (" | edge AUC" if t["reference_edges"] else "")
                  + " | time (s) | peak extra RSS (MiB) |",
                  "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in sizes)
                  + (" | ---:" if t["reference_edges"] else "") + " | ---: | ---: |"]
        for name, m in t["methods"].items():
            corr = ("1 | 1 | 1" if name == "exact" else
                    f"{m['spearman']:.3f} | {m['spearman_abs']:.3f} | {m['pearson']:.3f}")
            faith = " | ".join(f"{m['faithfulness'][str(n)]:.3f}" for n in sizes)
            auc = f" | {m['edge_auc']:.3f}" if t["reference_edges"] else ""
            lines.append(f"| {name} | {corr} | {faith}{auc} | {m['seconds']:.2f} | "
                         f"{m['peak_rss_delta'] / 2**20:.0f} |")
        lines.append("")
    return "\n".join(lines)


def run_over_targets(doc: str, evaluate: Any, render: Any, default_out: str) -> None:
    """The command line shared by the scripts that score every target (stories260k, the zoo):
    ``evaluate(label, source, task, reference, examples, seed)`` per target, then ``OUT.json``
    and ``OUT.md`` (``render``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--targets", default="stories260k,zoo")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for label, source, task, reference in targets(args.targets.split(",")):
        rows.append(evaluate(label, source, task, reference, args.examples, args.seed))
        print(f"done {label}", flush=True)
    write_results(args.out, {"threads": args.threads, "seed": args.seed, "targets": rows,
                             "versions": cf.api.versions()}, render)


def main() -> None:
    run_over_targets(__doc__, compare, markdown, "benchmarks/results/algorithm_comparison")


if __name__ == "__main__":
    main()
