"""Gemma-2's post-attention norm: edges defined through it, checked against plain Hugging Face.

A receiver reads, for each earlier layer, the post-attention norm of its own mixture of kept and
removed head outputs (``circuitfind/patching/post_norm_pass.py``, ``PostNormPass``).
The slow reference here implements that definition with plain PyTorch hooks on the Hugging Face
modules: every receiver's input (each head's q, each key/value head's k and v, each MLP and the
logits) is rebuilt from the run's own captured values, for any (fractional) removal weights.
Being differentiable in those weights, its gradient at the full circuit is EAP's score.
"""

from __future__ import annotations

import pytest
import torch

from circuitfind.patching import PatchingEngine
from circuitfind.testing import ToyTask
from tolerances import assert_close


@pytest.fixture(scope="module")
def gemma(tiny_models):
    model = tiny_models("gemma2")  # conftest.MODEL_SPECS: 3 layers, 4 heads, 2 k/v heads
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model.cfg.model_name, dtype=torch.float64,
                                              attn_implementation="eager").eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    return model, hf


def _captures(hf, tokens, g):
    """Every sender's output (heads pre-norm) of a plain run: ``[S, N, T, d]``."""
    body = hf.model
    out = {}
    hooks = [body.embed_tokens.register_forward_hook(lambda m, a, o: out.__setitem__(0, o))]
    for layer, block in enumerate(body.layers):
        def z_hook(m, args, layer=layer):
            z = args[0]  # [N, T, H*dh]
            w = m.weight.T.view(g.n_heads, -1, m.weight.shape[0])  # [H, dh, d]
            zh = z.view(*z.shape[:2], g.n_heads, -1)
            for h in range(g.n_heads):
                out[g.head_start[layer] + h] = zh[:, :, h] @ w[h]
        hooks.append(block.self_attn.o_proj.register_forward_pre_hook(z_hook))
        hooks.append(block.post_feedforward_layernorm.register_forward_hook(
            lambda m, a, o, u=g.mlp_index[layer]: out.__setitem__(u, o)))
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([out[u] for u in range(g.n_senders)])


def reference_logits(hf, g, tokens, removed, ablated, frozen=None, clean=None, fixed=None,
                     moved=None):
    """Logits ``[N, T, V]`` of plain HF with every receiver's input rebuilt by hooks from the
    removal weights ``removed [S, R]`` (eq. (1), heads through their layer's post-norm).

    ``frozen [S, R]`` weights move edges to their value in the run ``clean [S, N, T, d]`` (path
    patching); ``fixed [S, N, T, d]`` replaces every ``a_u - a'_u`` by a constant (EAP-IG takes
    the plain runs' differences at every gradient point); ``moved = {node group: (alpha,
    change)}`` replaces that group's output (``input``, ``a{L}``: the heads' pre-norm sum with
    bias, ``m{L}``) by the constant ``value - (1 - alpha) change`` (EAP-IG's gradient points)."""
    moved = moved or {}

    def interpolated(node, out):
        """``out``, or its constant interpolation if the point moves ``node``."""
        if node not in moved:
            return out
        alpha, delta = moved[node]
        return out.detach() - (1 - alpha) * delta
    body = hf.model

    def change(u, r):
        """``removed (a_u - a'_u) + frozen (a_u - a_u(clean))`` for the edge u -> r."""
        out = removed[u, r] * (cur[u] - ablated[u] if fixed is None else fixed[u])
        if frozen is not None:
            out = out + frozen[u, r] * (cur[u] - clean[u])
        return out
    cur: dict[int, torch.Tensor] = {}  # this run's sender values
    sums: dict[int, torch.Tensor] = {}  # this run's pre-norm head sums
    resid: dict[int, torch.Tensor] = {}
    hooks = []

    def receiver_input(r, x):
        """Receiver r's input from the residual ``x`` it would read unpatched."""
        layer = g.receivers[r].layer
        own = g.receivers[r].kind in ("mlp", "logits")
        heads_upto = layer + 1 if own else layer
        out = x
        for u in range(int(g.n_upstream[r])):
            is_head = any(g.head_start[lv] <= u < g.head_start[lv] + g.n_heads
                          for lv in range(min(heads_upto, g.n_layers)))
            if not is_head:
                out = out - change(u, r)
        for lv in range(min(heads_upto, g.n_layers)):
            h0 = g.head_start[lv]
            mix = sums[lv] - sum(change(h0 + h, r) for h in range(g.n_heads))
            norm = body.layers[lv].post_attention_layernorm
            out = out + norm(mix) - norm(sums[lv])
        return out

    def embed_hook(m, args, out):
        cur[0] = out = interpolated("input", out)
        return out
    hooks.append(body.embed_tokens.register_forward_hook(embed_hook))
    for layer, block in enumerate(body.layers):
        attn = block.self_attn
        dh = attn.head_dim

        def pre(m, args, layer=layer):
            resid[layer] = args[0]
        hooks.append(block.register_forward_pre_hook(pre))

        def proj_hook(m, args, out, layer=layer, kind="q", block=block, dh=dh):
            out = out.clone()
            n_groups = out.shape[-1] // dh
            first = {"q": g.q_start, "k": g.k_start, "v": g.v_start}[kind][layer]
            for i in range(n_groups):
                x_r = receiver_input(first + i, resid[layer])
                full = torch.nn.functional.linear(block.input_layernorm(x_r), m.weight, m.bias)
                out[..., i * dh:(i + 1) * dh] = full[..., i * dh:(i + 1) * dh]
            return out
        for kind in "qkv":
            hooks.append(getattr(attn, f"{kind}_proj").register_forward_hook(
                lambda m, a, o, f=proj_hook, k=kind: f(m, a, o, kind=k)))

        def z_hook(m, args, layer=layer):
            z = args[0]
            w = m.weight.T.view(g.n_heads, -1, m.weight.shape[0])
            zh = z.view(*z.shape[:2], g.n_heads, -1)
            for h in range(g.n_heads):
                cur[g.head_start[layer] + h] = zh[:, :, h] @ w[h]
        hooks.append(attn.o_proj.register_forward_pre_hook(z_hook))
        def sum_hook(m, args, out, layer=layer):
            sums[layer] = out = interpolated(f"a{layer}", out)
            return out
        hooks.append(attn.o_proj.register_forward_hook(sum_hook))

        def mlp_in(m, args, layer=layer):
            return (receiver_input(g.mlp_receiver[layer], args[0]),)
        hooks.append(block.pre_feedforward_layernorm.register_forward_pre_hook(mlp_in))
        def mlp_out(m, args, out, layer=layer):
            cur[g.mlp_index[layer]] = out = interpolated(f"m{layer}", out)
            return out
        hooks.append(block.post_feedforward_layernorm.register_forward_hook(mlp_out))

    def final_in(m, args):
        return (receiver_input(g.n_receivers - 1, args[0]),)
    hooks.append(body.norm.register_forward_pre_hook(final_in))
    try:
        return hf(tokens).logits
    finally:
        for h in hooks:
            h.remove()


def _at(logits, data):
    idx = data.positions[:, :, None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx)


def test_masked_passes_equal_the_hooked_hugging_face_reference(gemma):
    """Single edges, random fractional circuits, every start layer: the runner's post-norm
    form equals plain HF with every receiver rebuilt by hooks."""
    model, hf = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=2)
    engine = PatchingEngine(model)
    g = engine.graph
    ablated = _captures(hf, data.corrupted, g)
    gen = torch.Generator().manual_seed(0)
    pairs = g.edge_pairs
    picks = torch.randperm(g.n_edges, generator=gen)[:24].tolist()
    masks = g.full_mask(torch.float64).expand(len(picks) + 3, -1, -1).clone()
    for k, e in enumerate(picks):
        masks[k, pairs[e, 0], pairs[e, 1]] = 0
    for k in range(3):  # random fractional circuits
        masks[len(picks) + k] = torch.rand(g.edge_mask.shape, generator=gen,
                                           dtype=torch.float64) * g.edge_mask
    got = engine.run(data, masks)
    moved = 0
    for k in range(len(masks)):
        removed = (g.edge_mask.double() - masks[k])
        with torch.no_grad():
            want = _at(reference_logits(hf, g, data.clean, removed, ablated), data)
        scale = float(want.abs().max())
        torch.testing.assert_close(got[k], want, atol=64 * 1.2e-7 * scale, rtol=0)
        moved += bool((want - _at(hf(data.clean).logits, data)).abs().max() > 1e-4)
    assert moved > len(masks) // 2
    # later start layers give the same logits
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    late = masks[-1].clone()
    late[:, layer_of < 2] = g.edge_mask[:, layer_of < 2].double()
    # Gemma-2's softmax and norms round through float32 (tests/tolerances.py)
    assert_close(model, engine.run(data, late, start=2), engine.run(data, late, start=0))


def test_eap_differentiates_through_the_post_norm(gemma):
    """EAP on the runner = the gradient of the hooked reference's metric with respect to the
    removal weights at the full circuit (the definition of an edge's attribution score)."""
    model, hf = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=3)
    engine = PatchingEngine(model)
    g = engine.graph
    ablated = _captures(hf, data.corrupted, g)
    removed = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64, requires_grad=True)
    logits = _at(reference_logits(hf, g, data.clean, removed, ablated), data)
    data.metric(logits).mean().backward()
    want = (removed.grad * g.edge_mask).float()
    got = engine.edge_attribution(data)
    heads = [u for u in range(g.n_senders) if g.senders[u].kind == "attention"]
    assert want[heads].abs().max() > 1e-2  # head edges matter: the check has teeth
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)


def _reference_gradient(hf, g, data, ablated, **kwargs):
    """``d metric / d removed`` ``[S, R]`` of the hooked reference at the full circuit (mean
    metric over the examples): EAP's score by definition, with ``kwargs`` as in
    :func:`reference_logits`."""
    removed = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64, requires_grad=True)
    logits = _at(reference_logits(hf, g, data.clean, removed, ablated, **kwargs), data)
    data.metric(logits).mean().backward()
    return removed.grad * g.edge_mask


def _ablation_values(captured, kind):
    """Zero or mean ablation values ``[S, 1, 1, d]`` of captured corrupted sender outputs (the
    toy task has no padding: the mean is over every example and position)."""
    if kind == "zero":
        return torch.zeros_like(captured[:, :1, :1])
    return captured.mean((1, 2), keepdim=True)


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_zero_and_mean_ablations_equal_the_reference(gemma, kind):
    """Single edges, fractional circuits and the empty circuit under zero and mean ablation
    (heads ablated before the norm: a receiver reads PostNorm(S - a_h + a'_h)) equal the hooked
    reference, and EAP under that ablation is the reference's gradient."""
    model, hf = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=5)
    engine = PatchingEngine(model, ablation=kind)
    g = engine.graph
    ablated = _ablation_values(_captures(hf, data.corrupted, g), kind)
    gen = torch.Generator().manual_seed(1)
    picks = torch.randperm(g.n_edges, generator=gen)[:8].tolist()
    masks = g.full_mask(torch.float64).expand(len(picks) + 3, -1, -1).clone()
    for k, e in enumerate(picks):
        masks[k, g.edge_pairs[e, 0], g.edge_pairs[e, 1]] = 0
    for k in (-3, -2):
        masks[k] = torch.rand(g.edge_mask.shape, generator=gen, dtype=torch.float64)
    masks[-1] = 0  # every edge ablated
    edge = g.edge_mask.double()
    masks = masks * edge
    got = engine.run(data, masks)
    full = _at(hf(data.clean).logits, data)
    for k in range(len(masks)):
        with torch.no_grad():
            want = _at(reference_logits(hf, g, data.clean, edge - masks[k], ablated), data)
        torch.testing.assert_close(got[k], want, atol=64 * 1.2e-7 * float(want.abs().max()),
                                   rtol=0)
    assert float((got[-1] - full).abs().max()) > 1e-2  # the ablation changes the model
    want = _reference_gradient(hf, g, data, ablated).float()
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(engine.edge_attribution(data), want,
                               atol=1e-4 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("kind", ["resample", "zero", "mean"])
def test_removing_every_out_edge_equals_patching_the_node(gemma, kind):
    """The identity that defines an edge, under every ablation, against plain Hugging Face with
    one node's output replaced by a hook (a head: its slice of the attention output
    projection's input, before the post-norm; an MLP: the post-feedforward norm's output)."""
    model, hf = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 4, seed=6)
    engine = PatchingEngine(model, ablation=kind)
    g = engine.graph
    masks = g.full_mask(torch.float64).expand(g.n_senders, -1, -1).clone()
    for u in range(g.n_senders):
        masks[u, u] = 0
    got = engine.evaluate(data, masks)
    body = hf.model
    want = []
    for node in g.senders:
        if node.kind == "attention":
            module = body.layers[node.layer].self_attn.o_proj
            dh = module.in_features // g.n_heads
            part = slice(node.head * dh, (node.head + 1) * dh)
        else:
            module = body.embed_tokens if node.name == "input" else (
                body.layers[node.layer].post_feedforward_layernorm)
            part = slice(None)
        saved = {}

        def save(m, args, out, saved=saved, is_head=node.kind == "attention"):
            saved["v"] = args[0] if is_head else out

        hook = module.register_forward_hook(save)
        with torch.no_grad():
            hf(data.corrupted)
        hook.remove()
        value = saved["v"][..., part]
        if kind != "resample":
            value = _ablation_values(value[None], kind)[0]

        def patch(m, args, out, value=value, part=part, is_head=node.kind == "attention"):
            if is_head:  # the projection's input: redo it with the head's slice replaced
                z = args[0].clone()
                z[..., part] = value
                return torch.nn.functional.linear(z, m.weight, m.bias)
            return value.expand_as(out)

        hook = module.register_forward_hook(patch)
        with torch.no_grad():
            want.append(data.metric(_at(hf(data.clean).logits, data)).double().mean())
        hook.remove()
    want = torch.stack(want)
    torch.testing.assert_close(got, want, atol=64 * 1.2e-7 * float(want.abs().max()), rtol=0)
    assert float((want - want.mean()).abs().max()) > 1e-3


def test_frozen_edges_equal_the_reference(gemma):
    """Path patching's frozen edges (kept edges carrying their clean value) through the
    post-norm: a receiver's mixture moves frozen heads to their clean outputs."""
    model, hf = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=7)
    engine = PatchingEngine(model)
    g = engine.graph
    ablated, clean = _captures(hf, data.corrupted, g), _captures(hf, data.clean, g)
    gen = torch.Generator().manual_seed(2)
    edge = g.edge_mask.double()
    masks = (torch.rand(3, *edge.shape, generator=gen, dtype=torch.float64) < 0.6) * edge
    frozen = (torch.rand(3, *edge.shape, generator=gen, dtype=torch.float64) < 0.5) * masks
    got = engine.run(data, masks, frozen=frozen)
    assert float((got - engine.run(data, masks)).abs().max()) > 1e-3  # freezing matters
    for k in range(3):
        with torch.no_grad():
            want = _at(reference_logits(hf, g, data.clean, edge - masks[k], ablated,
                                        frozen=frozen[k], clean=clean), data)
        torch.testing.assert_close(got[k], want, atol=64 * 1.2e-7 * float(want.abs().max()),
                                   rtol=0)


def test_every_start_layer_gives_the_same_logits(gemma):
    """A pass may start at any layer up to the first one its masks touch (earlier blocks are
    the cached clean run, whose heads enter every later receiver's mixture clean)."""
    model, _ = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=8)
    engine = PatchingEngine(model)
    g = engine.graph
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    gen = torch.Generator().manual_seed(3)
    edge = g.edge_mask.double()
    for first in range(g.n_layers + 1):
        masks = (torch.rand(2, *edge.shape, generator=gen, dtype=torch.float64) < 0.5) * edge
        masks[:, :, layer_of < first] = edge[:, layer_of < first]
        want = engine.run(data, masks)
        for start in range(first + 1):
            assert_close(model, engine.run(data, masks, start=start), want)


def test_gradient_points_equal_the_reference(gemma):
    """EAP-IG (inputs and activations) and clean-corrupted through the post-norm, several
    points stacked in one pass and one point a pass, equal the mean over the points of the
    hooked reference's gradient, taken with the point's node group held at its interpolated
    value and the plain runs' differences ``a - a'`` (the norm's Jacobian is each point's)."""
    from circuitfind.algorithms.eap_ig import activation_points, input_points
    from circuitfind.patching.engine import GradientPoint

    model, hf = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=9)
    engine = PatchingEngine(model)
    g = engine.graph
    ablated, clean = _captures(hf, data.corrupted, g), _captures(hf, data.clean, g)
    fixed = clean - ablated  # a - a' of the plain runs

    def change(node):
        if node == "input":
            return fixed[0]
        if node.startswith("a"):
            h0 = g.head_start[int(node[1:])]
            return fixed[h0: h0 + g.n_heads].sum(0)
        return fixed[g.mlp_index[int(node[1:])]]

    for points in (input_points(g, 3), activation_points(g, 1),
                   [GradientPoint(1.0), GradientPoint(0.0)]):
        want = sum(_reference_gradient(hf, g, data, ablated, fixed=fixed, moved={
            p.node: (p.alpha, change(p.node))}) for p in points) / len(points)
        want = want.float()
        assert want.abs().max() > 1e-2
        tol = 1e-4 * float(want.abs().max())
        torch.testing.assert_close(engine.edge_attribution(data, points=points), want,
                                   atol=tol, rtol=0)
        single = PatchingEngine(model)  # one point a pass
        single.attribution_plan = (lambda n, seq_len, n_points=1, batch_size=None,
                                     positions=1: (n, 1, False))
        torch.testing.assert_close(single.edge_attribution(data, points=points), want,
                                   atol=tol, rtol=0)


def test_the_fully_ablated_residual_is_the_corrupted_run(gemma):
    """``BlockRunner.ablated_residuals`` of the corrupted run's sender outputs is the corrupted
    run's residual stream (heads through their layer's post-norm), before every block and
    after every attention."""
    model, _ = gemma
    data = ToyTask(seq_len=8).build(model.tokenizer, 3, seed=10)
    runner = PatchingEngine(model).runner
    corrupted = runner.cache(data.corrupted)
    pre, mid = runner.ablated_residuals(corrupted.senders, *data.corrupted.shape)
    assert_close(model, pre, corrupted.resid)
    assert_close(model, mid, corrupted.mid)


def test_the_post_norm_pass_is_differentiable_and_its_gradient_is_eap(gemma):
    """Autograd through ``PostNormPass`` with the removal weights as a leaf (every real edge
    then counts as touched) gives EAP's scores: the fast pass and the closed-form backward agree
    on the edge definition."""
    from circuitfind.patching.post_norm_pass import PostNormPass

    model, _ = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=11)
    engine = PatchingEngine(model)
    g = engine.graph
    cache = engine.clean_cache(data)
    ablated = engine.ablation_values(data)[:, :, : cache.resid.shape[2]]
    removed = torch.zeros(1, g.n_senders, g.n_receivers, dtype=torch.float64,
                          requires_grad=True)
    with torch.enable_grad():
        logits = PostNormPass(engine.runner, cache, ablated, removed * g.edge_mask,
                              data.positions).logits()
        data.metric(logits[0]).mean().backward()
    want = (removed.grad[0] * g.edge_mask).float()
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(engine.edge_attribution(data), want,
                               atol=1e-5 * float(want.abs().max()), rtol=0)


def test_exact_patching_equals_the_reference_on_every_edge(gemma):
    """Exact patching (edges grouped by receiver layer, batched passes from that layer, sparse
    start layer) scores every edge as the hooked reference with that edge alone removed."""
    from circuitfind.algorithms import ExactPatching

    model, hf = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=12)
    engine = PatchingEngine(model)
    g = engine.graph
    ablated = _captures(hf, data.corrupted, g)
    got = ExactPatching(progress=False).score(engine, data).double()
    with torch.no_grad():
        base = data.metric(_at(hf(data.clean).logits, data)).double().mean()
        want = torch.zeros_like(got)
        for u, r in g.edge_pairs.tolist():
            removed = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
            removed[u, r] = 1
            logits = _at(reference_logits(hf, g, data.clean, removed, ablated), data)
            want[u, r] = data.metric(logits).double().mean() - base
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)


def _batch_setup(gemma, data_seed, gen_seed):
    """Model, HF model, data, engine, graph, the corrupted run's senders, the edge mask, each
    receiver's layer and a seeded generator, for batches checked against the reference."""
    model, hf = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=data_seed)
    engine = PatchingEngine(model)
    g = engine.graph
    ablated = _captures(hf, data.corrupted, g)
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    return (model, hf, data, engine, g, ablated, g.edge_mask.double(), layer_of,
            torch.Generator().manual_seed(gen_seed))


@pytest.mark.parametrize("layer, kind", [(1, "q"), (1, "k"), (2, "mlp")])
def test_acdc_like_batches_equal_the_reference(gemma, layer, kind):
    """ACDC's batches: a sparse base circuit with one edge into one receiver flipped per mask
    (so the start layer's heads are computed once for the masks that agree and per mask where
    the flipped receiver feeds them) equal the hooked reference."""
    model, hf, data, engine, g, ablated, edge, layer_of, gen = _batch_setup(gemma, 14, 4)
    base = (torch.rand(edge.shape, generator=gen, dtype=torch.float64) < 0.3) * edge
    base[:, layer_of < layer] = edge[:, layer_of < layer]
    tested = next(r for r, rec in enumerate(g.receivers)
                  if rec.layer == layer and rec.kind == kind)
    senders = edge[:, tested].nonzero()[:, 0][:5]
    masks = base.expand(len(senders), -1, -1).clone()
    masks[torch.arange(len(senders)), senders, tested] = 1 - masks[
        torch.arange(len(senders)), senders, tested]
    got = engine.run(data, masks)
    for k in range(len(masks)):
        with torch.no_grad():
            want = _at(reference_logits(hf, g, data.clean, edge - masks[k], ablated), data)
        torch.testing.assert_close(got[k], want, atol=64 * 1.2e-7 * float(want.abs().max()),
                                   rtol=0)
    assert float((got - got[:1]).abs().max()) > 1e-4  # the flipped edges matter


def test_gram_form_equals_the_direct_norms_and_the_memo_changes_nothing(gemma, monkeypatch):
    """The receivers' post-norms of their own mixtures read off each layer's Gram matrices
    (``PostNormPass._dynamic_gram``) equal the norms computed directly (the path taken when an
    adapter's post-norm is not an RMSNorm), for random fractional circuits with frozen edges
    from every start layer; and consecutive ACDC-like passes, whose receivers' static parts come
    from the runner's memo, equal the same passes on a fresh runner."""
    from circuitfind.patching.masked_pass import KeptFormMemo

    model, _ = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=15)
    engine = PatchingEngine(model)
    g = engine.graph
    edge = g.edge_mask.double()
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    gen = torch.Generator().manual_seed(5)
    cases = []
    for first in range(g.n_layers):
        masks = (torch.rand(3, *edge.shape, generator=gen, dtype=torch.float64) < 0.5) * edge
        masks[:, :, layer_of < first] = edge[:, layer_of < first]
        frozen = (torch.rand(3, *edge.shape, generator=gen, dtype=torch.float64) < 0.3) * masks
        cases.append((masks, frozen))
    gram = [(engine.run(data, m), engine.run(data, m, frozen=f)) for m, f in cases]
    monkeypatch.setattr(engine.runner.arch, "post_norm_rms", lambda layer: None)
    for (masks, frozen), (got, got_frozen) in zip(cases, gram):
        assert_close(model, got, engine.run(data, masks))
        assert_close(model, got_frozen, engine.run(data, masks, frozen=frozen))
    monkeypatch.undo()
    # ACDC-like: a sparse base circuit, then passes flipping edges into receivers of layer 1
    base = (torch.rand(edge.shape, generator=gen, dtype=torch.float64) < 0.3) * edge
    base[:, layer_of < 1] = edge[:, layer_of < 1]
    passes = []
    for r in [r for r, rec in enumerate(g.receivers) if rec.layer == 1][:3]:
        senders = edge[:, r].nonzero()[:, 0][:3]
        masks = base.expand(len(senders), -1, -1).clone()
        masks[torch.arange(len(senders)), senders, r] = 1 - masks[
            torch.arange(len(senders)), senders, r]
        passes.append(masks)
    memo, reused, heads = engine.runner.memo, 0, 0
    for masks in passes:
        had = dict(memo.entries)
        got = engine.run(data, masks)
        reused += sum(1 for key, value in memo.entries.items() if had.get(key) is value)
        heads += sum(1 for key, value in memo.entries.items()
                     if key[0] == "start head" and had.get(key) is value)
        engine.runner.memo = KeptFormMemo()
        assert_close(model, got, engine.run(data, masks))  # fresh: nothing reused
        engine.runner.memo = memo
    assert reused > 0  # later receivers' static parts came from the memo
    assert heads > 0  # and start-layer heads whose inputs no mask changes


def test_a_single_mask_touching_several_layers_equals_the_reference(gemma):
    """One mask (a pass of one row in every layer) touching a receiver of layer 0 and one query
    of layer 2: the later layer's untouched heads read the mask's residual, not the clean one
    (a one-row pass once took every layer for its start layer and kept their clean outputs)."""
    model, hf = gemma
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=16)
    engine = PatchingEngine(model)
    g = engine.graph
    ablated = _captures(hf, data.corrupted, g)
    mask = g.full_mask(torch.float64).clone()
    mask[0, next(r for r, rec in enumerate(g.receivers) if rec.layer == 0)] = 0
    mask[:, next(r for r, rec in enumerate(g.receivers) if rec.layer == 2 and rec.kind == "q")] = 0
    got = engine.run(data, mask[None] * g.edge_mask.double())[0]
    with torch.no_grad():
        want = _at(reference_logits(hf, g, data.clean, g.edge_mask.double() - mask
                                    * g.edge_mask.double(), ablated), data)
    torch.testing.assert_close(got, want, atol=64 * 1.2e-7 * float(want.abs().max()), rtol=0)


def test_mask_invariant_nodes_equal_the_removed_form_and_the_reference(gemma, monkeypatch):
    """Sparse ACDC-like batches (a base circuit keeping few edges, one edge into a receiver of
    the start layer removed per mask): receivers after the start layer whose weights agree in
    every mask and whose kept computed senders are invariant are built once in kept form
    (``PostNormPass._kept_inputs``), heads and MLPs reading only them run once, and their
    outputs come from the memo in the next pass; logits keeping only MLP edges from the
    computed layers are built in kept form per mask. All of it equals the hooked reference, the
    removed form (every node per mask, Gram form) and a fresh runner."""
    from circuitfind.patching.masked_pass import KeptFormMemo
    from circuitfind.patching.post_norm_pass import PostNormPass

    model, hf, data, engine, g, ablated, edge, layer_of, gen = _batch_setup(gemma, 17, 6)
    passes = []
    for first in (0, 1):
        base = (torch.rand(edge.shape, generator=gen, dtype=torch.float64) < 0.08) * edge
        base[:, layer_of < first] = edge[:, layer_of < first]
        # the layer's MLP keeps every input (it varies with the flipped receivers' heads), and
        # the logits keep only the MLPs and the input (they vary, reading no head)
        base[:, g.mlp_receiver[first]] = edge[:, g.mlp_receiver[first]]
        base[:, -1] = 0
        base[[0] + [u for u in g.mlp_index if u is not None], -1] = 1
        for r in [r for r, rec in enumerate(g.receivers) if rec.layer == first][:2]:
            senders = edge[:, r].nonzero()[:, 0][-3:]
            masks = base.expand(len(senders), -1, -1).clone()
            masks[torch.arange(len(senders)), senders, r] = 1 - masks[
                torch.arange(len(senders)), senders, r]
            passes.append(masks)
    memo, reused, once = engine.runner.memo, 0, 0
    got, forms = [], set()
    kept_inputs = PostNormPass._kept_inputs

    def spy(self, rs, abl, per_mask=False):
        forms.add(per_mask)
        return kept_inputs(self, rs, abl, per_mask)

    monkeypatch.setattr(PostNormPass, "_kept_inputs", spy)
    for masks in passes:
        had = dict(memo.entries)
        got.append(engine.run(data, masks))
        kinds = [key[0] for key in memo.entries if isinstance(key, tuple)]
        once += sum(kind in ("pn heads", "pn mlp") for kind in kinds)
        reused += sum(1 for key, value in memo.entries.items()
                      if isinstance(key, tuple) and key[0] in ("pn recv", "pn heads", "pn mlp")
                      and had.get(key) is value)
        engine.runner.memo = KeptFormMemo()
        assert_close(model, got[-1], engine.run(data, masks))  # fresh: nothing reused
        engine.runner.memo = memo
        for k in range(len(masks)):
            with torch.no_grad():
                want = _at(reference_logits(hf, g, data.clean, edge - masks[k], ablated), data)
            torch.testing.assert_close(got[-1][k], want,
                                       atol=64 * 1.2e-7 * float(want.abs().max()), rtol=0)
    assert once > 0 and reused > 0  # invariant nodes ran once and came from the memo
    assert forms == {False, True}  # and receivers with few kept edges took the kept form
    monkeypatch.setattr(PostNormPass, "_recv_key", lambda self, r: None)  # every node per mask
    monkeypatch.setattr(PostNormPass, "_sparse", lambda self, r: False)  # in removed form
    for masks, logits in zip(passes, got):
        assert_close(model, logits, engine.run(data, masks))


def test_one_mask_dense_passes_build_invariant_receivers_in_the_removed_form(gemma,
                                                                             monkeypatch):
    """In a pass of one mask every node is invariant; over a dense circuit the receivers
    missing from the memo are built in the removed form (``PostNormPass._kept_pays``: q/k/v,
    MLP and logits receivers keeping head edges from computed layers) and kept in the memo,
    those keeping none in kept form. Consecutive one-mask passes (ACDC's at tau 1e-3) equal the
    hooked reference, the kept form for every invariant receiver and a fresh runner, and a
    repeated pass takes every entry from the memo."""
    from circuitfind.patching.masked_pass import KeptFormMemo
    from circuitfind.patching.post_norm_pass import PostNormPass

    model, hf, data, engine, g, ablated, edge, layer_of, gen = _batch_setup(gemma, 19, 9)
    base = (torch.rand(edge.shape, generator=gen, dtype=torch.float64) < 0.6) * edge
    base[:, layer_of < 1] = edge[:, layer_of < 1]
    base[:, g.mlp_receiver[2]] = 0  # the last MLP keeps no head edge: kept form
    base[[0] + [u for u in g.mlp_index if u is not None], g.mlp_receiver[2]] = 1
    r = next(r for r, rec in enumerate(g.receivers) if rec.layer == 1 and rec.kind == "q")
    passes = []
    for u in base[:, r].nonzero()[:, 0][-3:].tolist():  # kept edges, removed one per pass
        mask = base.clone()
        mask[u, r] = 0
        passes.append(mask[None])
    passes.append(passes[-1])  # repeated: every node from the memo
    calls, pays = [], PostNormPass._kept_pays

    def spy(self, r):
        calls.append((g.receivers[r].kind, pays(self, r)))
        return calls[-1][1]

    monkeypatch.setattr(PostNormPass, "_kept_pays", spy)
    memo, got, seen = engine.runner.memo, [], set()
    for i, masks in enumerate(passes):
        had, calls[:] = dict(memo.entries), []
        got.append(engine.run(data, masks))
        if i == len(passes) - 1:
            assert [kind for kind, _ in calls] == ["logits"]  # nothing else missing
            assert all(had.get(key) is value for key, value in memo.entries.items()
                       if isinstance(key, tuple) and key[0] in ("pn recv", "pn mlp"))
        seen.update(calls)
        engine.runner.memo = KeptFormMemo()
        assert_close(model, got[-1], engine.run(data, masks))  # fresh: nothing reused
        engine.runner.memo = memo
        with torch.no_grad():
            want = _at(reference_logits(hf, g, data.clean, edge - masks[0], ablated), data)
        torch.testing.assert_close(got[-1][0], want, atol=64 * 1.2e-7 * float(want.abs().max()),
                                   rtol=0)
    assert {kind for kind, kept in seen if not kept} == {"q", "k", "v", "mlp", "logits"}
    assert ("mlp", True) in seen  # the last MLP, keeping no head edge
    assert float((got[0] - got[1]).abs().max()) > 1e-4  # the flipped edges matter
    monkeypatch.setattr(PostNormPass, "_kept_pays", lambda self, r: True)  # every one kept
    engine.runner.memo = KeptFormMemo()
    for masks, logits in zip(passes, got):
        assert_close(model, logits, engine.run(data, masks))


def _acdc_like(g, gen, layers, kinds):
    """Float32 masks like ACDC's passes: for each layer of ``layers`` a sparse base circuit
    after it (the full graph before it) and, for each receiver kind of ``kinds``, a pass of
    three masks, each removing one of the last three edges of the layer's first such
    receiver."""
    edge = g.edge_mask.float()
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    cases = []
    for first in layers:
        base = (torch.rand(edge.shape, generator=gen) < 0.4) * edge
        base[:, layer_of < first] = edge[:, layer_of < first]
        for kind in kinds:
            r = next(r for r, rec in enumerate(g.receivers)
                     if rec.layer == first and rec.kind == kind)
            senders = edge[:, r].nonzero()[:, 0][-3:]
            masks = base.expand(len(senders), -1, -1).clone()
            masks[torch.arange(len(senders)), senders, r] = 0
            cases.append(masks)
    return cases


def test_float32_folded_projections_equal_the_normalised_inputs(tmp_path, monkeypatch):
    """In float32 the input norm folds into the q/k/v projections and ACDC-like passes build
    their receivers' inputs in place of the Gram form's change (``PostNormPass.
    _own_projections``); they equal the passes that normalise every input first, within
    float32 rounding."""
    from circuitfind.patching.post_norm_pass import PostNormPass
    from circuitfind.testing.tiny import tiny_model

    # the float64 fixture's model (conftest.MODEL_SPECS), in float32
    model = tiny_model(tmp_path / "gemma2", dtype=torch.float32, arch="gemma2", n_layers=3,
                       n_heads=4, n_kv_heads=2, seed=9)
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=17)
    engine = PatchingEngine(model)
    g = engine.graph
    edge = g.edge_mask.float()
    gen = torch.Generator().manual_seed(6)
    cases = _acdc_like(g, gen, range(g.n_layers), ("q", "mlp"))
    cases.append((torch.rand(2, *edge.shape, generator=gen) < 0.5) * edge)  # random circuits
    folded, original = [], PostNormPass._folded

    def spy(self, layer):
        out = original(self, layer)
        folded.append(out is not None)
        return out
    monkeypatch.setattr(PostNormPass, "_folded", spy)
    fast = [engine.run(data, masks) for masks in cases]
    assert folded and all(folded)
    monkeypatch.setattr(PostNormPass, "_folded", lambda self, layer: None)
    spread = 0.0
    for masks, got in zip(cases, fast):
        want = engine.run(data, masks)
        spread = max(spread, float((want - want[:1]).abs().max()))
        assert_close(model, got, want)
    assert spread > 1e-3  # the flipped edges matter


def test_folded_and_output_weights_kept_from_pass_to_pass_change_nothing(tmp_path,
                                                                          monkeypatch):
    """Float32 passes keep ``W_O`` and the norm-folded q/k/v weights among the adapter's
    weight-derived values (``PostNormPass._all_heads``, ``_folded``; ``Architecture.derived``,
    capped by ``DERIVED_BYTES``), never in the runner's memo, whose size the memory plan does
    not bound by the weights: a later pass reads the very tensors an earlier one made; with no
    room for derived values nothing is held and the logits equal, bit for bit, those of passes
    reading the kept tensors; a pass with autograd on keeps none of them (their graphs would
    outlive the pass)."""
    from circuitfind.patching.architectures import base
    from circuitfind.patching.masked_pass import KeptFormMemo
    from circuitfind.patching.post_norm_pass import PostNormPass
    from circuitfind.testing.tiny import tiny_model

    model = tiny_model(tmp_path / "gemma2", dtype=torch.float32, arch="gemma2", n_layers=3,
                       n_heads=4, n_kv_heads=2, seed=9)
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=17)
    engine = PatchingEngine(model)
    g, runner = engine.graph, engine.runner
    mine = ("pn folded", "pn w_out")
    gen = torch.Generator().manual_seed(6)
    cases = _acdc_like(g, gen, range(g.n_layers), ("q", "mlp"))
    expected = [engine.run(data, masks) for masks in cases]
    kept = {key: held[2] for key, held in runner.arch._derived.items() if key[0] in mine}
    assert {key[0] for key in kept} == set(mine)
    assert len(kept) == g.n_layers * 4  # q, k, v folded and W_O, per layer
    assert not any(isinstance(key, tuple) and key and key[0] in mine
                   for key in runner.memo.entries)
    read = []
    original = PostNormPass._folded

    def spy(self, layer):
        out = original(self, layer)
        read.extend(out[0][kind][0] for kind in "qkv")
        return out
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PostNormPass, "_folded", spy)
        engine.run(data, cases[0])
    assert read and all(any(w is v for v in kept.values()) for w in read)
    monkeypatch.setattr(base, "DERIVED_BYTES", 0)
    fresh = PatchingEngine(model)
    for masks, logits in zip(cases, expected):  # made afresh in every pass: the same logits
        assert torch.equal(fresh.run(data, masks), logits)
    assert not any(key[0] in mine for key in fresh.runner.arch._derived)
    monkeypatch.undo()
    cache = engine.clean_cache(data)
    values = engine.ablation_values(data, None)[:, :, : cache.resid.shape[2]]
    removed = (1 - cases[0][:1]) * g.edge_mask.float()
    runner.memo, runner.arch._derived, runner.arch._derived_bytes = KeptFormMemo(), {}, 0
    with torch.enable_grad():
        PostNormPass(runner, cache, values, removed, data.positions).logits()
    assert not any(key[0] in mine for key in runner.arch._derived)


def test_mixture_norms_flag_cancelling_mixtures():
    """``mixture_norms`` reads ``|sum_j u_j v_j|^2`` off the Gram matrix and flags the mixtures
    that cancel (where a float32 Gram matrix's rounding would dominate), not the others."""
    from circuitfind.patching.post_norm_pass import mixture_norms

    gen = torch.Generator().manual_seed(7)
    v = torch.randn(2, 5, 4, 64, generator=gen, dtype=torch.float64)  # [K, X, J, d]
    v[1, :, 3] = v[1, :, 1] + v[1, :, 2] + 1e-3 * v[1, :, 0]  # mask 1: v3 - v1 - v2 ~ 0
    gram = v @ v.transpose(-1, -2)
    us = torch.tensor([[0.0, -1.0, -1.0, 1.0], [1.0, 0.5, -0.25, 0.0]],
                      dtype=torch.float64).T[None].expand(2, -1, -1)  # [K, J, R=2]
    sq, suspect = mixture_norms(gram, us)
    want = ((v[:, :, None] * us.transpose(1, 2)[:, None, :, :, None]).sum(3)).square().sum(-1)
    torch.testing.assert_close(sq, want, rtol=1e-12, atol=1e-12)
    assert bool(suspect[1, :, 0].all())  # the cancelling mixture
    assert not bool(suspect[0].any()) and not bool(suspect[1, :, 1].any())


def test_float32_gram_matrices_equal_float64_and_the_hooked_reference(tmp_path, monkeypatch):
    """Float32 models take each layer's Gram matrices in float32 (``PostNormPass._gram``);
    ACDC-like passes then equal the same passes with every squared mixture norm recomputed
    from a float64 Gram matrix (the repair, ``PostNormPass._exact_norms``, forced here for
    every entry), the passes that normalise each mixture directly, and plain Hugging Face with
    every receiver rebuilt by hooks, within float32 rounding."""
    import circuitfind.patching.post_norm_pass as post_norm_pass
    from transformers import AutoModelForCausalLM

    from circuitfind.testing.tiny import tiny_model

    model = tiny_model(tmp_path / "gemma2", dtype=torch.float32, arch="gemma2", n_layers=3,
                       n_heads=4, n_kv_heads=2, seed=9)
    hf = AutoModelForCausalLM.from_pretrained(model.cfg.model_name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=18)
    engine = PatchingEngine(model)
    g = engine.graph
    edge = g.edge_mask.float()
    cases = _acdc_like(g, torch.Generator().manual_seed(8), range(g.n_layers - 1), ("v",))
    fast = [engine.run(data, masks) for masks in cases]
    repaired, original = [], post_norm_pass.PostNormPass._exact_norms

    def spy(self, layer, kd, us, sq, suspect):
        repaired.append(int(suspect.sum()))
        return original(self, layer, kd, us, sq, suspect)
    monkeypatch.setattr(post_norm_pass.PostNormPass, "_exact_norms", spy)
    monkeypatch.setattr(post_norm_pass, "CANCELLATION", float("inf"))  # repair every entry
    exact = [engine.run(data, masks) for masks in cases]
    assert repaired and min(repaired) > 0
    monkeypatch.setattr(engine.runner.arch, "post_norm_rms", lambda layer: None)
    ablated = _captures(hf, data.corrupted, g)
    spread = 0.0
    for masks, got, got_exact in zip(cases, fast, exact):
        assert_close(model, got, got_exact)
        assert_close(model, got, engine.run(data, masks))  # the direct norms
        for k in (0, len(masks) - 1):
            with torch.no_grad():
                want = _at(reference_logits(hf, g, data.clean, edge - masks[k], ablated), data)
            assert_close(model, got[k], want)
        spread = max(spread, float((got - got[:1]).abs().max()))
    assert spread > 1e-3  # the flipped edges matter
