"""Long prompts: the checkpointed attribution pass (one block at a time, attention in chunks of
query positions, sender buffer in host memory) equals the plain gradient pass, and the engine
takes it, with the chunk the plan predicts, when the budget requires it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import circuitfind as cf
from circuitfind.errors import ConfigError
from circuitfind.patching import PatchingEngine
from circuitfind.patching import checkpointed as ck
from circuitfind.patching import plan as memory_plan
from circuitfind.patching.engine import GradientPoint, frozen_parameters
from circuitfind.patching.placement import move
from circuitfind.testing import ToyTask, tiny_model
from tests.tolerances import assert_close

FAMILIES = {  # one of each wiring: LayerNorm, parallel blocks, grouped-query RMSNorm, post-norm
    "gpt2": dict(arch="gpt2", n_layers=2, n_heads=4, seed=0),
    "gpt_neox": dict(arch="gpt_neox", n_layers=2, n_heads=4, seed=1),
    "llama_gqa": dict(arch="llama", n_layers=3, n_heads=4, n_kv_heads=2, seed=2),
    "gemma2": dict(arch="gemma2", n_layers=3, n_heads=4, seed=1),
    "qwen2": dict(arch="qwen2", n_layers=2, n_heads=4, n_kv_heads=2, seed=3),  # sliding window
}
POINTS = [("input", 0.2), ("input", 0.7), ("a1", 0.4), ("m0", 0.9)]  # EAP-IG-like, mixed


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny_model(tmp_path_factory.mktemp(name), dtype=torch.float64,
                                     **FAMILIES[name])
        return cache[name]

    return get


def reference_and_store(engine: PatchingEngine, data, points, store_device=None, mover=move):
    """The plain pass's scores, and a sender store filled as the checkpointed pass needs it."""
    runner, g = engine.runner, engine.graph
    ablated = runner.sender_outputs(data.corrupted)
    n_copies = 1 if points is None else len(points)

    def metric(logits):
        rows = logits.view(n_copies, data.n, *logits.shape[1:]) if n_copies > 1 else logits
        return data.metric(rows).sum()

    diff = None if points is None else runner.sender_outputs(data.clean) - ablated
    with torch.enable_grad():
        want = runner.attribute(data.clean, ablated, data.positions, metric, points, diff)
    home = torch.device("cpu")
    store = ck.SenderStore((g.n_senders, data.n, data.seq_len, engine.d_model), engine.dtype,
                           store_device or home, home, mover)
    return want, store, metric


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("points", [None, POINTS], ids=["eap", "points"])
def test_checkpointed_pass_equals_the_plain_pass(family_models, name, points):
    model = family_models(name)
    engine = PatchingEngine(model)
    data = ToyTask(seq_len=10, positions=2).build(model.tokenizer, 3, seed=4)
    with frozen_parameters(model):
        want, store, metric = reference_and_store(engine, data, points)
        for chunk in (3, 64):  # attention in chunks of 3 queries; unchunked
            ck.fill_senders(engine.runner, data.corrupted, store, chunk)
            if points is not None:
                ck.subtract_senders(engine.runner, data.clean, store, chunk)
            got = ck.checkpointed_pass(engine.runner, data.clean, data.positions, metric,
                                       store, chunk, points)
            assert_close(model, got, want, 1e-12)
            assert got.abs().max() > 0


def test_chunked_attention_and_its_gradient_equal_the_adapter(family_models):
    model = family_models("gemma2")  # soft-capped scores, sliding window, eager pattern
    lay = PatchingEngine(model).runner.arch
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 11, n, 8, generator=gen, dtype=torch.float64,
                           requires_grad=True) for n in (4, 4, 4))
    want = lay.attend(1, q, k, v)
    dz = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(want, (q, k, v), dz)
    got = ck._ChunkedAttention.apply(q, k, v, 1, lay, 4)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dz), grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_checkpointed_pass_on_a_model_split_across_devices(family_models):
    """Each block's primitives on its own (CPU) device name, as on several GPUs: the same
    scores, and the blocks' recomputation goes through every block's device."""
    from tests.integration.test_placement import split

    model = family_models("llama_gqa")
    one, many = PatchingEngine(model), PatchingEngine(model)
    log: list = []
    placement = split(many, log)
    data = ToyTask(seq_len=10, positions=2).build(model.tokenizer, 2, seed=7)
    with frozen_parameters(model):
        want, store, metric = reference_and_store(one, data, None)
        ck.fill_senders(many.runner, data.corrupted, store, 4)
        log.clear()
        got = ck.checkpointed_pass(many.runner, data.clean, data.positions, metric, store, 4)
    assert_close(model, got, want, 1e-12)
    moved_to = {entry[1] for entry in log if entry[0] == "move"}
    assert set(placement.layers) <= moved_to


def test_offloaded_store_streams_the_contraction(family_models, monkeypatch):
    """The sender buffer on another device (``cpu:1`` standing for pinned host memory beside
    a GPU): every read and write moves through the mover, the contraction reads it in chunks
    of positions, and the scores are the same."""
    model = family_models("llama_gqa")
    engine = PatchingEngine(model)
    data = ToyTask(seq_len=10, positions=2).build(model.tokenizer, 2, seed=5)
    host = torch.device("cpu", 1)
    log: list[tuple[torch.device, int]] = []

    def mover(value, device):
        log.append((device, value.nbytes))
        return move(value, device, copy=True)  # a copy, as between real devices

    step_bytes = 4 * 8 * engine.d_model * 8  # 4 rows of every sender
    monkeypatch.setattr(ck, "STREAM_BYTES", step_bytes)
    with frozen_parameters(model):
        for points in (None, POINTS):
            want, store, metric = reference_and_store(engine, data, points, host, mover)
            assert store.offloaded
            ck.fill_senders(engine.runner, data.corrupted, store, 4)
            if points is not None:
                ck.subtract_senders(engine.runner, data.clean, store, 4)
            log.clear()
            got = ck.checkpointed_pass(engine.runner, data.clean, data.positions, metric,
                                       store, 4, points)
            assert_close(model, got, want, 1e-12)
            reads = [size for device, size in log if device == store.home]
            assert reads and max(reads) <= max(step_bytes, store.data[0:4].nbytes)
            assert len(reads) > 2 * engine.graph.n_layers + 1  # more than one per receiver group
    not_moved = ck.SenderStore((2, 1, 3, 4), torch.float64, torch.device("cpu"),
                               torch.device("cpu"))
    assert not not_moved.offloaded and not_moved.get(0).data_ptr() == not_moved.data.data_ptr()


def test_engine_takes_the_chunk_the_plan_predicts(family_models, monkeypatch):
    """Budgets between the checkpointed pass's least and the plain pass's: the plan picks a
    chunk of query positions (Gemma-2's eager, soft-capped attention keeps one chunk's
    pattern), the engine runs it and the scores equal the plain pass's, for EAP and for
    gradient points; under the least budget the run is refused with it."""
    model = family_models("gemma2")
    data = ToyTask(seq_len=127, positions=2).build(model.tokenizer, 2, seed=6)
    full = PatchingEngine(model)
    t, shape = data.seq_len, full.shape
    points = [GradientPoint(a) for a in (0.25, 0.75)]
    chunks: list[int] = []
    real = ck.checkpointed_pass
    monkeypatch.setattr("circuitfind.patching.engine.checkpointed_pass",
                        lambda *a, **k: chunks.append(a[5]) or real(*a, **k))
    for chunk, runs in ((32, None), (64, points)):
        n_points = 1 if runs is None else len(runs)
        budget = (shape.weights + memory_plan.sender_bytes(shape, t)
                  + memory_plan.checkpointed_row_bytes(shape, t, chunk, 2, runs is not None))
        assert memory_plan.MIN_BUDGET <= budget < memory_plan.gradient_pass_minimum(
            shape, t, n_points, 2)
        plan = cf.plan(model, algorithm="eap" if runs is None else "clean_corrupted",
                       examples=data.n, seq_len=t, positions=2, memory=budget)
        if runs is not None:  # clean-corrupted: gradient points at alpha 1 and 0
            runs = [GradientPoint(1.0), GradientPoint(0.0)]
        assert plan.position_chunk == chunk and plan.fits and plan.peak <= budget
        assert f"chunks of {chunk} query positions" in plan.summary()
        engine = PatchingEngine(model, memory_budget=budget)
        assert engine.plan_attribution(data.n, t, n_points, positions=2,
                                       algorithm=plan.algorithm) == plan
        monkeypatch.setattr(engine.runner, "attribute", None)  # the plain pass must not run
        chunks.clear()
        assert_close(model, engine.edge_attribution(data, points=runs),
                     full.edge_attribution(data, points=runs), 1e-12)
        assert chunks and set(chunks) == {chunk}
        if runs is None:  # zero ablation needs no corrupted run; means need all of it
            assert_close(model, engine.edge_attribution(data, ablation="zero"),
                         full.edge_attribution(data, ablation="zero"), 1e-12)
            with pytest.raises(ConfigError, match="'mean' ablation averages"):
                engine.edge_attribution(data, ablation="mean")
            # offload on a CPU: the buffer is already in host memory (the same scores)
            monkeypatch.setattr(engine, "plan_attribution",
                                lambda *a, **k: dataclasses.replace(plan, offload=True))
            assert_close(model, engine.edge_attribution(data), full.edge_attribution(data),
                         1e-12)
    least = memory_plan.checkpointed_minimum(shape, t, 1, 2)
    with pytest.raises(ConfigError, match=f"at least {least} bytes"):
        PatchingEngine(model, memory_budget=least - 1).edge_attribution(data)
