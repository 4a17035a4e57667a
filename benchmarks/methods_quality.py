"""GIM, RelP and AtP* against exact patching on the zoo organisms and stories260k (issue 19).

For stories260k (``gendered_pronoun``) and every shipped zoo organism (its own task), scores all
edges with ``exact`` (each edge corrupted alone: the ground truth every estimate approximates)
and with EAP, GIM, RelP, AtP* (QK fix alone) and AtP* (QK fix and GradDrop), and reports for each:

- Spearman's rho with ``exact`` over all edges, signed (not for GradDrop, whose scores are
  unsigned) and of |score| against |exact|;
- edge AUROC against exact patching: |score| ranking the edges whose |exact| is in the top 10%
  (Mann-Whitney AUC, :func:`circuitfind.evaluation.roc.roc_from_labels`);
- edge AUROC against the zoo organism's reference circuit (:func:`circuitfind.edge_roc`);
- CPR and CMD of the MIB faithfulness curve (:func:`circuitfind.faithfulness_curve`, MIB's
  convention: CPR over the signed ranking, CMD over |score|; GradDrop's importances rank
  themselves);
- wall time of the scoring call.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/methods_quality.py [--examples 32] [--threads 1] \
        [--out benchmarks/results/methods_backward_rules]

Writes ``OUT.json`` and ``OUT.md``. Measures and reports; asserts nothing.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy.stats import spearmanr

import circuitfind as cf
from circuitfind.evaluation import edge_roc
from circuitfind.evaluation.roc import roc_from_labels
from compare_algorithms import run_over_targets

METHODS = [("eap", "eap", {}), ("gim", "gim", {}), ("relp", "relp", {}),
           ("atp_star_qk", "atp_star", {"grad_drop": False}), ("atp_star", "atp_star", {})]
TOP = 0.10  # fraction of edges (by |exact|) that count as positives for the AUROC vs exact


def evaluate_target(label: str, source: str, task: str, reference: Any, examples: int,
                    seed: int) -> dict[str, Any]:
    model = cf.load_model(source, device="cpu")
    data = cf.build_data(model, task, n=examples, seed=seed)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    engine.corrupted_outputs(data)  # shared by every method
    start = time.perf_counter()
    exact = cf.get_algorithm("exact", progress=False).score(engine, data)
    exact_s = time.perf_counter() - start
    e_exact = g.to_edges(exact).numpy()
    k = max(1, round(TOP * len(e_exact)))
    positives = np.zeros(len(e_exact), dtype=bool)
    positives[np.argsort(-np.abs(e_exact), kind="stable")[:k]] = True
    rows: dict[str, Any] = {}
    for key, name, params in [("exact", "exact", {"progress": False}), *METHODS]:
        algo = cf.get_algorithm(name, **params)
        if key == "exact":
            scores, seconds = exact, exact_s
        else:
            start = time.perf_counter()
            scores = algo.score(engine, data)
            seconds = time.perf_counter() - start
        e = g.to_edges(scores).numpy()
        kind = algo.score_meaning(data.task).kind
        curve = cf.faithfulness_curve(engine, scores, data, score_kind=kind)
        row = {"seconds": seconds, "score_kind": kind, "cpr": curve.cpr, "cmd": curve.cmd,
               "spearman": (None if kind == "importance"
                            else float(spearmanr(e, e_exact).statistic)),
               "spearman_abs": float(spearmanr(np.abs(e), np.abs(e_exact)).statistic),
               "auc_vs_exact": roc_from_labels(np.abs(e), positives, absolute=True).auc}
        if reference is not None:
            row["auc_vs_reference"] = edge_roc(scores, reference).auc
        rows[key] = row
    return {"target": label, "task": task, "examples": examples, "seed": seed,
            "n_edges": g.n_edges, "positives": k,
            "reference_edges": None if reference is None else reference.n_edges,
            "methods": rows}


def _f(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(r: dict[str, Any]) -> str:
    lines = [f"{r['threads']} CPU thread(s), data seed {r['seed']}. Spearman: over all edges "
             "against `exact` (signed; n/a for GradDrop's unsigned importances) and of |score| "
             f"against |exact|. AUC vs exact: |score| ranking the top {TOP:.0%} of edges by "
             "|exact|. AUC vs reference: the zoo organism's reference circuit. CPR (higher is "
             "better) / CMD (lower is better): MIB convention.", ""]
    for t in r["targets"]:
        ref = t["reference_edges"] is not None
        lines += [f"### {t['target']} ({t['task']}, {t['examples']} examples, {t['n_edges']} "
                  f"edges)", "",
                  "| method | Spearman | Spearman abs | AUC vs exact"
                  + (" | AUC vs reference" if ref else "") + " | CPR | CMD | time (s) |",
                  "| --- | ---: | ---: | ---:" + (" | ---:" if ref else "")
                  + " | ---: | ---: | ---: |"]
        for name, m in t["methods"].items():
            lines.append(f"| {name} | {_f(m['spearman'])} | {_f(m['spearman_abs'])} "
                         f"| {_f(m['auc_vs_exact'])}"
                         + (f" | {_f(m['auc_vs_reference'])}" if ref else "")
                         + f" | {_f(m['cpr'])} | {_f(m['cmd'])} | {m['seconds']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    run_over_targets(__doc__, evaluate_target, markdown,
                     "benchmarks/results/methods_backward_rules")


if __name__ == "__main__":
    main()
