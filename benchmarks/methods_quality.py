"""The issue-19 methods against exact patching on the zoo organisms and stories260k.

For stories260k (``gendered_pronoun``, the one offline task its SentencePiece vocabulary
supports and it performs) and every shipped zoo organism (its own task and reference circuit),
scores all edges with ``exact`` (each edge corrupted alone: the ground truth every estimate
approximates) and with the baselines EAP and EAP-IG (inputs, 5 steps) and the six methods of
issue 19: GIM, RelP, AtP* (QK fix alone, and QK fix + GradDrop), EAP-GP (5 steps), information
flow routes (IFR; its top-down circuit at tau = 0.04 too) and edge pruning (trained to
``--target-fraction`` of the edges). For each it reports:

- Spearman's rho with ``exact`` over all edges: of the importances (each method's scores read
  as its ``score_meaning`` says, most important largest; exact: the metric drop) and of the
  magnitudes (|score| against |exact|);
- edge AUROC against exact patching (positives: the top ``--top`` of edges by |exact effect|,
  ranked by |score|) and, for zoo organisms, against the organism's reference circuit;
- CPR and CMD (MIB convention, :func:`circuitfind.faithfulness_curve`: top int(p E) edges at
  MIB's fractions, dangling edges pruned; CPR over the importance ranking, CMD over |score|),
  f@k: the normalized faithfulness of each method's k most important edges, k = the size edge
  pruning trains to, and KL@k: KL(full model || that circuit) in nats at the metric positions
  (edge pruning's own objective);
- wall time of the call; for edge pruning also the time per training step in plain Hugging
  Face forwards of the step's minibatch (issue 19's cost unit).

``--cache DIR`` keeps exact's scores and every finished (target, method) row in ``DIR``, keyed
by target, task, examples and seed (and each method's ``[S, R]`` scores beside its row), so an
interrupted run resumes and a rerun that changes one method recomputes only that method's rows
(delete the row's file to recompute it).

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/methods_quality.py [--examples 32] [--threads 1] \
        [--steps 1000] [--targets stories260k,zoo] [--target-fraction 0.05] [--top 0.1] \
        [--methods eap,gim,...] [--cache DIR] [--out benchmarks/results/methods_quality]

Writes ``OUT.json`` and ``OUT.md``. It measures and reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

import circuitfind as cf
from _results import write_results  # benchmarks/_results.py (scripts run from benchmarks/)
from circuitfind.evaluation import edge_roc, evaluate
from circuitfind.graphs.selection import prune_dangling, select_top_n
from compare_algorithms import targets

# (row key, algorithm, parameters); edge pruning's target and steps are set per target
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("eap", "eap", {}), ("eap_ig", "eap_ig", {}), ("gim", "gim", {}), ("relp", "relp", {}),
    ("atp_star_qk", "atp_star", {"grad_drop": False}), ("atp_star", "atp_star", {}),
    ("eap_gp", "eap_gp", {}), ("ifr", "ifr", {}), ("edge_pruning", "edge_pruning", {}),
]


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


class RowCache:
    """Exact's scores and finished rows of one target on disk (nothing when ``root`` is None)."""

    def __init__(self, root: str | None, label: str, task: str, examples: int, seed: int) -> None:
        self.dir = (None if root is None else
                    Path(root) / f"{label}-{task}-n{examples}-s{seed}")
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def exact(self, compute: Any) -> tuple[torch.Tensor, float]:
        """Exact's ``[S, R]`` scores and seconds, from the cache or ``compute()``."""
        path = None if self.dir is None else self.dir / "exact.pt"
        if path is not None and path.exists():
            saved = torch.load(path)
            return saved["scores"], saved["seconds"]
        start = time.perf_counter()
        scores = compute()
        seconds = time.perf_counter() - start
        if path is not None:
            torch.save({"scores": scores, "seconds": seconds}, path)
        return scores, seconds

    def save_scores(self, key: str, scores: torch.Tensor) -> None:
        """Keep method ``key``'s ``[S, R]`` scores beside its row (nothing without a cache)."""
        if self.dir is not None:
            torch.save(scores, self.dir / f"scores_{key}.pt")

    def row(self, key: str, compute: Any) -> dict[str, Any]:
        """The row of method ``key``, from the cache or ``compute()``."""
        path = None if self.dir is None else self.dir / f"{key}.json"
        if path is not None and path.exists():
            return json.loads(path.read_text())
        row = compute()
        if path is not None:
            path.write_text(json.dumps(row, indent=1))
        return row


def compare(label: str, source: str, task: str, reference: Any, args: Any) -> dict[str, Any]:
    """Every method's row on one target (module docstring)."""
    model = cf.load_model(source, device="cpu")
    data = cf.build_data(model, task, n=args.examples, seed=args.seed)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    cache = RowCache(args.cache, label, task, args.examples, args.seed)
    engine.corrupted_outputs(data)  # shared by every method
    exact, exact_s = cache.exact(
        lambda: cf.get_algorithm("exact", progress=False).score(engine, data))
    exact_meaning = cf.get_algorithm("exact").score_meaning(data.task)
    k_top = max(1, round(args.top * g.n_edges))
    top_exact = select_top_n(g, exact, k_top)  # by |exact|: the positives of AUROC exact
    e_exact = exact_meaning.importance(exact)[g.edge_mask].numpy()
    target_edges = max(1, round(args.target_fraction * g.n_edges))
    wanted = set(args.methods.split(",")) if args.methods else None

    def row(key: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {"algorithm": name, "params": params}
        if name == "exact":
            algo: Any = None
            scores, meaning, extra["seconds"] = exact, exact_meaning, exact_s
        else:
            if name == "edge_pruning":
                params = {"target_edges": target_edges, "steps": args.steps,
                          "warmup_steps": min(2500, args.steps * 3 // 5), "progress": False}
            algo = cf.get_algorithm(name, **params)
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
        cache.save_scores(key, scores)
        e = meaning.importance(scores)[g.edge_mask].numpy()
        extra["score_kind"] = meaning.kind
        extra["spearman"] = float(spearmanr(e, e_exact).statistic)
        extra["spearman_abs"] = float(spearmanr(abs(e), abs(e_exact)).statistic)
        extra["auroc_exact"] = edge_roc(scores, top_exact).auc
        if reference is not None:
            extra["auroc_reference"] = edge_roc(scores, reference).auc
        if name == "edge_pruning":
            extra["report"] = algo.report
            t = int(data.positions.max()) + 1
            batch = min(algo.batch_size, data.n)
            per_step = extra["seconds"] / args.steps
            forward = hf_forward_seconds(model, data.clean[:batch, :t])
            extra.update(seconds_per_step=per_step, hf_forward_s=forward,
                         step_in_forwards=per_step / forward, batch=batch, steps=args.steps)
        curve = cf.faithfulness_curve(engine, scores, data, score_kind=meaning.kind)
        extra.update(cpr=curve.cpr, cmd=curve.cmd)
        top = prune_dangling(select_top_n(g, scores, target_edges, absolute=False,
                                          meaning=meaning))
        at_target = evaluate(engine, top, data)
        extra["faithfulness_at_target"] = at_target.faithfulness
        extra["kl_at_target"] = at_target.kl_div
        return extra

    rows: dict[str, Any] = {}
    for key, name, params in [("exact", "exact", {}), *METHODS]:
        if wanted is None or key in wanted or key == "exact":
            rows[key] = cache.row(key, lambda: row(key, name, params))
            print(f"  {label}: {key} {rows[key]['seconds']:.1f} s", flush=True)
    return {"target": label, "task": task, "examples": args.examples, "seed": args.seed,
            "n_edges": g.n_edges, "top_exact": k_top, "target_edges": target_edges,
            "reference_edges": None if reference is None else reference.n_edges, "methods": rows}


def _kl(row: dict[str, Any]) -> str:
    """KL@k of a row, ``n/a`` for rows cached before it was measured."""
    return f"{row['kl_at_target']:.3f}" if "kl_at_target" in row else "n/a"


LABELS = {"atp_star_qk": "atp_star (QK fix)", "atp_star": "atp_star (QK fix + GradDrop)"}


def markdown(r: dict[str, Any]) -> str:
    """The tables of one run: one per target, then IFR's circuit and edge pruning's cost."""
    lines = ["# The issue-19 methods against exact patching", "",
             f"{r['threads']} CPU thread(s), {r['examples']} examples, data seed {r['seed']}, "
             "`benchmarks/methods_quality.py`. Spearman over all edges against `exact` "
             "(importances as each method's scores read, signed; |·|: magnitudes). AUROC exact: "
             f"|score| ranking the top {r['top']:.0%} of edges by |exact effect|. AUROC reference: "
             "the zoo organism's reference circuit. CPR ↑ / CMD ↓: MIB convention. f@k: "
             "normalized faithfulness of each method's k most important edges (dangling edges "
             f"pruned), k = the size edge pruning trains to ({r['steps']} steps); KL@k: "
             "KL(full model ‖ those k edges) in nats at the metric positions.", ""]
    for t in r["targets"]:
        ref = t["reference_edges"] is not None
        lines += [f"## {t['target']} ({t['task']}, {t['n_edges']} edges"
                  + (f", reference {t['reference_edges']} edges" if ref else "") + ")", "",
                  "| method | Spearman | Spearman abs | AUROC exact"
                  + (" | AUROC reference" if ref else "")
                  + " | CPR | CMD | f@{k} | KL@{k} | time (s) |".format(k=t["target_edges"]),
                  "| --- | ---: | ---: | ---:" + (" | ---:" if ref else "")
                  + " | ---: | ---: | ---: | ---: | ---: |"]
        for name, m in t["methods"].items():
            auc = f" | {m['auroc_reference']:.3f}" if ref else ""
            lines.append(f"| {LABELS.get(name, name)} | {m['spearman']:.3f} | "
                         f"{m['spearman_abs']:.3f} | {m['auroc_exact']:.3f}{auc} | "
                         f"{m['cpr']:.3f} | {m['cmd']:.3f} | {m['faithfulness_at_target']:.3f} | "
                         f"{_kl(m)} | {m['seconds']:.2f} |")
        notes = []
        if "ifr" in t["methods"]:
            ifr = t["methods"]["ifr"]
            notes.append(f"IFR's top-down circuit at tau = 0.04: {ifr['circuit_edges']} edges, "
                         f"faithfulness {ifr['circuit_faithfulness']:.3f}"
                         + (f" (recall of the reference's edges {ifr['circuit_edge_recall']:.2f})"
                            if ref else "") + ".")
        if "edge_pruning" in t["methods"]:
            ep = t["methods"]["edge_pruning"]
            notes.append(f"Edge pruning: {ep['steps']} steps of {ep['batch']} examples, "
                         f"{1000 * ep['seconds_per_step']:.1f} ms a step = "
                         f"{ep['step_in_forwards']:.1f} plain HF forwards of the minibatch; "
                         f"expected kept edges {ep['report']['expected_kept_edges']:.1f} "
                         f"(target {t['target_edges']}).")
        lines += ["", " ".join(notes), ""] if notes else [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1000,
                        help="edge pruning's training steps (the paper's: 3000)")
    parser.add_argument("--targets", default="stories260k,zoo",
                        help="stories260k, zoo, or zoo organism names, comma-separated")
    parser.add_argument("--target-fraction", type=float, default=0.05)
    parser.add_argument("--top", type=float, default=0.10,
                        help="fraction of edges (by |exact|) that are AUROC exact's positives")
    parser.add_argument("--methods", default="", help="row keys to run (default: all)")
    parser.add_argument("--cache", default=None, help="directory of exact scores and rows")
    parser.add_argument("--out", default="benchmarks/results/methods_quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    which = args.targets.split(",")
    chosen = [t for t in targets(["stories260k", "zoo"])
              if t[0] in which or ("zoo" in which and t[0] != "stories260k")]
    rows = []
    for label, source, task, reference in chosen:
        rows.append(compare(label, source, task, reference, args))
        print(f"done {label}", flush=True)
    write_results(args.out, {"threads": args.threads, "seed": args.seed, "steps": args.steps,
                             "examples": args.examples, "top": args.top, "targets": rows,
                             "versions": cf.api.versions()}, markdown)


if __name__ == "__main__":
    main()
