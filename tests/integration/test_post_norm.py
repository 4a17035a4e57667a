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
from circuitfind.testing import ToyTask, tiny_model
from tolerances import assert_close


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    model = tiny_model(tmp_path_factory.mktemp("gemma2"), dtype=torch.float64, arch="gemma2",
                       n_layers=3, n_kv_heads=2, seed=9)
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


def reference_logits(hf, g, tokens, removed, ablated):
    """Logits ``[N, T, V]`` of plain HF with every receiver's input rebuilt by hooks from the
    removal weights ``removed [S, R]`` (eq. (1), heads through their layer's post-norm)."""
    body = hf.model
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
            w = removed[u, r]
            is_head = any(g.head_start[lv] <= u < g.head_start[lv] + g.n_heads
                          for lv in range(min(heads_upto, g.n_layers)))
            if not is_head:
                out = out - w * (cur[u] - ablated[u])
        for lv in range(min(heads_upto, g.n_layers)):
            h0 = g.head_start[lv]
            mix = sums[lv] - sum(removed[h0 + h, r] * (cur[h0 + h] - ablated[h0 + h])
                                 for h in range(g.n_heads))
            norm = body.layers[lv].post_attention_layernorm
            out = out + norm(mix) - norm(sums[lv])
        return out

    hooks.append(body.embed_tokens.register_forward_hook(
        lambda m, a, o: cur.__setitem__(0, o)))
    for layer, block in enumerate(body.layers):
        attn = block.self_attn
        dh = attn.head_dim

        def pre(m, args, layer=layer):
            resid[layer] = args[0]
        hooks.append(block.register_forward_pre_hook(pre))

        def proj_hook(m, args, out, layer=layer, kind="q", block=block):
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
        hooks.append(attn.o_proj.register_forward_hook(
            lambda m, a, o, layer=layer: sums.__setitem__(layer, o)))

        def mlp_in(m, args, layer=layer):
            return (receiver_input(g.mlp_receiver[layer], args[0]),)
        hooks.append(block.pre_feedforward_layernorm.register_forward_pre_hook(mlp_in))
        hooks.append(block.post_feedforward_layernorm.register_forward_hook(
            lambda m, a, o, u=g.mlp_index[layer]: cur.__setitem__(u, o)))

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
