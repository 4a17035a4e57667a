"""Engine invariants as hypothesis properties over randomly drawn small models of every family.

On a freshly drawn shape (family, layers, query heads per key/value head, key/value heads,
weight seed) and padded prompts of random lengths, checked against plain Hugging Face:

- every edge kept = the clean run of each prompt alone; none kept = the corrupted run;
- removing every out-edge of a drawn node = replacing that node's output with its corrupted
  value by hooks on the Hugging Face modules (the identity that defines an edge);
- K masks in one pass = the masks one at a time;
- EAP is additive over a node's out-edges: the sum of its edges' scores is the node's own
  attribution ``(a'_u - a_u) . d metric / d a_u`` taken by autograd through plain Hugging Face
  (through Gemma-2's post-attention norm for heads).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitfind.patching import PatchingEngine
from circuitfind.testing import tiny_model
from test_families import _modules, _node_patched_metric
from test_fast_path_matrix import alone, hf_logits_at, padded_data
from tolerances import EPS32, assert_close

FAMILIES = ["gpt_neox", "gpt_neox_seq", "llama", "llama3", "mistral", "qwen2", "qwen3",
            "gemma2"]
_BUILT: dict[tuple, tuple] = {}  # shapes drawn again reuse their model (hypothesis shrinks)


def _model(tmp_path_factory, family, layers, group, kv, seed):
    key = (family, layers, group, kv, seed)
    if key not in _BUILT:
        from transformers import AutoModelForCausalLM

        neox = family.startswith("gpt_neox")
        heads = group * kv
        path = tmp_path_factory.mktemp(family)
        model = tiny_model(path, dtype=torch.float64, arch=family, n_layers=layers,
                           n_heads=heads, d_model=8 * heads, seed=seed,
                           n_kv_heads=None if neox else kv)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64,
                                                  attn_implementation="eager").eval()
        for p in hf.parameters():
            p.requires_grad_(False)
        _BUILT.clear()  # one model at a time: hypothesis draws few repeats
        _BUILT[key] = model, hf
    return _BUILT[key]


def node_attribution(hf, data, node: str, n_heads: int) -> torch.Tensor:
    """``(a'_u - a_u) . d metric / d a_u`` (batch-mean metric) by autograd on plain HF, for
    heads through their slice of the attention output projection's input (``a_h = z_h W_O[h]``
    is linear in ``z_h``)."""
    embed, o_proj, mlp = _modules(hf)
    if node == "input":
        module, kind, sl = embed, "out", slice(None)
    elif node.startswith("m"):
        module, kind, sl = mlp[int(node[1:])], "out", slice(None)
    else:
        layer, head = (int(p[1:]) for p in node.split("."))
        module, kind = o_proj[layer], "in"
        d_head = module.weight.shape[1] // n_heads
        sl = slice(head * d_head, (head + 1) * d_head)
    seen: dict[str, torch.Tensor] = {}

    def pre(mod, args):
        x = args[0].detach().requires_grad_(True)
        seen["x"] = x
        return (x, *args[1:])

    def post(mod, args, out):
        out = out.detach().requires_grad_(True)
        seen["x"] = out
        return out

    values = {}
    for name, tokens in (("clean", data.clean), ("corrupted", data.corrupted)):
        handle = (module.register_forward_pre_hook(pre) if kind == "in"
                  else module.register_forward_hook(post))
        try:
            logits = hf(tokens).logits
        finally:
            handle.remove()
        idx = data.positions[:, :, None].expand(-1, -1, logits.shape[-1])
        if name == "clean":
            metric = data.metric(logits.gather(1, idx)).mean()
            (grad,) = torch.autograd.grad(metric, seen["x"])
        values[name] = seen["x"].detach()
    diff = (values["corrupted"] - values["clean"])[..., sl]
    return (diff * grad[..., sl]).sum()


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(family=st.sampled_from(FAMILIES), layers=st.integers(1, 3), group=st.integers(1, 2),
       kv=st.integers(1, 2), seed=st.integers(0, 1000), node=st.integers(0, 10**6),
       lengths=st.lists(st.tuples(st.integers(2, 10), st.integers(2, 10)), min_size=2,
                        max_size=3))
def test_engine_invariants_on_random_models(tmp_path_factory, family, layers, group, kv, seed,
                                            node, lengths):
    model, hf = _model(tmp_path_factory, family, layers, group, kv, seed)
    data = padded_data([c for c, _ in lengths], [x for _, x in lengths], seed=seed)
    engine = PatchingEngine(model)
    g = engine.graph
    full = g.full_mask(torch.float64)
    u = node % g.n_senders
    without_u = full.clone()
    without_u[u] = 0
    rand = torch.rand(full.shape, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)
    masks = torch.stack([full, torch.zeros_like(full), without_u, rand])
    out = engine.run(data, masks)
    for i in range(data.n):
        one = alone(data, i)
        length = int(one.attention_mask.sum())
        assert_close(model, out[0, i], hf_logits_at(hf, one.clean[0, :length], one.positions[0]))
        assert_close(model, out[1, i], hf_logits_at(hf, data.corrupted[i], data.positions[i]))
    d_head = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // g.n_heads
    want = _node_patched_metric(hf, data, g.senders[u].name, d_head)
    got = data.metric(out[2]).double().mean()
    assert_close(model, got, want, scale=out[2])
    assert_close(model, torch.cat([engine.run(data, m) for m in masks]), out)
    # EAP summed over the node's out-edges = the node's attribution
    scores = engine.edge_attribution(data).double()
    total = node_attribution(hf, data, g.senders[u].name, g.n_heads)
    largest = float(scores[u].abs().sum())
    # scores are float64 sums stored in float32: one rounding each
    assert_close(model, scores[u].sum(), total, float64=2 * EPS32 * max(1.0, largest),
                 scale=torch.tensor(largest))
