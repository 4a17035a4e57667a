"""What the block runner keeps from one masked pass to the next gives exactly the uncached result.

- the data memo (:class:`~circuitfind.patching.masked_pass.DataMemo`: ablated values, sender
  differences and ablated residuals at the metric positions) and the scratch buffers: a
  sequence of ACDC-like passes on one engine, the circuit changing between passes, equals
  each pass on a fresh engine bit for bit; other data (other positions) starts afresh;
- the masks inspected on the host (:func:`~circuitfind.patching.masked_pass.fully_removed`)
  agree with the same questions asked with torch operations;
- :meth:`BlockRunner.scratch` reuses its memory for smaller shapes and replaces it for larger;
- the kept-form memo (:class:`~circuitfind.patching.masked_pass.KeptFormMemo`) stays within
  the memory plan's cap (:func:`~circuitfind.patching.plan.memo_rows`) after every pass of a
  whole ACDC run, counts what it really holds, and a smaller cap changes no decision or score.
"""

from __future__ import annotations

import pytest
import torch

from circuitfind.algorithms import ACDC
from circuitfind.errors import ConfigError
from circuitfind.patching import PatchingEngine, masked_pass
from circuitfind.patching.masked_pass import KeptFormMemo, fully_removed, memo_cap
from circuitfind.patching.plan import memo_rows, senders_from
from circuitfind.testing import ToyTask


def _acdc_like_passes(g, gen, n_passes: int) -> list[torch.Tensor]:
    """Candidates of ACDC-like passes from the last layer back: a sparse circuit after the
    tested receiver's layer, each mask removing one more incoming edge of a receiver of that
    layer, the circuit losing an edge between passes."""
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    kept = (torch.rand(g.n_senders, g.n_receivers, generator=gen) < 0.25).double()
    out = []
    for i in range(n_passes):
        layer = g.n_layers - 1 - (i * g.n_layers) // n_passes
        base = kept.clone()
        base[:, layer_of < layer] = 1
        at_layer = (layer_of == layer).nonzero()[:, 0]
        k = 1 + i % 3
        cand = base.expand(k, -1, -1).clone()
        for j in range(k):
            r = int(at_layer[torch.randint(len(at_layer), (1,), generator=gen)])
            cand[j:, int(torch.randint(int(g.n_upstream[r]), (1,), generator=gen)), r] = 0
        out.append(cand)
        kept_edges = (kept * g.edge_mask).nonzero()
        u, r = kept_edges[int(torch.randint(len(kept_edges), (1,), generator=gen))].tolist()
        kept[u, r] = 0  # the next pass's circuit: one edge fewer
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_passes_with_kept_values_equal_fresh_engines_bit_for_bit(tiny_models, name, ablation):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=4)
    engine = PatchingEngine(model, ablation=ablation)
    g = engine.graph
    passes = _acdc_like_passes(g, torch.Generator().manual_seed(1), 8)
    for masks in passes:
        warm = engine.run(data, masks)
        cold = PatchingEngine(model, ablation=ablation).run(data, masks)
        assert torch.equal(warm, cold)
    memo = engine.runner.data_memo
    assert "ablated at positions" in memo.values or ablation == "zero"
    assert any(isinstance(k, tuple) and k[0] == "ablated residual at positions"
               for k in memo.values)  # the kept form read them from the memo
    kept = dict(memo.values)
    engine.run(data, passes[-1])
    assert all(memo.values[k] is v for k, v in kept.items())  # the same data: kept
    # other data (other metric positions) on the same engine: the memo starts afresh
    other = ToyTask(positions=1).build(model.tokenizer, 3, seed=5)
    for masks in passes[-3:]:
        assert torch.equal(engine.run(other, masks),
                           PatchingEngine(model, ablation=ablation).run(other, masks))
    assert not any(memo.values.get(k) is v for k, v in kept.items())


def test_masks_inspected_on_the_host_agree_with_torch():
    """Fractional weights, frozen edges, edges off the graph's mask and exact ones."""
    gen = torch.Generator().manual_seed(0)
    edge = torch.rand(7, 9, generator=gen) < 0.7
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        removed = torch.rand(5, 7, 9, generator=gen).round().to(dtype) * edge
        removed[1] = edge.to(dtype)  # every edge removed
        removed[2, :, 3] = 0.5 * edge[:, 3]
        frozen = torch.zeros_like(removed)
        frozen[1, 0, 4] = 1.0
        for fz in (None, frozen):
            want = (removed == edge.to(removed)).all(1)
            if fz is not None:
                want &= fz.eq(0).all(1)
            got = fully_removed(edge, removed, fz)
            if not want.any():
                assert got is None
            else:
                assert got is not None and torch.equal(got, want)
    grad = torch.ones(1, 7, 9, requires_grad=True) * edge
    assert fully_removed(edge, grad) is None


def test_scratch_reuses_its_memory_for_smaller_shapes(tiny_models):
    runner = PatchingEngine(tiny_models("gpt2")).runner
    like = torch.zeros(1)
    big = runner.scratch("test", (4, 5, 6), like)
    small = runner.scratch("test", (2, 3, 6), like)
    assert small.data_ptr() == big.data_ptr() and small.shape == (2, 3, 6)
    assert small.is_contiguous()
    larger = runner.scratch("test", (5, 5, 6), like)
    assert larger.shape == (5, 5, 6) and larger.numel() == 150
    assert runner.scratch("test", (4, 5, 6), like).data_ptr() == larger.data_ptr()
    assert runner.scratch("test", (4, 5, 6), like.double()).dtype == torch.float64


@pytest.mark.parametrize("positions", [[[5, 6]] * 3, [[2, 6]] * 3, [[1, 6], [3, 4], [0, 7]]])
def test_metric_positions_selected_and_written_as_by_gather_and_scatter(positions):
    """``select_pos``/``write_pos`` (strided copies where every example has the same metric
    positions, consecutive or not; gather/scatter where they differ) equal ``gather`` and
    ``scatter_`` along the position axis."""
    from circuitfind.patching.masked_pass import DataMemo, MaskedPass

    mp = MaskedPass.__new__(MaskedPass)
    mp.pos = torch.tensor(positions)
    mp.n, mp.n_pos = mp.pos.shape
    mp.data_memo = DataMemo()
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(2, 4, mp.n, 8, 5, generator=gen)  # [K, h, n, T, d]
    idx = mp.pos[None, None, :, :, None].expand(2, 4, mp.n, mp.n_pos, 5)
    assert torch.equal(mp.select_pos(values, 3), values.gather(3, idx))
    assert torch.equal(mp.select_pos(values, 3, fresh=False), values.gather(3, idx))
    assert torch.equal(mp.at_positions(values[:, 0]), values[:, 0].gather(2, idx[:, 0]))
    change = torch.randn(1, 4, mp.n, mp.n_pos, 5, generator=gen)
    got, want = values.clone(), values.clone()
    mp.write_pos(got, change.expand(2, -1, -1, -1, -1), 3)
    want.scatter_(3, idx, change.expand(2, -1, -1, -1, -1))
    assert torch.equal(got, want)
    assert (mp.common_pos is None) == (positions[0] != positions[1])


def _held_bytes(memo: KeptFormMemo) -> int:
    """Bytes of the distinct storages the memo's tensors keep alive."""
    storages = {}
    for value in [*memo.entries.values(), *memo.sums.values()]:
        storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("name", ["llama_gqa", "gemma2"])
def test_kept_form_memo_stays_within_the_plans_cap_and_changes_no_decision(tiny_models, name,
                                                                           monkeypatch):
    """A whole ACDC run (the pre-norm pass and the post-norm pass): after every pass the memo
    holds at most its cap, and no more than it counts (a row kept from a batch of static
    parts must not keep the batch alive); capped to one row per example, or to nothing (so
    that it drops entries it was offered), it keeps the same edges with the same scores (up
    to the rounding of Gemma-2's float32 attention softmax)."""
    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    engine = PatchingEngine(model)
    g = engine.graph
    seen: list[tuple[int, int, int]] = []
    dropped = [0]
    keep = KeptFormMemo.keep

    def spy(self, entries, ids, sums, cap):
        keep(self, entries, ids, sums, cap)
        seen.append((_held_bytes(self), self.nbytes, cap))
        dropped[0] += len(entries) + len(sums or {}) - len(self.entries) - len(self.sums)

    monkeypatch.setattr(KeptFormMemo, "keep", spy)
    full = ACDC(threshold=1e-4, progress=False).discover(engine, data)
    assert 0 < int(full.kept.sum()) < g.n_edges
    assert seen and max(nbytes for _, nbytes, _ in seen) > 0
    for held, nbytes, cap in seen:
        assert held == nbytes <= cap
    for rows in (1, 0):
        monkeypatch.setattr(masked_pass, "memo_rows", lambda graph, start, rows=rows: rows)
        seen.clear()
        dropped[0] = 0
        capped = ACDC(threshold=1e-4, progress=False).discover(PatchingEngine(model), data)
        assert all(nbytes <= cap for _, nbytes, cap in seen)
        assert dropped[0] > 0
        assert torch.equal(capped.kept, full.kept)
        # a node missing from the memo may be built in the other (removed or kept) form: the
        # same effect up to the rounding of Gemma-2's float32 attention softmax (float64 else)
        torch.testing.assert_close(capped.scores, full.scores, rtol=1e-5, atol=1e-9)


def test_memo_rows_count_the_senders_and_receivers_a_pass_reaches(tiny_models):
    """One row per sender at or after the start layer and one per receiver there; the cap in
    bytes is that many ``[T, d]`` rows per example; a start outside the model is refused."""
    g = PatchingEngine(tiny_models("llama_gqa")).graph
    per_layer_senders, per_layer_receivers = g.n_heads + 1, g.n_heads + 2 * g.n_kv_heads + 1
    assert senders_from(g, 0) == g.n_senders
    assert senders_from(g, g.n_layers) == 0
    for start in range(1, g.n_layers + 1):
        later = g.n_layers - start
        assert memo_rows(g, start) == later * (per_layer_senders + per_layer_receivers) + 1
    rows = torch.zeros(3, 5, 7, dtype=torch.float32)
    assert memo_cap(g, 2, rows) == memo_rows(g, 2) * 3 * 5 * 7 * 4
    with pytest.raises(ConfigError, match="starts at a layer from 0"):
        senders_from(g, g.n_layers + 1)
