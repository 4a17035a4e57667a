"""Issue 17's targets on every model family: exact, EAP, EAP-IG and ACDC in plain-forward units.

For each family the block runner implements, a random-weight model of one shape (6 layers,
d_model 256, 8 query heads (4 key/value heads where the family has grouped-query attention),
vocabulary 5,000; the weights do not matter for speed) and a batch of 8 prompts of 16 tokens,
on one CPU thread, in CPU time (``time.process_time``: not inflated when other jobs share the
cores), medians of ``--repeats``:

``hf_forward``
    A no-grad forward of the clean batch through the plain Hugging Face model (the unit),
    measured before and after the other phases and averaged.
``exact``
    ``ExactPatching`` over every edge; reported per edge in ``hf_forward`` units (target <= 0.3).
``eap`` / ``eap_floor``
    ``engine.edge_attribution(data)`` on a fresh corrupted tensor each call (the engine's memo
    never hits) / its floor on the plain model: a no-grad corrupted forward plus a clean forward
    and backward with frozen parameters and the input embeddings a leaf (target ratio <= 1.15).
``eap_ig`` / ``eap_ig_floor``
    EAP-IG with 5 interpolation steps on the inputs, likewise / its floor: no-grad corrupted and
    clean forwards plus one forward and backward of the 5 interpolated copies stacked on the
    batch (target ratio <= 1.15).
``acdc``
    ACDC in exact mode (KL objective, tau ``--tau``) over the whole graph; reported per tested
    edge or node in ``hf_forward`` units (target <= 0.3).

Usage::

    python benchmarks/bench_families.py [--families gpt2 llama ...] [--repeats 5]
        [--out benchmarks/results/families]

Measures and reports; asserts nothing about times.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine, write_results  # noqa: E402
from bench_engine import _median_time as _median  # noqa: E402

FAMILIES = ["gpt2", "llama", "gpt_neox", "mistral", "qwen2", "qwen3", "gemma2"]
GROUPED = {"llama", "mistral", "qwen2", "qwen3", "gemma2"}  # families with 4 of 8 k/v heads
SHAPE = dict(n_layers=6, n_heads=8, d_model=256, vocab_size=5000, n_ctx=256)


def _floors(plain: Any, data: Any, steps: int) -> tuple[Any, Any, Any]:
    """The plain model's forward, EAP floor and EAP-IG floor as callables."""
    embed = plain.get_input_embeddings()
    last = data.positions[:, -1]
    rows = torch.arange(data.n)
    ans, wrong = data.answers[:, 0], data.wrong_answers[:, 0]

    def metric(logits: torch.Tensor, copies: int = 1) -> torch.Tensor:
        picked = logits.view(copies, data.n, *logits.shape[1:])[:, rows, last]
        return (picked[..., ans] - picked[..., wrong]).sum()

    def forward() -> None:
        with torch.no_grad():
            plain(data.clean)

    def eap_floor() -> None:
        with torch.no_grad():
            plain(data.corrupted)
        x = embed(data.clean).detach().requires_grad_(True)
        metric(plain(inputs_embeds=x).logits).backward()

    def eap_ig_floor() -> None:
        with torch.no_grad():
            plain(data.corrupted)
            plain(data.clean)
        x = embed(data.clean).detach().repeat(steps, 1, 1).requires_grad_(True)
        metric(plain(inputs_embeds=x).logits, steps).backward()

    return forward, eap_floor, eap_ig_floor


def measure(family: str, repeats: int, tau: float, tmp: Path) -> dict[str, Any]:
    """All figures for one family."""
    import warnings

    from transformers import AutoModelForCausalLM

    import circuitfind as cf
    from circuitfind.algorithms import ACDC, ExactPatching
    from circuitfind.algorithms.eap_ig import input_points
    from circuitfind.testing import ToyTask
    from circuitfind.testing.tiny import make_tiny_model_dir

    kv = 4 if family in GROUPED else None
    path = make_tiny_model_dir(tmp / family, arch=family, n_kv_heads=kv, seed=0, **SHAPE)
    model = cf.load_model(path, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = cf.PatchingEngine(model)
    if engine.runner is None:
        return {"family": family, "runner": False,
                "warning": "; ".join(str(w.message) for w in caught)}
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    data = ToyTask(seq_len=15).build(model.tokenizer, 8, seed=0)
    g = engine.graph
    steps = 5
    forward, eap_floor, eap_ig_floor = _floors(plain, data, steps)
    hf_before = _median(forward, repeats)

    def fresh() -> Any:  # a new corrupted tensor: the engine's memo never hits
        return dataclasses.replace(data, corrupted=data.corrupted.clone())

    eap = _median(lambda: engine.edge_attribution(fresh()), repeats)
    floor = _median(eap_floor, repeats)
    points = input_points(g, steps)
    eap_ig = _median(lambda: engine.edge_attribution(fresh(), points=points), repeats)
    ig_floor = _median(eap_ig_floor, repeats)
    engine.evaluate(data, g.full_mask())  # caches, as at the start of a search
    start = time.process_time()
    ExactPatching(progress=False).score(engine, data)
    exact = time.process_time() - start
    start = time.process_time()
    circuit = ACDC(threshold=tau, progress=False).discover(engine, data)
    acdc = time.process_time() - start
    acdc_meta = circuit.metadata["acdc"]
    tests = int(acdc_meta["tested_edges"]) + int(acdc_meta["node_tests"])
    hf_after = _median(forward, repeats)
    hf = (hf_before + hf_after) / 2
    return {
        "family": family, "runner": True, "hf_class": type(plain).__name__,
        "n_edges": g.n_edges, "n_kv_heads": g.n_kv_heads, "hf_forward_s": hf,
        "hf_forward_before_after_s": [hf_before, hf_after],
        "exact_s": exact, "exact_per_edge_hf": exact / g.n_edges / hf,
        "eap_s": eap, "eap_floor_s": floor, "eap_vs_floor": eap / floor,
        "eap_ig_s": eap_ig, "eap_ig_floor_s": ig_floor, "eap_ig_vs_floor": eap_ig / ig_floor,
        "acdc_s": acdc, "acdc_tests": tests, "acdc_kept": circuit.n_edges,
        "acdc_per_test_hf": acdc / max(1, tests) / hf,
    }


def family_setup(family: str, tmp: Path) -> tuple[Any, Any, Any]:
    """The benchmark's random-weight model of ``family`` (:data:`SHAPE`, 4 k/v heads for
    grouped-query families), saved under ``tmp`` and loaded on the CPU, its patching engine
    and the batch every family benchmark times: 8 toy-task prompts of 15 tokens, seed 0.

    Returns:
        ``(model, engine, data)``.
    """
    import circuitfind as cf
    from circuitfind.testing import ToyTask
    from circuitfind.testing.tiny import make_tiny_model_dir

    kv = 4 if family in GROUPED else None
    path = make_tiny_model_dir(tmp / family, arch=family, n_kv_heads=kv, seed=0, **SHAPE)
    model = cf.load_model(path, device="cpu")
    engine = cf.PatchingEngine(model)
    data = ToyTask(seq_len=15).build(model.tokenizer, 8, seed=0)
    return model, engine, data


def markdown(result: dict[str, Any]) -> str:
    """The results table."""
    lines = [
        "# Model families on the block runner (issue 17)", "",
        f"Random-weight models, 6 layers, d_model 256, 8 heads (4 k/v heads for grouped-query "
        f"families), batch 8 x 16 tokens, one thread, CPU time, medians of {result['repeats']}; "
        f"{result['machine']}. Units: one plain Hugging Face no-grad forward of the same batch. "
        "Targets: exact <= 0.3 per edge, EAP and EAP-IG inputs(5) <= 1.15x their floors, "
        "ACDC exact mode <= 0.3 per test.", "",
        "| family | edges | HF forward (ms) | exact / edge | EAP / floor | EAP-IG(5) / floor "
        "| ACDC / test (tests) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["families"]:
        if not r["runner"]:
            lines.append(f"| {r['family']} | | | not on the runner: {r['warning'][:80]} | | | |")
            continue
        lines.append(
            f"| {r['family']} | {r['n_edges']} | {1000 * r['hf_forward_s']:.2f} "
            f"| {r['exact_per_edge_hf']:.3f} | {r['eap_vs_floor']:.2f} "
            f"| {r['eap_ig_vs_floor']:.2f} | {r['acdc_per_test_hf']:.3f} ({r['acdc_tests']}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tau", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/families")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        families = [measure(f, args.repeats, args.tau, Path(tmp)) for f in args.families]
    result = {"families": families, "repeats": args.repeats, "threads": args.threads,
              "machine": machine()}
    write_results(args.out, result, markdown)


if __name__ == "__main__":
    main()
