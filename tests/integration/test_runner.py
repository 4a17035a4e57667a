"""The block runner against the bridge, plain Hugging Face and slow one-edge-at-a-time patching.

- the runner's logits equal the bridge's and a separately loaded plain Hugging Face model's;
- every single edge of the tiny GPT-2 and Llama/GQA models, patched through the runner (passes
  that start at the receiver's layer), equals the bridge's full forward with the patch applied
  by a hand-written hook (the slow, obviously correct reference);
- any start layer at or before the first touched receiver gives the same logits, and the
  invariants (all kept = clean, none kept = corrupted, batched = one at a time) hold for each;
- chunking under a tiny memory budget changes nothing; padded data keeps the invariants;
- zero / mean ablations equal their definitions.
"""

from __future__ import annotations

import pytest
import torch

from circuitfind.errors import ConfigError
from circuitfind.patching import PatchingEngine, plan
from circuitfind.patching.runner import block_runner
from circuitfind.tasks.base import TaskData
from circuitfind.testing import ToyTask

from bridge_reference import edge_patched_logits, logits_at
from tolerances import assert_close, atol_for

MODELS = ["gpt2", "llama", "llama_gqa"]


def _plain_hf(model):
    """A separately loaded plain Hugging Face model (no bridge components) of ``model``."""
    from transformers import AutoModelForCausalLM

    path = model.cfg.model_name
    return AutoModelForCausalLM.from_pretrained(path, dtype=model.cfg.dtype).eval()


@pytest.mark.parametrize("name", MODELS)
def test_runner_equals_bridge_and_plain_hugging_face(tiny_models, tmp_path, name):
    from circuitfind.testing import tiny_model

    specs = {"gpt2": dict(arch="gpt2"), "llama": dict(arch="llama"),
             "llama_gqa": dict(arch="llama", n_layers=3, n_kv_heads=2)}
    model = tiny_model(tmp_path, dtype=torch.float32, **specs[name])  # float32 here
    engine = PatchingEngine(model)
    tokens = torch.randint(3, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    ours = engine.runner.logits(tokens)
    with torch.no_grad():
        bridge = model(tokens)
        plain = _plain_hf(model)(tokens).logits
    assert ours.abs().max() > 0.1
    atol = atol_for(model, plain)  # a float32 model: float32 rounding of every op
    torch.testing.assert_close(ours, bridge, atol=atol, rtol=0)
    torch.testing.assert_close(ours, plain, atol=atol, rtol=0)
    # right padding with an attention mask in Hugging Face: real positions unchanged
    mask = torch.ones_like(tokens)
    mask[0, 7:] = 0
    with torch.no_grad():
        padded = _plain_hf(model)(tokens, attention_mask=mask).logits
    torch.testing.assert_close(ours[0, :7], padded[0, :7], atol=atol, rtol=0)


def test_unknown_architecture_falls_back_with_a_warning(tiny_models):
    model = tiny_models("gpt2")
    engine = PatchingEngine(model)

    class Other(torch.nn.Module):
        pass

    with pytest.warns(RuntimeWarning, match="fall back"):
        assert block_runner(Other(), engine.graph) is None


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_every_single_edge_equals_the_slow_reference(tiny_models, name):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=4)
    engine = PatchingEngine(model)
    g = engine.graph
    clean_out = engine.sender_outputs(data.clean)
    corr_out = engine.sender_outputs(data.corrupted)
    full = g.full_mask(torch.float64)
    masks = full.expand(g.n_edges, -1, -1).clone()
    pairs = g.edge_pairs
    masks[torch.arange(g.n_edges), pairs[:, 0], pairs[:, 1]] = 0
    got = engine.run(data, masks)  # batched, each pass starting at its first touched layer
    clean = logits_at(model, data.clean, data.positions)
    moved = 0
    for e, (s, r) in enumerate(pairs.tolist()):
        want = edge_patched_logits(model, engine.graph, data, s, r, clean_out, corr_out)
        assert_close(model, got[e], want, 1e-8)
        moved += bool((want - clean).abs().max() > 1e-6)
    assert moved > g.n_edges // 2  # most edges change the logits: the check has teeth


@pytest.mark.parametrize("name", MODELS)
def test_every_start_layer_gives_the_same_logits(tiny_models, name):
    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    engine = PatchingEngine(model)
    g = engine.graph
    gen = torch.Generator().manual_seed(0)
    for layer in range(g.n_layers + 1):
        # a random mask touching only receivers of layer >= `layer`
        masks = torch.rand(3, g.n_senders, g.n_receivers, generator=gen, dtype=torch.float64)
        early = torch.tensor([rec.layer < layer for rec in g.receivers])
        masks[:, :, early] = 1
        masks[2] = (masks[2] > 0.5).double()
        masks[2][:, early] = 1
        reference = engine.run(data, masks, start=0)
        for start in range(layer + 1):
            assert_close(model, engine.run(data, masks, start=start), reference, 1e-9)
        single = torch.stack([engine.run(data, m, start=layer)[0] for m in masks])
        assert_close(model, single, reference, 1e-9)
        if layer < g.n_layers:
            with pytest.raises(ConfigError, match="before the start layer"):
                engine.run(data, masks, start=layer + 1)
    full = g.full_mask(torch.float64)
    for start in range(g.n_layers + 1):
        assert_close(model, engine.run(data, full, start=start)[0],
                                   logits_at(model, data.clean, data.positions), 1e-9)
    with pytest.raises(ConfigError, match="start layer"):
        engine.run(data, full, start=g.n_layers + 1)
    with pytest.raises(ConfigError, match="start layer"):
        engine.run(data, full, start=-1)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_tiny_memory_budget_chunks_without_changing_results(tiny_models, name):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 5, seed=2)
    big = PatchingEngine(model)
    g = big.graph
    masks = torch.rand(4, g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    t = int(data.positions.max()) + 1
    fixed = big.shape.weights + plan.masked_fixed_bytes(big.shape, data.n, t)
    small = PatchingEngine(model, memory_budget=max(2**20, fixed + 3 * plan.masked_row_bytes(
        big.shape, t)))
    assert small.rows_per_pass(t, None, data.n) < 4 * data.n  # it really chunks
    assert_close(model, small.run(data, masks), big.run(data, masks), 1e-10)
    tight = PatchingEngine(model, memory_budget=2**20)
    with pytest.raises(ConfigError, match="at least"):
        tight.rows_per_pass(10**6)


def _padded(data: TaskData, lengths: list[int], pad: int) -> TaskData:
    """``data`` with example i cut to ``lengths[i]`` real tokens and right-padded."""
    clean, corrupted = data.clean.clone(), data.corrupted.clone()
    mask = torch.ones_like(clean)
    positions = torch.tensor([[n - 1] for n in lengths])
    for i, n in enumerate(lengths):
        clean[i, n:] = pad
        corrupted[i, n:] = pad
        mask[i, n:] = 0
    return TaskData(task=data.task, clean=clean, corrupted=corrupted, positions=positions,
                    answers=data.answers, wrong_answers=data.wrong_answers, attention_mask=mask,
                    clean_prompts=data.clean_prompts, corrupted_prompts=data.corrupted_prompts,
                    seed=data.seed)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_invariants_on_padded_data(tiny_models, name):
    model = tiny_models(name)
    data = _padded(ToyTask(seq_len=8).build(model.tokenizer, 3, seed=3), [4, 9, 6],
                   pad=int(model.tokenizer.pad_token_id))
    engine = PatchingEngine(model)
    g = engine.graph
    full = g.full_mask(torch.float64)
    rand = torch.rand(full.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = engine.run(data, torch.stack([full, torch.zeros_like(full), rand]))
    assert_close(model, out[0], logits_at(model, data.clean, data.positions), 1e-8)
    assert_close(model, out[1], logits_at(model, data.corrupted, data.positions), 1e-8)
    one_by_one = torch.cat([engine.run(data.subset([i]), rand)[0] for i in range(data.n)])
    assert_close(model, out[2], one_by_one, 1e-8)
    hooked = PatchingEngine(model, use_runner=False)
    assert_close(model, hooked.run(data, rand)[0], out[2], 1e-8)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_ablation_values_follow_their_definitions(tiny_models, name):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=7)
    engine = PatchingEngine(model)
    g = engine.graph
    clean_out = engine.sender_outputs(data.clean)
    corr_out = engine.sender_outputs(data.corrupted)
    definitions = {
        "zero": torch.zeros_like(corr_out),
        "mean": corr_out.mean((1, 2), keepdim=True).expand_as(corr_out),
        "mean_positional": corr_out.mean(1, keepdim=True).expand_as(corr_out),
    }
    for e in (0, g.n_edges // 3, g.n_edges - 1):
        s, r = g.edge_pairs[e].tolist()
        mask = g.full_mask(torch.float64)
        mask[s, r] = 0
        for kind, ablated in definitions.items():
            want = edge_patched_logits(model, engine.graph, data, s, r, clean_out, ablated)
            assert_close(model, engine.run(data, mask, ablation=kind)[0], want, 1e-8)
    with pytest.raises(ConfigError, match="resample"):
        engine.run(data.subset([0]), g.full_mask(), ablation="mean")
    with pytest.raises(ConfigError, match="zero"):
        engine.run(data, g.full_mask(), ablation="gaussian")


def _runner_and_hooked(model, data_seed: int, seed: int):
    """Data (3 examples, 2 metric positions), the runner and hooked engines, a generator and
    each receiver's layer."""
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=data_seed)
    runner, hooked = PatchingEngine(model), PatchingEngine(model, use_runner=False)
    layer_of = torch.tensor([rec.layer for rec in runner.graph.receivers])
    return data, runner, hooked, torch.Generator().manual_seed(seed), layer_of


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_few_receivers_at_the_start_layer_equal_the_hooked_engine(tiny_models, name):
    """ACDC-like masks: one or two touched receivers in the first layer, random edges later
    (the start layer recomputes only the touched heads; later layers see per-mask senders)."""
    model = tiny_models(name)
    data, runner, hooked, gen, layer_of = _runner_and_hooked(model, 8, 3)
    g = runner.graph
    for layer in range(g.n_layers):
        masks = (torch.rand(4, g.n_senders, g.n_receivers, generator=gen) > 0.3).double()
        masks[:, :, layer_of <= layer] = 1
        at_layer = (layer_of == layer).nonzero()[:, 0]
        for k in range(4):
            for r in at_layer[torch.randperm(len(at_layer), generator=gen)[: 1 + k % 2]].tolist():
                masks[k, int(torch.randint(int(g.n_upstream[r]), (1,), generator=gen)), r] = 0
        got = runner.run(data, masks)
        assert_close(model, got, hooked.run(data, masks), 1e-8)
        assert_close(model, got, runner.run(data, masks, start=0), 1e-8)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_partly_touched_dense_layers_equal_the_hooked_engine(tiny_models, name):
    """Masks touching a given share of each layer's (mask, q/k/v receiver) pairs, around the
    runner's dense-layer threshold of one half (a dense layer computes every receiver's input
    by one batched matmul, untouched ones included; the last block at the metric positions)."""
    model = tiny_models(name)
    data, runner, hooked, gen, layer_of = _runner_and_hooked(model, 9, 4)
    g = runner.graph
    kinds = torch.tensor([rec.kind in "qkv" for rec in g.receivers])
    for share in (0.25, 0.5, 0.75, 1.0):
        masks = g.full_mask(torch.float64).expand(4, -1, -1).clone()
        for layer in range(g.n_layers):
            qkv = ((layer_of == layer) & kinds).nonzero()[:, 0]
            for k in range(4):
                chosen = qkv[torch.randperm(len(qkv), generator=gen)[: round(share * len(qkv))]]
                for r in chosen.tolist():
                    ups = torch.randperm(int(g.n_upstream[r]), generator=gen)[:2]
                    masks[k, ups, r] = 0
            mlp = g.mlp_receiver[layer]
            masks[: round(4 * share), torch.randint(int(g.n_upstream[mlp]), (1,), generator=gen),
                  mlp] = 0
        masks *= g.edge_mask.double()
        got = runner.run(data, masks)
        assert_close(model, got, hooked.run(data, masks), 1e-8)
        single = torch.cat([runner.run(data, m) for m in masks])
        assert_close(model, single, hooked.run(data, masks), 1e-8)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_as_many_metric_positions_as_tokens_in_any_order(tiny_models, name):
    """P == T with positions out of order and repeated: the last block's values at the metric
    positions must not be taken for values at every position (dense, sparse and kept-form
    masks)."""
    import dataclasses

    model = tiny_models(name)
    data, runner, hooked, gen, _ = _runner_and_hooked(model, 10, 5)
    g = runner.graph
    t = data.clean.shape[1]
    order = torch.stack([torch.randperm(t, generator=gen) for _ in range(data.n)])
    order[:, 0] = order[:, 1]  # a repeated position
    data = dataclasses.replace(data, positions=order)
    full = g.full_mask(torch.float64)
    masks = torch.stack([
        (torch.rand(full.shape, generator=gen, dtype=torch.float64) < 0.5).double(),  # dense
        (torch.rand(full.shape, generator=gen, dtype=torch.float64) < 0.9).double(),
        (torch.rand(full.shape, generator=gen, dtype=torch.float64) < 0.05).double(),  # kept form
    ]) * g.edge_mask.double()
    got = runner.run(data, masks)
    assert got.shape[2] == t
    assert_close(model, got, hooked.run(data, masks), 1e-8)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_sender_outputs_with_the_last_block_at_the_metric_positions(tiny_models, name):
    """EAP's corrupted run with the last block at the metric positions only (repeated and out
    of order): every earlier sender as in the full run, the last block's senders equal to it
    at those positions and 0 elsewhere; EAP scores equal whether or not the engine's memo
    already holds the full corrupted run."""
    import dataclasses

    model = tiny_models(name)
    data, engine, _, gen, _ = _runner_and_hooked(model, 11, 6)
    g, runner = engine.graph, engine.runner
    t = data.clean.shape[1]
    positions = torch.stack([torch.randperm(t, generator=gen)[:3] for _ in range(data.n)])
    positions[:, 0] = positions[:, 1]  # a repeated position
    full = runner.sender_outputs(data.corrupted)
    part = runner.sender_outputs(data.corrupted, positions=positions)
    last = list(range(g.head_start[g.n_layers - 1], g.n_senders))
    earlier = [u for u in range(g.n_senders) if u not in last]
    assert torch.equal(part[earlier], full[earlier])
    at = torch.zeros(data.n, t, dtype=torch.bool)
    at[torch.arange(data.n)[:, None], positions] = True
    assert_close(model, part[last][:, at], full[last][:, at], 1e-10)
    assert not part[last][:, ~at].any()
    data = dataclasses.replace(data, positions=positions)
    fresh = engine.edge_attribution(data)  # partial corrupted run (the memo holds nothing)
    engine.corrupted_outputs(data)  # now the memo holds the full run, which EAP then reads
    assert_close(model, engine.edge_attribution(data), fresh, 1e-10)


def test_float32_dense_layers_with_the_norm_folded_equal_the_hooked_engine(tmp_path):
    """In float32 a Llama layout's dense layers fold RMSNorm into the q/k/v projections (the
    normalised inputs are never written): equal to the hooked engine up to float32 rounding,
    batched and one at a time (the float64 tests above take the unfolded norm)."""
    from circuitfind.testing import tiny_model

    model = tiny_model(tmp_path, dtype=torch.float32, arch="llama", n_layers=3, n_heads=4,
                       n_kv_heads=2, seed=2)
    data, runner, hooked, gen, _ = _runner_and_hooked(model, 11, 6)
    g = runner.graph
    masks = torch.stack([(torch.rand(g.edge_mask.shape, generator=gen) < p).float()
                         for p in (0.3, 0.5, 0.8)]) * g.edge_mask.float()
    want = hooked.run(data, masks)
    assert (want - hooked.run(data, g.full_mask())).abs().max() > 1e-2  # the masks matter
    assert_close(model, runner.run(data, masks), want)
    assert_close(model, torch.cat([runner.run(data, m) for m in masks]), want)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_exact_scores_equal_the_hooked_engine(tiny_models, name):
    """ExactPatching on the runner (layer-grouped passes) = on the bridge's full hooked forward."""
    from circuitfind.algorithms import ExactPatching

    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=9)
    fast = ExactPatching(progress=False).score(PatchingEngine(model), data)
    slow = ExactPatching(progress=False).score(PatchingEngine(model, use_runner=False), data)
    assert slow.abs().max() > 1e-2
    assert_close(model, fast, slow, 1e-7)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
def test_sparse_circuits_in_kept_form_equal_the_hooked_engine(tiny_models, name, ablation):
    """Masks that keep few edges after their first touched layer run in kept form (receivers
    read the ablated residual plus their kept edges; senders no kept edge leaves are skipped):
    equal to the hooked engine's eq. (1) for every start layer, batched or one at a time."""
    model = tiny_models(name)
    data, runner, hooked, gen, layer_of = _runner_and_hooked(model, 4, 5)
    g = runner.graph
    for layer in range(g.n_layers + 1):
        masks = (torch.rand(4, g.n_senders, g.n_receivers, generator=gen) < 0.15).double()
        masks[1] = 0  # the empty circuit after ``layer``
        masks[:, :, layer_of < layer] = 1
        kept_later = masks[:, :, layer_of >= layer] * g.edge_mask[:, layer_of >= layer]
        assert kept_later.sum() < (g.edge_mask[:, layer_of >= layer].sum() * 4) / 2
        got = runner.run(data, masks, ablation=ablation)
        assert_close(model, got, hooked.run(data, masks, ablation=ablation), 1e-8)
        one = torch.cat([runner.run(data, masks[k: k + 1], ablation=ablation) for k in range(4)])
        assert_close(model, got, one, 1e-8)
        if layer < g.n_layers:
            assert_close(model, got, runner.run(data, masks, start=0, ablation=ablation), 1e-8)
        # ACDC's candidates: one shared sparse circuit, each mask also removing one edge into
        # a receiver of ``layer`` (most nodes are then computed once for all masks)
        at_layer = (layer_of == layer).nonzero()[:, 0]
        cand = masks[0].expand(4, -1, -1).clone()
        for k in range(4):
            r = int(at_layer[torch.randint(len(at_layer), (1,), generator=gen)])
            cand[k, int(torch.randint(int(g.n_upstream[r]), (1,), generator=gen)), r] = 0
        assert_close(model, runner.run(data, cand, ablation=ablation),
                                   hooked.run(data, cand, ablation=ablation), 1e-8)
        # the next test's circuit: one more kept edge removed from every mask; nodes it does
        # not reach come from the previous pass's memo, the others must be recomputed
        kept_edges = (cand[0] * g.edge_mask).nonzero()
        if len(kept_edges):
            u, r = kept_edges[int(torch.randint(len(kept_edges), (1,), generator=gen))].tolist()
            cand[:, u, r] = 0
            assert_close(model, runner.run(data, cand, ablation=ablation),
                                       hooked.run(data, cand, ablation=ablation), 1e-8)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_eap_on_the_runner_equals_the_hooked_engine(tiny_models, name, ablation):
    """EAP through the runner (plain forward; receiver gradients from the q/k/v projections'
    gradients and the norm's closed-form backward) = EAP with the bridge's split inputs."""
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=6)
    fast = PatchingEngine(model, ablation=ablation).edge_attribution(data)
    slow = PatchingEngine(model, use_runner=False, ablation=ablation).edge_attribution(data)
    assert slow.abs().max() > 1e-2
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_nodes_read_at_the_metric_positions_only_equal_the_hooked_engine(tiny_models, name,
                                                                        monkeypatch):
    """Kept form computes a node at the metric positions only when no kept edge leads from it
    (directly or through q/MLP inputs) into a k/v input: a circuit with both kinds after the
    start layer, classified as expected and equal to the hooked engine (the full nodes read
    the position-only ones with weight 0, which must not leak uninitialised values)."""
    from circuitfind.patching import masked_pass

    model = tiny_models(name)
    data, runner, hooked, _, layer_of = _runner_and_hooked(model, 4, 0)
    g = runner.graph
    kv = "kv0" if g.n_kv_heads < g.n_heads else "h0"
    mask = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    mask[:, layer_of < 1] = 1  # receivers before the start layer keep every edge
    edges = [f"a0.h0->a1.{kv}<k>", "a0.h1->a1.h0<q>", "a1.h0->logits", "m0->m1", "m1->logits",
             "a0.h0->a1.h0<q>"]
    for e in edges:
        mask[g.edge_index(e)] = 1
    cand = mask.expand(3, -1, -1).clone()
    cand[1][g.edge_index("a0.h1->a1.h0<q>")] = 0
    cand[2][g.edge_index("input->a0.h1<q>")] = 0  # start layer 0: its heads are computed
    seen: list[set[int]] = []
    demand = masked_pass.MaskedPass._position_demand

    def spy(self):
        out = demand(self)
        seen.append({g.senders[u].name for u in out})
        return out

    monkeypatch.setattr(masked_pass.MaskedPass, "_position_demand", spy)
    got = runner.run(data, cand)
    assert seen and {"a0.h1", "a1.h0", "m0", "m1"} <= seen[0]
    assert "a0.h0" not in seen[0]  # its kept edge enters a computed head's key input
    assert_close(model, got, hooked.run(data, cand), 1e-8)


def test_receivers_equal_in_every_mask_projected_once_equal_the_hooked_engine(tiny_models,
                                                                              monkeypatch):
    """Kept form projects the q/k/v receivers of a per-mask head whose input is the same in
    every mask once for all masks (and keeps them in the memo for the next pass): a head whose
    value input alone differs between masks, and a key/value group shared by two query heads
    of which one differs. Equal to the hooked engine on the first pass, on a second pass that
    takes them from the memo, and after a change of one of their inputs (memo key)."""
    from circuitfind.patching import masked_pass

    model = tiny_models("llama_gqa")  # 3 layers, 4 query heads, 2 key/value heads
    data, runner, hooked, _, layer_of = _runner_and_hooked(model, 4, 0)
    g = runner.graph
    mask = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    mask[:, layer_of < 1] = 1
    for e in ["a0.h0->a1.h0<q>", "a0.h0->a1.kv0<k>", "a0.h1->a1.kv0<v>", "a0.h1->a1.h1<q>",
              "a1.h0->a2.h0<q>", "a1.h0->a2.kv0<k>", "a1.h1->a2.kv0<v>", "a1.h1->a2.h1<q>",
              "a2.h0->logits", "a2.h1->logits"]:
        mask[g.edge_index(e)] = 1
    cand = mask.expand(2, -1, -1).clone()
    cand[1][g.edge_index("a0.h1->a1.h1<q>")] = 0  # a1.h1 differs between the masks
    calls: list[tuple[int, list[str], str]] = []
    project = masked_pass.MaskedPass._project

    def spy(self, layer, rs, form, base, sign, *rest):
        calls.append((layer, [g.receivers[r].name for r in rs], form))
        return project(self, layer, rs, form, base, sign, *rest)

    monkeypatch.setattr(masked_pass.MaskedPass, "_project", spy)
    once = {"a2.h0<q>", "a2.kv0<k>"}  # read a1.h0 only, the same in both masks
    assert_close(model, runner.run(data, cand), hooked.run(data, cand), 1e-8)
    at_2 = [(set(rs), form) for layer, rs, form in calls if layer == 2]
    assert (once, "kept1") in at_2
    assert all(not (rs & once) for rs, form in at_2 if form == "kept")
    calls.clear()
    assert_close(model, runner.run(data, cand), hooked.run(data, cand), 1e-8)
    assert all(not (set(rs) & once) for layer, rs, _ in calls if layer == 2)  # from the memo
    for edge, value in (("a1.h0->a2.h0<q>", 0), ("a0.h0->a2.h0<q>", 1)):  # a new input
        s, r = g.edge_index(edge)
        cand[:, s, r] = value
    calls.clear()
    assert_close(model, runner.run(data, cand), hooked.run(data, cand), 1e-8)
    assert ({"a2.h0<q>"}, "kept1") in [(set(rs), f) for layer, rs, f in calls if layer == 2]
