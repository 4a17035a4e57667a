"""Information flow routes against brute-force references.

Contributions: each head's part from each key position is read off the bridge itself, one
forward pass per (layer, key position) with every other key's attention weight set to 0 through
``hook_pattern`` (the head's output when it reads that key alone); proximities (eq. 2) are then
computed part by part in plain Python loops. Flows: the per-head IFR graph of each example is
built in networkx (residual states per layer and position, MLP and value-input nodes) and each
receiver's flow is the sum over every path from the prediction of the product of its weights (summed parent by parent);
a sender's route weight is walked layer by layer. No circuitfind code runs in the references.
"""

from __future__ import annotations

import networkx as nx
import pytest
import torch

import circuitfind as cf
from circuitfind.algorithms import InformationFlowRoutes
from circuitfind.errors import ConfigError
from circuitfind.patching import PatchingEngine
from circuitfind.patching.flow_routes import contributions, decomposed_attention, information_flow
from circuitfind.testing import ToyTask, tiny_model
from circuitfind.testing.tiny import FAMILY_CONFIGS


def _prox(parts, whole):
    raw = [max(0.0, float(whole.abs().sum() - (whole - p).abs().sum())) for p in parts]
    total = sum(raw)
    return [r / total if total > 0 else 0.0 for r in raw]


def brute_force_contributions(model, tokens):
    """``(attn [L, N, T, T, H], res_attn, ffn, res_ffn [L, N, T])`` from hooks and loops."""
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    n, t = tokens.shape
    acts = {}

    def keep(x, hook, name):
        acts[name] = x.detach().clone()

    names = [f"blocks.{l}.hook_{k}" for l in range(n_layers)
             for k in ("resid_pre", "resid_mid", "resid_post", "mlp_out")]
    with torch.no_grad(), model.hooks(fwd_hooks=[(nm, lambda x, hook, nm=nm: keep(x, hook, nm))
                                                for nm in names]):
        model(tokens)
    parts = torch.zeros(n_layers, n, t, t, n_heads, cfg.d_model, dtype=torch.float64)
    for layer in range(n_layers):
        for j in range(t):
            def only_key(x, hook, j=j):
                y = torch.zeros_like(x)
                y[..., j] = x[..., j]
                return y

            out = {}
            with torch.no_grad(), model.hooks(fwd_hooks=[
                    (f"blocks.{layer}.attn.hook_pattern", only_key),
                    (f"blocks.{layer}.attn.hook_result", lambda x, hook: out.setdefault("r", x))]):
                model(tokens)
            parts[layer, :, :, j] = out["r"]  # [N, T_i, H, d]: the head reading key j only
    attn = torch.zeros(n_layers, n, t, t, n_heads, dtype=torch.float64)
    res_attn, ffn, res_ffn = (torch.zeros(n_layers, n, t, dtype=torch.float64) for _ in range(3))
    for layer in range(n_layers):
        pre, mid = acts[f"blocks.{layer}.hook_resid_pre"], acts[f"blocks.{layer}.hook_resid_mid"]
        post, m = acts[f"blocks.{layer}.hook_resid_post"], acts[f"blocks.{layer}.hook_mlp_out"]
        for b in range(n):
            for i in range(t):
                keys = [(j, h) for j in range(t) for h in range(n_heads)]
                c = _prox([parts[layer, b, i, j, h] for j, h in keys] + [pre[b, i]], mid[b, i])
                for (j, h), value in zip(keys, c):
                    attn[layer, b, i, j, h] = value
                res_attn[layer, b, i] = c[-1]
                ffn[layer, b, i], res_ffn[layer, b, i] = _prox([m[b, i], mid[b, i]], post[b, i])
    return attn, res_attn, ffn, res_ffn


def slow_flows(graph, c, positions, parallel=False):
    """Eq. (3) from path sums on a networkx graph of each example (module docstring)."""
    attn, res_attn, ffn, res_ffn = c
    n_layers, n, t = res_attn.shape
    rep = graph.n_heads // graph.n_kv_heads
    scores = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    for b in range(n):
        dag = nx.DiGraph()
        state = lambda layer, pos: ("post", layer, pos) if layer >= 0 else ("input", pos)
        for layer in range(n_layers):
            for pos in range(t):
                dag.add_edge(state(layer, pos), ("mid", layer, pos), w=float(res_ffn[layer, b, pos]))
                dag.add_edge(state(layer, pos), ("mlp", layer, pos), w=float(ffn[layer, b, pos]))
                dag.add_edge(("mlp", layer, pos), state(layer - 1, pos) if parallel
                             else ("mid", layer, pos), w=1.0)
                dag.add_edge(("mid", layer, pos), state(layer - 1, pos),
                             w=float(res_attn[layer, b, pos]))
                for grp in range(graph.n_kv_heads):
                    for j in range(pos + 1):
                        dag.add_edge(("mid", layer, pos), ("v", layer, grp, j), w=float(
                            attn[layer, b, pos, j, grp * rep:(grp + 1) * rep].sum()))
                        dag.add_edge(("v", layer, grp, j), state(layer - 1, j), w=1.0)

        # each node's flow: the sum over paths from the predictions of their weights'
        # products, accumulated parent by parent in topological order
        flows = dict.fromkeys(dag.nodes, 0.0)
        for p in positions[b].tolist():
            flows[state(n_layers - 1, p)] += 1.0 / positions.shape[1]
        for node in nx.topological_sort(dag):
            for child in dag.successors(node):
                flows[child] += flows[node] * dag[node][child]["w"]
        flow = flows.__getitem__

        def route(u, layer, pos, where):
            """Weight of sender ``u`` in the state before ("pre") or after attention ("mid")
            of ``layer`` (``layer == n_layers``: the final state) at ``pos``: walked from the
            state the sender writes into, one residual contribution at a time."""
            sender = graph.senders[u]
            if sender.name == "input":
                w, cur = 1.0, ("post", -1)
            elif sender.kind == "mlp":
                w, cur = float(ffn[sender.layer, b, pos]), ("post", sender.layer)
            else:
                w, cur = float(attn[sender.layer, b, pos, :, sender.head].sum()), ("mid", sender.layer)
            target = ("post", layer - 1) if where == "pre" else ("mid", layer)
            while cur != target:
                kind, k = cur
                if kind == "mid":
                    w, cur = w * float(res_ffn[k, b, pos]), ("post", k)
                else:
                    w, cur = w * float(res_attn[k + 1, b, pos]), ("mid", k + 1)
            return w

        for r, rec in enumerate(graph.receivers):
            if rec.kind in ("q", "k"):
                continue
            for pos in range(t):
                if rec.kind == "logits":
                    f, layer, where = flow(state(n_layers - 1, pos)), n_layers, "pre"
                elif rec.kind == "mlp":
                    f, layer = flow(("mlp", rec.layer, pos)), rec.layer
                    where = "pre" if parallel else "mid"
                else:
                    f, layer, where = flow(("v", rec.layer, rec.head, pos)), rec.layer, "pre"
                if f == 0:
                    continue
                for u in range(int(graph.n_upstream[r])):
                    scores[u, r] += f * route(u, layer, pos, where)
    return scores * graph.edge_mask / n


MODELS = ["gpt2", "llama_gqa"]


@pytest.mark.parametrize("name", MODELS)
def test_contributions_match_brute_force_decomposition(tiny_models, name):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 2, seed=41)
    engine = PatchingEngine(model)
    got = contributions(engine.runner, data.clean)
    want = brute_force_contributions(model, data.clean)
    for g, w in zip((got.attn, got.res_attn, got.ffn, got.res_ffn), want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tau", [0.0, 0.05])
def test_flows_match_path_sums(tiny_models, name, tau):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 2, seed=42)
    engine = PatchingEngine(model)
    c = contributions(engine.runner, data.clean)
    if tau:
        c = c.thresholded(tau)
    want = slow_flows(engine.graph, (c.attn, c.res_attn, c.ffn, c.res_ffn), data.positions)
    assert want.abs().max() > 1e-2  # the comparison can fail
    got = information_flow(engine, data, (tau,))[0]
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    # chunks of examples: the same flows
    split = information_flow(PatchingEngine(model), data, (tau,), batch_size=1)[0]
    torch.testing.assert_close(split, got, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("arch", sorted(FAMILY_CONFIGS))
def test_every_family_decomposes_exactly(tmp_path, arch):
    """On every family the parts (eq. 1) sum to the attention output the model adds, and each
    state's contributions sum to 1."""
    kv = {"n_kv_heads": 2} if arch not in ("gpt_neox", "gpt_neox_seq", "gpt2") else {}
    model = tiny_model(tmp_path, arch=arch, n_layers=2, n_heads=4, dtype=torch.float64, seed=4,
                       **kv)
    data = ToyTask(positions=2).build(model.tokenizer, 2, seed=43)
    engine = PatchingEngine(model)
    runner = engine.runner
    cache = runner.cache(data.clean)
    for layer in range(engine.graph.n_layers):
        _, bias = runner.arch.w_out(layer)
        with torch.no_grad():
            parts, attn = decomposed_attention(runner, layer, cache.resid[layer])
        summed = parts.sum((2, 3)) + (0 if bias is None or runner.arch.attn_post_norm else bias)
        torch.testing.assert_close(summed, cache.mid[layer] - cache.resid[layer],
                                   atol=1e-6, rtol=1e-6)
    c = contributions(runner, data.clean)
    ones = torch.ones_like(c.res_attn)
    torch.testing.assert_close(c.attn.sum((3, 4)) + c.res_attn, ones, atol=1e-9, rtol=0)
    torch.testing.assert_close(c.ffn + c.res_ffn, ones, atol=1e-9, rtol=0)
    if arch == "gpt_neox":  # parallel blocks: checked against the path sums too
        want = slow_flows(engine.graph, (c.attn, c.res_attn, c.ffn, c.res_ffn), data.positions,
                          parallel=True)
        torch.testing.assert_close(information_flow(engine, data)[0].double(), want,
                                   atol=1e-6, rtol=1e-6)


def test_discover_top_down_graph(tiny_models):
    """The circuit is the edges with flow after the cut (nested as tau grows); scores are the
    uncut flows, importances; q/k edges carry nothing; discover and the registry run it."""
    model = tiny_models("llama_gqa")
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=44)
    engine = PatchingEngine(model)
    loose = InformationFlowRoutes(threshold=0.02).discover(engine, data)
    tight = InformationFlowRoutes(threshold=0.1).discover(engine, data)
    assert 0 < tight.n_edges < loose.n_edges
    assert not (tight.kept & ~loose.kept).any()
    torch.testing.assert_close(loose.scores, tight.scores)
    assert (loose.scores[loose.kept] > 0).all()
    g = engine.graph
    qk = torch.tensor([r.kind in ("q", "k") for r in g.receivers])
    assert loose.scores[:, qk].abs().max() == 0 and not loose.kept[:, qk].any()
    assert loose.metadata["scores"]["kind"] == "importance"
    circuit = cf.discover(model, data=data, algorithm="ifr", threshold=0.1)
    assert circuit.n_edges <= tight.n_edges  # discover prunes nothing that reaches the logits
    assert circuit.metadata["algorithm"] == "ifr"


def test_bad_input():
    with pytest.raises(ConfigError, match="'threshold' parameter of InformationFlowRoutes"):
        InformationFlowRoutes(threshold=1.5)
    with pytest.raises(ConfigError, match="batch_size"):
        InformationFlowRoutes(batch_size=0)
