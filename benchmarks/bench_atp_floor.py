"""AtP*'s cost floor against EAP (issue 19's "AtP* <= 2x EAP"): FLOPs and the irreducible time.

On bench_families' shape (``bench_families.SHAPE``: 6 layers, d_model 256, 8 query heads, a
batch of 8 prompts of 16 tokens), one CPU thread, for each family asked:

``flops``  matmul multiply-adds (``torch.utils.flop_counter.FlopCounterMode``, halved: MACs) of
           one call of ``EAP``, ``AtPStar(grad_drop=False)`` (QK fix alone), ``AtPStar(
           qk_fix=False)`` (GradDrop alone) and ``AtPStar()``, each with its corrupted forward;
``bare``   GradDrop's irreducible part on its own: after one plain forward through the family
           adapter (autograd graph kept), one backward pass from each layer ``l >= 1``'s input
           through the layers below it (``L (L - 1) / 2`` layer-backward passes, input
           gradients only), with nothing else: no receiver gradients, no contraction, no QK
           fix. Its MACs and its CPU time, timed interleaved with the four methods.

The floor ratios: ``(EAP + bare + QK fix) / EAP`` in MACs, with the QK fix's MACs as
implemented (``AtP* QK fix - EAP``: the patched projections and patterns, nothing else), and in
measured time ``(t(AtP* QK fix) + t(bare)) / t(EAP)``: what AtP* would cost if GradDrop took no
more than its bare layer-backward passes. Elementwise work is not in the MACs.

Usage::

    PYTHONPATH=. python benchmarks/bench_atp_floor.py [--families gpt2 llama] [--repeats 9]
        [--out benchmarks/results/atp_floor]

Measures and reports; asserts nothing about times.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, interleaved_rounds, utc_now, write_results  # noqa: E402
from bench_families import FAMILIES, family_setup  # noqa: E402

METHODS = ["eap", "atp_qk", "grad_drop", "atp_star"]


def bare_grad_drop(engine: Any, tokens: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """The plain forward through the family adapter that GradDrop's bare backward passes
    read: a function returning every layer's input and the last layer's output (the forward
    is measured on its own and subtracted)."""
    lay, layers = engine.runner.arch, engine.graph.n_layers

    def forward() -> list[torch.Tensor]:
        x = lay.embed(tokens).detach().requires_grad_(True)
        inputs = []
        for layer in range(layers):
            inputs.append(x)
            q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
            attn = lay.post_norm(layer, lay.attn_out(layer, lay.attend(layer, q, k, v)))
            h = x + attn
            x = h + lay.mlp(layer, lay.ln_mlp(layer, x if lay.parallel else h))
        inputs.append(x)
        return inputs

    return forward


def measure(family: str, repeats: int, tmp: Path) -> dict[str, Any]:
    """MACs and CPU seconds of the methods and of GradDrop's bare backward passes."""
    from circuitfind.algorithms import EAP, AtPStar
    from torch.utils.flop_counter import FlopCounterMode

    model, engine, data = family_setup(family, tmp)
    algos = {"eap": EAP(), "atp_qk": AtPStar(grad_drop=False),
             "grad_drop": AtPStar(qk_fix=False), "atp_star": AtPStar()}
    layers = engine.graph.n_layers
    for parameter in model.parameters():  # input gradients only, as the attribution pass
        parameter.requires_grad_(False)
    forward = bare_grad_drop(engine, data.clean)
    with torch.no_grad():
        seeds = [torch.randn_like(x) for x in forward()]

    def fresh() -> Any:  # a new corrupted tensor: the engine's memo never hits
        return dataclasses.replace(data, corrupted=data.corrupted.clone())

    def scorer(a: Any) -> Callable[[], Any]:
        return lambda: a.score(engine, fresh())

    def backward_passes(inputs: list[torch.Tensor]) -> None:
        for below in range(1, layers):
            torch.autograd.backward(inputs[below], seeds[below + 1],
                                    retain_graph=below < layers - 1)

    def bare() -> None:
        with torch.enable_grad():
            backward_passes(forward())

    def bare_forward() -> None:
        with torch.enable_grad():
            forward()

    macs: dict[str, float] = {}
    for name, fn in {**{k: scorer(a) for k, a in algos.items()}, "bare": bare,
                     "bare_forward": bare_forward}.items():
        fn()  # warm (the QK fix keeps weight products between calls)
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        macs[name] = counter.get_total_flops() / 2
    macs["bare"] -= macs.pop("bare_forward")
    fns = {**{k: scorer(a) for k, a in algos.items()}, "bare": bare,
           "bare_forward": bare_forward}
    times = interleaved_rounds(fns, repeats)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    seconds["bare"] = max(0.0, seconds["bare"] - seconds.pop("bare_forward"))
    macs["qk_ideal"] = qk_fix_macs(engine, data.n, data.clean.shape[1],
                                   int(data.positions.shape[1]))
    floor_macs = (macs["atp_qk"] + macs["bare"]) / macs["eap"]
    ideal_macs = 1 + (macs["bare"] + macs["qk_ideal"]) / macs["eap"]
    floor_time = (seconds["atp_qk"] + seconds["bare"]) / seconds["eap"]
    return {"family": family, "layers": layers, "macs": macs, "seconds": seconds,
            "floor_macs": floor_macs, "ideal_macs": ideal_macs, "floor_time": floor_time}


def qk_fix_macs(engine: Any, n: int, t: int, p_last: int) -> float:
    """The QK fix's irreducible MACs at edge level: per layer ``j`` the q/k projections of
    the patched receiver input for each of its ``1 + j`` non-head senders (``d``-wide) and
    ``H j`` head senders (in head space, ``d_head``-wide), and the patched patterns' scores
    (a patched query and a patched key pattern per sender), queries at every position but
    the last layer's metric positions."""
    g, lay = engine.graph, engine.runner.arch
    h, kv = g.n_heads, g.n_kv_heads
    w_out = lay.w_out(0)[0]  # [H * d_head, d]
    d, dh = w_out.shape[1], w_out.shape[0] // h
    total = 0.0
    for j in range(g.n_layers):
        rows = t if j < g.n_layers - 1 else p_last
        plain, heads = 1 + j, h * j
        out = rows * h * dh + t * kv * dh  # q at the query rows, k at every position
        total += plain * n * d * out + heads * n * dh * out
        total += 2 * (plain + heads) * n * h * rows * t * dh
    return total


def markdown(result: dict[str, Any]) -> str:
    """One table of MACs and one of times, newest run only."""
    lines = [
        f"## {result['title']}", "",
        "bench_families' shape (6 layers, d_model 256, 8 heads, 4 k/v heads for grouped-query "
        "families), batch 8 x 16 tokens, one thread; "
        f"{result['machine']}. MACs: matmul multiply-adds (FlopCounterMode / 2), every call "
        "with its corrupted forward. `bare GradDrop`: the L(L-1)/2 layer-backward passes alone "
        "(input gradients, nothing else). Floor = (AtP* QK fix + bare GradDrop) / EAP; ideal QK fix: "
        "the patched q/k projections and pattern scores alone (`qk_fix_macs`); ideal floor = 1 + "
        "(bare GradDrop + ideal QK fix) / EAP. Times: "
        f"CPU ms, medians of {result['repeats']} interleaved rounds.", "",
        "| family | EAP MMAC | QK fix / EAP | GradDrop / EAP | AtP* / EAP | bare GradDrop / EAP "
        "| floor / EAP | ideal QK fix / EAP | ideal floor / EAP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["families"]:
        m = r["macs"]
        e = m["eap"]
        lines.append(f"| {r['family']} | {e / 1e6:.0f} | {m['atp_qk'] / e:.2f} "
                     f"| {m['grad_drop'] / e:.2f} | {m['atp_star'] / e:.2f} "
                     f"| {m['bare'] / e:.2f} | {r['floor_macs']:.2f} "
                     f"| {m['qk_ideal'] / e:.2f} | {r['ideal_macs']:.2f} |")
    lines += ["", "| family | EAP (ms) | QK fix / EAP | GradDrop / EAP | AtP* / EAP "
              "| bare GradDrop / EAP | floor / EAP |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["families"]:
        s = r["seconds"]
        e = s["eap"]
        lines.append(f"| {r['family']} | {1000 * e:.1f} | {s['atp_qk'] / e:.2f} "
                     f"| {s['grad_drop'] / e:.2f} | {s['atp_star'] / e:.2f} "
                     f"| {s['bare'] / e:.2f} | {r['floor_time']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama"], choices=FAMILIES)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default="benchmarks/results/atp_floor")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run: dict[str, Any] = {"date": utc_now(), "commit": git("rev-parse", "--short", "HEAD"),
                           "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        families = [measure(f, args.repeats, Path(tmp)) for f in args.families]
    run.update(families=families, repeats=args.repeats, load_after=os.getloadavg()[0],
               machine=f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    run["title"] = (f"{run['date']}, commit {run['commit']}, load average "
                    f"{run['load_before']:.1f} -> {run['load_after']:.1f}")
    write_results(args.out, run, markdown)


if __name__ == "__main__":
    main()
