"""Masked passes for families whose attention output is normalised after the heads are summed.

Why. In Gemma-2 a block adds ``PostNorm_l(S_l)`` to the residual stream, with
``S_l = sum_h a_h + b_O`` the summed (pre-norm) head outputs ``a_h = z_h W_O[h]``. A receiver's
input is then not a sum of head outputs, and eq. (1) of :mod:`circuitfind.patching.engine`
(``x_r = x - sum_u removed[u, r] (a_u - a'_u)``) would not make removing every out-edge of a
head equal to patching the head (the identity that defines an edge; off by up to 6e-2 logits
on a tiny Gemma-2).

Method. A receiver ``r`` reads, for each earlier layer ``l``, the post-norm of its *own*
mixture of kept and ablated head outputs:

    x_r = x(current run) - sum_{u not a head} removed[u, r] (a_u - a'_u)
                         - sum_{u not a head} frozen[u, r]  (a_u - a_u(clean run))
                         - sum_l D_{l, r}
    D_{l, r} = PostNorm_l(S_l) - PostNorm_l(S_l - sum_{h in l} [removed[h, r] (a_h - a'_h)
                                                               + frozen[h, r] (a_h - a_h(clean))])

with ``a`` and ``S_l`` from the current run. Removing every out-edge of head ``h`` makes every
receiver read ``PostNorm_l(S_l - a_h + a'_h)``, exactly what patching ``h`` gives; the input
and MLP nodes (the MLP's output is post-feedforward-normed) are plain senders, as in eq. (1).
This is the receiver input of the EAP-IG library's ``evaluate_graph`` for models with
``use_normalization_before_and_after`` (see ``docs/decisions.md``).

Cost. Per layer ``L`` and mask, every receiver some mask touches costs one ``[K, H, R']`` by
``[K, H, n*T*d]`` batched matmul and one norm per upstream layer with a touched head edge,
plus its own norm and projection; untouched receivers take the shared norm and projection.
Blocks before the start layer are the cached clean run. None of the runner's linear shortcuts
(dense buffers, the sparse start layer, the kept form with the ablated residual) apply here;
this pass is the plain, readable form, differentiable in ``removed`` and ``frozen`` (the
autograd reference of EAP through the norm in the tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from circuitfind.patching.architectures import Architecture

if TYPE_CHECKING:
    from circuitfind.patching.runner import BlockRunner, RunCache


class PostNormPass:
    """K masked runs over N examples from one start layer for a post-norm family (arguments as
    in :meth:`circuitfind.patching.runner.BlockRunner.run`, plus the runner itself).

    Raises:
        ConfigError: ``start`` out of range, or a mask touches a receiver before ``start``.
    """

    def __init__(self, runner: BlockRunner, cache: RunCache, ablated: Tensor, removed: Tensor,
                 positions: Tensor, start: int | None = None, frozen: Tensor | None = None,
                 diff: Tensor | None = None) -> None:
        g = runner.graph
        self.runner, self.g, self.lay, self.cache = runner, g, runner.arch, cache
        self.ablated, self.removed, self.frozen = ablated, removed, frozen
        self.positions = positions.to(cache.resid.device)
        self.k = removed.shape[0]
        # every real edge counts as touched when the weights carry gradients (the autograd
        # reference of EAP differentiates at weight 0)
        grads = removed.requires_grad or (frozen is not None and frozen.requires_grad)
        weights = removed if frozen is None else removed.abs() + frozen.abs()
        touched = (g.edge_mask.to(weights.device).bool().unsqueeze(0) if grads
                   else weights.detach().ne(0))  # [K|1, S, R]
        self.touched = touched.any(1).any(0).cpu()  # [R]
        self.start = runner.resolve_start(self.touched, start)
        self.diff = cache.senders - ablated if diff is None else diff  # [S, n, T, d]
        n, t, d = cache.resid.shape[1:]
        self.n, self.t, self.d = n, t, d
        # current values of the senders the pass computes: sender -> [K, n, T, d]
        self.current: dict[int, Tensor] = {}
        # per layer: the summed head outputs S_l [K|1, 1, n, T, d] and PostNorm_l(S_l)
        self.sums: dict[int, Tensor] = {}
        self.normed: dict[int, Tensor] = {}

    # ------------------------------------------------------------------ the receivers' inputs
    def _value(self, u: int) -> Tensor:
        """Sender ``u``'s value in the current run, ``[K|1, n, T, d]``."""
        return self.current[u] if u in self.current else self.cache.senders[u].unsqueeze(0)

    def _change(self, us: slice, rs: Tensor) -> Tensor | None:
        """``sum_u removed[u, r] (a_u - a'_u) + frozen[u, r] (a_u - a_u(clean))`` over the
        senders ``us`` for the receivers ``rs``: ``[K, R', n*T*d]``, or ``None`` if no mask
        touches these edges (and no gradient is taken)."""
        k = self.k
        w_r = self.removed[:, us][:, :, rs]  # [K, U, R']
        w_f = None if self.frozen is None else self.frozen[:, us][:, :, rs]
        grads = w_r.requires_grad or (w_f is not None and w_f.requires_grad)
        if not grads and not bool(w_r.ne(0).any()) and (w_f is None or not bool(w_f.ne(0).any())):
            return None
        senders = range(us.start, us.stop)
        value = torch.stack([self._value(u).expand(k, -1, -1, -1) for u in senders], 1)
        value = value.reshape(k, len(senders), -1)  # [K, U, n*T*d]
        out = torch.bmm(w_r.transpose(1, 2), value - self.ablated[us].expand(
            len(senders), self.n, self.t, self.d).reshape(1, len(senders), -1))
        if w_f is not None:
            clean = self.cache.senders[us].reshape(1, len(senders), -1)
            out = out + torch.bmm(w_f.transpose(1, 2), value - clean)
        return out

    def inputs(self, rs: list[int], x: Tensor) -> Tensor:
        """Inputs ``[K, R', n, T, d]`` of the receivers ``rs`` (all in one layer, or the logits)
        from the current residual stream ``x [K, n, T, d]`` reaching them."""
        g, lay, k = self.g, self.lay, self.k
        idx = torch.tensor(rs, device=x.device)
        n_up = int(g.n_upstream[rs].max())
        total: Tensor | None = None
        # plain senders (the input and the MLPs), each one of eq. (1)
        plain = [0] + [g.mlp_index[layer] for layer in range(g.n_layers)
                       if g.mlp_index[layer] < n_up]
        for u in plain:
            change = self._change(slice(u, u + 1), idx)
            if change is not None:
                total = change if total is None else total + change
        # heads, through the post-norm of each layer: D_{l, r}
        for layer in range(g.n_layers):
            h0 = g.head_start[layer]
            if h0 + g.n_heads > n_up:
                break
            change = self._change(slice(h0, h0 + g.n_heads), idx)
            if change is None:
                continue
            s = self._sum(layer)  # [K|1, 1, n, T, d]
            mixed = lay.post_norm(layer, s - change.view(k, len(rs), *s.shape[2:]))
            d_lr = (self.normed[layer] - mixed).reshape(k, len(rs), -1)
            total = d_lr if total is None else total + d_lr
        shape = (k, len(rs), self.n, -1, self.d)
        if total is None:
            return x.unsqueeze(1).expand(shape)
        return x.unsqueeze(1) - total.view(k, len(rs), self.n, self.t, self.d)

    def _sum(self, layer: int) -> Tensor:
        """``S_l`` ``[K|1, 1, n, T, d]``: the summed head outputs (with bias) of ``layer`` in
        the current run (the clean run's before the start layer), and its post-norm."""
        if layer not in self.sums:  # a layer before the start: the clean run
            g = self.g
            h0 = g.head_start[layer]
            heads = self.cache.senders[h0: h0 + g.n_heads]
            s = Architecture.attn_from_heads(self.lay, layer, heads, 0)[None, None]  # pre-norm
            self.sums[layer], self.normed[layer] = s, self.lay.post_norm(layer, s)
        return self.sums[layer]

    # ------------------------------------------------------------------ the pass
    def _attention(self, layer: int, x: Tensor) -> Tensor:
        """Block ``layer``'s head outputs ``[K*n, T, H, d]`` with each touched q/k/v receiver
        reading its own input (the others the shared residual ``x [K, n, T, d]``)."""
        g, lay, k, n, t = self.g, self.lay, self.k, self.n, self.t
        first = {"q": g.q_start[layer], "k": g.k_start[layer], "v": g.v_start[layer]}
        count = {"q": g.n_heads, "k": g.n_kv_heads, "v": g.n_kv_heads}
        rs = [first[kind] + i for kind in "qkv" for i in range(count[kind])
              if bool(self.touched[first[kind] + i])]
        shared = lay.ln_attn(layer, x.reshape(k * n, t, -1))
        q, kk, v = lay.qkv(layer, shared)
        projected = {"q": q, "k": kk, "v": v}
        if rs:
            own = lay.ln_attn(layer, self.inputs(rs, x))  # [K, R', n, T, d]
            for kind in "qkv":
                heads = []
                for i in range(count[kind]):
                    r = first[kind] + i
                    if r in rs:
                        xr = own[:, rs.index(r)].reshape(k * n, t, -1)
                        heads.append(lay.project(layer, kind, i, xr))
                    else:
                        heads.append(projected[kind][:, :, i])
                projected[kind] = torch.stack(heads, 2)  # [K*n, T, h, dh]
        z = lay.attend(layer, projected["q"], projected["k"], projected["v"])
        return lay.head_results(layer, z, torch.arange(g.n_heads, device=x.device))

    def logits(self) -> Tensor:
        """``[K, N, P, V]`` logits at the metric positions."""
        g, lay, k, n, t, d = self.g, self.lay, self.k, self.n, self.t, self.d
        x = self.cache.resid[self.start].unsqueeze(0).expand(k, n, t, d)
        for layer in range(self.start, g.n_layers):
            res = self._attention(layer, x)  # [K*n, T, H, d]
            h0 = g.head_start[layer]
            heads = res.view(k, n, t, g.n_heads, d).permute(3, 0, 1, 2, 4)
            for i in range(g.n_heads):
                self.current[h0 + i] = heads[i]
            s = Architecture.attn_from_heads(lay, layer, res, 2).view(k, 1, n, t, d)  # pre-norm
            self.sums[layer], self.normed[layer] = s, lay.post_norm(layer, s)
            x_mid = x + self.normed[layer][:, 0]
            r = g.mlp_receiver[layer]
            base = x if lay.parallel else x_mid
            xm = self.inputs([r], base)[:, 0] if bool(self.touched[r]) else base
            m = lay.mlp(layer, lay.ln_mlp(layer, xm.reshape(k * n, t, d))).view(k, n, t, d)
            self.current[g.mlp_index[layer]] = m
            x = x_mid + m
        r = g.n_receivers - 1
        xf = self.inputs([r], x)[:, 0] if bool(self.touched[r]) else x
        pos = self.positions
        xf = xf.gather(2, pos[None, :, :, None].expand(k, n, pos.shape[1], d))
        return lay.final(xf)
