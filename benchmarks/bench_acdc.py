"""ACDC: cost per tested edge in plain Hugging Face forwards, and exact vs batched circuits.

``speed`` (random GPT-2-architecture networks, batch 8 x 16 tokens, one CPU thread, fixed τ):

``hf_forward``
    One no-grad forward of the clean batch through the plain Hugging Face model: the unit.
``exact`` / ``batched``
    ``ACDC(mode=...)`` on the :class:`PatchingEngine` (passes start at the receiver's layer;
    speculative batching in exact mode). Cost per test = seconds / (tested edges + q/k/v node
    tests).
``naive``
    The reference's strategy: one full forward of the bridge with hooks per test, no batching,
    no start layer (``PatchingEngine(use_runner=False)``, ``masks_per_pass=1``); same decisions.

Settings with ``budget`` visit only the first ``budget`` receivers of the plan (logits, then the
last layers). Those are the *cheapest* receivers for passes that start at the receiver's layer,
so the exact-mode figure of a budgeted run is an optimistic estimate of a full run; the naive
baseline's cost per test does not depend on the layer.

``quality``: exact vs batched mode on each zoo organism (its task, its reference circuit) and on
stories260k ``gendered_pronoun``: circuit size, normalized faithfulness, Jaccard index of the
two edge sets, edge ROC AUC of the ACDC scores against the reference circuit (zoo), wall time.

Usage::

    python benchmarks/bench_acdc.py speed [--settings gpt2-6l gpt2-small] [--tau 1e-3]
    python benchmarks/bench_acdc.py quality [--tau 1e-2] [--examples 32]

Measures and reports; asserts nothing about times.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's circuitfind
from _results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SETTINGS: dict[str, dict[str, Any]] = {
    "gpt2-6l": dict(arch=dict(arch="gpt2", n_layers=6, n_heads=8, d_model=256, vocab_size=5000,
                              n_ctx=256), budget=None, naive_budget=8),
    "gpt2-small": dict(arch=dict(arch="gpt2", n_layers=12, n_heads=12, d_model=768,
                                 vocab_size=50257, n_ctx=1024), budget=3, naive_budget=1),
}


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def _tests(circuit: Any) -> int:
    a = circuit.metadata["acdc"]
    return int(a["tested_edges"]) + int(a["node_tests"])


def speed(name: str, tau: float, tmp: Path) -> dict[str, Any]:
    """Per-test cost of exact, batched and naive ACDC for one setting."""
    from transformers import AutoModelForCausalLM

    import circuitfind as cf
    from circuitfind.algorithms import ACDC
    from circuitfind.testing import ToyTask
    from circuitfind.testing.tiny import make_tiny_model_dir

    spec = SETTINGS[name]
    path = make_tiny_model_dir(tmp / name, seed=0, **spec["arch"])
    model = cf.load_model(path, device="cpu")
    data = ToyTask(seq_len=15).build(model.tokenizer, 8, seed=0)
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def hf_time() -> float:
        times = []
        with torch.no_grad():
            plain(data.clean)
            for _ in range(5):
                t0 = time.perf_counter()
                plain(data.clean)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    hf_before = hf_time()
    out: dict[str, Any] = {"setting": name, "n_edges": cf.ComputeGraph.from_model(model).n_edges,
                           "tau": tau, "budget": spec["budget"], "load_before": _load()}
    for label, use_runner, params in (
            ("exact", True, {"mode": "exact", "max_receivers": spec["budget"]}),
            ("batched", True, {"mode": "batched", "max_receivers": spec["budget"]}),
            ("exact_on_naive_budget", True, {"mode": "exact",
                                             "max_receivers": spec["naive_budget"]}),
            ("naive", False, {"mode": "exact", "masks_per_pass": 1,
                              "max_receivers": spec["naive_budget"]})):
        engine = cf.PatchingEngine(model, use_runner=use_runner)
        engine.evaluate(data, engine.graph.full_mask())  # caches, as at the start of a search
        t0 = time.perf_counter()
        circuit = ACDC(threshold=tau, progress=False, **params).discover(engine, data)
        seconds = time.perf_counter() - t0
        out[label] = {"seconds": seconds, "tests": _tests(circuit), "kept": circuit.n_edges,
                      "planned_edges": circuit.metadata["acdc"]["planned_edges"]}
    hf = statistics.median([hf_before, hf_time()])
    out["hf_forward_s"] = hf
    out["load_after"] = _load()
    for label in ("exact", "batched", "exact_on_naive_budget", "naive"):
        r = out[label]
        r["per_test_hf"] = r["seconds"] / max(1, r["tests"]) / hf
    out["exact_vs_naive"] = (out["naive"]["per_test_hf"]
                             / out["exact_on_naive_budget"]["per_test_hf"])
    return out


def _jaccard(a: Any, b: Any) -> float:
    union = int((a.kept | b.kept).sum())
    return float(int((a.kept & b.kept).sum()) / union) if union else 1.0


def quality(tau: float, n_examples: int) -> list[dict[str, Any]]:
    """Exact vs batched ACDC on the zoo organisms and stories260k."""
    import circuitfind as cf
    from circuitfind import zoo
    from circuitfind.algorithms import ACDC

    cases: list[tuple[str, Any, str, Any]] = []
    for name in zoo.names():
        entry = zoo.ZOO[name]
        cases.append((f"zoo:{name}", f"zoo:{name}", entry.task, zoo.reference_circuit(name)))
    stories = SHARED / "models" / "stories260k"
    if stories.exists():
        cases.append(("stories260k", str(stories), "gendered_pronoun", None))
    rows = []
    for label, source, task, reference in cases:
        model = cf.load_model(source, device="cpu")
        data = cf.build_data(model, task, n=n_examples, seed=0)
        engine = cf.PatchingEngine(model)
        row: dict[str, Any] = {"model": label, "task": task, "n_edges": engine.graph.n_edges,
                               "tau": tau}
        circuits = {}
        for mode in ("exact", "batched"):
            t0 = time.perf_counter()
            circuit = ACDC(threshold=tau, mode=mode, progress=False).discover(engine, data)
            seconds = time.perf_counter() - t0
            report = cf.evaluate(engine, circuit, data)
            circuits[mode] = circuit
            row[mode] = {"edges": circuit.n_edges, "faithfulness": report.faithfulness,
                         "kl": report.kl_div, "seconds": seconds, "tests": _tests(circuit)}
            if reference is not None:
                row[mode]["edge_auc"] = cf.edge_roc(circuit.scores, reference).auc
        row["jaccard"] = _jaccard(circuits["exact"], circuits["batched"])
        rows.append(row)
    return rows


def _speed_md(result: dict[str, Any]) -> str:
    lines = ["# ACDC speed: cost per test in plain Hugging Face forwards", "",
             f"Machine: {result['machine']}; torch {result['torch']}; 1 thread. Load average "
             "(1/5/15 min) is given per setting: the machine is shared, so compare ratios "
             "measured in the same run.", "",
             "| setting | edges | τ (KL, nats) | receivers | HF forward | exact: tests, per test "
             "| batched: tests, per test | naive (hooked full forward per test) | exact on the "
             "naive budget | naive / exact | load before → after |",
             "| --- | ---: | ---: | --- | ---: | --- | --- | --- | --- | ---: | --- |"]
    for r in result["settings"]:
        e, b, n, en = r["exact"], r["batched"], r["naive"], r["exact_on_naive_budget"]
        lines.append(
            f"| {r['setting']} | {r['n_edges']} | {r['tau']:g} | "
            f"{'all' if r['budget'] is None else 'first ' + str(r['budget'])} | "
            f"{r['hf_forward_s'] * 1e3:.2f} ms | {e['tests']}, {e['per_test_hf']:.2f} | "
            f"{b['tests']}, {b['per_test_hf']:.2f} | {n['tests']}, {n['per_test_hf']:.2f} | "
            f"{en['tests']}, {en['per_test_hf']:.2f} | {r['exact_vs_naive']:.1f}x | "
            f"{r['load_before']} → {r['load_after']} |")
    lines += ["", "Per test = seconds / (tested edges + q/k/v node tests) / HF forward seconds. "
              "Naive and 'exact on the naive budget' visit the same first receivers "
              "(the naive baseline is too slow for more); budgets cover the last layers, where "
              "exact-mode passes are shortest, so budgeted exact figures are optimistic for a "
              "full run. Reference ACDC: 1.45 HF forwards per tested edge on the 6-layer "
              "network (issue 8).", ""]
    return "\n".join(lines)


def _quality_md(result: dict[str, Any]) -> str:
    lines = ["# ACDC exact vs batched mode", "",
             f"Machine: {result['machine']}; 1 thread; {result['n_examples']} examples, seed 0; "
             f"KL objective, resample ablation. Load average {result['load']}.", "",
             "| model | task | edges | τ | exact: edges, faithfulness, KL, AUC, s | batched: "
             "edges, faithfulness, KL, AUC, s | Jaccard |",
             "| --- | --- | ---: | ---: | --- | --- | ---: |"]
    for r in result["rows"]:
        cells = []
        for mode in ("exact", "batched"):
            m = r[mode]
            auc = f"{m['edge_auc']:.3f}" if "edge_auc" in m else "–"
            cells.append(f"{m['edges']}, {m['faithfulness']:.3f}, {m['kl']:.4f}, {auc}, "
                         f"{m['seconds']:.1f}")
        lines.append(f"| {r['model']} | {r['task']} | {r['n_edges']} | {r['tau']:g} | "
                     f"{cells[0]} | {cells[1]} | {r['jaccard']:.3f} |")
    lines += ["", "AUC: edge ROC AUC of the ACDC scores (measured effects; untested edges 0) "
              "against the organism's reference circuit. Faithfulness: normalized, task "
              "metric.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["speed", "quality"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--tau", type=float, default=None)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if args.what == "speed":
        tau = args.tau if args.tau is not None else 1e-3
        with tempfile.TemporaryDirectory() as tmp:
            result = {"machine": machine, "torch": torch.__version__,
                      "settings": [speed(s, tau, Path(tmp)) for s in args.settings]}
        write_results(args.out or ROOT / "benchmarks/results/acdc_speed", result, _speed_md)
    else:
        tau = args.tau if args.tau is not None else 1e-2
        result = {"machine": machine, "n_examples": args.examples, "load": _load(),
                  "rows": quality(tau, args.examples)}
        write_results(args.out or ROOT / "benchmarks/results/acdc_quality", result, _quality_md)


if __name__ == "__main__":
    main()
