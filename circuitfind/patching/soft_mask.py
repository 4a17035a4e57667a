"""A differentiable forward pass with continuous edge masks (for learned masks: edge pruning).

Why. The engine's masked passes (:mod:`circuitfind.patching.masked_pass`) are built for many
discrete circuits at once and run without autograd; learning masks needs the gradient of the
output with respect to every edge's mask at once. This module runs the model's blocks with
plain tensor functions of the family's adapter (:mod:`circuitfind.patching.architectures`),
building every receiver's input from its senders with the mask as a coefficient, so autograd
differentiates through it. It installs no hooks.

Method. Eq. (1) of :mod:`circuitfind.patching.engine` with a continuous keep-mask ``M`` in
[0, 1] on every real edge: receiver ``r`` reads, from each upstream sender ``u``, the mixture
``a'_u + M[u, r] (a_u - a'_u)`` of its output in this run ``a_u`` and its ablated value
``a'_u``, so

    x_r = sum_u (a'_u + M[u, r] (a_u - a'_u)) + sum_{l upstream} b_O[l]

(``b_O`` the attention output biases, the residual stream's only other terms). In families
whose heads' sum passes a norm (Gemma-2, :attr:`Architecture.attn_post_norm`) each earlier
layer's heads enter as ``PostNorm_l(sum_h mixture_h + b_O[l])``, as in
:mod:`circuitfind.patching.post_norm_pass`. ``M = 1`` everywhere is the model; ``M = 0`` is
the fully ablated run (the corrupted run for resample ablation); a fractional ``M`` equals the
engine's masked pass with the same fractional mask.

Cost. Every layer recomputes each receiver's input: one ``[U, R'] x [U, N T d]`` contraction
per receiver group (U upstream senders), then the group's norm and projection; the forward
costs a plain forward plus these contractions, and the backward about twice that
(``benchmarks/results/methods.md`` gives the measured cost per training step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from circuitfind.patching.runner import BlockRunner


def soft_masked_logits(runner: BlockRunner, tokens: Tensor, ablated: Tensor,
                       positions: Tensor, masks: Tensor) -> Tensor:
    """Logits at the metric positions of the run with continuous edge masks (differentiable).

    Args:
        runner: The model's block runner.
        tokens: ``[N, T]`` clean token ids.
        ablated: ``[S, N|1, T|1, d]`` ablated sender values ``a'_u``.
        positions: ``[N, P]`` metric positions.
        masks: ``[S, R]`` keep-masks in [0, 1] (entries off real edges are ignored); may
            require grad.

    Returns:
        ``[N, P, V]`` logits.
    """
    g, lay = runner.graph, runner.arch
    up = g.n_upstream.tolist()
    n_heads = g.n_heads
    masks = masks * g.edge_mask.to(masks)
    x = lay.embed(tokens)
    n, t, d = x.shape
    outs: list[Tensor] = [x]  # every sender's output in this run, in sender order
    ablated = ablated.expand(-1, n, t, -1)
    bias_layers = [lay.w_out(layer)[1] for layer in range(g.n_layers)]
    head_layer = {g.head_start[layer] + h: layer for layer in range(g.n_layers)
                  for h in range(n_heads)}

    def inputs(r0: int, r1: int) -> Tensor:
        """``[R', N, T, d]`` the inputs of receivers ``r0..r1`` (same upstream senders)."""
        u = up[r0]
        a = torch.stack(outs[:u])
        diff = a - ablated[:u]
        coef = masks[:u, r0:r1].to(a.dtype)
        layers = sorted({head_layer[s] for s in range(u) if s in head_layer})
        if not lay.attn_post_norm:
            x_r = ablated[:u].sum(0) + torch.einsum("ur,untd->rntd", coef, diff)
            for layer in layers:
                bias = bias_layers[layer]
                if bias is not None:
                    x_r = x_r + bias
            return x_r
        plain = [s for s in range(u) if s not in head_layer]
        x_r = ablated[plain].sum(0) + torch.einsum("ur,untd->rntd", coef[plain], diff[plain])
        for layer in layers:
            heads = slice(g.head_start[layer], g.head_start[layer] + n_heads)
            s_l = ablated[heads].sum(0) + torch.einsum("ur,untd->rntd", coef[heads], diff[heads])
            bias = bias_layers[layer]
            if bias is not None:
                s_l = s_l + bias
            x_r = x_r + lay.post_norm(layer, s_l)
        return x_r

    def project(layer: int, kind: str, x_r: Tensor) -> Tensor:
        """Each receiver's own projection: ``[h, N, T, d]`` -> ``[N, T, h, dh]``."""
        w, b = lay.head_weights(layer, kind)
        out = torch.einsum("hntd,hde->nthe", lay.ln_attn(layer, x_r), w)
        return out if b is None else out + b

    all_heads = torch.arange(n_heads, device=x.device)
    for layer in range(g.n_layers):
        q = project(layer, "q", inputs(g.q_start[layer], g.q_start[layer] + n_heads))
        k = project(layer, "k", inputs(g.k_start[layer], g.k_start[layer] + g.n_kv_heads))
        v = project(layer, "v", inputs(g.v_start[layer], g.v_start[layer] + g.n_kv_heads))
        res = lay.head_results(layer, lay.attend(layer, q, k, v), all_heads)  # [N, T, H, d]
        outs.extend(res.unbind(2))
        r = g.mlp_receiver[layer]
        if r is not None:
            outs.append(lay.mlp(layer, lay.ln_mlp(layer, inputs(r, r + 1)[0])))
    final = inputs(g.n_receivers - 1, g.n_receivers)[0]
    idx = positions[:, :, None].expand(-1, -1, d)
    return lay.final(final.gather(1, idx))
