"""The counting of ``benchmarks/bench_acdc_floor.py`` (ACDC's work floor per test), pinned to
FlopCounterMode on the Hugging Face modules and to costs written out by hand."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import circuitfind as cf
from circuitfind.testing import ToyTask
from circuitfind.testing.tiny import make_tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_acdc_floor as floor_bench  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-layer grouped-query Llama (4 query heads on 2 k/v heads), its graph, HF model, data
    (4 prompts of 6 tokens, metric at the last) and the floor's counter."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model_dir(tmp_path_factory.mktemp("floor") / "m", arch="llama",
                               n_layers=2, n_heads=4, n_kv_heads=2, seed=3)
    model = cf.load_model(path, device="cpu")
    engine = cf.PatchingEngine(model)
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    data = ToyTask(seq_len=5).build(model.tokenizer, 4, seed=0)
    g = engine.graph
    shape = floor_bench.shape_of(plain, engine.runner.arch, g.n_layers)
    metric = torch.zeros(data.clean.shape, dtype=torch.bool)
    metric.scatter_(1, data.positions, True)
    changes = floor_bench.sender_change(g, data.clean, data.corrupted)
    return engine, plain, data, shape, floor_bench.Floor(g, shape, changes, metric)


def _macs(fn) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops() / 2


def test_shape_model_counts_the_hf_forward(setup):
    engine, plain, data, shape, _ = setup
    n, t = data.clean.shape
    assert floor_bench.dense_macs(shape, n, t, engine.graph.n_layers) == _macs(
        lambda: plain(data.clean))


def test_edge_into_last_mlp_costs_that_mlp_at_metric_positions_and_the_unembedding(setup):
    engine, plain, data, shape, floor = setup
    g = engine.graph
    last = g.n_layers - 1
    r, s = g.mlp_receiver[last], g.node_index(f"a{last}.h2")
    x = torch.randn(data.n, 1, shape.d)  # one metric position per prompt
    expected = _macs(lambda: plain.lm_head(plain.model.layers[last].mlp(x)))
    macs = floor.test(g.edge_mask.clone(), r, s)
    assert macs["proj"] == macs["attn"] == 0
    assert macs["mlp"] + macs["unembed"] == expected
    # the logits' own test: the unembedding alone
    logits = floor.test(g.edge_mask.clone(), g.n_receivers - 1, s)
    assert sum(logits.values()) == _macs(lambda: plain.lm_head(x))


def test_grouped_value_edge_costs_its_value_path_only(setup):
    """Circuit input -> a0.kv0<v>, a0.h0 -> logits: the value projection at the changed
    positions (clean and corrupted prompts differ after BOS), the head's weighted sum and output
    projection at the metric position only, the unembedding; a0.h1 shares the k/v head but
    nothing reads it, so it costs nothing."""
    engine, _, data, shape, floor = setup
    g = engine.graph
    v, head = g.v_start[0], g.node_index("a0.h0")
    kept = torch.zeros_like(g.edge_mask)
    kept[g.node_index("input"), v] = True
    kept[head, g.n_receivers - 1] = True
    n = data.n
    changed = int((data.clean != data.corrupted).sum())  # value rows that change
    d, dh = shape.d, shape.d_head
    macs = floor.test(kept, v, g.node_index("input"))
    assert macs["proj"] == changed * d * dh + n * dh * d
    assert macs["attn"] == changed * dh  # the last query sees every changed value
    assert macs["mlp"] == 0
    assert macs["unembed"] == n * d * shape.vocab


def test_recorded_sequence_is_the_runs(setup):
    engine, _, data, _, _ = setup
    tests, circuit, _ = floor_bench.record_run(engine, data, 1e-2)
    meta = circuit.metadata["acdc"]
    assert len(tests) == meta["tested_edges"] + meta["node_tests"] > 0
    for before, after in itertools.pairwise(tests):  # edges only ever leave the circuit
        assert not (after["kept_before"] & ~before["kept_before"]).any()
    for t in tests:  # a removed edge is gone from the final circuit, a kept one stays
        r, s = t["receiver"], t["sender"]
        if s is not None:
            assert bool(circuit.kept[s, r]) != t["removed"]


def test_window_is_what_hf_attends_to(tmp_path):
    """Mistral's sliding window of 4 (every layer of the tiny config): the keys the floor lets
    a query see are exactly those Hugging Face gives non-zero attention."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model_dir(tmp_path / "m", arch="mistral", n_layers=1, n_heads=2, seed=0)
    engine = cf.PatchingEngine(cf.load_model(path, device="cpu"))
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    tokens = torch.randint(3, 64, (1, 9))
    with torch.no_grad():
        attn = plain(tokens, output_attentions=True).attentions[0][0]  # [H, T, T]
    window = engine.runner.arch.window(0)
    assert window == 4
    assert torch.equal(attn.gt(0).any(0), floor_bench.visible(9, window))


def test_resume_floor_of_the_full_circuit_is_the_trimmed_forward(setup):
    """From layer 0 in the full circuit, the resume floor is the forward with causal attention
    and a last block that runs its queries, output projections and MLP at the metric position
    only (its keys and values everywhere: the last query reads them), written out by hand."""
    engine, _, data, s, floor = setup
    g = engine.graph
    n, t = data.clean.shape
    dd = s.d * s.d_head
    proj = (2 * s.n_heads + 2 * s.n_kv_heads) * dd
    causal = 2 * n * s.n_heads * (t * (t + 1) // 2) * s.d_head
    early = (g.n_layers - 1) * (n * t * (proj + s.mlp_row) + causal)
    last = n * (2 * s.n_heads * dd + s.mlp_row) + n * t * 2 * s.n_kv_heads * dd
    last += 2 * n * s.n_heads * t * s.d_head
    expected = early + last + n * s.d * s.vocab
    macs = floor.test(g.edge_mask.clone(), g.q_start[0], g.node_index("input"),
                      changed_only=False)
    assert sum(macs.values()) == expected
    # the floor proper is below it: BOS never changes
    assert sum(floor.test(g.edge_mask.clone(), g.q_start[0], g.node_index("input")).values()) \
        < expected
