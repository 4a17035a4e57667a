"""Example figures: a small and a large circuit drawn by each renderer, with drawing times.

Usage:
    python benchmarks/figures.py --model ../shared/models/stories260k --task gendered_pronoun \
        --edges 30 300 --out benchmarks/results/figures

Discovers EAP circuits of each size (top-n by |score|, dangling edges pruned, the ``discover``
defaults) and draws each with every registered renderer to ``OUT/{task}_{n}_{renderer}.png``
(and the same options to SVG and PDF, timed and measured but not kept). Writes ``OUT/figures.md``
and ``OUT/figures.json``: edges and nodes drawn, seconds per drawing (median of ``--repeats``),
bytes per format. Needs the Graphviz ``dot`` binary for the graphviz figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import circuitfind as cf
from _results import write_results  # benchmarks/_results.py (scripts run from benchmarks/)
from circuitfind.graphs.render import RENDERERS, scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--edges", type=int, nargs="+", default=[30, 300])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = cf.load_model(args.model)
    rows = []
    for n in args.edges:
        circuit = cf.discover(model, args.task, algorithm="eap", n_edges=n,
                              n_examples=args.examples)
        drawn = scene(circuit)
        for renderer in RENDERERS.names():
            row = {"edges_selected": n, "edges_kept": circuit.n_edges,
                   "edges_drawn": len(drawn.edges), "nodes": len(drawn.nodes),
                   "renderer": renderer, "seconds": {}, "bytes": {}}
            with tempfile.TemporaryDirectory() as tmp:
                for fmt in ("png", "svg", "pdf"):
                    path = (out / f"{args.task}_{n}_{renderer}.png" if fmt == "png"
                            else Path(tmp) / f"c.{fmt}")
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        circuit.render(path, renderer=renderer)
                        times.append(time.perf_counter() - start)
                    row["seconds"][fmt] = round(statistics.median(times), 3)
                    row["bytes"][fmt] = path.stat().st_size
            rows.append(row)
    result = {"model": args.model, "task": args.task, "algorithm": "eap",
              "examples": args.examples, "torch": torch.__version__, "threads": 1, "rows": rows}
    write_results(out / "figures", result, markdown)


def markdown(result: dict) -> str:
    lines = [f"# Example figures: {result['task']} on {result['model']} (EAP, "
             f"{result['examples']} examples)", "",
             "PNGs in this folder: `{task}_{n}_{renderer}.png`. Seconds: median drawing time "
             "(one CPU thread, machine shared with other jobs).", "",
             "| edges selected → kept | edges drawn | nodes | renderer | s PNG | s SVG | s PDF "
             "| KB PNG | KB SVG | KB PDF |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        s, b = r["seconds"], r["bytes"]
        lines.append(f"| {r['edges_selected']} → {r['edges_kept']} | {r['edges_drawn']} | "
                     f"{r['nodes']} | {r['renderer']} | {s['png']} | {s['svg']} | {s['pdf']} | "
                     f"{b['png'] / 1000:.0f} | {b['svg'] / 1000:.0f} | {b['pdf'] / 1000:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
