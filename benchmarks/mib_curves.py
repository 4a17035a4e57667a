"""CPR and CMD under MIB's convention and the single-ranking curve, side by side.

Usage (from the repository root; PYTHONPATH=. to run this checkout's circuitfind):
    PYTHONPATH=. python benchmarks/mib_curves.py --out benchmarks/results/mib_curves

For stories260k (``gendered_pronoun``) and the zoo organisms, scores every edge with EAP and
EAP-IG and computes :func:`circuitfind.faithfulness_curve` three ways: ``convention="mib"``
(top ``int(p·E)`` edges, pruned; CPR over the signed ranking, CMD over |score|) and
``convention="single"`` ranked by |score| and by signed score. Writes ``OUT.md`` and ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import circuitfind as cf  # noqa: E402
from _results import write_results  # noqa: E402

CELLS = (("../shared/models/stories260k", "gendered_pronoun"), ("zoo:ioi-small", "ioi"),
         ("zoo:greater-than-small", "greater_than"), ("zoo:induction-2l", "induction"))
ALGORITHMS = ("eap", "eap_ig")
VARIANTS = (("mib", {"convention": "mib"}),
            ("single abs", {"convention": "single", "absolute": True}),
            ("single signed", {"convention": "single", "absolute": False}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="output path without suffix")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite OUT.md from OUT.json without running anything")
    args = parser.parse_args()
    if args.markdown_only:
        result = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(markdown(result))
        return
    torch.set_num_threads(args.threads)
    rows = []
    for model_name, task in CELLS:
        if model_name.startswith("..") and not Path(model_name).is_dir():
            print(f"skipping {model_name}: not found")
            continue
        model = cf.load_model(model_name, device="cpu")
        data = cf.build_data(model, task, n=args.examples, seed=args.seed)
        engine = cf.PatchingEngine(model)
        for algorithm in ALGORITHMS:
            scores = cf.get_algorithm(algorithm).score(engine, data)
            row = {"model": model_name, "task": task, "algorithm": algorithm,
                   "n_total_edges": engine.graph.n_edges, "curves": {}}
            for name, kwargs in VARIANTS:
                start = time.process_time()
                curve = cf.faithfulness_curve(engine, scores, data, **kwargs)
                row["curves"][name] = {**curve.to_dict(),
                                       "cpu_s": round(time.process_time() - start, 2)}
            rows.append(row)
    write_results(args.out, {"examples": args.examples, "seed": args.seed, "rows": rows,
                             "threads": args.threads, "versions": cf.api.versions()}, markdown)


def markdown(r: dict) -> str:
    """The comparison as a Markdown table."""
    labels = {name: r["rows"][0]["curves"][name]["label"] for name, _ in VARIANTS} if r["rows"] \
        else {}
    lines = ["# CPR / CMD: MIB's convention vs a single ranking", "",
             f"{r['examples']} examples per task (seed {r['seed']}); normalized faithfulness at "
             "MIB's fractions 0.1%–100% of edges, trapezoid areas over the fractions.", ""]
    lines += [f"- **{name}**: {label}." for name, label in labels.items()]
    lines += ["", "MIB's signed ranking puts first the edges whose corruption lowers the metric "
              "(MIB's scores attribute a loss); `single signed` ranks circuitfind's raw signed "
              "scores largest first, i.e. the edges whose corruption *raises* a higher-is-better "
              "metric, so its CPR is low by construction. CMD uses |score| in both MIB and "
              "`single abs`; they differ only by MIB's floor sizes (0 edges at 0.1% of a "
              "110-edge graph) and pruning."]
    lines += ["", "| model | task | algorithm | edges | " + " | ".join(
        f"{name} CPR | {name} CMD" for name, _ in VARIANTS) + " |",
              "| --- | --- | --- | ---: | " + " | ".join("---: | ---:" for _ in VARIANTS) + " |"]
    for row in r["rows"]:
        cells = " | ".join(f"{row['curves'][n]['cpr']:.3f} | {row['curves'][n]['cmd']:.3f}"
                           for n, _ in VARIANTS)
        lines.append(f"| {Path(row['model']).name} | {row['task']} | {row['algorithm']} | "
                     f"{row['n_total_edges']} | {cells} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
