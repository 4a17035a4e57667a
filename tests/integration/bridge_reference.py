"""Slow references on the bridge itself (hand-written hooks), shared by the integration tests."""

from __future__ import annotations

import torch


def receiver_hook(rec) -> str:
    """The transformer-lens hook whose tensor is receiver ``rec``'s input."""
    if rec.kind in ("q", "k", "v"):
        return f"blocks.{rec.layer}.hook_{rec.kind}_input"
    return "ln_final.hook_in" if rec.kind == "logits" else f"blocks.{rec.layer}.hook_mlp_in"


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
