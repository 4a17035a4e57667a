"""Where the time of a plain Hugging Face forward and of an EAP / EAP-IG run goes, op by op.

One process, one torch thread: a random model of ``SHAPE`` (the shapes of ``bench_scale.py``;
``--layers`` keeps the first L) in ``DTYPE``, ``--batch`` x ``--seq-len`` tokens, an optional
``--memory`` budget (long prompts: the checkpointed pass). It runs the plain forward once to
warm up and once under :mod:`torch.profiler`, then the algorithm once (cold, not profiled)
and once more under the profiler, and prints each profile's operators by self CPU time
(their share of the total) with the matmul FLOPs the profiler counts, grouped by the dtype
of their inputs (``--group dtype``). The notes in ``scale.md`` on where the time model's
gap comes from rest on it. Measures and prints; asserts nothing.

Usage (from the repository root)::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/scale_time_profile.py SHAPE \
        [--layers L] [--dtype bfloat16] [--algorithm eap_ig] [--batch 8] [--seq-len 32] \
        [--memory 6GiB] [--model-root DIR] [--top 25]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale  # noqa: E402


def summarise(prof, top: int) -> dict:
    """Self CPU seconds per (op, input dtypes) and per op, the largest first."""
    by_op: dict[str, float] = defaultdict(float)
    by_dtype: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages(group_by_input_shape=False):
        by_op[ev.key] += ev.self_cpu_time_total / 1e6
        if ev.flops:
            flops[ev.key] += ev.flops
    total = sum(by_op.values())
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {"total_s": round(total, 3),
            "ops": [(k, round(v, 3), round(v / total, 3),
                     round(flops.get(k, 0) / 1e9, 2)) for k, v in ops]}


def by_input_dtype(prof, names: tuple[str, ...]) -> dict:
    """Self CPU seconds of the matmul-like ops ``names`` by their inputs' dtypes."""
    out: dict[str, float] = defaultdict(float)
    gflop: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.name in names:
            key = f"{ev.name}[{','.join(sorted({t for t in ev.input_type if t}))}]" \
                if hasattr(ev, "input_type") else ev.name
            out[key] += ev.self_cpu_time_total / 1e6
            gflop[key] += (ev.flops or 0) / 1e9
    return {k: (round(v, 3), round(gflop[k], 2)) for k, v in sorted(out.items(),
                                                                     key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(bench_scale.SHAPES))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--algorithm", default="eap", choices=("eap", "eap_ig"))
    parser.add_argument("--batch", type=int, default=bench_scale.BATCH)
    parser.add_argument("--seq-len", type=int, default=bench_scale.SEQ_LEN)
    parser.add_argument("--memory", default=None)
    parser.add_argument("--model-root", default=None)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-algorithm", action="store_true")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    import circuitfind as cf
    from circuitfind.testing.tiny import ToyTask

    name = bench_scale.cut_shape(args.shape, args.layers) if args.layers else args.shape
    root = Path(args.model_root or tempfile.mkdtemp(prefix="cf-prof-"))
    path = bench_scale.model_dir(root, name, args.dtype)
    model = cf.load_model(str(path), device="cpu", dtype=args.dtype)
    data = ToyTask(seq_len=args.seq_len - 1).build(model.tokenizer, args.batch, seed=0)
    plain = model.original_model
    matmuls = ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear",
               "aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
    report: dict = {"shape": name, "dtype": args.dtype, "algorithm": args.algorithm,
                    "batch": args.batch, "seq_len": args.seq_len,
                    "attn_implementation": getattr(plain.config, "_attn_implementation", None)}
    with torch.no_grad():
        plain(data.clean)
        t0 = time.thread_time()
        plain(data.clean)
        report["forward_s"] = round(time.thread_time() - t0, 3)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                     with_flops=True) as prof:
            plain(data.clean)
    report["forward"] = summarise(prof, args.top)
    report["forward_matmul_dtypes"] = by_input_dtype(prof, matmuls)
    if not args.no_algorithm:
        params = bench_scale.ALGORITHMS[args.algorithm]
        algo = cf.get_algorithm(args.algorithm, **params)
        engine = cf.PatchingEngine(model, memory_budget=args.memory)
        t0 = time.thread_time()
        algo.score(engine, data)
        report["cold_s"] = round(time.thread_time() - t0, 3)
        t0 = time.thread_time()
        algo.score(engine, data)
        report["warm_s"] = round(time.thread_time() - t0, 3)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                     with_flops=True) as prof:
            algo.score(engine, data)
        report["run"] = summarise(prof, args.top)
        report["run_matmul_dtypes"] = by_input_dtype(prof, matmuls)
        plan = cf.plan(str(path), None, args.algorithm, examples=args.batch,
                       seq_len=args.seq_len, dtype=args.dtype, algorithm_params=params,
                       memory=args.memory)
        report["plan"] = plan.forward_units
        report["plan_passes"] = plan.passes
        report["cold_units"] = round(report["cold_s"] / report["forward_s"], 3)
        report["warm_units"] = round(report["warm_s"] / report["forward_s"], 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
