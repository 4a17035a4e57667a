"""Faithfulness of EAP and exact-patching circuits at several sizes, and EAP/exact agreement.

Usage:
    python benchmarks/faithfulness_sizes.py --model ../shared/models/stories260k \
        --task gendered_pronoun --examples 64 --out benchmarks/results/stories260k_gendered_pronoun

Writes ``OUT.md`` (table) and ``OUT.json`` (raw numbers). Circuits are the top-n edges by |score|
(the ``discover`` default), dangling edges pruned (which never changes the output); faithfulness
is the normalized faithfulness (m(C) − m(∅)) / (m(M) − m(∅)); CPR/CMD over the MIB fractions.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from scipy.stats import pearsonr, spearmanr

import circuitfind as cf
from _results import write_results  # benchmarks/_results.py (scripts run from benchmarks/)
from circuitfind.algorithms import EAP, ExactPatching
from circuitfind.evaluation import evaluate, faithfulness_curve
from circuitfind.graphs.selection import prune_dangling, select_top_n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default="0,10,25,50,100,200,400,800,all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="output path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = cf.load_model(args.model, device="cpu")
    data = cf.build_data(model, args.task, n=args.examples, seed=args.seed)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    sizes = [g.n_edges if s == "all" else int(s) for s in args.sizes.split(",")]
    timings, scores = {}, {}
    for name, algo in (("eap", EAP()), ("exact", ExactPatching(progress=False))):
        start = time.perf_counter()
        scores[name] = algo.score(engine, data)
        timings[name] = time.perf_counter() - start
    e_eap, e_exact = g.to_edges(scores["eap"]).numpy(), g.to_edges(scores["exact"]).numpy()
    agreement = {"spearman": float(spearmanr(e_eap, e_exact).statistic),
                 "pearson": float(pearsonr(e_eap, e_exact).statistic),
                 "spearman_abs": float(spearmanr(abs(e_eap), abs(e_exact)).statistic)}
    rows = []
    for n in sizes:
        row = {"n_edges": n}
        for name in scores:
            circuit = prune_dangling(select_top_n(g, scores[name], n))
            rep = evaluate(engine, circuit, data)
            row[name] = {"faithfulness": rep.faithfulness, "kl_div": rep.kl_div,
                         "edges_after_pruning": circuit.n_edges}
        rows.append(row)
    curves = {name: faithfulness_curve(engine, scores[name], data, convention="single",
                                     absolute=True).to_dict() for name in scores}
    result = {"model": args.model, "task": args.task, "examples": args.examples,
              "seed": args.seed, "n_total_edges": g.n_edges, "graph": g.config(),
              "seconds": timings, "agreement": agreement, "sizes": rows,
              "curves": {k: {"cpr": v["cpr"], "cmd": v["cmd"], "fractions": v["fractions"],
                             "faithfulness": v["faithfulness"], "convention": v["label"]}
                         for k, v in curves.items()},
              "versions": cf.api.versions(), "threads": args.threads}
    write_results(args.out, result, markdown)


def markdown(r: dict) -> str:
    """The result table as Markdown."""
    lines = [f"# {r['task']} on {Path(r['model']).name}: faithfulness by circuit size", "",
             f"{r['examples']} examples (seed {r['seed']}), {r['n_total_edges']} edges in the "
             f"graph; top-n by |score|, dangling edges pruned. Faithfulness is normalized "
             f"(m(C) − m(∅)) / (m(M) − m(∅)); KL(full ‖ circuit) in nats at the metric position.",
             "", "| top-n | EAP faithfulness | EAP KL | exact faithfulness | exact KL |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for row in r["sizes"]:
        e, x = row["eap"], row["exact"]
        lines.append(f"| {row['n_edges']} | {e['faithfulness']:.3f} | {e['kl_div']:.3f} | "
                     f"{x['faithfulness']:.3f} | {x['kl_div']:.3f} |")
    a = r["agreement"]
    lines += ["", f"EAP vs exact over all {r['n_total_edges']} edges: Spearman "
              f"{a['spearman']:.3f} (signed), {a['spearman_abs']:.3f} (|score|); Pearson "
              f"{a['pearson']:.3f}.", "",
              "CPR / CMD (MIB fractions 0.1%–100%, trapezoid over the fraction of edges; "
              + next(iter(r["curves"].values())).get("convention", "single ranking by |score|")
              + "): " + "; ".join(f"{k}: CPR {v['cpr']:.3f}, CMD {v['cmd']:.3f}"
                                        for k, v in r["curves"].items()) + ".", "",
              f"Scoring time ({r['threads']} CPU threads): " + ", ".join(
                  f"{k} {v:.1f} s" for k, v in r["seconds"].items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
