"""Where EAP / EAP-IG time goes on a public shape cut to a few layers, next to the plan.

One process, one torch thread, main-thread CPU time: a random model of ``SHAPE`` (the
shapes of ``bench_scale.py``) with ``LAYERS`` layers in ``DTYPE``, batch 8 x 32 tokens; the
plain Hugging Face forward (median of 3, the unit), then the algorithm three ways: the first
run in the process (``cold``: the engine's set-up and first-touch allocations included), the
same engine again (``warm``) and a fresh engine on the loaded model (``fresh_engine``), and
the time inside the score contraction (:func:`circuitfind.patching.attribution.matmul_nt`) of
the warm run; beside :func:`circuitfind.plan`'s prediction. The numbers in ``scale.md``'s
notes come from it. Measures and prints; asserts nothing.

Usage (from the repository root)::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/scale_time_split.py \
        SHAPE LAYERS [--dtype bfloat16] [--algorithm eap_ig] [--model-root DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(bench_scale.SHAPES))
    parser.add_argument("layers", type=int)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--algorithm", default="eap", choices=("eap", "eap_ig"))
    parser.add_argument("--model-root", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    import circuitfind as cf
    import circuitfind.patching.attribution as attribution
    from circuitfind.testing.tiny import ToyTask

    name = bench_scale.cut_shape(args.shape, args.layers)
    root = Path(args.model_root or tempfile.mkdtemp(prefix="cf-split-"))
    path = bench_scale.model_dir(root, name, args.dtype)
    model = cf.load_model(str(path), device="cpu", dtype=args.dtype)
    data = ToyTask(seq_len=bench_scale.SEQ_LEN - 1).build(model.tokenizer, bench_scale.BATCH,
                                                          seed=0)
    params = bench_scale.ALGORITHMS[args.algorithm]
    algo = cf.get_algorithm(args.algorithm, **params)
    plain = model.original_model
    with torch.no_grad():
        plain(data.clean)
        units = []
        for _ in range(3):
            t0 = time.thread_time()
            plain(data.clean)
            units.append(time.thread_time() - t0)
    unit = statistics.median(units)

    contraction = [0.0]
    original = attribution.matmul_nt

    def timed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        t0 = time.thread_time()
        out = original(a, b)
        contraction[0] += time.thread_time() - t0
        return out

    attribution.matmul_nt = timed

    def run(engine: cf.PatchingEngine) -> float:
        contraction[0] = 0.0
        t0 = time.thread_time()
        algo.score(engine, data)
        return (time.thread_time() - t0) / unit

    engine = cf.PatchingEngine(model)
    cold = run(engine)
    warm = run(engine)
    warm_contraction = contraction[0] / unit
    fresh = run(cf.PatchingEngine(model))
    plan = cf.plan(str(path), None, args.algorithm, examples=bench_scale.BATCH,
                   seq_len=bench_scale.SEQ_LEN, dtype=args.dtype, algorithm_params=params)
    print(json.dumps({"shape": args.shape, "layers": args.layers, "dtype": args.dtype,
                      "algorithm": args.algorithm, "forward_s": round(unit, 4),
                      "cold": round(cold, 3), "warm": round(warm, 3),
                      "fresh_engine": round(fresh, 3),
                      "warm_contraction": round(warm_contraction, 3),
                      "plan": plan.forward_units, "plan_passes": plan.passes}))


if __name__ == "__main__":
    main()
