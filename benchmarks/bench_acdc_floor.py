"""ACDC exact mode's work floor per test (issue 17's "ACDC <= 0.3 HF forwards per tested edge").

Is 0.3 forwards per test reachable at all on a family? This script replays one real ACDC run
(exact mode, KL, tau ``--tau``) on each family's benchmark model and data (``bench_families``:
6 layers, d_model 256, 8 query heads, 4 key/value heads for grouped-query families, vocabulary
5,000, 8 prompts of 16 tokens, one thread) and counts, for every test in the run's order, the
least matmul work any exact implementation must do, given every activation of the circuit state
before the test memoised for free.

The floor of one test. ACDC tests removing edge ``s -> r`` (or, for a q/k/v node test, every
kept edge into ``r``) from the current circuit ``C``, giving ``C'``. Every value of ``C`` is
known; what must be recomputed are the values that change:

- the tested receiver's input changes at the rows (example, position) where the removed
  senders' current values differ from their ablated ones. Senders of ``r`` lie upstream of every
  receiver ACDC has visited, so their current value is the clean run's; under the resample
  ablation (the engine default) ``input`` differs where the clean and corrupted tokens differ and
  any other node from the first such position on (causality);
- changes propagate along the edges *kept in* ``C'`` (a removed edge carries the ablated value,
  which does not change), in topological order: a head's output changes at the query rows whose
  query changed, or whose attention window (causal, and the family's sliding window) holds a
  changed key or value; an MLP's output at the rows its input changed;
- a value is only needed where something downstream reads it (backward over ``C'``): the logits
  at the metric positions; an MLP and a head's query and output at the rows their readers need;
  a key or value at the positions inside the window of a needed query row. Work is counted at
  changed *and* needed rows only (so the last block runs at the metric positions only, and
  sliding-window layers near the end read only the last few keys).

Counted per node (multiply-accumulates, MACs): q projection ``d x d_head`` per changed row, k and
v projections ``d x d_head`` per key/value head (grouped-query heads share them), attention scores
``d_head`` per (changed query row x key in its window) plus per (unchanged query row x changed
key), the weighted sum ``d_head`` per (row whose weights changed x key) plus per (row x changed
value), the output projection ``d_head x d`` per changed head row, the MLP (``2`` or ``3`` (gated)
``x d x d_ff``) per changed row, the unembedding ``d x vocab`` per changed metric row. Norms,
rotary, soft-caps, softmax, activations and the KL itself are elementwise: not counted. This is a
lower bound: it ignores the speculative batches' wasted masks, any fixed cost per pass, memory
traffic, and it assumes a perfect memo of ``C``.

The resume floor (``Floor.test(..., changed_only=False)``), for comparison: what a pass that
resumes from the tested receiver's layer and recomputes every node the circuit still reads
(changed or not; same needed rows, so the last block still runs at the metric positions only)
must spend: the floor of today's design (resume from a layer, kept form), without change tracking.

The unit: one plain Hugging Face forward of the same batch, in MACs: ``FlopCounterMode`` on the HF
model (halved) plus the dense attention products where HF's CPU ``scaled_dot_product_attention``
kernel has no FLOP formula (``dense_macs``: T x T scores and weighted sums per head, as HF computes
them); the analytic dense count equals FlopCounterMode's for every family (checked each run).

Reported per family: the mean floor per test in forwards, by start layer (the tested receiver's
layer), beside ACDC's measured CPU time per test in forwards (``bench_acdc_families.measure``:
rounds of the HF forward, one whole ACDC run, the forward again) and the ratio measured / floor;
a time floor: the MAC floor at HF's own speed per MAC (ms) and at this machine's single-thread
matmul peak (a 512 x 512 x 512 matmul; the strict lower bound); and, as a sensitivity check only
(not the target's setting), the floor of a run whose tau keeps about GPT-2's edge fraction.

Usage::

    PYTHONPATH=. python benchmarks/bench_acdc_floor.py [--families gpt2 llama ...] [--rounds 3]
        [--tau 1e-3] [--no-sparse] [--out benchmarks/results/acdc_floor] [--report-only]

Measures and reports; asserts nothing about times.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import git, load_average, machine, utc_now, write_results  # noqa: E402
from bench_acdc_families import FAMILIES  # noqa: E402
from bench_acdc_families import measure as measure_acdc  # noqa: E402
from bench_families import family_setup  # noqa: E402

TARGET = 0.3  # issue 17: ACDC exact mode <= 0.3 HF forwards per test


@dataclass(frozen=True)
class Shape:
    """Sizes the floor counts with (from the Hugging Face config; windows from the adapter).

    Attributes:
        d: Residual width. d_head: Head size. n_heads / n_kv_heads: Query / key-value heads.
        mlp_row: MACs of one MLP on one row. vocab: Unembedding width.
        windows: Per layer, the sliding window (``None``: every earlier position).
    """

    d: int
    d_head: int
    n_heads: int
    n_kv_heads: int
    mlp_row: int
    vocab: int
    windows: tuple[int | None, ...]


def shape_of(plain: Any, arch: Any, n_layers: int) -> Shape:
    """The :class:`Shape` of a Hugging Face causal LM ``plain`` (``arch``: its adapter, for the
    sliding windows)."""
    c = plain.config
    d = int(getattr(c, "hidden_size", None) or c.n_embd)
    h = int(getattr(c, "num_attention_heads", None) or c.n_head)
    kv = int(getattr(c, "num_key_value_heads", None) or h)
    dh = int(getattr(c, "head_dim", None) or d // h)
    d_ff = int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d)
    gated = c.model_type not in ("gpt2", "gpt_neox")
    return Shape(d, dh, h, kv, (3 if gated else 2) * d * d_ff, int(c.vocab_size),
                 tuple(arch.window(layer) for layer in range(n_layers)))


def dense_macs(shape: Shape, n: int, t: int, n_layers: int) -> int:
    """MACs of one dense forward of ``n x t`` tokens as Hugging Face computes it (full ``T x T``
    attention products, every row unembedded)."""
    s = shape
    proj = (2 * s.n_heads + 2 * s.n_kv_heads) * s.d * s.d_head
    per_layer = n * t * (proj + s.mlp_row) + 2 * n * s.n_heads * t * t * s.d_head
    return n_layers * per_layer + n * t * s.d * s.vocab


def visible(t: int, window: int | None) -> Tensor:
    """``[T, T]`` bool: query ``t`` sees key ``j`` (causal, and ``j > t - window``)."""
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    vis = k <= q
    return vis if window is None else vis & (k > q - window)


def sender_change(graph: Any, clean: Tensor, corrupted: Tensor) -> Tensor:
    """``[S, N, T]`` bool: rows where each sender's clean value differs from its resample-ablated
    one (``input``: differing tokens; any other node: from the first differing token on)."""
    diff = clean != corrupted
    later = torch.cummax(diff.int(), dim=1).values.bool()
    out = later[None].repeat(graph.n_senders, 1, 1)
    out[graph.node_index("input")] = diff
    return out


class Floor:
    """The floor's counting for one graph, shape and batch (see the module docstring).

    Args:
        graph: The :class:`~circuitfind.graphs.graph.ComputeGraph`.
        shape: The model's :class:`Shape`.
        changes: ``[S, N, T]`` bool, :func:`sender_change`.
        metric_rows: ``[N, T]`` bool, the positions the objective reads.
    """

    def __init__(self, graph: Any, shape: Shape, changes: Tensor, metric_rows: Tensor) -> None:
        self.g, self.s, self.changes, self.metric = graph, shape, changes, metric_rows
        n, t = metric_rows.shape
        self.n, self.t = n, t
        self.vis = [visible(t, w).float() for w in shape.windows]
        # query head -> its k/v head (consecutive query heads share one)
        self.group = torch.arange(graph.n_heads) // (graph.n_heads // graph.n_kv_heads)

    def _spread(self, rows: Tensor, layer: int) -> Tensor:
        """Per query row, how many of the marked key rows ``[..., N, T]`` it sees."""
        return torch.einsum("...nj,tj->...nt", rows.float(), self.vis[layer])

    def _keys_of(self, rows: Tensor, layer: int) -> Tensor:
        """Key rows inside the window of any marked query row ``[..., N, T]``."""
        return torch.einsum("...nt,tj->...nj", rows.float(), self.vis[layer]) > 0

    def needed(self, kept: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Backward over ``kept`` ``[S, R]``: ``[S, N, T]`` rows each node's output is read at
        and ``[R, N, T]`` rows each receiver's input is read at (layers ``>= start``)."""
        g = self.g
        node = torch.zeros(g.n_senders, self.n, self.t, dtype=torch.bool)
        recv = torch.zeros(g.n_receivers, self.n, self.t, dtype=torch.bool)
        recv[-1] = self.metric
        flat = recv.view(g.n_receivers, -1)

        def read_at(senders: list[int]) -> Tensor:
            k = kept[senders].float()  # [len, R]
            return (k @ flat.float() > 0).view(len(senders), self.n, self.t)

        for layer in reversed(range(start, g.n_layers)):
            m, mr = g.mlp_index[layer], g.mlp_receiver[layer]
            if m is not None:
                node[m] = read_at([m])[0]
                recv[mr] = node[m]
            heads = list(range(g.head_start[layer], g.head_start[layer] + g.n_heads))
            node[heads] = read_at(heads)
            h = node[heads]
            recv[g.q_start[layer]: g.q_start[layer] + g.n_heads] = h
            grouped = h.view(g.n_kv_heads, -1, self.n, self.t).any(1)  # heads of a k/v head
            keys = self._keys_of(grouped, layer)
            recv[g.k_start[layer]: g.k_start[layer] + g.n_kv_heads] = keys
            recv[g.v_start[layer]: g.v_start[layer] + g.n_kv_heads] = keys
        return node, recv

    def test(self, kept_before: Tensor, receiver: int, sender: int | None,
             changed_only: bool = True) -> dict[str, float]:
        """MACs of the test removing ``sender -> receiver`` (``sender=None``: every kept edge
        into ``receiver``, a q/k/v node test) from ``kept_before`` ``[S, R]``, by part
        (``proj``: q/k/v/output projections; ``attn``: scores and weighted sums; ``mlp``;
        ``unembed``). ``changed_only=False``: the resume floor instead, every node of layers
        ``>=`` the receiver's at every row something downstream reads, changed or not."""
        g, s = self.g, self.s
        kept = kept_before.clone()
        if sender is None:
            senders = kept[:, receiver].nonzero()[:, 0]
            kept[:, receiver] = False
        else:
            senders = torch.tensor([sender])
            kept[sender, receiver] = False
        start = g.receivers[receiver].layer
        need_node, need_recv = self.needed(kept, start)
        out = torch.zeros(g.n_senders, self.n, self.t, dtype=torch.bool)  # changed outputs
        first = self.changes[senders].any(0)
        flat = out.view(g.n_senders, -1)
        macs = {"proj": 0.0, "attn": 0.0, "mlp": 0.0, "unembed": 0.0}

        def inputs(receivers: slice | list[int]) -> Tensor:
            idx = torch.arange(g.n_receivers)[receivers] if isinstance(receivers, slice) \
                else torch.tensor(receivers)
            k = kept[:, idx].T.float()  # [len, S]
            if not changed_only:
                return torch.ones(len(idx), self.n, self.t, dtype=torch.bool)
            x = (k @ flat.float() > 0).view(len(idx), self.n, self.t)
            x |= (idx == receiver)[:, None, None] & first
            return x

        dd = s.d * s.d_head
        for layer in range(start, g.n_layers):
            q = inputs(slice(g.q_start[layer], g.q_start[layer] + g.n_heads))
            k = inputs(slice(g.k_start[layer], g.k_start[layer] + g.n_kv_heads))
            v = inputs(slice(g.v_start[layer], g.v_start[layer] + g.n_kv_heads))
            heads = slice(g.head_start[layer], g.head_start[layer] + g.n_heads)
            nd = need_node[heads]  # [H, N, T]
            nd_kv = need_recv[g.k_start[layer]: g.k_start[layer] + g.n_kv_heads]
            macs["proj"] += dd * (int((q & nd).sum()) + int((k & nd_kv).sum())
                                  + int((v & nd_kv).sum()))
            seen = self.vis[layer].sum(1)  # [T] keys each query row sees
            k_rows = self._spread(k[self.group], layer)  # [H, N, T] changed keys seen
            v_rows = self._spread(v[self.group], layer)
            scores = torch.where(q, seen, k_rows)
            weights = q | (k_rows > 0)
            mixed = torch.where(weights, seen, v_rows)
            macs["attn"] += s.d_head * float(((scores + mixed) * nd).sum())
            changed = weights | (v_rows > 0)
            out[heads] = changed
            macs["proj"] += dd * int((changed & nd).sum())
            mr, m = g.mlp_receiver[layer], g.mlp_index[layer]
            if mr is not None:
                x = inputs([mr])[0]
                out[m] = x
                macs["mlp"] += s.mlp_row * int((x & need_node[m]).sum())
        x = inputs([g.n_receivers - 1])[0]
        macs["unembed"] += s.d * s.vocab * int((x & self.metric).sum())
        return macs


def record_run(engine: Any, data: Any, tau: float) -> tuple[list[dict[str, Any]], Any, float]:
    """One ACDC exact-mode run (KL, ``tau``) with every test recorded in order: the circuit
    state before it, what it removes and the decision. Reads the sequence by wrapping the
    private ``_Run._decide`` (called once per test, in the sequential order, with the true
    state) for the duration of the run; nothing in the package changes.

    Returns:
        ``(tests, circuit, cpu_seconds)``; each test ``{"kind", "receiver", "sender",
        "kept_before" [S, R] bool, "removed"}``.
    """
    from circuitfind.algorithms import ACDC
    from circuitfind.algorithms import acdc as acdc_module

    tests: list[dict[str, Any]] = []
    decide = acdc_module._Run._decide

    def recording(self: Any, item: Any, value: float) -> bool:
        before = self.state["kept"].clone()
        removed = decide(self, item, value)
        tests.append({"kind": item.kind, "receiver": item.receiver, "sender": item.sender,
                      "kept_before": before, "removed": removed})
        return removed

    acdc_module._Run._decide = recording  # type: ignore[method-assign]
    try:
        start = time.process_time()
        circuit = ACDC(threshold=tau, progress=False).discover(engine, data)
        seconds = time.process_time() - start
    finally:
        acdc_module._Run._decide = decide  # type: ignore[method-assign]
    return tests, circuit, seconds


def floors(floor: Floor, tests: list[dict[str, Any]], unit: float,
           layers: int) -> dict[str, Any]:
    """Mean floor per test in forwards, overall, by part and by start layer, and the mean
    resume floor (``Floor.test(..., changed_only=False)``)."""
    per_test, by_layer = [], {}
    parts = {"proj": 0.0, "attn": 0.0, "mlp": 0.0, "unembed": 0.0}
    for t in tests:
        m = floor.test(t["kept_before"], t["receiver"], t["sender"])
        resume = sum(floor.test(t["kept_before"], t["receiver"], t["sender"],
                                changed_only=False).values()) / unit
        total = sum(m.values()) / unit
        per_test.append((total, resume))
        for key, value in m.items():
            parts[key] += value / unit
        layer = floor.g.receivers[t["receiver"]].layer
        by_layer.setdefault(layer, []).append((total, resume))
    n = max(1, len(tests))
    return {"tests": len(tests), "mean": sum(v[0] for v in per_test) / n,
            "resume": sum(v[1] for v in per_test) / n,
            "parts": {k: v / n for k, v in parts.items()},
            "by_layer": {str(layer): {"tests": len(v), "mean": sum(x[0] for x in v) / len(v),
                                      "resume": sum(x[1] for x in v) / len(v)}
                         for layer, v in sorted(by_layer.items())}}


def peak_macs_per_s(size: int = 512, repeats: int = 9) -> float:
    """This thread's matmul peak: MACs per CPU second of a ``size^3`` float32 matmul (median)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        times.append(time.process_time() - start)
    return size ** 3 / statistics.median(times)


def hf_unit(plain: Any, shape: Shape, data: Any, layers: int) -> dict[str, float]:
    """One HF forward's MACs: FlopCounterMode's count, plus the attention products its CPU SDPA
    kernel does not count (checked: the analytic dense count must equal it)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        plain(data.clean)
    counted = counter.get_total_flops() / 2
    n, t = data.clean.shape
    dense = dense_macs(shape, n, t, layers)
    attn = 2 * layers * n * shape.n_heads * t * t * shape.d_head
    if not math.isclose(counted, dense) and not math.isclose(counted + attn, dense):
        raise RuntimeError(f"the floor's shape model ({dense:.0f} MACs) does not match "
                           f"FlopCounterMode's count of the HF forward ({counted:.0f})")
    return {"flop_counter": counted, "unit": dense}


def sparse_tau(engine: Any, data: Any, target: float, tau: float,
               tries: int) -> dict[str, Any]:
    """Sensitivity check: raise tau (geometric bisection, at most ``tries`` runs) until the
    circuit keeps about ``target`` of the edges. Returns the searched runs and, of the closest
    run, its tau, kept fraction, recorded tests (:func:`record_run`), kept edges and CPU seconds."""
    g = engine.graph
    lo, hi, best = tau, None, None
    runs = []
    current = tau * 10
    for _ in range(tries):
        tests, circuit, seconds = record_run(engine, data, current)
        frac = circuit.n_edges / g.n_edges
        runs.append({"tau": current, "kept": circuit.n_edges, "fraction": frac,
                     "tests": len(tests)})
        if best is None or abs(math.log(frac / target)) < abs(math.log(best[1] / target)):
            best = (current, frac, tests, circuit, seconds)
        if abs(math.log(frac / target)) < math.log(1.3):
            break
        if frac > target:
            lo = current
        else:
            hi = current
        current = current * 10 if hi is None else math.sqrt(lo * hi)
    if best is None:
        raise ValueError(f"--tries must be >= 1; got {tries}.")
    return {"runs": runs, "tau": best[0], "fraction": best[1], "tests": best[2],
            "kept": best[3].n_edges, "seconds": best[4]}


def measure(family: str, rounds: int, tau: float, tmp: Path,
            sparse_target: float | None, tries: int) -> dict[str, Any]:
    """The floor and the measured cost of one family."""
    from transformers import AutoModelForCausalLM

    measured = measure_acdc(family, rounds, 7, tau, tmp / "timed")
    _, engine, data = family_setup(family, tmp)
    g = engine.graph
    plain = AutoModelForCausalLM.from_pretrained(str(tmp / family), dtype=torch.float32).eval()
    shape = shape_of(plain, engine.runner.arch, g.n_layers)
    unit = hf_unit(plain, shape, data, g.n_layers)
    metric = torch.zeros(data.clean.shape, dtype=torch.bool)
    metric.scatter_(1, data.positions, True)
    floor = Floor(g, shape, sender_change(g, data.clean, data.corrupted), metric)
    engine.evaluate(data, g.full_mask())
    tests, circuit, seconds = record_run(engine, data, tau)
    if (len(tests), circuit.n_edges) != (measured["tests"], measured["kept"]):
        raise RuntimeError(f"{family}: the recorded run ({len(tests)} tests, {circuit.n_edges} "
                           f"kept) is not the timed one ({measured['tests']}, "
                           f"{measured['kept']})")
    result = floors(floor, tests, unit["unit"], g.n_layers)
    hf_s = measured["runs"][-1]["hf_forward_s"]
    by_start = measured["by_start_layer"]
    for layer, row in result["by_layer"].items():
        passes = by_start.get(layer)
        row["measured"] = None if passes is None else passes["seconds"] / row["tests"] / hf_s
    out = {"family": family, "n_edges": g.n_edges, "kept": circuit.n_edges,
           "kept_fraction": circuit.n_edges / g.n_edges, "unit_macs": unit,
           "hf_forward_s": hf_s, "measured_per_test": measured["per_test_hf"],
           "measured_rounds": measured["per_test_hf_rounds"],
           "recorded_run_per_test": seconds / len(tests) / hf_s,
           "floor": result, "ratio": measured["per_test_hf"] / result["mean"],
           "hf_macs_per_s": unit["unit"] / hf_s}
    if sparse_target is not None and family != "gpt2":
        sparse = sparse_tau(engine, data, sparse_target, tau, tries)
        sparse["floor"] = floors(floor, sparse.pop("tests"), unit["unit"], g.n_layers)
        sparse["per_test"] = sparse.pop("seconds") / sparse["floor"]["tests"] / hf_s
        out["sparse"] = sparse
    return out


def markdown(result: dict[str, Any]) -> str:
    """The floor tables."""
    fams = result["families"]
    layers = result["n_layers"]
    peak = result["peak_macs_per_s"]
    lines = [
        "# ACDC exact mode: the work floor per test (issue 17)", "",
        f"{result['date']}, commit {result['commit']}, {result['machine']}; load average "
        f"{result['load_before']} before, {result['load_after']} after. bench_families' models "
        "and batch (6 layers, d_model 256, 8 heads, 4 k/v heads for grouped-query families, "
        f"8 x 16 tokens), ACDC exact mode, KL, tau {result['tau']}, one thread.", "",
        "Floor: for each test of the real run, in its order, the matmul MACs (projections, "
        "attention scores and weighted sums, MLPs, unembedding) an exact implementation must "
        "spend with every value of the circuit before the test memoised for free: the tested "
        "receiver's node and every node with a kept path from it, at the rows that change and "
        "are read downstream (metric positions at the end; sliding windows honoured). Unit: one "
        "HF forward's MACs (FlopCounterMode, plus the dense attention products its CPU SDPA "
        "does not count). Measured: ACDC's CPU seconds per test / HF forward, median of "
        f"{result['rounds']} interleaved rounds (`bench_acdc_families.measure`). Elementwise work, "
        "wasted speculative masks and per-pass fixed costs are not in the floor.", "",
        "| family | edges | kept (%) | tests | floor / test | proj | attn | MLP | unembed "
        "| resume floor / test | measured / test | rounds | measured / floor "
        "| 0.3 / floor | 0.3 / resume floor | floor at HF speed (ms) "
        "| at matmul peak (forwards) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in fams:
        f = r["floor"]
        p = f["parts"]
        at_peak = f["mean"] * r["hf_macs_per_s"] / peak
        lines.append(
            f"| {r['family']} | {r['n_edges']} | {r['kept']} ({100 * r['kept_fraction']:.1f}) "
            f"| {f['tests']} | **{f['mean']:.3f}** | {p['proj']:.3f} | {p['attn']:.4f} "
            f"| {p['mlp']:.3f} | {p['unembed']:.3f} | {f['resume']:.3f} "
            f"| {r['measured_per_test']:.3f} "
            f"| {', '.join(f'{v:.3f}' for v in r['measured_rounds'])} "
            f"| {r['ratio']:.1f}x | {TARGET / f['mean']:.1f}x | {TARGET / f['resume']:.1f}x "
            f"| {1000 * f['mean'] * r['hf_forward_s']:.2f} "
            f"| {at_peak:.3f} |")
    lines += [
        "", "`0.3 / floor`: how many times its MAC floor an implementation may spend and still "
        "meet the target (GPT-2 and GPT-NeoX meet it today at `measured / floor`).", "",
        "HF forward speed per MAC vs the thread's matmul peak (512^3 float32 matmul, "
        f"{peak / 1e9:.1f} GMAC/s): " + ", ".join(
            f"{r['family']} {r['hf_macs_per_s'] / 1e9:.1f} GMAC/s "
            f"({100 * r['hf_macs_per_s'] / peak:.0f}%)" for r in fams) + ". "
        "`floor at HF speed` = floor MACs x HF's seconds per MAC; `at matmul peak` = the "
        "floor's MACs at the peak rate, in HF forwards (a strict lower bound on time; the "
        "floor's small per-head and per-row products run below HF's rate, not above it).", "",
        "By start layer (the tested receiver's layer; 6 = logits): tests, floor per test, "
        "resume floor per test, measured per test (the masked passes' CPU time from that layer, last round, / tests "
        "from that layer / HF forward; passes only, about 90% of the run).", "",
        "| family | " + " | ".join(f"start {i}" for i in range(layers + 1)) + " |",
        "|---|" + "---:|" * (layers + 1)]
    for r in fams:
        cells = []
        for i in range(layers + 1):
            b = r["floor"]["by_layer"].get(str(i))
            if b is None:
                cells.append("")
                continue
            m = "" if b["measured"] is None else f", {b['measured']:.2f}"
            cells.append(f"{b['tests']}, {b['mean']:.3f}, {b['resume']:.3f}{m}")
        lines.append(f"| {r['family']} | " + " | ".join(cells) + " |")
    sparse = [r for r in fams if "sparse" in r]
    if sparse:
        target = result["sparse_target"]
        lines += [
            "", "## Sensitivity check (not the target's setting): a sparser circuit", "",
            f"Each family rerun at the tau (searched, at most {result['tries']} runs) whose "
            f"circuit keeps about GPT-2's edge fraction at tau {result['tau']} "
            f"({100 * target:.1f}%). Measured: the recording run's CPU time per test (one run, "
            "not interleaved).", "",
            "| family | tau | kept (%) | tests | floor / test | resume floor / test "
            "| measured / test | floor by start layer (tests, floor) |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in sparse:
            s = r["sparse"]
            by = "; ".join(f"{k}: {v['tests']}, {v['mean']:.3f}"
                           for k, v in s["floor"]["by_layer"].items())
            lines.append(f"| {r['family']} | {s['tau']:.3g} | {s['kept']} "
                         f"({100 * s['fraction']:.1f}) | {s['floor']['tests']} "
                         f"| **{s['floor']['mean']:.3f}** | {s['floor']['resume']:.3f} "
                         f"| {s['per_test']:.3f} | {by} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tau", type=float, default=1e-3)
    parser.add_argument("--no-sparse", action="store_true",
                        help="skip the sensitivity check at GPT-2's edge fraction")
    parser.add_argument("--sparse-fraction", type=float, default=None,
                        help="kept edge fraction of the sensitivity check (default: GPT-2's "
                             "at --tau, measured first)")
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/acdc_floor")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render OUT.md from OUT.json without measuring")
    args = parser.parse_args()
    if args.report_only:
        write_results(args.out, json.loads(Path(args.out).with_suffix(".json").read_text()),
                      markdown)
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    commit = git("rev-parse", "--short", "HEAD")
    load_before = load_average()
    families = list(args.families)
    if not args.no_sparse and args.sparse_fraction is None and "gpt2" not in families:
        families.insert(0, "gpt2")  # the sparse check's target fraction
    results = []
    target = args.sparse_fraction
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            print(f"{utc_now()} {family}", file=sys.stderr, flush=True)
            if family == "gpt2" or args.no_sparse:
                results.append(measure(family, args.rounds, args.tau, Path(tmp), None, 0))
                if family == "gpt2" and target is None:
                    target = results[-1]["kept_fraction"]
            else:
                results.append(measure(family, args.rounds, args.tau, Path(tmp), target,
                                       args.tries))
    result = {"families": results, "rounds": args.rounds, "tau": args.tau,
              "n_layers": 6, "sparse_target": target, "tries": args.tries,
              "peak_macs_per_s": peak_macs_per_s(), "commit": commit, "date": utc_now(),
              "load_before": load_before, "load_after": load_average(),
              "machine": machine()}
    write_results(args.out, result, markdown)


if __name__ == "__main__":
    main()
