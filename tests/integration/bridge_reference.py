"""Slow references on the bridge itself (hand-written hooks), shared by the integration tests."""

from __future__ import annotations

import torch


def receiver_hook(rec) -> str:
    """The transformer-lens hook whose tensor is receiver ``rec``'s input."""
    if rec.kind in ("q", "k", "v"):
        return f"blocks.{rec.layer}.hook_{rec.kind}_input"
    return "ln_final.hook_in" if rec.kind == "logits" else f"blocks.{rec.layer}.hook_mlp_in"


def logits_at(model, tokens, positions):
    """The bridge's logits ``[N, P, V]`` at ``positions [N, P]`` (no grad)."""
    with torch.no_grad():
        logits = model(tokens)
    idx = positions[:, :, None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx)


def metric_with_hooks(model, data, hooks) -> float:
    """Mean task metric of the bridge on the clean prompts with ``hooks`` installed."""
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(data.clean)
    idx = data.positions[:, :, None].expand(-1, -1, logits.shape[-1])
    return float(data.metric(logits.gather(1, idx)).double().mean())


def add_at_receiver(rec, delta):
    """``(hook, fn)`` adding ``delta [N, T, d]`` to receiver ``rec``'s input only."""

    def fn(x, hook):
        if rec.kind in ("q", "k", "v"):
            x = x.clone()
            x[:, :, rec.head] += delta
            return x
        return x + delta

    return receiver_hook(rec), fn


def edge_patched_logits(model, graph, data, s, r, clean_out, ablated):
    """Bridge logits at the metric positions with the single edge ``s -> r`` patched by hand:
    ``ablated[s] - clean_out[s]`` (``[N, T, d]``) added at receiver ``r``'s hook."""
    hook = add_at_receiver(graph.receivers[r], ablated[s] - clean_out[s])
    with model.hooks(fwd_hooks=[hook]):
        return logits_at(model, data.clean, data.positions)


def sender_hooks(graph, into: dict) -> list:
    """Bridge hooks that store every sender's output of the run they see into ``into``
    (sender index -> ``[N, T, d]``; heads without the attention output bias), in order."""
    def keep(index):
        def fn(x, hook):
            into[index] = x.detach().clone()
            return x
        return fn

    def keep_heads(h0):
        def fn(x, hook):
            for h in range(graph.n_heads):
                into[h0 + h] = x[:, :, h].detach().clone()
            return x
        return fn

    hooks = [("blocks.0.hook_resid_pre", keep(0))]
    for layer in range(graph.n_layers):
        hooks.append((f"blocks.{layer}.attn.hook_result", keep_heads(graph.head_start[layer])))
        hooks.append((f"blocks.{layer}.hook_mlp_out", keep(graph.mlp_index[layer])))
    return hooks


def bridge_senders(model, graph, tokens) -> torch.Tensor:
    """Every sender's output ``[S, N, T, d]`` of the bridge's run on ``tokens``, read by
    :func:`sender_hooks`."""
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad(), model.hooks(fwd_hooks=sender_hooks(graph, out)):
        model(tokens)
    return torch.stack([out[u] for u in range(graph.n_senders)])


def patched_run(model, graph, data, removed, frozen, ablated, clean_out):
    """Logits at the metric positions of the bridge with the runner's patching equation applied
    in hooks, one receiver at a time:

        x_r = x_r(this run) - sum_u removed[u, r] (a_u(this run) - ablated_u)
                            - sum_u frozen[u, r]  (a_u(this run) - a_u(clean run))

    ``removed``, ``frozen``: ``[S, R]``; ``ablated``, ``clean_out``: ``[S, N, T, d]``. Sender
    outputs of this run are read by hooks as the forward reaches them (senders come first).
    """
    current: dict[int, torch.Tensor] = {}
    hooks = sender_hooks(graph, current)
    by_hook: dict[str, list] = {}
    for r, rec in enumerate(graph.receivers):
        by_hook.setdefault(receiver_hook(rec), []).append((r, rec))

    def patch(items):
        def fn(x, hook):
            x = x.clone()
            for r, rec in items:
                delta = sum(removed[u, r] * (current[u] - ablated[u])
                            + frozen[u, r] * (current[u] - clean_out[u])
                            for u in range(int(graph.n_upstream[r])))
                if rec.kind in ("q", "k", "v"):
                    x[:, :, rec.head] -= delta
                else:
                    x = x - delta
            return x
        return fn

    hooks += [(name, patch(items)) for name, items in by_hook.items()]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(data.clean)
    idx = data.positions[:, :, None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx)
