"""Ablation types and path patching on a real model: agreement with exact patching, faithfulness.

Usage:
    python benchmarks/ablations_path_patching.py --model ../shared/models/stories260k \
        --task gendered_pronoun --examples 32 --out benchmarks/results/ablations_path_patching

For each ablation (resample, zero, mean, mean_positional): EAP and exact scores under it, their
Spearman/Pearson agreement over all edges, m(M) and m(∅), and the normalized faithfulness of
the top-100 circuits (by |score|, dangling edges pruned) evaluated under the same ablation.
Then, under resample ablation: single-edge path-patching effects against exact's scores on a
sample of edges (they are the same intervention), and the ``path_patching`` algorithm at
several thresholds: circuit size, faithfulness and wall time, beside exact's top-n circuit of
the same size. Writes ``OUT.md`` and ``OUT.json``.
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import pearsonr, spearmanr

import circuitfind as cf
from _results import write_results  # benchmarks/_results.py (scripts run from benchmarks/)
from circuitfind.algorithms import EAP, ExactPatching, PathPatching
from circuitfind.evaluation import evaluate
from circuitfind.graphs.selection import prune_dangling, select_top_n

KINDS = ("resample", "zero", "mean", "mean_positional")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--thresholds", default="0.005,0.01,0.02,0.05")
    parser.add_argument("--sample", type=int, default=300, help="edges for the path/exact check")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="output path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = cf.load_model(args.model, device="cpu")
    data = cf.build_data(model, args.task, n=args.examples, seed=args.seed)
    result = {"model": args.model, "task": args.task, "examples": args.examples,
              "threads": args.threads, "torch": torch.__version__, "ablations": {}}
    exact_resample = None
    for kind in KINDS:
        engine = cf.PatchingEngine(model, ablation=kind)
        g = engine.graph
        row: dict = {}
        scores = {}
        for name, algo in (("eap", EAP()), ("exact", ExactPatching(progress=False))):
            start = time.perf_counter()
            scores[name] = algo.score(engine, data)
            row[f"{name}_s"] = time.perf_counter() - start
            circuit = prune_dangling(select_top_n(g, scores[name], args.top))
            rep = evaluate(engine, circuit, data)
            row[f"{name}_faithfulness"] = rep.faithfulness
            row["metric_full"], row["metric_empty"] = rep.metric_full, rep.metric_empty
        e, x = g.to_edges(scores["eap"]).numpy(), g.to_edges(scores["exact"]).numpy()
        row["spearman"] = float(spearmanr(e, x).statistic)
        row["spearman_abs"] = float(spearmanr(abs(e), abs(x)).statistic)
        row["pearson"] = float(pearsonr(e, x).statistic)
        result["ablations"][kind] = row
        if kind == "resample":
            exact_resample = scores["exact"]
    engine = cf.PatchingEngine(model)
    g = engine.graph
    gen = torch.Generator().manual_seed(0)
    sample = torch.randperm(g.n_edges, generator=gen)[: args.sample]
    pairs = g.edge_pairs[sample].tolist()
    start = time.perf_counter()
    path = cf.path_patch(engine, data, [[g.senders[s].name] for s, _ in pairs],
                         [[g.receivers[r].name] for _, r in pairs])
    result["single_edge_check"] = {
        "edges": len(pairs), "seconds": time.perf_counter() - start,
        "max_abs_diff": float((path - exact_resample[tuple(g.edge_pairs[sample].T)]).abs().max()),
        "max_abs_exact": float(exact_resample.abs().max())}
    runs = []
    for threshold in (float(t) for t in args.thresholds.split(",")):
        start = time.perf_counter()
        circuit = PathPatching(threshold=threshold).discover(engine, data)
        seconds = time.perf_counter() - start
        pruned = prune_dangling(circuit)
        rep = evaluate(engine, pruned, data)
        size = pruned.n_edges
        same = evaluate(engine, prune_dangling(select_top_n(g, exact_resample, size)), data)
        runs.append({"threshold": threshold, "edges": size, "levels": len(
            circuit.metadata["path_patching"]["levels"]), "seconds": seconds,
            "faithfulness": rep.faithfulness, "exact_same_size_faithfulness": same.faithfulness})
    result["path_patching"] = runs
    write_results(args.out, result, markdown)


def markdown(r: dict) -> str:
    lines = [f"# Ablation types and path patching: {r['task']} on {r['model']}", "",
             f"{r['examples']} examples, {r['threads']} CPU thread(s), torch {r['torch']}. "
             "Faithfulness is normalized, (m(C) − m(∅)) / (m(M) − m(∅)), with ∅ and removed "
             "edges under the same ablation as the scores.", "",
             "## EAP vs exact under each ablation", "",
             "| ablation | m(M) | m(∅) | Spearman | Spearman \\|·\\| | Pearson | EAP top-100 f | "
             "exact top-100 f | EAP s | exact s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, a in r["ablations"].items():
        lines.append(f"| {kind} | {a['metric_full']:.3f} | {a['metric_empty']:.3f} | "
                     f"{a['spearman']:.3f} | {a['spearman_abs']:.3f} | {a['pearson']:.3f} | "
                     f"{a['eap_faithfulness']:.3f} | {a['exact_faithfulness']:.3f} | "
                     f"{a['eap_s']:.1f} | {a['exact_s']:.1f} |")
    c = r["single_edge_check"]
    lines += ["", "## Path patching (resample ablation)", "",
              f"Single-edge path patching vs exact on {c['edges']} random edges: max |difference| "
              f"{c['max_abs_diff']:.2e} (largest |exact score| {c['max_abs_exact']:.3f}); "
              f"{c['seconds']:.1f} s.", "",
              "| threshold (fraction of \\|m(M) − m(∅)\\|) | levels | edges (pruned) | "
              "faithfulness | exact top-n, same size | seconds |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in r["path_patching"]:
        lines.append(f"| {p['threshold']} | {p['levels']} | {p['edges']} | "
                     f"{p['faithfulness']:.3f} | {p['exact_same_size_faithfulness']:.3f} | "
                     f"{p['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
