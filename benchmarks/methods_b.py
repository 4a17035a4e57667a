"""EAP-GP, edge pruning and information flow routes against exact patching (issue 19, items 4-6).

For stories260k (``gendered_pronoun``) and every shipped zoo organism (its own task), scores all
edges with ``exact`` and with EAP, EAP-IG (inputs, 5 steps), EAP-GP (5 steps), information
flow routes (IFR; the circuit at its default threshold tau = 0.04 too) and edge pruning (its
target: ``--target-fraction`` of the edges, 5% by default), and reports for each:

- Spearman correlation with ``exact`` over all edges: of the importances (each method's
  scores read as its ``score_meaning`` says, most important largest; exact: the metric drop)
  and of the magnitudes (|score| against |exact|);
- edge ROC AUC against exact patching (positives: the top 5% of edges by |exact effect|) and,
  for zoo organisms, against the organism's reference circuit;
- CPR and CMD (MIB convention: top int(p E) edges at MIB's fractions, dangling edges pruned;
  CPR over the importance ranking, CMD over |score|), and the normalized faithfulness of each
  method's top k edges (k: the size edge pruning trains to);
- wall time; for edge pruning also the time per training step and the same in plain Hugging
  Face forwards of the step's minibatch (the cost unit of issue 19).

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/methods_b.py [--examples 32] [--threads 1] \
        [--steps 3000] [--targets stories260k,zoo] [--target-fraction 0.05] \
        [--out benchmarks/results/methods_b]

Writes ``OUT.json`` and ``OUT.md``. It measures and reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

import circuitfind as cf
from _results import write_results  # benchmarks/_results.py (scripts run from benchmarks/)
from circuitfind import zoo
from circuitfind.evaluation import edge_roc, evaluate
from circuitfind.graphs.selection import prune_dangling, select_top_n

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"


def targets(which: list[str]) -> list[tuple[str, str, str, Any]]:
    """(label, model source, task, reference circuit or None) of ``stories260k`` and/or ``zoo``."""
    out = []
    if "stories260k" in which and STORIES.exists():
        out.append(("stories260k", str(STORIES), "gendered_pronoun", None))
    for name in zoo.names() if "zoo" in which else []:
        if zoo.ZOO[name].shipped:
            out.append((name, f"zoo:{name}", zoo.ZOO[name].task, zoo.reference_circuit(name)))
    return out


def hf_forward_seconds(model: Any, tokens: torch.Tensor, repeats: int = 20) -> float:
    """Median seconds of one plain Hugging Face forward of ``tokens`` (no grad)."""
    hf = model.original_model
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            hf(tokens)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def compare(label: str, source: str, task: str, reference: Any, examples: int, seed: int,
            steps: int, target_fraction: float) -> dict[str, Any]:
    model = cf.load_model(source, device="cpu")
    data = cf.build_data(model, task, n=examples, seed=seed)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    engine.corrupted_outputs(data)
    start = time.perf_counter()
    exact = cf.get_algorithm("exact", progress=False).score(engine, data)
    exact_s = time.perf_counter() - start
    exact_meaning = cf.get_algorithm("exact").score_meaning(data.task)
    k_top = max(1, round(0.05 * g.n_edges))
    top_exact = select_top_n(g, exact, k_top)  # positives for the AUROC against exact
    e_exact = exact_meaning.importance(exact)[g.edge_mask].numpy()
    target_edges = max(1, round(target_fraction * g.n_edges))
    methods = {
        "eap": cf.get_algorithm("eap"),
        "eap_ig": cf.get_algorithm("eap_ig"),
        "eap_gp": cf.get_algorithm("eap_gp"),
        "ifr": cf.get_algorithm("ifr"),
        "edge_pruning": cf.get_algorithm("edge_pruning", target_edges=target_edges, steps=steps,
                                         warmup_steps=min(2500, steps * 3 // 5),
                                         progress=False),
    }
    rows: dict[str, Any] = {"exact": {"seconds": exact_s}}
    for name, algo in [("exact", None), *methods.items()]:
        extra: dict[str, Any] = {}
        if algo is None:
            scores, meaning = exact, exact_meaning
        else:
            start = time.perf_counter()
            if algo.returns_circuit:
                circuit = algo.discover(engine, data)
                scores = circuit.scores
                extra["circuit_edges"] = circuit.n_edges
                extra["circuit_faithfulness"] = evaluate(engine, circuit, data).faithfulness
                if reference is not None:
                    extra["circuit_edge_recall"] = float(
                        (circuit.kept & reference.kept).sum() / reference.n_edges)
            else:
                scores = algo.score(engine, data)
            extra["seconds"] = time.perf_counter() - start
            meaning = algo.score_meaning(data.task)
            e = meaning.importance(scores)[g.edge_mask].numpy()
            extra["spearman"] = float(spearmanr(e, e_exact).statistic)
            extra["spearman_abs"] = float(spearmanr(abs(e), abs(e_exact)).statistic)
            extra["auroc_exact"] = edge_roc(scores, top_exact).auc
        if name == "edge_pruning":
            extra["report"] = algo.report
            t = int(data.positions.max()) + 1
            batch = min(algo.batch_size, data.n)
            per_step = extra["seconds"] / steps
            forward = hf_forward_seconds(model, data.clean[:batch, :t])
            extra.update(seconds_per_step=per_step, hf_forward_s=forward,
                         step_in_forwards=per_step / forward, batch=batch, steps=steps)
        curve = cf.faithfulness_curve(engine, scores, data, score_kind=meaning.kind)
        extra.update(cpr=curve.cpr, cmd=curve.cmd)
        top = prune_dangling(select_top_n(g, scores, target_edges, absolute=False,
                                          meaning=meaning))
        extra["faithfulness_at_target"] = evaluate(engine, top, data).faithfulness
        if reference is not None:
            extra["auroc_reference"] = edge_roc(scores, reference).auc
        rows[name] = {**rows.get(name, {}), **extra}
    return {"target": label, "task": task, "examples": examples, "seed": seed,
            "n_edges": g.n_edges, "top_exact": k_top, "target_edges": target_edges,
            "reference_edges": None if reference is None else reference.n_edges, "methods": rows}


def markdown(r: dict[str, Any]) -> str:
    lines = ["# EAP-GP, edge pruning and information flow routes against exact patching", "",
             f"{r['threads']} CPU thread(s), data seed {r['seed']}, `benchmarks/methods_b.py`. "
             "Spearman over all edges against `exact` (importances; |·|: magnitudes). AUROC "
             "exact: positives are the top 5% of edges by |exact effect|. CPR/CMD: MIB "
             "convention. f@k: normalized faithfulness of each method's top k edges (most "
             "important first as its scores read; dangling edges pruned), k = the size edge pruning "
             f"trains to ({r['steps']} steps).", ""]
    for t in r["targets"]:
        ref = t["reference_edges"] is not None
        lines += [f"## {t['target']} ({t['task']}, {t['examples']} examples, "
                  f"{t['n_edges']} edges" + (f", reference {t['reference_edges']} edges"
                                             if ref else "") + ")", "",
                  "| method | Spearman | Spearman abs | AUROC exact"
                  + (" | AUROC reference" if ref else "")
                  + f" | CPR | CMD | f@{t['target_edges']} | time (s) |",
                  "| --- | ---: | ---: | ---:" + (" | ---:" if ref else "")
                  + " | ---: | ---: | ---: | ---: |"]
        for name, m in t["methods"].items():
            corr = ("1 | 1 | 1" if name == "exact" else
                    f"{m['spearman']:.3f} | {m['spearman_abs']:.3f} | {m['auroc_exact']:.3f}")
            auc = f" | {m['auroc_reference']:.3f}" if ref else ""
            lines.append(f"| {name} | {corr}{auc} | {m['cpr']:.3f} | {m['cmd']:.3f} | "
                         f"{m['faithfulness_at_target']:.3f} | {m['seconds']:.2f} |")
        ifr, ep = t["methods"]["ifr"], t["methods"]["edge_pruning"]
        lines += ["", f"IFR's top-down circuit at tau = 0.04: {ifr['circuit_edges']} edges, "
                  f"faithfulness {ifr['circuit_faithfulness']:.3f}"
                  + (f" (recall of the reference's edges {ifr['circuit_edge_recall']:.2f})"
                     if ref else "") + ". Edge pruning: "
                  f"{ep['steps']} steps of {ep['batch']} examples, "
                  f"{1000 * ep['seconds_per_step']:.1f} ms a step = "
                  f"{ep['step_in_forwards']:.1f} plain HF forwards of the minibatch; expected "
                  f"kept edges {ep['report']['expected_kept_edges']:.1f} "
                  f"(target {t['target_edges']}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--targets", default="stories260k,zoo")
    parser.add_argument("--target-fraction", type=float, default=0.05)
    parser.add_argument("--out", default="benchmarks/results/methods_b")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for label, source, task, reference in targets(args.targets.split(",")):
        rows.append(compare(label, source, task, reference, args.examples, args.seed,
                            args.steps, args.target_fraction))
        print(f"done {label}", flush=True)
    write_results(args.out, {"threads": args.threads, "seed": args.seed, "steps": args.steps,
                             "targets": rows,
                             "versions": cf.api.versions()}, markdown)


if __name__ == "__main__":
    main()
