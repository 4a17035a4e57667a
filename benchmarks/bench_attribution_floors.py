"""EAP and EAP-IG(5) against their plain Hugging Face floors on every family, interleaved.

The EAP and EAP-IG(5) columns of ``benchmarks/results/families.md`` (issue 17's targets: each
<= 1.15x its floor), measured so that a shared machine's load falls on both sides alike: per
family, rounds of EAP, its floor, EAP-IG(5) and its floor, one after the other, in CPU time
(``time.process_time``), on the models, data and floors of ``bench_families.py`` (6 layers,
d_model 256, 8 heads, batch 8 x 16 tokens, one thread; a fresh corrupted tensor per call, so
the engine's memo never hits). Reported per family: the medians, their ratio, and the spread
of the per-round ratios (min, median, max), with the load average before and after.

Usage::

    python benchmarks/bench_attribution_floors.py [--families gpt2 llama ...] [--rounds 9]
        [--out benchmarks/results/families]

Writes the section "EAP and EAP-IG(5) against their floors, interleaved" of ``OUT.md``
(replacing an earlier one) and the key ``attribution_interleaved`` of ``OUT.json``; the other
columns and sections are left as they are. Measures and reports; asserts nothing about times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, interleaved_rounds, machine, utc_now  # noqa: E402
from bench_families import FAMILIES, GROUPED, SHAPE, _floors  # noqa: E402

TITLE = "## EAP and EAP-IG(5) against their floors, interleaved"
STEPS = 5


def _ratios(times: dict[str, list[float]], thing: str, floor: str) -> dict[str, Any]:
    """Medians, their ratio and the per-round ratios' (min, median, max)."""
    per_round = sorted(a / b for a, b in zip(times[thing], times[floor]))
    med, med_floor = statistics.median(times[thing]), statistics.median(times[floor])
    return {"s": med, "floor_s": med_floor, "vs_floor": med / med_floor,
            "rounds": [per_round[0], statistics.median(per_round), per_round[-1]]}


def measure(family: str, rounds: int, tmp: Path) -> dict[str, Any]:
    """The interleaved figures of one family."""
    from transformers import AutoModelForCausalLM

    import circuitfind as cf
    from circuitfind.algorithms.eap_ig import input_points
    from circuitfind.testing import ToyTask
    from circuitfind.testing.tiny import make_tiny_model_dir

    kv = 4 if family in GROUPED else None
    path = make_tiny_model_dir(tmp / family, arch=family, n_kv_heads=kv, seed=0, **SHAPE)
    model = cf.load_model(path, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = cf.PatchingEngine(model)
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    data = ToyTask(seq_len=15).build(model.tokenizer, 8, seed=0)
    _, eap_floor, eap_ig_floor = _floors(plain, data, STEPS)
    points = input_points(engine.graph, STEPS)

    def fresh() -> Any:  # a new corrupted tensor: the engine's memo never hits
        return dataclasses.replace(data, corrupted=data.corrupted.clone())

    load_before = os.getloadavg()
    times = interleaved_rounds({
        "eap": lambda: engine.edge_attribution(fresh()), "eap_floor": eap_floor,
        "eap_ig": lambda: engine.edge_attribution(fresh(), points=points),
        "eap_ig_floor": eap_ig_floor,
    }, rounds)
    return {"family": family, "n_edges": engine.graph.n_edges,
            "load_before_after": [load_before[0], os.getloadavg()[0]],
            "eap": _ratios(times, "eap", "eap_floor"),
            "eap_ig": _ratios(times, "eap_ig", "eap_ig_floor"), "times_s": times}


def markdown(result: dict[str, Any]) -> str:
    """The section of ``families.md``."""
    loads = [x for r in result["families"] for x in r["load_before_after"]]
    lines = [
        TITLE, "",
        f"{result['date']}, commit {result['commit']} (branch {result['branch']}), "
        f"`python benchmarks/bench_attribution_floors.py --rounds {result['rounds']}`: per "
        "family, rounds of EAP, its floor, EAP-IG(5) and its floor, one after the other, in "
        "CPU time, on the models, data and floors of `bench_families.py`; ratio of the "
        "medians, and the per-round ratios (min / median / max). "
        f"{result['machine']}, load average {min(loads):.1f}-{max(loads):.1f} (1 minute, "
        "before and after each family). Target: each <= 1.15.", "",
        "| family | edges | EAP (ms) | floor (ms) | EAP / floor | per round "
        "| EAP-IG(5) (ms) | floor (ms) | EAP-IG(5) / floor | per round |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in result["families"]:
        e, g = r["eap"], r["eap_ig"]
        lines.append(
            f"| {r['family']} | {r['n_edges']} | {1000 * e['s']:.1f} | {1000 * e['floor_s']:.1f} "
            f"| {e['vs_floor']:.2f} | {' / '.join(f'{x:.2f}' for x in e['rounds'])} "
            f"| {1000 * g['s']:.1f} | {1000 * g['floor_s']:.1f} | {g['vs_floor']:.2f} "
            f"| {' / '.join(f'{x:.2f}' for x in g['rounds'])} |")
    return "\n".join(lines) + "\n"


def write(out: Path, result: dict[str, Any]) -> str:
    """Replace (or append) the section in ``OUT.md`` and the key in ``OUT.json``."""
    section = markdown(result)
    md = out.with_suffix(".md")
    text = md.read_text() if md.exists() else ""
    if TITLE in text:
        head, _, rest = text.partition(TITLE)
        tail = rest.find("\n## ")
        text = head + section + ("" if tail < 0 else rest[tail + 1:])
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md.write_text(text)
    js = out.with_suffix(".json")
    data = json.loads(js.read_text()) if js.exists() else {}
    data["attribution_interleaved"] = result
    js.write_text(json.dumps(data, indent=1))
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/families")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        families = [measure(f, args.rounds, Path(tmp)) for f in args.families]
    result = {
        "families": families, "rounds": args.rounds, "threads": args.threads,
        "date": utc_now(),
        "commit": git("rev-parse", "--short", "HEAD"),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "machine": machine(),
    }
    print(write(Path(args.out), result))


if __name__ == "__main__":
    main()
