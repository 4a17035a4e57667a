"""AUROC of every algorithm's edge scores against each zoo organism's reference circuit.

Usage:
    python benchmarks/zoo_auroc.py [--examples 64] [--out benchmarks/results/zoo_auroc]

For every shipped organism (``circuitfind.zoo``) and every built-in algorithm, scores all edges
on the organism's task and reports ROC AUC against the shipped reference circuit (Conmy et al.
2023 protocol, see ``circuitfind.evaluation.roc``): edge level (|score|), edge level with q/k/v
collapsed into one sender→head edge, and node level; plus the faithfulness of the top-k circuit
with k = the reference's edge count. Writes ``OUT.md`` and ``OUT.json``.
"""

from __future__ import annotations

import argparse
import time

import torch

import circuitfind as cf
from _results import write_results  # benchmarks/_results.py (scripts run from benchmarks/)
from circuitfind import zoo
from circuitfind.evaluation import edge_roc, node_roc
from circuitfind.graphs.selection import prune_dangling, select_top_n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/zoo_auroc")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in zoo.names():
        entry = zoo.ZOO[name]
        if not entry.shipped:
            rows.append({"organism": name, "task": entry.task, "shipped": False})
            continue
        model = cf.load_model(f"zoo:{name}", device="cpu")
        reference = zoo.reference_circuit(name)
        data = cf.build_data(model, entry.task, n=args.examples, seed=args.seed)
        engine = cf.PatchingEngine(model)
        for algo_name in cf.ALGORITHMS.names():
            params = {"progress": False} if algo_name == "exact" else {}
            algo = cf.get_algorithm(algo_name, **params)
            start = time.perf_counter()
            scores = algo.score(engine, data)
            seconds = time.perf_counter() - start
            top = prune_dangling(select_top_n(engine.graph, scores, reference.n_edges))
            rows.append({
                "organism": name, "task": entry.task, "shipped": True, "algorithm": algo_name,
                "reference_edges": reference.n_edges, "total_edges": engine.graph.n_edges,
                "edge_auc": edge_roc(scores, reference).auc,
                "edge_auc_collapsed_qkv": edge_roc(scores, reference, collapse_qkv=True).auc,
                "node_auc": node_roc(scores, reference).auc,
                "topk_faithfulness": cf.evaluate(engine, top, data).faithfulness,
                "seconds": seconds})
    result = {"examples": args.examples, "seed": args.seed, "threads": args.threads,
              "rows": rows, "versions": cf.api.versions()}
    write_results(args.out, result, markdown)


def markdown(r: dict) -> str:
    """The table as Markdown."""
    lines = ["# AUROC against the zoo organisms' reference circuits", "",
             f"{r['examples']} held-out examples (data seed {r['seed']}), {r['threads']} CPU "
             "thread(s). AUC of |score| against reference membership; ties count one half "
             "(Mann–Whitney). `collapsed` merges a sender's q/k/v edges into one sender→head "
             "edge (max |score|); node AUC scores a node by the max |score| of its edges. "
             "Top-k faithfulness: the top |reference| edges by |score|, pruned.", "",
             "| organism | task | algorithm | edge AUC | edge AUC (collapsed) | node AUC | "
             "top-k faithfulness | reference / total edges | time (s) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if not row["shipped"]:
            lines.append(f"| {row['organism']} | {row['task']} | — | not shipped | | | | | |")
            continue
        lines.append(f"| {row['organism']} | {row['task']} | {row['algorithm']} | "
                     f"{row['edge_auc']:.3f} | {row['edge_auc_collapsed_qkv']:.3f} | "
                     f"{row['node_auc']:.3f} | {row['topk_faithfulness']:.3f} | "
                     f"{row['reference_edges']} / {row['total_edges']} | {row['seconds']:.1f} |")
    lines += ["", "References are derived from exact single-edge patching on the organism's "
              "own training distribution (see circuitfind/zoo/README.md), so `exact` is close to "
              "1 by construction; the EAP rows are the informative ones.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
