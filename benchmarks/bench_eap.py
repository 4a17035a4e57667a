"""Speed and memory of edge attribution patching (EAP) against the bare passes it needs.

EAP (``PatchingEngine.edge_attribution``) scores every edge of the graph from one corrupted
forward pass (caching every sender's output) and one clean forward + backward pass (backward
hooks accumulate ``(a'_u - a_u) . d metric / d x_r`` per receiver group). Its floor is the same
three passes without any patching hooks. This script times, on a random GPT-2-small-shaped model
(12 layers, 12 heads, d_model 768, vocab 50257; the weights do not matter for speed):

``eap``
    ``engine.edge_attribution(data)`` on a fresh corrupted tensor each call (so the engine's
    memo of corrupted sender outputs never hits and the corrupted forward is always paid).
``bare``
    Corrupted forward (no grad) + clean forward + backward of the same metric, with the model's
    patching switches on (split q/k/v inputs, per-head results, MLP-input hooks), parameters
    frozen and the residual stream entering block 0 made a leaf that requires grad, exactly as
    the engine does (that leaf is the one hook this baseline installs).
``bare_plain``
    As ``bare`` with the three switches off (a plain, Hugging-Face-like forward): what the
    switches alone cost.
``hf_floor`` / ``hf_forward``
    The same three passes (activation gradients only: frozen parameters, input embeddings a
    leaf) / a no-grad clean forward on a separately loaded plain Hugging Face model with the same
    weights: issue 7's floor for EAP (target ``eap / hf_floor <= 1.15``).
``masked_forward``
    ``engine.run(data, mask)`` with a random keep-mask (half the edges removed), a new one per
    call; the corrupted sender outputs are cached by the engine, as in a search that evaluates
    many masks.
``forward`` / ``forward_plain``
    A bare no-grad clean forward with the switches on / off.

Every phase runs once as a warm-up, then ``--repeats`` rounds that time each phase once, in
rotating order (so slow drift from other processes hits every phase alike); the table reports
medians and the ratios of medians. Peak memory is measured per phase in a fresh subprocess,
because torch on CPU has no ``max_memory_allocated``: after paging in the (memory-mapped)
weights and one warm-up call, the freed heap is returned to the OS (``malloc_trim``) and the
resident set size is sampled every millisecond during a call; the figure is the peak minus the
size just before the call (the larger of two calls). It counts what the phase allocates,
including autograd's saved activations, and excludes the model's weights.

Usage::

    python benchmarks/bench_eap.py [--repeats 5] [--threads 1] \
        [--out benchmarks/results/eap_speed.json] [--profile]

Writes the raw numbers to ``--out`` and a Markdown table next to it (same name, ``.md``).
``--profile`` also prints torch.profiler and cProfile tables of one EAP call and one bare call.
The script measures and reports; it asserts nothing about times.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import dataclasses
import gc
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from circuitfind.patching.engine import frozen_parameters

PHASES = ("eap", "bare", "bare_plain", "hf_floor", "masked_forward", "forward", "forward_plain",
          "hf_forward")
SWITCHES = ("set_use_split_qkv_input", "set_use_attn_result", "set_use_hook_mlp_in")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "eap_speed.json"


# ---------------------------------------------------------------------- set-up
def make_model_dir(path: Path, seed: int = 0) -> Path:
    """Save a random GPT-2-small-shaped model and a 50257-word tokenizer to ``path``."""
    from circuitfind.testing.tiny import make_tiny_model_dir

    return make_tiny_model_dir(path, arch="gpt2", n_layers=12, n_heads=12, d_model=768,
                               vocab_size=50257, n_ctx=1024, seed=seed)


@dataclasses.dataclass
class Bench:
    """The model, engine and data every phase shares, and the seeded generator of
    ``masked_forward``'s random masks."""

    model: Any
    engine: Any
    data: Any
    gen: torch.Generator
    plain: Any = None  # the same weights as a plain Hugging Face model (no bridge components)
    keep_alive: list[Any] = dataclasses.field(default_factory=list)

    def set_switches(self, on: bool) -> None:
        for setter in SWITCHES:
            getattr(self.model, setter)(on)

    @contextlib.contextmanager
    def switches(self, on: bool) -> Iterator[None]:
        self.set_switches(on)
        try:
            yield
        finally:
            self.set_switches(True)  # the engine's state

    def fresh_data(self) -> Any:
        """``data`` with a new corrupted tensor, so the engine's corrupted-output memo misses.

        The copies are kept alive so that no new tensor can reuse an old one's ``id``.
        """
        data = dataclasses.replace(self.data, corrupted=self.data.corrupted.clone())
        self.keep_alive.append(data)
        return data


def set_up(model_dir: Path, batch: int, seq_len: int, threads: int, seed: int = 0) -> Bench:
    import circuitfind
    from circuitfind.patching.engine import PatchingEngine
    from circuitfind.testing.tiny import ToyTask

    torch.set_num_threads(threads)
    model = circuitfind.load_model(model_dir, device="cpu")
    engine = PatchingEngine(model)
    data = ToyTask(seq_len=seq_len).build(model.tokenizer, batch, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    return Bench(model, engine, data, gen, plain)


# ---------------------------------------------------------------------- the phases
def bare_passes(b: Bench) -> None:
    """Corrupted forward + clean forward + backward of the mean metric, no patching hooks."""
    model, data = b.model, b.data
    with torch.no_grad():
        model(data.corrupted)

    def make_leaf(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x.detach().requires_grad_(True)

    with frozen_parameters(model), torch.enable_grad(), model.hooks(
            fwd_hooks=[(b.engine.table.input, make_leaf)], reset_hooks_end=True):
        logits = model(data.clean)
        pos = data.positions
        idx = pos[:, :, None].expand(data.n, pos.shape[1], logits.shape[-1])
        metric = data.metric(logits.gather(1, idx)).sum() / data.n
        metric.backward()


def hf_floor_passes(b: Bench) -> None:
    """EAP's physical floor in plain Hugging Face: corrupted forward (no grad) + clean forward +
    backward for activation gradients only (frozen parameters, input embeddings a leaf)."""
    plain, data = b.plain, b.data
    with torch.no_grad():
        plain(data.corrupted)
    embeds = plain.get_input_embeddings()(data.clean).detach().requires_grad_(True)
    logits = plain(inputs_embeds=embeds).logits
    idx = data.positions[:, :, None].expand(data.n, data.positions.shape[1], logits.shape[-1])
    (data.metric(logits.gather(1, idx)).sum() / data.n).backward()


def phase_fns(b: Bench) -> dict[str, Callable[[], Any]]:
    def eap() -> Any:
        return b.engine.edge_attribution(b.fresh_data())

    def bare() -> None:
        bare_passes(b)

    def bare_plain() -> None:
        with b.switches(False):
            bare_passes(b)

    def masked_forward() -> Any:
        # a fresh random circuit each call (a repeated one would be served by the runner's
        # memo of the previous pass)
        mask = (torch.rand(b.engine.graph.edge_mask.shape, generator=b.gen) < 0.5).float()
        return b.engine.run(b.data, mask)

    @torch.no_grad()
    def forward() -> Any:
        return b.model(b.data.clean)

    @torch.no_grad()
    def forward_plain() -> Any:
        with b.switches(False):
            return b.model(b.data.clean)

    def hf_floor() -> None:
        hf_floor_passes(b)

    @torch.no_grad()
    def hf_forward() -> Any:
        return b.plain(b.data.clean)

    return {"eap": eap, "bare": bare, "bare_plain": bare_plain, "hf_floor": hf_floor,
            "masked_forward": masked_forward, "forward": forward, "forward_plain": forward_plain,
            "hf_forward": hf_forward}


def prepare(b: Bench, name: str) -> None:
    """Untimed set-up before a phase: ``masked_forward`` gets the engine's corrupted cache.

    ``eap`` replaces the engine's memo of corrupted sender outputs with its fresh data, so
    without this a ``masked_forward`` after an ``eap`` would pay a corrupted forward too.
    """
    if name == "masked_forward":
        b.engine.corrupted_outputs(b.data)


def time_phases(b: Bench, repeats: int) -> dict[str, list[float]]:
    """Warm up every phase, then time each once per round in rotating order (seconds)."""
    fns = phase_fns(b)
    for name in PHASES:
        prepare(b, name)
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in PHASES}
    for r in range(repeats):
        order = PHASES[r % len(PHASES):] + PHASES[: r % len(PHASES)]
        for name in order:
            prepare(b, name)
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{repeats}: "
              + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    return times


# ---------------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_delta(fn: Callable[[], Any], interval: float = 0.001) -> int:
    """Peak resident set size during ``fn()`` minus the size just before it (bytes)."""
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss())
    return peak[0] - base


def memory_child(args: argparse.Namespace) -> None:
    """Subprocess entry: measure one phase's peak memory after loading the model."""
    b = set_up(Path(args.model_dir), args.batch, args.seq_len, args.threads)
    fn = phase_fns(b)[args.memory_phase]
    with torch.no_grad():  # page in the memory-mapped weights: not the phase's memory
        for p in b.model.parameters():
            float(p.sum())
    prepare(b, args.memory_phase)
    fn()  # warm-up: one-time allocations
    deltas = []
    for _ in range(2):
        prepare(b, args.memory_phase)
        gc.collect()
        _malloc_trim()  # hand freed heap back to the OS so that reuse does not hide the peak
        deltas.append(peak_rss_delta(fn))
    print(json.dumps({"phase": args.memory_phase, "peak_rss_delta": max(deltas)}))


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_memory(args: argparse.Namespace, model_dir: Path) -> dict[str, int]:
    out = {}
    for name in PHASES:
        cmd = [sys.executable, __file__, "--memory-phase", name, "--model-dir", str(model_dir),
               "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_delta"]
        print(f"memory {name}: {out[name] / 2**20:.0f} MiB", flush=True)
    return out


# ---------------------------------------------------------------------- profiling
def profile(b: Bench) -> tuple[str, dict[str, Any]]:
    """torch.profiler and cProfile of one EAP call and one bare call.

    Returns:
        The printable tables, and a summary: per phase, the self CPU time (ms) of the aten ops
        and the cumulative time (ms) of every function in ``circuitfind/patching/engine.py``.
    """
    fns = phase_fns(b)
    parts, summary = [], {}
    for name in ("eap", "bare"):
        fns[name]()  # warm
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fns[name]()
        averages = prof.key_averages()
        parts.append(f"== torch.profiler: {name} ==\n"
                     + averages.table(sort_by="self_cpu_time_total", row_limit=25))
        pr = cProfile.Profile()
        pr.enable()
        fns[name]()
        pr.disable()
        s = io.StringIO()
        stats = pstats.Stats(pr, stream=s)
        stats.sort_stats("cumulative").print_stats(30)
        parts.append(f"== cProfile: {name} ==\n{s.getvalue()}")
        engine_ms: dict[str, float] = {}
        for (file, line, func), row in stats.stats.items():  # type: ignore[attr-defined]
            if file.endswith("patching/engine.py"):
                key = f"{func}:{line}"
                engine_ms[key] = engine_ms.get(key, 0.0) + row[3] * 1e3
        summary[name] = {
            "aten_self_ms": {e.key: e.self_cpu_time_total / 1e3 for e in averages
                             if e.key.startswith("aten::") and e.self_cpu_time_total > 0},
            "engine_cumulative_ms": engine_ms,
        }
    return "\n".join(parts), summary


# ---------------------------------------------------------------------- report
def machine_info(threads: int) -> dict[str, Any]:
    import transformers

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "load_average": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def summarise(times: dict[str, list[float]]) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_s": med,
        "min_s": {k: min(v) for k, v in times.items()},
        "ratios": {
            "eap / bare": med["eap"] / med["bare"],
            "eap / bare_plain": med["eap"] / med["bare_plain"],
            "eap / hf_floor": med["eap"] / med["hf_floor"],
            "masked_forward / hf_forward": med["masked_forward"] / med["hf_forward"],
            "bare / bare_plain": med["bare"] / med["bare_plain"],
            "masked_forward / forward": med["masked_forward"] / med["forward"],
            "masked_forward / forward_plain": med["masked_forward"] / med["forward_plain"],
            "forward / forward_plain": med["forward"] / med["forward_plain"],
        },
    }


def markdown(result: dict[str, Any]) -> str:
    m, s, cfg = result["machine"], result["summary"], result["config"]
    mem = result.get("peak_rss_delta_bytes", {})
    what = {
        "eap": "`edge_attribution` (corrupted fwd with sender cache + clean fwd + bwd; on the block runner where the model has one)",
        "bare": "corrupted fwd + clean fwd + bwd, switches on, frozen params, leaf input",
        "bare_plain": "as `bare`, switches off (plain forward)",
        "hf_floor": "plain Hugging Face model: corrupted fwd + clean fwd + bwd (activation grads)",
        "hf_forward": "plain Hugging Face model: no-grad clean forward",
        "masked_forward": "`engine.run` with a new random mask each call, half the edges "
                          "removed (corrupted outputs cached)",
        "forward": "no-grad clean forward, switches on",
        "forward_plain": "no-grad clean forward, switches off",
    }
    lines = [
        "# EAP speed: GPT-2-small-shaped random model on CPU",
        "",
        f"Written by `benchmarks/bench_eap.py` on {m['date']}. Model: random `GPT2LMHeadModel` "
        f"(12 layers, 12 heads, d_model 768, vocab 50257), {result['graph']['n_edges']} edges "
        f"({result['graph']['n_senders']} senders x {result['graph']['n_receivers']} receivers); "
        f"batch {cfg['batch']}, {cfg['tokens']} tokens (BOS + {cfg['seq_len']}), float32.",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with "
        f"{m['torch_threads']} thread(s), transformers {m['transformers']}, Python {m['python']}; "
        f"load average at the start {m['load_average'][0]:.2f}. "
        f"Times are medians over {cfg['repeats']} rounds after one warm-up round. Memory is the "
        "peak resident set size during one warm call minus the size just before it (fresh "
        "process per phase, weights paged in beforehand, freed heap trimmed): what the phase "
        "allocates, weights excluded.",
        "",
        "| phase | what | median (s) | min (s) | peak extra RSS (MiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for name in PHASES:
        mib = f"{mem[name] / 2**20:.0f}" if name in mem else "-"
        lines.append(f"| `{name}` | {what[name]} | {s['median_s'][name]:.3f} | "
                     f"{s['min_s'][name]:.3f} | {mib} |")
    lines += ["", "| ratio of medians | value |", "|---|---:|"]
    for key, value in s["ratios"].items():
        lines.append(f"| {key} | {value:.2f}x |")
    lines += ["", f"Target: eap / bare <= 1.3x. Measured: {s['ratios']['eap / bare']:.2f}x. "
              f"Issue 7's target: eap / hf_floor <= 1.15x. Measured: "
              f"{s['ratios']['eap / hf_floor']:.2f}x.", ""]
    if "profile" in result:
        lines += profile_markdown(result["profile"])
    return "\n".join(lines)


def profile_markdown(prof: dict[str, Any], top: int = 8) -> list[str]:
    eap, bare = prof["eap"]["aten_self_ms"], prof["bare"]["aten_self_ms"]
    ops = sorted(set(eap) | set(bare), key=lambda k: -max(eap.get(k, 0.0), bare.get(k, 0.0)))
    lines = ["## Profile of one call (torch.profiler, self CPU time)", "",
             "| aten op | eap (ms) | bare (ms) | eap - bare (ms) |", "|---|---:|---:|---:|"]
    for op in ops[:top]:
        e, b = eap.get(op, 0.0), bare.get(op, 0.0)
        lines.append(f"| `{op}` | {e:.0f} | {b:.0f} | {e - b:+.0f} |")
    lines.append(f"| all aten ops | {sum(eap.values()):.0f} | {sum(bare.values()):.0f} | "
                 f"{sum(eap.values()) - sum(bare.values()):+.0f} |")
    engine = sorted(prof["eap"]["engine_cumulative_ms"].items(), key=lambda kv: -kv[1])
    lines += ["", "Cumulative time in `circuitfind/patching/engine.py` functions during `eap` "
              "(cProfile; nested calls are counted in their callers too):", "",
              "| function:line | ms |", "|---|---:|"]
    lines += [f"| `{k}` | {v:.0f} |" for k, v in engine[:top]]
    return lines + [""]


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--batch", type=int, default=8, help="examples (default 8)")
    p.add_argument("--seq-len", type=int, default=15, help="tokens after BOS (default 15)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="JSON of raw numbers; the Markdown table goes next to it (.md)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="reuse a model directory saved by an earlier run (default: a temp dir)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler and cProfile tables of one EAP and one bare call")
    p.add_argument("--memory-phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.batch < 1 or args.seq_len < 1:
        p.error("--repeats, --threads, --batch and --seq-len must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_phase is not None:
        memory_child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_eap_") as tmp:
        model_dir = args.model_dir
        if model_dir is None or not (model_dir / "config.json").is_file():
            model_dir = make_model_dir(model_dir or Path(tmp) / "gpt2-random")
        b = set_up(model_dir, args.batch, args.seq_len, args.threads)
        g = b.engine.graph
        result: dict[str, Any] = {
            "machine": machine_info(args.threads),
            "config": {"batch": args.batch, "seq_len": args.seq_len,
                       "tokens": b.data.seq_len, "repeats": args.repeats},
            "graph": {"n_senders": g.n_senders, "n_receivers": g.n_receivers,
                      "n_edges": int(g.edge_mask.sum())},
        }
        times = time_phases(b, args.repeats)
        result["times_s"] = times
        result["summary"] = summarise(times)
        if args.profile:
            text, result["profile"] = profile(b)
            print(text)
        del b
        if not args.no_memory:
            result["peak_rss_delta_bytes"] = measure_memory(args, model_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
