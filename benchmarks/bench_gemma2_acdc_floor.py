"""A work floor for ACDC exact mode per test on the families benchmark's Gemma-2 (issue 17).

What any exact implementation must recompute for one test, given the circuit state at the
test (the candidate removed) and the current circuit's run for free: the *forward cone* of the
tested receiver through kept edges. The receiver's own projection; a head whose q, k or v
input changed (its attention and output projection); a later receiver that keeps an edge from
a changed sender (its projection, or the MLP, or the logits at the metric positions); the last
block's queries, MLP and logits at the metric positions only; nothing else (a receiver whose
edges from every changed sender are removed reads their ablated values, which do not change).
Counted in multiply-accumulates and divided by the plain Hugging Face forward's (every block
at every token, logits at every token): HF forwards per test at HF's own FLOP rate, one mask
per test (no speculative batches). The post-norm mixtures of changed receivers, updated by the
changed heads only (``d`` per kept changed head and one norm per token, receiver and layer),
are reported separately.

The states come from one ACDC run on ``bench_acdc_families.py``'s model, data and tau.

Usage::

    python benchmarks/bench_gemma2_acdc_floor.py [--tau 1e-3]

Measures and reports; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_families import SHAPE  # noqa: E402


def cone_macs(g: Any, kept: torch.Tensor, r: int, sizes: dict[str, int]) -> tuple[int, int]:
    """MACs of the forward cone of receiver ``r`` through the kept edges ``kept [S, R]`` (the
    candidate already removed), and of the changed receivers' post-norm mixture updates."""
    d, dh, inter, vocab = sizes["d"], sizes["dh"], sizes["inter"], sizes["vocab"]
    tok, rows_last, t = sizes["tok"], sizes["rows_last"], sizes["t"]
    n_layers, rep = g.n_layers, g.n_heads // g.n_kv_heads
    changed, sent, total, mix = {r}, set(), 0, 0
    for rr in range(r, g.n_receivers):
        rec = g.receivers[rr]
        last = rec.layer == n_layers - 1
        if rec.kind == "mlp":  # the layer's heads are settled: which of them changed
            q_rows = rows_last if last else tok
            for h in range(g.n_heads):
                own = (g.q_start[rec.layer] + h, g.k_start[rec.layer] + h // rep,
                       g.v_start[rec.layer] + h // rep)
                if any(x in changed for x in own):
                    total += q_rows * t * dh * 2 + q_rows * dh * d  # attention, output
                    sent.add(g.head_start[rec.layer] + h)
        if rr != r:
            up = int(g.n_upstream[rr])
            if not any(bool(kept[u, rr]) for u in sent if u < up):
                continue
            changed.add(rr)
        rows = rows_last if (last and rec.kind in ("q", "mlp")) or rec.kind == "logits" else tok
        for layer in range(g.receivers[r].layer, min(rec.layer, n_layers)):
            heads = range(g.head_start[layer], g.head_start[layer] + g.n_heads)
            moved = [u for u in heads if u in sent and bool(kept[u, rr])]
            if moved and not all(bool(kept[u, rr]) for u in heads):
                mix += rows * d * (1 + len(moved))
        if rec.kind in ("q", "k", "v"):
            total += rows * d * dh
        elif rec.kind == "mlp":
            total += rows * 3 * d * inter
            sent.add(g.mlp_index[rec.layer])
        else:
            total += rows * d * vocab
    return total, mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tau", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import circuitfind as cf
    import circuitfind.algorithms.acdc as acdc
    from circuitfind.testing import ToyTask
    from circuitfind.testing.tiny import make_tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model_dir(Path(tmp) / "gemma2", arch="gemma2", n_kv_heads=4, seed=0,
                                   **SHAPE)
        model = cf.load_model(path, device="cpu")
        engine = cf.PatchingEngine(model)
        data = ToyTask(seq_len=15).build(model.tokenizer, 8, seed=0)
        states: list[tuple[int, torch.Tensor]] = []
        decide = acdc._Run._decide

        def record(self: Any, item: Any, value: float) -> bool:
            kept = self.state["kept"].clone()
            if item.sender is None:
                kept[:, item.receiver] = False
            else:
                kept[item.sender, item.receiver] = False
            states.append((item.receiver, kept))
            return decide(self, item, value)
        acdc._Run._decide = record  # type: ignore[method-assign]
        try:
            acdc.ACDC(threshold=args.tau, progress=False).discover(engine, data)
        finally:
            acdc._Run._decide = decide  # type: ignore[method-assign]
    g, cfg = engine.graph, model.cfg
    d, n, t = int(cfg.d_model), data.clean.shape[0], data.clean.shape[1]
    sizes = {"d": d, "dh": d // g.n_heads, "inter": 2 * d, "vocab": int(cfg.d_vocab),
             "tok": n * t, "t": t, "rows_last": n * int(data.positions.shape[1])}
    dh, tok = sizes["dh"], sizes["tok"]
    layer_macs = tok * (d * (g.n_heads + 2 * g.n_kv_heads) * dh + g.n_heads * dh * d
                        + 3 * d * sizes["inter"]) + g.n_heads * tok * t * dh * 2
    hf = g.n_layers * layer_macs + tok * d * sizes["vocab"]
    by_layer: dict[int, list[float]] = {}
    floor = mix = 0.0
    for r, kept in states:
        cone, mixture = cone_macs(g, kept, r, sizes)
        floor += cone / hf
        mix += mixture / hf
        row = by_layer.setdefault(g.receivers[r].layer, [0, 0.0])
        row[0] += 1
        row[1] += cone / hf
    print(f"Gemma-2 ACDC work floor (tau {args.tau}): {len(states)} tests, HF forward "
          f"{hf / 1e6:.0f} M MACs; floor {floor / len(states):.3f} HF forwards per test "
          f"(one mask per test), post-norm mixture updates {mix / len(states):.4f}")
    print("| receiver layer | tests | floor per test |")
    print("|---|---:|---:|")
    for layer, (count, value) in sorted(by_layer.items()):
        print(f"| {layer} | {int(count)} | {value / count:.3f} |")


if __name__ == "__main__":
    main()
