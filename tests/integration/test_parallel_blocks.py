"""GPT-NeoX's parallel attention and MLP on the block runner, against plain Hugging Face.

With ``use_parallel_residual`` (Pythia) a block computes ``x + attn(ln1(x)) + mlp(ln2(x))``: the
MLP reads the block's input, so the graph has no edge from a layer's heads into its own MLP, and
every place the runner builds an MLP's input (the cache, the fully ablated run, the dense,
sparse-start and kept-form masked passes, the last block at the metric positions, EAP's backward)
must pass the block's input. The slow reference here is written with plain PyTorch hooks on the
Hugging Face modules, independent of the bridge and of the adapter: every receiver's input (each
head's q, k and v rows of the fused projection, each MLP's input, the final norm's input) is
rebuilt by eq. (1) from the run's own captured sender outputs, for any (fractional) removal
weights. Being differentiable in those weights, its gradient at the full circuit is EAP's score.

Both wirings are tested (``gpt_neox``: parallel, ``gpt_neox_seq``: sequential), and a runner
that treats one as the other (mutation) must fail the comparison in every strategy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from circuitfind.errors import ConfigError
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.patching import PatchingEngine
from circuitfind.patching.masked_pass import MaskedPass
from circuitfind.patching.runner import block_runner
from circuitfind.testing import ToyTask, tiny_model
from tolerances import EPS32, ULPS

WIRINGS = {"parallel": dict(arch="gpt_neox", n_layers=3, seed=7),
           "sequential": dict(arch="gpt_neox_seq", n_layers=3, seed=8)}
SEQ = 9
TOL = ULPS * EPS32  # Hugging Face's eager NeoX softmax runs in float32 (tests/tolerances.py)


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """wiring -> (float64 bridge, its plain Hugging Face model), built lazily."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, tuple[object, object]] = {}

    def get(wiring: str):
        if wiring not in cache:
            model = tiny_model(tmp_path_factory.mktemp(wiring), dtype=torch.float64,
                               **WIRINGS[wiring])
            hf = AutoModelForCausalLM.from_pretrained(
                model.cfg.model_name, dtype=torch.float64, attn_implementation="eager").eval()
            for p in hf.parameters():
                p.requires_grad_(False)
            cache[wiring] = model, hf
        return cache[wiring]

    return get


def reference_logits(hf, g: ComputeGraph, tokens, removed, ablated, capture=None):
    """Logits ``[K*N, T, V]`` of plain HF GPT-NeoX on ``tokens [N, T]`` repeated for K masks,
    every receiver's input rebuilt by hooks as eq. (1) with ``removed [K, S, R]`` (1 = edge
    removed) and the ablated sender values ``ablated [S, N|1, T|1, d]``.

    With ``capture`` (a dict), the run's sender outputs ``[S, K*N, T, d]`` are stored in it
    under ``"senders"`` (use ``removed = 0`` for a plain run's)."""
    body = hf.gpt_neox
    k_masks, n = removed.shape[0], tokens.shape[0]
    cur: dict[int, torch.Tensor] = {}  # this run's sender outputs, [K*N, T, d]
    resid: dict[int, torch.Tensor] = {}  # each block's input
    hooks = []

    def receiver_input(r, x):
        """Receiver r's input from the residual ``x [K*N, T, d]`` it reads in this run."""
        n_up = int(g.n_upstream[r])
        cur_up = torch.stack([cur[u] for u in range(n_up)], 1)  # [K*N, U, T, d]
        diffs = cur_up.view(k_masks, n, n_up, *x.shape[1:]) - ablated[:n_up].transpose(0, 1)
        out = x.view(k_masks, n, *x.shape[1:]) - torch.einsum(
            "ku,knutd->kntd", removed[:, :n_up, r], diffs)
        return out.reshape(x.shape)

    hooks.append(body.embed_in.register_forward_hook(lambda m, a, o: cur.__setitem__(0, o)))
    for layer, block in enumerate(body.layers):
        attn = block.attention
        dh = attn.head_size

        def block_in(m, args, layer=layer):
            resid[layer] = args[0]
        hooks.append(block.input_layernorm.register_forward_pre_hook(block_in))

        def qkv_hook(m, args, out, layer=layer, block=block):
            # Hugging Face's layout: per head [q | k | v] rows of d_head each
            out = out.clone().view(*out.shape[:-1], g.n_heads, 3, dh)
            ln = block.input_layernorm  # its parameters (calling it would re-enter block_in)
            for i, first in enumerate((g.q_start[layer], g.k_start[layer], g.v_start[layer])):
                for h in range(g.n_heads):
                    x_r = F.layer_norm(receiver_input(first + h, resid[layer]),
                                       ln.normalized_shape, ln.weight, ln.bias, ln.eps)
                    proj = F.linear(x_r, m.weight, m.bias).view(out.shape)
                    out[..., h, i, :] = proj[..., h, i, :]
            return out.flatten(-3)
        hooks.append(attn.query_key_value.register_forward_hook(qkv_hook))

        def heads(m, args, layer=layer):
            z = args[0]  # [K*N, T, H*dh]
            w = m.weight.T.view(g.n_heads, -1, m.weight.shape[0])  # [H, dh, d]
            zh = z.view(*z.shape[:2], g.n_heads, -1)
            for h in range(g.n_heads):
                cur[g.head_start[layer] + h] = zh[:, :, h] @ w[h]
        hooks.append(attn.dense.register_forward_pre_hook(heads))

        def mlp_in(m, args, layer=layer):
            # the block's input (parallel) or the residual after attention (sequential)
            return (receiver_input(g.mlp_receiver[layer], args[0]),)
        hooks.append(block.post_attention_layernorm.register_forward_pre_hook(mlp_in))
        hooks.append(block.mlp.register_forward_hook(
            lambda m, a, o, u=g.mlp_index[layer]: cur.__setitem__(u, o)))

    def final_in(m, args):
        return (receiver_input(g.n_receivers - 1, args[0]),)
    hooks.append(body.final_layer_norm.register_forward_pre_hook(final_in))
    try:
        logits = hf(tokens.repeat(k_masks, 1)).logits
    finally:
        for h in hooks:
            h.remove()
    if capture is not None:
        capture["senders"] = torch.stack([cur[u] for u in range(g.n_senders)])
    return logits


def _ablated(hf, g, data, kind: str):
    """``[S, N|1, T|1, d]`` ablated sender values of plain HF: the corrupted run (resample),
    zeros, or the corrupted run's mean over examples and positions (no padding here)."""
    captured: dict[str, torch.Tensor] = {}
    none = torch.zeros(1, g.n_senders, g.n_receivers, dtype=torch.float64)
    with torch.no_grad():
        reference_logits(hf, g, data.corrupted, none, torch.zeros(g.n_senders, 1, 1, 1),
                         captured)
    corrupted = captured["senders"]
    if kind == "resample":
        return corrupted
    if kind == "zero":
        return torch.zeros_like(corrupted[:, :1, :1])
    return corrupted.mean((1, 2), keepdim=True)


def _at(logits, data, k_masks):
    """Logits ``[K*N, T, V]`` -> ``[K, N, P, V]`` at the metric positions."""
    logits = logits.view(k_masks, data.n, *logits.shape[1:])
    idx = data.positions[None, :, :, None].expand(k_masks, -1, -1, logits.shape[-1])
    return logits.gather(2, idx)


def _reference(hf, g, data, masks, ablated):
    """Reference logits ``[K, N, P, V]`` of keep-masks ``masks [K, S, R]``."""
    removed = (g.edge_mask.double() - masks) * g.edge_mask
    with torch.no_grad():
        return _at(reference_logits(hf, g, data.clean, removed, ablated), data, len(masks))


def _close(got, want):
    scale = max(float(want.abs().max()), 1.0)
    torch.testing.assert_close(got, want, atol=TOL * scale, rtol=0)


def _far(got, want) -> bool:
    """Whether ``got`` misses ``want`` by far more than the tolerance (a caught mutation)."""
    return float((got - want).abs().max()) > 100 * TOL * max(float(want.abs().max()), 1.0)


def _data(model, seed: int):
    return ToyTask(seq_len=SEQ - 1, positions=2).build(model.tokenizer, 3, seed=seed)


def _flipped(model, data, ablation: str = "resample"):
    """Mutation: an engine whose runner treats a parallel block as sequential and vice versa
    in everything but the plain clean and corrupted runs (taken before the flip; the family
    tests compare those with Hugging Face): the fully ablated run, every masked pass, EAP."""
    engine = PatchingEngine(model, ablation=ablation)
    engine.clean_cache(data)
    engine.corrupted_outputs(data)
    arch = engine.runner.arch
    arch.parallel = not arch.parallel
    return engine


# ------------------------------------------------------------------ the graph
@pytest.mark.parametrize("wiring", sorted(WIRINGS))
def test_the_graph_follows_the_wiring(neox, wiring):
    """A parallel block's MLP reads no head of its own layer (and a sequential one reads all);
    the edge count in closed form; a graph of the other wiring is refused by the runner."""
    model, hf = neox(wiring)
    parallel = wiring == "parallel"
    assert hf.config.use_parallel_residual is parallel
    g = ComputeGraph.from_model(model)
    assert g.parallel_attn_mlp is parallel
    names = set(g.edge_names)
    for layer in range(g.n_layers):
        own = {f"a{layer}.h{h}->m{layer}" for h in range(g.n_heads)}
        assert (own & names) == (set() if parallel else own)
        assert f"a{layer - 1}.h0->m{layer}" in names or layer == 0
    n_l, h = g.n_layers, g.n_heads
    up = [1 + layer * (h + 1) for layer in range(n_l)]  # senders entering each block
    edges = sum(3 * h * u + u + (0 if parallel else h) for u in up) + 1 + n_l * (h + 1)
    assert g.n_edges == edges
    other = ComputeGraph(n_l, h, parallel_attn_mlp=not parallel)
    with pytest.raises(ConfigError, match="in parallel" if not parallel else "in sequence"):
        block_runner(model, other)


def test_the_reference_is_plain_hugging_face_at_both_ends(neox):
    """The hook reference with nothing removed is the clean model and with every edge removed
    (resample) the corrupted one, in both wirings: it is a faithful slow reference."""
    for wiring in WIRINGS:
        model, hf = neox(wiring)
        g = ComputeGraph.from_model(model)
        data = _data(model, 0)
        ablated = _ablated(hf, g, data, "resample")
        masks = torch.stack([g.full_mask(torch.float64), torch.zeros_like(g.full_mask(
            torch.float64))])
        got = _reference(hf, g, data, masks, ablated)
        with torch.no_grad():
            clean = _at(hf(data.clean).logits, data, 1)[0]
            corrupted = _at(hf(data.corrupted).logits, data, 1)[0]
        _close(got[0], clean)
        _close(got[1], corrupted)
        assert _far(clean, corrupted)


# ------------------------------------------------------------------ masked passes
@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
@pytest.mark.parametrize("wiring", sorted(WIRINGS))
def test_every_single_edge_equals_plain_hugging_face_hooks(neox, wiring, ablation):
    """Each edge removed alone (runner passes from the receiver's layer, the last block at the
    metric positions) equals plain HF with that receiver's input rebuilt by a hook."""
    model, hf = neox(wiring)
    engine = PatchingEngine(model, ablation=ablation)
    g = engine.graph
    data = _data(model, 1)
    masks = g.full_mask(torch.float64).expand(g.n_edges, -1, -1).clone()
    pairs = g.edge_pairs
    masks[torch.arange(g.n_edges), pairs[:, 0], pairs[:, 1]] = 0
    want = _reference(hf, g, data, masks, _ablated(hf, g, data, ablation))
    _close(engine.run(data, masks), want)
    full = _reference(hf, g, data, g.full_mask(torch.float64)[None], _ablated(hf, g, data,
                                                                              ablation))
    moved = (want - full).abs().amax((1, 2, 3))
    assert int((moved > 1e-6).sum()) > g.n_edges // 2  # most edges matter: the check has teeth
    into_mlp = torch.tensor([g.receivers[r].kind == "mlp" for r in pairs[:, 1].tolist()])
    assert bool((moved[into_mlp] > 1e-6).all())  # every edge into an MLP matters


def _strategy_masks(g: ComputeGraph, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Keep-masks ``[K, S, R]`` that drive each masked-pass strategy (see MaskedPass):
    ``dense`` (random circuits: every receiver touched), ``kept`` (sparse circuits after the
    start layer), ``sparse_start`` (a few receivers touched at the start layer: only an MLP's
    input, only one head's q/k/v, or both) and ``fractional`` (interpolated edges)."""
    edge = g.edge_mask.double()
    full = g.full_mask(torch.float64)
    layer_of = torch.tensor([r.layer for r in g.receivers])
    dense = torch.stack([(torch.rand(edge.shape, generator=gen, dtype=torch.float64) < p)
                         .double() for p in (0.3, 0.7)]) * edge
    kept = []
    for layer in range(g.n_layers):
        m = (torch.rand(edge.shape, generator=gen, dtype=torch.float64) < 0.1).double() * edge
        m[:, layer_of < layer] = edge[:, layer_of < layer]
        kept.append(m)
    sparse = []
    for layer in range(g.n_layers):
        r_mlp, r_q, r_v = g.mlp_receiver[layer], g.q_start[layer], g.v_start[layer] + 1
        for receivers in ([r_mlp], [r_q], [r_v, r_mlp]):
            m = full.clone()
            for r in receivers:
                m[int(g.n_upstream[r]) - 1, r] = 0  # the latest sender into it
                m[0, r] = 0  # and the embeddings
            sparse.append(m)
    frac = full * torch.rand(edge.shape, generator=gen, dtype=torch.float64)
    return {"dense": dense, "kept": torch.stack(kept), "sparse_start": torch.stack(sparse),
            "fractional": frac[None]}


@pytest.mark.parametrize("wiring", sorted(WIRINGS))
def test_every_masked_strategy_equals_plain_hugging_face_and_needs_the_wiring(neox, wiring,
                                                                              monkeypatch):
    """Dense layers, kept form, a sparse start layer and fractional masks, batched and one at a
    time, equal the hook reference, and each strategy does run; with the wiring flipped in the
    runner (mutation) every strategy misses the reference."""
    model, hf = neox(wiring)
    engine = PatchingEngine(model)
    g = engine.graph
    data = _data(model, 2)
    ablated = _ablated(hf, g, data, "resample")
    ran: list[str] = []
    logits, sparse_attention = MaskedPass.logits, MaskedPass.sparse_attention

    def spy_logits(self):
        ran.append("kept" if self.kept_w is not None
                   else "dense" if self.dense_layers else "removed")
        return logits(self)

    def spy_sparse(self, layer, patches):
        out = sparse_attention(self, layer, patches)
        ran.append("sparse_start" if out is not None else "shared")
        return out

    monkeypatch.setattr(MaskedPass, "logits", spy_logits)
    monkeypatch.setattr(MaskedPass, "sparse_attention", spy_sparse)
    cases = _strategy_masks(g, torch.Generator().manual_seed(3))
    wants = {name: _reference(hf, g, data, masks, ablated) for name, masks in cases.items()}
    for name, masks in cases.items():
        ran.clear()
        got = engine.run(data, masks)
        _close(got, wants[name])
        _close(torch.cat([engine.run(data, m) for m in masks]), got)
        expected = {"dense": "dense", "kept": "kept", "sparse_start": "sparse_start",
                    "fractional": "dense"}[name]
        assert expected in ran, (name, ran)  # the strategy under test did run
    mutant = _flipped(model, data)
    for name, masks in cases.items():
        assert _far(mutant.run(data, masks), wants[name]), name


def test_every_start_layer_gives_the_same_logits(neox):
    """A pass may start at any layer up to the first one its masks touch: the cached blocks
    (residual and MLP input of parallel blocks) equal running them."""
    model, hf = neox("parallel")
    engine = PatchingEngine(model)
    g = engine.graph
    data = _data(model, 4)
    layer_of = torch.tensor([r.layer for r in g.receivers])
    gen = torch.Generator().manual_seed(5)
    masks = (torch.rand(g.edge_mask.shape, generator=gen, dtype=torch.float64) < 0.5).double()
    masks = masks * g.edge_mask
    masks[:, layer_of < g.n_layers - 1] = g.edge_mask.double()[:, layer_of < g.n_layers - 1]
    masks = torch.stack([masks, g.full_mask(torch.float64)])
    want = _reference(hf, g, data, masks, _ablated(hf, g, data, "resample"))
    for start in range(g.n_layers):
        _close(engine.run(data, masks, start=start), want)


# ------------------------------------------------------------------ attribution
@pytest.mark.parametrize("ablation", ["resample", "zero"])
@pytest.mark.parametrize("wiring", sorted(WIRINGS))
def test_eap_is_the_gradient_of_the_plain_hugging_face_reference(neox, wiring, ablation):
    """EAP on the runner equals the derivative of the hook reference's metric with respect to
    each edge's removal weight at the full circuit (the MLP receiver's gradient taken on the
    block's input in parallel blocks); with the wiring flipped (mutation) it does not."""
    model, hf = neox(wiring)
    engine = PatchingEngine(model, ablation=ablation)
    g = engine.graph
    data = _data(model, 6)
    removed = torch.zeros(1, g.n_senders, g.n_receivers, dtype=torch.float64,
                          requires_grad=True)
    logits = _at(reference_logits(hf, g, data.clean, removed,
                                  _ablated(hf, g, data, ablation)), data, 1)[0]
    data.metric(logits).double().mean().backward()
    want = removed.grad[0] * g.edge_mask
    got = engine.edge_attribution(data).double()
    scale = float(want.abs().max())
    assert scale > 1e-2
    torch.testing.assert_close(got, want, atol=TOL * scale, rtol=0)
    mlp_cols = want[:, [r for r in g.mlp_receiver if r is not None]]
    assert float(mlp_cols.abs().max()) > 1e-3  # MLP receivers carry scores: the check has teeth
    flipped = _flipped(model, data, ablation).edge_attribution(data).double()
    assert float((flipped - want).abs().max()) > 100 * TOL * scale
