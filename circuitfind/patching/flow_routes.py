"""Information flow routes (IFR): contributions of every component to the residual stream, from
one forward pass, and the flow of the prediction through the graph's edges.

Method (Ferrando & Voita 2024, "Information Flow Routes: Automatically Interpreting Language
Models at Scale", arXiv:2403.00824, §2-3). Every update of the residual stream is a sum of
parts: the attention block of layer ``l`` writes, at query position ``i``,

    x_mid[i] = x_pre[i] + sum_{h, j} A^h[i, j] (v^h_j W_O^h)  (+ b_O)                       (1)

(each head ``h`` reading key position ``j``: the per-head, per-position decomposition of the
attention output), and the MLP writes ``x_post[t] = x_mid[t] + m(t)``. A part ``p`` of a whole
``y`` contributes in proportion to its *proximity* (eq. 2 of the paper, after ALTI-Logit)

    prox(p, y) = max(0, ||y||_1 - ||y - p||_1),   c(p, y) = prox(p, y) / sum_{p'} prox(p', y)   (2)

with the residual stream itself (``x_pre`` for attention, ``x_mid`` for the MLP) one of the
parts. The paper's graph has a node per (layer, position) residual state and an edge per part
with weight ``c``; the circuit of a prediction is every edge with ``c > tau`` reachable top-down
from the prediction's final residual state (§3).

Our graph's edges. A circuitfind edge ``u -> r`` is a direct path through the residual stream
from sender ``u`` into receiver ``r``'s input at the same position; in the IFR graph it is the
route "``u``'s part -> residual edges -> the state ``r`` reads". Its flow is what reaches it
top-down from the prediction: with ``F`` the flow into each residual state (1 at each metric
position of the final state, divided by the number of metric positions and examples),

    F_mlp(l)[t]  = F_post(l)[t] c_ffn(l)[t]                    (the MLP receiver of layer l)
    F_v(l, g)[j] = sum_{i, h in g} F_mid(l)[i] c_attn(l)[i, j, h]    (value receiver, kv group g)
    F_mid(l)     = F_post(l) c_res_ffn(l) + F_mlp(l)   (parallel blocks: F_mlp into F_pre)
    F_pre(l)     = F_mid(l) c_res_attn(l) + sum_g F_v(l, g),    F_post(l - 1) = F_pre(l)

and the route weight of sender ``u`` in the state a receiver reads is the product of the
residual contributions between them times ``u``'s own contribution where it enters (a head:
``sum_j c_attn[i, j, h]``; an MLP: ``c_ffn``; the input: 1). Then

    flow(u -> r) = sum_{n, t} F_r[n, t] W_u(state r reads)[n, t]                              (3)

a share of the prediction (dimensionless, in [0, 1]; an importance: larger is more important).
With a threshold ``tau`` every contribution ``c <= tau`` is set to 0 first (the paper's pruning:
an edge is in the top-down graph iff its route has every contribution above ``tau``).

Queries and keys. IFR, like ALTI, treats attention weights as given: flow passes through the
value path only, so every q and k edge has flow 0 (documented deviation from what patching
measures).

Post-norm families (Gemma-2). The heads' sum passes an RMSNorm before joining the residual
stream; with its denominator frozen at the actual sum ``s`` it is linear, and each part
becomes ``L(p) = (1 + w) p / rms(s) = J(s) p + y mean(s p) / mean(s^2)`` (``y`` the norm's
output), so the parts still sum to the attention output.

Cost. One forward pass (no backward) plus, per layer, the decomposition (1): ``N T^2 H
d_model`` values (examples are chunked to stay within the engine's memory budget) and the
distances (2) over them; the flows are ``O(L N T (S + R))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.runner import BlockRunner
from circuitfind.tasks.base import TaskData


@dataclass
class Contributions:
    """IFR contributions (eq. 2) of one run, per layer.

    Attributes:
        attn: ``[L, N, T_i, T_j, H]`` head ``h`` reading key ``j`` into the residual after
            attention at query ``i`` (0 for ``j > i``).
        res_attn: ``[L, N, T]`` the residual before attention into the residual after it.
        ffn: ``[L, N, T]`` the MLP output into the residual after the block.
        res_ffn: ``[L, N, T]`` the residual after attention into the residual after the block.
    """

    attn: Tensor
    res_attn: Tensor
    ffn: Tensor
    res_ffn: Tensor

    def thresholded(self, tau: float) -> Contributions:
        """Every contribution ``<= tau`` set to 0 (the paper's pruning)."""
        return Contributions(*(c * (c > tau) for c in (self.attn, self.res_attn, self.ffn,
                                                       self.res_ffn)))


def proximity(parts: Tensor, whole: Tensor) -> Tensor:
    """``max(0, ||whole||_1 - ||whole - p||_1)`` for each part (eq. 2, unnormalised).

    Args:
        parts: ``[..., K, d]`` parts.
        whole: ``[..., d]`` their whole.

    Returns:
        ``[..., K]``.
    """
    return (whole.abs().sum(-1)[..., None] - (whole[..., None, :] - parts).abs().sum(-1)).clamp_min(0)


def attention_pattern(runner: BlockRunner, layer: int, q: Tensor, k: Tensor) -> Tensor:
    """The attention weights of ``layer`` as the model computes them: ``q [N, T, H, dh]``,
    ``k [N, T, G, dh]`` -> ``[N, H, T_i, T_j]`` (each query head with its key/value head; the
    family's q/k norms, rotation, soft cap and sliding window applied)."""
    lay = runner.arch
    q, k = lay.qk_norm(layer, q, k)
    q, k = lay.rotate(q.transpose(1, 2), k.transpose(1, 2))
    k = k.repeat_interleave(lay.n_heads // lay.n_kv, 1)
    t = k.shape[2]
    window = lay.window(layer)
    hidden = lay._hidden(t, None, window if window is not None and window < t else None,
                         q.device)
    scores = lay._capped((q @ k.transpose(-1, -2)) * lay.scale(layer))
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, -1, dtype=lay.softmax_dtype).to(q.dtype)


def decomposed_attention(runner: BlockRunner, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. (1): each head's output at query ``i`` from each key position ``j``.

    Args:
        runner: The model's block runner.
        layer: The layer.
        x: ``[N, T, d]`` the residual stream entering the block.

    Returns:
        ``(parts [N, T_i, T_j, H, d], attn [N, T, d])``: the parts (after the post-attention
        norm's frozen-denominator map in post-norm families) and the attention output they
        sum to (plus the output bias).
    """
    lay, g = runner.arch, runner.graph
    q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
    pattern = attention_pattern(runner, layer, q, k)  # [N, H, Ti, Tj]
    w, bias = lay.w_out(layer)
    dh = w.shape[0] // g.n_heads
    v = v.repeat_interleave(g.n_heads // g.n_kv_heads, 2)  # [N, T, H, dh]
    vo = torch.einsum("nthe,hed->nthd", v, w.reshape(g.n_heads, dh, -1))  # [N, Tj, H, d]
    parts = torch.einsum("nhij,njhd->nijhd", pattern, vo)
    attn = parts.sum((2, 3)) if bias is None else parts.sum((2, 3)) + bias
    if lay.attn_post_norm:
        n, t, d = attn.shape
        s = attn.reshape(-1, d)
        y = lay.post_norm(layer, attn)
        flat = parts.permute(2, 3, 0, 1, 4).reshape(t * g.n_heads, n * t, d)
        # r^2 = 1 / (mean(s^2) + eps) from the norm itself: J s = y (1 - r^2 mean(s^2))
        yf = y.reshape(-1, d)
        js = lay.post_norm_jvp(layer, s, s[None])[0]
        r2 = ((yf * (yf - js)).sum(-1, keepdim=True)
              / (yf * yf).sum(-1, keepdim=True).clamp_min(torch.finfo(yf.dtype).tiny)
              / s.pow(2).mean(-1, keepdim=True).clamp_min(torch.finfo(yf.dtype).tiny))
        share = (s[None] * flat).mean(-1, keepdim=True) * r2
        flat = lay.post_norm_jvp(layer, s, flat) + yf[None] * share
        parts = flat.reshape(t, g.n_heads, n, t, d).permute(2, 3, 0, 1, 4)
        attn = y
    return parts, attn


@torch.no_grad()
def contributions(runner: BlockRunner, tokens: Tensor) -> Contributions:
    """IFR contributions (eqs. 1-2) of every layer, from one forward pass.

    Args:
        runner: The model's block runner.
        tokens: ``[N, T]`` token ids.

    Returns:
        The :class:`Contributions` (each whole's parts sum to 1 where any part is near it).
    """
    lay, g = runner.arch, runner.graph
    x = lay.embed(tokens)
    n, t = tokens.shape
    out = Contributions(x.new_zeros(g.n_layers, n, t, t, g.n_heads), x.new_zeros(g.n_layers, n, t),
                        x.new_zeros(g.n_layers, n, t), x.new_zeros(g.n_layers, n, t))
    tiny = torch.finfo(x.dtype).tiny
    for layer in range(g.n_layers):
        parts, attn = decomposed_attention(runner, layer, x)
        mid = x + attn
        prox = proximity(torch.cat([parts.reshape(n, t, t * g.n_heads, -1), x[:, :, None]], 2), mid)
        prox = prox / prox.sum(-1, keepdim=True).clamp_min(tiny)
        out.attn[layer] = prox[..., :-1].reshape(n, t, t, g.n_heads)
        out.res_attn[layer] = prox[..., -1]
        m = lay.mlp(layer, lay.ln_mlp(layer, x if lay.parallel else mid))
        post = mid + m
        prox = proximity(torch.stack([m, mid], 2), post)
        prox = prox / prox.sum(-1, keepdim=True).clamp_min(tiny)
        out.ffn[layer], out.res_ffn[layer] = prox[..., 0], prox[..., 1]
        x = post
    return out


def edge_flows(runner: BlockRunner, c: Contributions, positions: Tensor) -> Tensor:
    """Eq. (3): the prediction's flow through every edge, summed over the examples.

    Args:
        runner: The model's block runner (graph and wiring).
        c: The contributions of the run (thresholded or not).
        positions: ``[N, P]`` metric positions (the predictions).

    Returns:
        ``[S, R]`` float64 flows (each prediction contributes ``1 / P`` at its position).
    """
    g = runner.graph
    parallel = runner.arch.parallel
    n_layers, n, t = c.res_attn.shape
    scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    rep = g.n_heads // g.n_kv_heads
    # route weights W [S, N, T] of each residual state: the states before and after attention
    w = c.res_attn.new_zeros(g.n_senders, n, t)
    w[0] = 1.0
    pre, mid = [], []
    for layer in range(n_layers):
        pre.append(w.clone())
        h0 = g.head_start[layer]
        w = w * c.res_attn[layer]
        w[h0: h0 + g.n_heads] = c.attn[layer].sum(2).permute(2, 0, 1)
        mid.append(w.clone())
        w = w * c.res_ffn[layer]
        w[g.mlp_index[layer]] = c.ffn[layer]
    # flows top-down, from the predictions
    f = c.res_attn.new_zeros(n, t)
    f.scatter_add_(1, positions, torch.full(positions.shape, 1.0 / positions.shape[1],
                                            dtype=f.dtype, device=f.device))

    def add(r0: int, flow: Tensor, state: Tensor) -> None:
        """``scores[:, r0:r0+k] += W(state) . flow`` for ``flow [k, N, T]``."""
        scores[:, r0: r0 + flow.shape[0]] += torch.einsum(
            "snt,knt->sk", state.double(), flow.double()).cpu()

    add(g.n_receivers - 1, f[None], w)
    for layer in reversed(range(n_layers)):
        f_mlp = f * c.ffn[layer]
        r = g.mlp_receiver[layer]
        if r is not None:  # block runners exist only for models with MLPs; kept for types
            add(r, f_mlp[None], pre[layer] if parallel else mid[layer])
        f_mid = f * c.res_ffn[layer] + (0 if parallel else f_mlp)
        # [N, Ti, Tj, H] x F_mid [N, Ti] -> per head and key position, then per kv group
        f_heads = torch.einsum("nijh,ni->hnj", c.attn[layer], f_mid)
        f_v = f_heads.reshape(g.n_kv_heads, rep, n, t).sum(1)
        add(g.v_start[layer], f_v, pre[layer])
        f = f_mid * c.res_attn[layer] + f_v.sum(0) + (f_mlp if parallel else 0)
    return scores * g.edge_mask.double()


def information_flow(engine: PatchingEngine, data: TaskData, taus: tuple[float, ...] = (0.0,),
                     batch_size: int | None = None) -> Tensor:
    """Mean flow (eq. 3) of the predictions through every edge, over the examples.

    Args:
        engine: The patching engine (its block runner; the ablation plays no part: IFR
            patches nothing).
        data: Task data; the predictions are the clean prompts' metric positions.
        taus: Thresholds: for each, contributions ``<= tau`` are cut first (0: none). One
            forward pass serves them all.
        batch_size: Examples per pass (``None``: from the engine's memory budget).

    Returns:
        ``[len(taus), S, R]`` float32 flows in [0, 1] (0 off real edges and on q/k edges).

    Raises:
        ConfigError: a model without a block runner.

    References:
        Ferrando & Voita (2024), "Information Flow Routes", arXiv:2403.00824, eqs. 1-2 and
        §3 (the top-down graph).
    """
    runner = engine.runner
    if runner is None:
        raise ConfigError("Information flow routes run on the block runner, which this "
                          "model's architecture does not have.")
    g = engine.graph
    t = int(data.positions.max()) + 1
    width = torch.finfo(engine.dtype).bits // 8
    per_example = 4 * t * t * g.n_heads * engine.d_model * width  # parts, distances
    n_chunk = max(1, min(data.n, batch_size or data.n, engine.memory_budget // per_example))
    tokens = engine._tokens(data.clean)[:, :t]
    positions = data.positions.to(engine.device)
    scores = torch.zeros(len(taus), g.n_senders, g.n_receivers, dtype=torch.float64)
    for e0 in range(0, data.n, n_chunk):
        es = slice(e0, min(data.n, e0 + n_chunk))
        c = contributions(runner, tokens[es])
        for i, tau in enumerate(taus):
            scores[i] += edge_flows(runner, c.thresholded(tau) if tau > 0 else c, positions[es])
    return (scores / data.n).float()
