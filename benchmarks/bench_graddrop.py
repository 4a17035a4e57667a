"""AtP* with GradDrop against EAP on every family (issue 19's "AtP* <= 2x EAP").

On bench_families' shape (``bench_families.SHAPE``: 6 layers, d_model 256, 8 query heads, a
batch of 8 prompts of 16 tokens), one CPU thread, for each family: the CPU time of one call of

``eap``        ``EAP().score``;
``atp_qk``     ``AtPStar(grad_drop=False).score`` (the QK fix alone);
``grad_drop``  ``AtPStar(qk_fix=False).score`` (GradDrop alone);
``atp_star``   ``AtPStar().score`` (QK fix and GradDrop),

each with its corrupted forward pass (a fresh corrupted tensor every call), and

``bare``       GradDrop's irreducible backward work: after one plain forward through the family
               adapter (``bench_atp_floor.bare_grad_drop``, autograd graph kept), one backward
               pass from each layer ``l >= 1``'s input through the layers below it (``L (L - 1)
               / 2`` layer-backward passes, input gradients only: no receiver gradients, no
               contraction), less that forward (timed on its own),

all timed in interleaved rounds (medians), with the ratios to EAP. ``AtP* - QK fix`` is
GradDrop's share of AtP*'s time and ``QK fix + bare`` the floor of AtP* with the QK fix as it
is, both in units of EAP. Earlier runs are kept in ``OUT.json`` (newest first).

Usage::

    PYTHONPATH=. python benchmarks/bench_graddrop.py [--families gpt2 llama] [--repeats 7]
        [--label "after: batched GradDrop"] [--out benchmarks/results/graddrop_speed]

Measures and reports; asserts nothing about times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import (fresh_scorers, git, interleaved_rounds, load_average,  # noqa: E402
                      machine, utc_now, write_results)
from bench_atp_floor import bare_grad_drop  # noqa: E402
from bench_families import FAMILIES, family_setup  # noqa: E402

METHODS = ["eap", "atp_qk", "grad_drop", "atp_star"]


def measure(family: str, repeats: int, tmp: Path) -> dict[str, Any]:
    """Median CPU seconds per method and ratios to EAP for one family."""
    from circuitfind.algorithms import EAP, AtPStar

    _, engine, data = family_setup(family, tmp)
    algos = {"eap": EAP(), "atp_qk": AtPStar(grad_drop=False),
             "grad_drop": AtPStar(qk_fix=False), "atp_star": AtPStar()}
    model, layers = engine.model, engine.graph.n_layers
    for parameter in model.parameters():  # input gradients only, as the attribution pass
        parameter.requires_grad_(False)
    forward = bare_grad_drop(engine, data.clean)
    with torch.no_grad():
        seeds = [torch.randn_like(x) for x in forward()]

    def bare() -> None:
        with torch.enable_grad():
            inputs = forward()
            for below in range(1, layers):
                torch.autograd.backward(inputs[below], seeds[below + 1],
                                        retain_graph=below < layers - 1)

    def bare_forward() -> None:
        with torch.enable_grad():
            forward()

    fns = {**fresh_scorers(algos, engine, data), "bare": bare, "bare_forward": bare_forward}
    times = interleaved_rounds(fns, repeats)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    seconds["bare"] = max(0.0, seconds["bare"] - seconds.pop("bare_forward"))
    vs_eap = {k: seconds[k] / seconds["eap"] for k in [*METHODS, "bare"]}
    vs_eap["floor"] = vs_eap["atp_qk"] + vs_eap["bare"]
    return {"family": family, "seconds": seconds, "vs_eap": vs_eap}


def markdown(result: dict[str, Any]) -> str:
    """One table per run, newest first."""
    lines = ["# AtP* (QK fix + GradDrop) against EAP (`bench_graddrop.py`)", "",
             "bench_families' shape (6 layers, d_model 256, 8 heads, 4 k/v heads for "
             "grouped-query families), batch 8 x 16 tokens, one thread, CPU time, medians of "
             "interleaved rounds; every call with its corrupted forward. Target: AtP* <= 2x EAP. "
             "`GradDrop share` = (AtP* - QK fix) / EAP; `bare GradDrop`: the L(L-1)/2 "
             "layer-backward passes alone (input gradients only); floor = QK fix + bare "
             "GradDrop.", ""]
    for run in result["runs"]:
        lines += [f"## {run['title']}", "", run.get("label", ""), "",
                  "| family | EAP (ms) | QK fix / EAP | GradDrop / EAP | AtP* / EAP "
                  "| GradDrop share / EAP | bare GradDrop / EAP | floor / EAP |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in run["families"]:
            v = r["vs_eap"]
            lines.append(f"| {r['family']} | {1000 * r['seconds']['eap']:.1f} "
                         f"| {v['atp_qk']:.2f} | {v['grad_drop']:.2f} | {v['atp_star']:.2f} "
                         f"| {v['atp_star'] - v['atp_qk']:.2f} "
                         f"| {v.get('bare', float('nan')):.2f} "
                         f"| {v.get('floor', float('nan')):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default="benchmarks/results/graddrop_speed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run: dict[str, Any] = {"date": utc_now(), "commit": git("rev-parse", "--short", "HEAD"),
                           "load_before": load_average(), "label": args.label}
    with tempfile.TemporaryDirectory() as tmp:
        families = [measure(f, args.repeats, Path(tmp)) for f in args.families]
    run.update(families=families, repeats=args.repeats, machine=machine(),
               load_after=load_average())
    run["title"] = (f"{run['date']}, commit {run['commit']}, {args.repeats} rounds, load "
                    f"average {run['load_before']} -> {run['load_after']}; {run['machine']}")
    old = Path(args.out).with_suffix(".json")
    earlier = json.loads(old.read_text())["runs"] if old.exists() else []
    write_results(args.out, {"runs": [run, *earlier]}, markdown)


if __name__ == "__main__":
    main()
