"""AtP*'s QK fix at edge level: q and k edges scored through the exact attention pattern.

Why. Attribution patching linearises the metric in every activation; for queries and keys the
linearisation runs through the attention softmax, which saturates: a patched key that would
take all of a head's attention can have a near-zero gradient, so its edge looks unimportant
(the false negatives of Kramar et al. 2024, §3.1.1).

Method (Kramar et al. 2024, eq. 4 and 5, at edge level). For an edge from sender ``u`` into the
key input of key/value head ``g`` of layer ``L`` the pattern of every query head ``h`` reading
``g`` is recomputed exactly with the patched key, and only the step from the pattern to the
metric is linearised:

    score(u -> k_g) = sum_{n, h in g, i, j} (A'_{n h i j} - A_{n h i j}) . d metric / d A_{n h i j}

    A' = softmax(mask(cap(scale . q_h k'_g^T))),   k'_g = K_g(x_r + a'_u - a_u)

with ``K_g`` the key path of head ``g`` (input norm, projection, the family's q/k norms and
rotation) and ``x_r`` the receiver's clean input; query edges likewise with ``q'_h`` and the
clean keys (``A'`` differs from ``A`` in head ``h`` only). ``d metric / d A`` is the gradient
of the same backward pass (with GradDrop, of each pass with a layer dropped: the patterns
``A'`` do not depend on the backward pass, so they are computed once and contracted with every
pass's gradient). Gemma-2's head senders enter as their differences pushed through the
post-norm's Jacobian (the pass's own linearisation of that norm); every other step before the
scores is exact.

How (all without autograd, one layer at a time, in chunks of senders). The patched queries and
keys are never rotated: the rotation is linear per position (``R_t``), so a patched query
against clean rotated keys scores ``(R_i q'_i) . k_j = q'_i . (R_i^T k_j)`` and a clean rotated
query against a patched key ``q_i . (R_j k'_j) = (R_j^T q_i) . k'_j``; the clean sides
``R_i^T k_j`` and ``R_j^T q_i`` (``N H P T d_head`` values) are computed once a layer, by
the family's half-split rotation turned backwards elementwise
(:meth:`HalfSplitRotation.turn`), or for other rotations through ``R_t`` itself (the identity
rotated by the family's own rotation). Queries are projected
at the query rows some gradient reaches only (all but the metric positions in the last layer
carry none). The pattern's contraction with the gradient is a batched matrix product. The
patched streams ``x + delta_u`` are never materialised: the norm is ``1/sigma`` times a linear
map, so the projections are ``1/sigma(x + delta_u) (x W_c + delta_u W_c)`` plus a bias, with
``1/sigma`` from the clean stream's statistics and reductions of ``delta_u`` (``|delta_u|^2``
once a call, ``x . delta_u`` one batched product a layer), ``x W_c`` from the forward pass's
own projections (:meth:`QKFix.projections`), each product written straight into its senders'
slots of one q/k buffer. Scores are linear in the projections, so in float32/float64 the
scores are taken of the raw products ``y W_c`` and ``1/sigma`` and the bias applied to them:
``s = 1/sigma (y W_c . K) + b' . K``, one ``addcmul`` with the bias offsets ``b' . K`` that
also carry the causal/window mask (the scores are fewer values than the projections); Qwen3's
per-head RMS norms likewise (each head's ``1/rms`` from one reduction, the norms' weights in
the clean sides) and Gemma-2's soft cap after them. A head sender's
difference is ``dz_h W_O[h]`` (the difference of two head outputs ``z W_O``; recovered by least
squares once a call and checked to lie in ``W_O[h]``'s row space, else the direct path is
taken), so its projection is ``dz_h (W_O[h] W_c)``: ``d_head``-wide instead of ``d``-wide
(:class:`_NormedProjection`). Gemma-2's head differences, pushed through its post-norm, take
the direct path. The folded q/k weights, the ``W_O[h] W_c`` products and the head-space solves
are kept on the adapter between calls while their weights are unchanged
(:meth:`Architecture.derived`: the same tensors at the same in-place version, as EAP's own
folded weights), and one workspace a call holds the projections, scores and patterns
(:class:`_Workspace`).

Cost. Per layer, for the ``U`` senders upstream of it: the q/k projections of the ``L + 1``
non-head senders (``N T d (H + G) d_head`` multiply-adds each), of the heads in head space
(``N T d_head (H + G) d_head`` each, plus ``d^2 (H + G) d_head`` a pair of layers for ``W_O
W_c``, kept between calls while small), and ``2 U`` patterns of ``N H P T`` scores; no extra
backward pass.

References:
    Kramar, Lieberum, Shah & Nanda (2024), "AtP*: An efficient and scalable method for
    localizing LLM behaviour to components", arXiv:2403.00745, §3.1.1 (QK fix).
"""

from __future__ import annotations

from collections.abc import Hashable
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from circuitfind.patching.architectures.base import Architecture, HalfSplitRotation

if TYPE_CHECKING:
    from circuitfind.patching.runner import BlockRunner

CHUNK_SCORES = 1 << 24  # pattern entries per chunk of senders (memory: ~64 MiB in float32)
ROW_SPACE_TOL = 1e-3  # head differences off W_O's row space by more (relative): direct path


def rotation_matrices(lay: Architecture, t: int, dh: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[Tensor, Tensor] | None:
    """The family's rotation of queries and keys at each of ``t`` positions as matrices:
    ``(R_q, R_k)``, each ``[T, d_head, d_head]`` with ``rotate(v)_t = R_t v`` (the identity
    rotated by :meth:`Architecture.rotate`), or ``None`` for families without rotation."""
    if lay.rotary is None:
        return None
    eye = torch.eye(dh, dtype=dtype, device=device)[:, None, None, :].expand(dh, 1, t, dh)
    q_rot, k_rot = lay.rotate(eye, eye)  # [b, 1, T, a] = (R_t e_b)_a
    return q_rot[:, 0].permute(1, 2, 0), k_rot[:, 0].permute(1, 2, 0)


class _Workspace:
    """Buffers reused across the layers and chunks of one :meth:`QKFix.rescore` call: a fresh
    tensor of a few MiB is written to cold memory each time (on bench_families' shape the
    rescoring took about a fifth longer with fresh tensors), a reused one stays warm in the
    caches. Layers are rescored from the deepest (the most senders) down, so the first
    buffers are the largest."""

    def __init__(self) -> None:
        self.flat: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: Tensor,
             dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised ``shape`` tensor (``like``'s device, ``dtype`` or ``like``'s), a
        view of buffer ``name`` (grown when too small)."""
        dtype = like.dtype if dtype is None else dtype
        size = 1
        for s in shape:
            size *= s
        buf = self.flat.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype or buf.device != like.device:
            buf = self.flat[name] = torch.empty(size, dtype=dtype, device=like.device)
        return buf[:size].view(shape)


class QKFix:
    """Collects what the QK fix needs during an attribution pass and rescores q/k edges.

    Calling order (inside :func:`circuitfind.patching.attribution.attribute`): the forward pass
    calls :meth:`block_input` with each block's input and the adapter calls :meth:`tap` with
    each layer's rotated q, k and pattern; each backward pass (one, or with GradDrop one per
    dropped layer, each under its own :attr:`current` key) leaves the patterns' gradients;
    after the backward passes :meth:`rescore` replaces the scores of the q and k edges of
    every pass.

    Args:
        runner: The block runner of the pass.
        magnitudes: GradDrop's scores: each example's QK-fixed score in absolute value, summed
            over the examples (Kramar et al. 2024, eq. 11), instead of the signed sum.
    """

    def __init__(self, runner: BlockRunner, magnitudes: bool = False) -> None:
        self.runner = runner
        self.magnitudes = magnitudes
        self.inputs: dict[int, Tensor] = {}
        self.projected: dict[int, tuple[Tensor, Tensor]] = {}
        self.qk: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.grads: dict[Hashable, dict[int, Tensor]] = {}
        self.current: Hashable = None  # the backward pass whose gradients arrive now
        # [N, P] query positions of a layer run at the metric positions only (the last)
        self.query_pos: Tensor | None = None

    def block_input(self, layer: int, x: Tensor) -> None:
        """Record ``layer``'s input residual ``x [N, T, d]`` (clean run)."""
        self.inputs[layer] = x.detach()

    def projections(self, layer: int, q: Tensor, k: Tensor) -> None:
        """Record ``layer``'s clean q and k projections ``q [N, T, H, dh]``, ``k [N, T, G,
        dh]`` (the input norm and projection, before any q/k norm and rotation): the patched
        projections add to them (:class:`_NormedProjection`)."""
        self.projected[layer] = (q.detach(), k.detach())

    def tap(self, layer: int, q: Tensor, k: Tensor, pattern: Tensor) -> None:
        """Record ``layer``'s rotated ``q [N,H,T,dh]``, ``k [N,G,T,dh]`` and pattern
        ``[N,H,T,T]``, and catch the pattern's gradient in each backward pass.

        A layer run at the query positions :attr:`query_pos` ``[N, P]`` only (``q [N,H,P,dh]``,
        pattern ``[N,H,P,T]``: the last, in EAP's trimmed pass) is put back among all ``T``
        query rows, 0 elsewhere: exact, since the rows without gradient score nothing."""
        q, k = q.detach(), k.detach()
        at = None
        if q.shape[2] != k.shape[2]:
            assert self.query_pos is not None, "the attribution pass sets query_pos"
            n, heads, t = q.shape[0], q.shape[1], k.shape[2]
            at = self.query_pos[:, None, :, None]  # [N, 1, P, 1]
            q = q.new_zeros(n, heads, t, q.shape[3]).scatter_(2, at.expand(*q.shape), q)
        full = (pattern.detach() if at is None else pattern.new_zeros(
            pattern.shape[0], pattern.shape[1], pattern.shape[3], pattern.shape[3]).scatter_(
            2, at.expand(*pattern.shape), pattern.detach()))
        self.qk[layer] = (q, k, full)
        if pattern.requires_grad:
            def keep(grad: Tensor, layer: int = layer, at: Tensor | None = at) -> None:
                if at is not None:  # repeated positions add
                    grad = grad.new_zeros(full.shape).scatter_add_(2, at.expand(*grad.shape),
                                                                  grad)
                self.grads.setdefault(self.current, {})[layer] = grad
            pattern.register_hook(keep)

    @torch.no_grad()
    def rescore(self, passes: dict[int | None, Tensor], delta: Tensor) -> None:
        """Overwrite the scores of every q and k edge with the QK-fixed estimate, in every pass.

        A layer whose pattern got no gradient in a pass (nothing of it reaches the metric, or
        a dropped layer) scores 0 on its q and k edges in that pass.

        Args:
            passes: ``{pass key: [S, R] float64 scores}`` updated in place; the key is the
                :attr:`current` key the pass's gradients arrived under.
            delta: ``[S, N, T, d]`` the pass's sender differences ``a' - a`` (Gemma-2's heads
                already pushed through the post-norm's Jacobian).
        """
        g, lay = self.runner.graph, self.runner.arch
        work = _Workspace()
        with lay.backward_rules(None):  # plain values, no tap, while recomputing
            stats = _SenderStats(delta)
            heads_low = self._head_space(lay, delta, stats)
            for layer, x in sorted(self.inputs.items(), reverse=True):
                u_up = g.head_start[layer]
                q_cols = slice(g.q_start[layer], g.q_start[layer] + g.n_heads)
                k_cols = slice(g.k_start[layer], g.k_start[layer] + g.n_kv_heads)
                keys = [key for key in passes if layer in self.grads.get(key, {})]
                grads = [self.grads[key][layer] for key in keys]
                # query rows some gradient reaches: the only rows whose pattern change counts
                rows = (torch.stack([gr.ne(0).any(3).any(1).any(0) for gr in grads]).any(0)
                        .nonzero()[:, 0] if grads else None)  # [P]
                for key in passes:
                    if rows is None or not len(rows) or key not in keys:
                        passes[key][:u_up, q_cols] = 0
                        passes[key][:u_up, k_cols] = 0
                if rows is None or not len(rows):
                    continue
                values = self._layer(lay, layer, x, delta[:u_up], rows, grads, heads_low,
                                     stats, work)
                for key, (val_q, val_k) in zip(keys, values):
                    passes[key][:u_up, q_cols] = val_q.to(passes[key].dtype)
                    passes[key][:u_up, k_cols] = val_k.to(passes[key].dtype)

    def _layer(self, lay: Architecture, layer: int, x: Tensor, delta: Tensor, rows: Tensor,
               grads: list[Tensor], heads_low: dict[int, HeadSpace], stats: _SenderStats,
               work: _Workspace) -> list[tuple[Tensor, Tensor]]:
        """QK-fixed scores of ``layer``'s q and k edges from the ``U`` senders of ``delta
        [U, N, T, d]``, one ``([U, H], [U, G])`` pair per pattern gradient in ``grads`` (each
        ``[N, H, T, T]``), at the query ``rows [P]``; ``heads_low`` holds the head-space
        differences of the sender layers whose heads take the low-rank projection
        (:meth:`_head_space`); ``stats`` the senders' statistics; ``work`` the call's buffers. The patched projections are laid
        out senders-inside (``[N, T, c, out]``), so that each head's scores are one batched
        product of views."""
        q0, k0, a0 = self.qk[layer]
        g = self.runner.graph
        n, t, _ = x.shape
        heads, dh = q0.shape[1], q0.shape[-1]
        groups = k0.shape[1]
        rep, p, m, u_up = heads // groups, len(rows), len(grads), delta.shape[0]
        gdt = grads[0].dtype
        grad = torch.stack([gr[:, :, rows] for gr in grads])  # [m, N, H, P, T]
        base = torch.einsum("nhpt,mnhpt->mnh", a0[:, :, rows].to(gdt), grad)  # [m, N, H]
        # the gradients as each head's and group's contraction reads them (below)
        grad_q = grad.permute(2, 1, 3, 4, 0).contiguous()  # [H, N, P, T, m]
        grad_q = grad_q.view(heads, n, p, t, m)
        gx = grad.view(m, n, groups, rep * p, t)  # x = (r, i)
        q_rows = q0[:, :, rows].reshape(n, groups, rep * p, dh)
        scale = lay.scale(layer)  # folded into the clean sides: the scores come out scaled
        rot = lay.rotary is not None
        if not rot:  # the clean sides as they are: k^T [G, N, dh, T], q [G, N, rep*P, dh]
            key_side = (k0 * scale).permute(1, 0, 3, 2)
            query_side = (q_rows * scale).transpose(0, 1)
            grad_k = gx.permute(2, 1, 3, 4, 0).reshape(groups, n, -1, m)  # (x, j)
        else:  # R_i^T k_j [G, N, P, dh, T] and R_j^T q_i [G, N, T, rep*P, dh]
            key_side, query_side = self._rotated_sides(lay, k0, q_rows, rows, scale, work)
            grad_k = gx.permute(2, 1, 4, 3, 0).reshape(groups, n, -1, m)  # (j, x)
        grad_k = grad_k.contiguous()
        hidden = lay.hidden_keys(layer, t, q0.device)[rows]  # [P, T] (i, j)
        hidden_x = hidden.repeat(rep, 1)  # [rep*P, T] (x, j)
        sdt = lay.softmax_dtype or q0.dtype  # the patterns' dtype
        proj = _NormedProjection(lay, layer, x, rows, heads_low, stats, work,
                                 self.projected[layer])
        # without q/k norms (which need each patched projection itself) and in float32 or
        # float64, 1/sigma and the bias act on the scores: s = 1/sigma (y W_c . K) + b' . K
        # per-head RMS q/k norms (Qwen3) in float32 without biases likewise: each head's
        # 1/rms on the scores, its weight folded into the clean sides (see qk_norm_parts)
        normed = (lay.qk_norm_parts(layer) if x.dtype == torch.float32 and not proj.has_bias
                  else None)
        raw = normed is not None or (type(lay).qk_norm is Architecture.qk_norm
                                     and x.dtype in (torch.float32, torch.float64))
        if normed is not None:
            key_side.mul_(normed[0].to(key_side.dtype)[:, None])  # [..., dh, T]
            query_side.mul_(normed[1].to(query_side.dtype))  # [..., dh]
        cap = lay.attn_softcap if raw else None
        if raw:
            bias_q, bias_k = self._score_offsets(lay, proj, key_side, query_side, hidden,
                                                 hidden_x, rot, rep, k0, q_rows, rows, scale)
        if cap is not None:  # soft cap c tanh(s / c): 1/c into the offsets and the scales,
            # then tanh in place and the mask added with the factor c (one pass)
            if proj.has_bias:
                bias_q, bias_k = bias_q / cap, bias_k / cap
            low = torch.finfo(key_side.dtype).min
            add_q = key_side.new_zeros(()).masked_fill(hidden, low).view(1, 1, p, 1, t)
            add_k = key_side.new_zeros(()).masked_fill(
                hidden_x.T[:, :, None] if rot else hidden_x[:, :, None], low)[None, None]
        val_q = grad.new_empty(m, n, u_up, heads)  # per example (GradDrop's magnitudes)
        val_k = grad.new_empty(m, n, u_up, groups)
        step = max(1, CHUNK_SCORES // (n * heads * p * t))
        for u0 in range(0, u_up, step):
            u1 = min(u_up, u0 + step)
            c = u1 - u0
            qs, ks, inv = proj(delta, u0, u1, g, raw)  # [N, P, c, H*dh], [N, T, c, G*dh]
            if not raw:
                qs, ks = lay.qk_norm(layer, qs.view(n, p * c, heads, dh),
                                     ks.view(n, t * c, groups, dh), scratch=True)
            qs, ks = qs.view(n, p, c, heads, dh), ks.view(n, t, c, groups, dh)
            if inv is not None:  # what multiplies the raw scores: [H|1, N, P, c, 1] and
                # [G|1, N, T, 1, c] ([G|1, N, 1, T, c] without rotation)
                inv_q = inv if proj.every_row else inv[:, rows]
                if normed is None:  # 1/sigma
                    f_q, f_k = inv_q.reshape(1, n, p, c, 1), inv.view(1, n, t, c)
                else:  # 1/rms(1/sigma y) of each head = 1/sqrt(ms(y) + eps sigma^2)
                    f_q = _head_rms(qs, inv_q, normed[2]).permute(3, 0, 1, 2)[..., None]
                    f_k = _head_rms(ks, inv, normed[2]).permute(3, 0, 1, 2)
                f_k = f_k[:, :, :, None] if rot else f_k[:, :, None]
                if cap is not None:
                    f_q, f_k = f_q / cap, f_k / cap
            s_q = work.take("s", (heads, n, p, c, t), qs)  # patched queries, clean keys
            for h in range(heads):
                side = key_side[h // rep]
                if not rot:
                    torch.matmul(qs[:, :, :, h].reshape(n, p * c, dh), side,
                                 out=s_q[h].view(n, p * c, t))
                else:
                    torch.matmul(qs[:, :, :, h], side, out=s_q[h])
            mask_q: Tensor | None = hidden.view(1, 1, p, 1, t)
            if inv is not None:  # the scale, bias and mask (and soft cap)
                torch.addcmul(bias_q, s_q, f_q, out=s_q)
                if cap is not None:
                    torch.add(add_q, s_q.tanh_(), alpha=cap, out=s_q)
                mask_q = None
            a_q = lay.pattern_from_scores(layer, s_q, mask_q, -1, capped=raw,
                                          out=work.take("a", s_q.shape, s_q, sdt))
            got = torch.matmul(a_q.to(gdt), grad_q).sum(2)  # [H, N, c, m]
            val_q[:, :, u0:u1] = got.permute(3, 1, 2, 0)
            mask: Tensor | None
            if not rot:  # clean queries, patched keys: [G, N, rep*P, T, c]
                s_k = work.take("s", (groups, n, rep * p, t, c), ks)
                key_dim, mask = 3, hidden_x.view(1, 1, rep * p, t, 1)
            else:  # [G, N, T, rep*P, c]
                s_k = work.take("s", (groups, n, t, rep * p, c), ks)
                key_dim, mask = 2, hidden_x.T.reshape(1, 1, t, rep * p, 1)
            for gi in range(groups):
                kg = ks[:, :, :, gi]  # [N, T, c, dh]
                if not rot:
                    torch.matmul(query_side[gi], kg.reshape(n, t * c, dh).transpose(1, 2),
                                 out=s_k[gi].view(n, rep * p, t * c))
                else:
                    torch.matmul(query_side[gi], kg.transpose(-1, -2), out=s_k[gi])
            if inv is not None:
                torch.addcmul(bias_k, s_k, f_k, out=s_k)
                if cap is not None:
                    torch.add(add_k, s_k.tanh_(), alpha=cap, out=s_k)
                mask = None
            a_k = lay.pattern_from_scores(layer, s_k, mask, key_dim, capped=raw,
                                          out=work.take("a", s_k.shape, s_k, sdt))
            got = torch.matmul(a_k.to(gdt).view(groups, n, -1, c).transpose(-1, -2), grad_k)
            val_k[:, :, u0:u1] = got.permute(3, 1, 2, 0)  # [m, N, c, G]
        val_q -= base[:, :, None]
        val_k -= base.view(m, n, 1, groups, rep).sum(-1)
        if self.magnitudes:  # each example's estimate in magnitude (GradDrop)
            val_q.abs_()
            val_k.abs_()
        val_q, val_k = val_q.sum(1), val_k.sum(1)
        return [(val_q[i], val_k[i]) for i in range(m)]

    @staticmethod
    def _score_offsets(lay: Architecture, proj: _NormedProjection, key_side: Tensor,
                       query_side: Tensor, hidden: Tensor, hidden_x: Tensor, rot: bool,
                       rep: int, k0: Tensor, q_rows: Tensor, rows: Tensor, scale: float
                       ) -> tuple[Tensor, Tensor]:
        """What the bias ``b'`` of the patched q (k) adds to each score against the clean
        side ``K`` (``Q``), ``b'_q . K``, with the hidden keys at the dtype's lowest value
        (unless the family soft-caps its scores, which must come first): ``[H, N, P, 1,
        T]`` and ``[G, N, T, rep*P, 1]`` (``[G, N, rep*P, T, 1]`` without rotation); the
        masks alone, broadcast, where there is no bias. ``key_side``, ``query_side``,
        ``hidden [P, T]``, ``hidden_x [rep*P, T]``, the clean rotated ``k0 [N, G, T, dh]``,
        ``q_rows [N, G, rep*P, dh]``, the query ``rows [P]`` and ``scale`` as in
        :meth:`_layer`."""
        groups = query_side.shape[0]
        p, t = hidden.shape
        low = torch.finfo(key_side.dtype).min
        capped = lay.attn_softcap is not None
        mask_k = hidden_x.T[:, :, None] if rot else hidden_x[:, :, None]  # [T|X, X|T, 1]
        if not proj.has_bias:
            zero = key_side.new_zeros(())
            return (zero.expand(1, 1, p, 1, t) if capped else
                    zero.masked_fill(hidden, low).view(1, 1, p, 1, t),
                    zero.expand(1, 1, *mask_k.shape) if capped else
                    zero.masked_fill(mask_k, low)[None, None])
        bq = proj.bq.view(groups, rep, -1).to(key_side.dtype)  # [G, rep, dh]
        bk = proj.bk.view(groups, -1).to(key_side.dtype)  # [G, dh]
        fast = lay.half_split_factors(k0) if rot else None
        if fast is not None:  # (R_i b'_q) . k_j and q_i . (R_j b'_k), the biases turned
            cos, sin, half = fast  # (a few values) instead of the clean sides read again
            cos, sin = cos[0, 0] * scale, sin[0, 0] * scale  # [T, dh], [T, r/2]
            turn = HalfSplitRotation.turn
            dh = bq.shape[-1]
            rbq = turn(bq[:, :, None], cos[rows], sin[rows], half,
                       out=bq.new_empty(groups, rep, p, dh))  # [G, rep, P, dh]
            rbk = turn(bk[:, None], cos, sin, half, out=bk.new_empty(groups, t, dh))
            off_q = torch.einsum("grpe,ngte->grnpt", rbq, k0)
            off_k = torch.einsum("gte,ngxe->gntx", rbk, q_rows)[..., None]
        elif rot:  # K [G, N, P, dh, T], Q [G, N, T, X, dh]
            off_q = torch.einsum("gnpet,gre->grnpt", key_side, bq)
            off_k = torch.einsum("gntxe,ge->gntx", query_side, bk)[..., None]
        else:  # K [G, N, dh, T], Q [G, N, X, dh]
            off_q = torch.einsum("gnet,gre->grnt", key_side, bq)[:, :, :, None]
            off_k = torch.einsum("gnxe,ge->gnx", query_side, bk)[..., None, None]
            off_k = off_k.expand(-1, -1, -1, t, 1)
        # [H, N, P, 1, T]; [G, N, T, X, 1] (or [G, N, X, T, 1]), each its own
        off_q = off_q.reshape(groups * rep, off_q.shape[2], -1, 1, t).expand(-1, -1, p, 1, t)
        off_q, off_k = off_q.contiguous(), off_k.contiguous()
        if not capped:
            off_q.masked_fill_(hidden.view(1, 1, p, 1, t), low)
            off_k.masked_fill_(mask_k, low)
        return off_q, off_k

    @staticmethod
    def _rotated_sides(lay: Architecture, k0: Tensor, q_rows: Tensor, rows: Tensor,
                       scale: float, work: _Workspace) -> tuple[Tensor, Tensor]:
        """The clean sides of a rotary layer's patched scores, scaled: ``R_i^T k_j`` ``[G, N,
        P, dh, T]`` (each clean rotated key ``k0 [N, G, T, dh]`` turned back by each query
        row's rotation, ``rows [P]``) and ``R_j^T q_i`` ``[G, N, T, rep*P, dh]`` (each clean
        rotated query ``q_rows [N, G, rep*P, dh]`` turned back by each key position's). For
        half-split families by :meth:`HalfSplitRotation.turn` with ``scale`` folded into
        ``cos`` and ``sin`` (three elementwise kernels a side, into the call's buffers; the
        first as a transposed view of ``[G, N, P, T, dh]``, which the score products read
        as it is); otherwise through the rotation matrices (:func:`rotation_matrices`)."""
        n, groups, t, dh = k0.shape
        fast = lay.half_split_factors(k0)
        if fast is None:  # (contiguous once: each head's and group's product would copy)
            rot = rotation_matrices(lay, t, dh, k0.dtype, k0.device)
            assert rot is not None
            return (torch.einsum("iae,ngja->gniej", rot[0][rows] * scale, k0).contiguous(),
                    torch.einsum("jae,ngxa->gnjxe", rot[1] * scale, q_rows).contiguous())
        cos, sin, half = fast
        cos, sin = cos[0, 0] * scale, sin[0, 0] * scale  # [T, dh], [T, r/2]
        p, x = len(rows), q_rows.shape[2]
        turn = HalfSplitRotation.turn
        key_side = turn(k0.transpose(0, 1)[:, :, None], cos[rows][:, None], sin[rows][:, None],
                        half, -1.0, out=work.take("key side", (groups, n, p, t, dh), k0))
        query_side = turn(q_rows.transpose(0, 1)[:, :, None], cos[:, None], sin[:, None],
                          half, -1.0, out=work.take("query side", (groups, n, t, x, dh), k0))
        return key_side.transpose(-1, -2), query_side

    def _head_space(self, lay: Architecture, delta: Tensor, stats: _SenderStats
                    ) -> dict[int, HeadSpace]:
        """Each head sender's difference in head space, ``dz_h`` with ``delta_h = dz_h
        W_O[h]``, for the sender layers where every head's difference lies in its output
        projection's row space (to within :data:`ROW_SPACE_TOL` of its largest value: always,
        up to rounding, for differences of head outputs ``z W_O``; Gemma-2's differences,
        pushed through the post-norm, never do and take the direct path)."""
        g = self.runner.graph
        out: dict[int, HeadSpace] = {}
        if lay.attn_post_norm or delta.dtype in (torch.float16, torch.bfloat16):
            return out
        last = max(self.inputs, default=0)
        _, n, t, d = delta.shape
        for m in range(last):  # heads of the last tapped layer feed no q or k
            h0 = g.head_start[m]
            source = lay.w_out(m)[0]
            wd, left, gd = lay.derived(("qk_fix head space", m, delta.dtype), (source,),
                                       partial(_solve, source, g.n_heads, delta.dtype))
            rows = delta[h0: h0 + g.n_heads].reshape(g.n_heads, n * t, d)
            dz = torch.bmm(rows, left)
            # the part off the row space is orthogonal to it: |miss|^2 = |delta|^2 - |dz W|^2
            whole = stats.square[h0: h0 + g.n_heads].reshape(g.n_heads, n * t)
            miss = whole - (torch.bmm(dz, gd) * dz).sum(-1)
            if bool((miss <= ROW_SPACE_TOL ** 2 * whole.amax(1, keepdim=True)).all()):
                out[m] = HeadSpace(dz.view(g.n_heads, n, t, -1), wd, source)
        return out


def _solve(w_out: Tensor, heads: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(w [H, d_head, d], left [H, d, d_head], gram [H, d_head, d_head])`` of a layer's
    output projection ``w_out [H*d_head, d]`` in ``dtype`` (the solve in float64): ``delta
    left`` is the least-squares ``dz`` of ``delta = dz w`` and ``gram = w w^T``."""
    w = w_out.reshape(heads, -1, w_out.shape[-1]).to(dtype)
    w64 = w.double()
    gram = w64 @ w64.transpose(1, 2)  # [H, dh, dh]
    left = torch.linalg.solve(gram, w64).transpose(1, 2)  # [H, d, dh]
    return w.contiguous(), left.to(dtype).contiguous(), gram.to(dtype)


class HeadSpace(NamedTuple):
    """One sender layer's head differences in head space (``delta_h = dz_h W_O[h]``)."""

    dz: Tensor  # [H, N, T, dh]
    w_out: Tensor  # [H, dh, d]
    source: Tensor  # the adapter's w_out [H*dh, d] it came from (for Architecture.derived)


class _SenderStats:
    """What the patched norms need of each sender's difference ``delta [S, N, T, d]`` that
    does not depend on the receiving layer, once a call (in the statistics' dtype, float32 at
    least): ``square`` ``|delta_u|^2`` ``[S, N, T]`` and, for centred norms (LayerNorm),
    ``total`` ``sum_d delta_u`` ``[S, N, T]`` (made on first use)."""

    def __init__(self, delta: Tensor) -> None:
        self.dtype = torch.promote_types(delta.dtype, torch.float32)
        self.delta = delta
        wide = delta if delta.dtype == self.dtype else delta.to(self.dtype)
        self.square = torch.linalg.vector_norm(wide, dim=-1).square_()  # [S, N, T]
        self._total: Tensor | None = None

    @property
    def total(self) -> Tensor:
        """``sum_d delta_u`` ``[S, N, T]``."""
        if self._total is None:
            self._total = self.delta.sum(-1, dtype=self.dtype)
        return self._total


def norm_epsilon(lay: Architecture, layer: int, d: int,
                 device: torch.device | None = None) -> tuple[float, bool]:
    """``(eps, centred)`` of ``layer``'s attention input norm, read off
    :meth:`Architecture.norm_parts` on a row of ``+-1`` in float64 (``1/sigma =
    1/sqrt(stat + eps)``, ``stat`` its variance or mean square)."""
    row = torch.ones(1, d, dtype=torch.float64, device=device)
    row[:, 1::2] = -1
    _, inv, _, centred = lay.norm_parts(layer, row)
    stat = row.var(-1, unbiased=False) if centred else row.pow(2).mean(-1)
    return float(inv.double().reshape(-1)[0] ** -2 - stat[0]), centred


def _head_rms(y: Tensor, inv: Tensor, eps: float) -> Tensor:
    """``1 / rms(inv y)`` of each head's raw projection ``y [N, X, c, heads, dh]`` scaled by
    ``inv [N, X, c]`` (the input norm's ``1/sigma``), as ``1 / sqrt(mean(y^2) + eps /
    inv^2)`` (``inv`` itself cancels against the norm's): ``[N, X, c, heads]``."""
    ms = torch.linalg.vector_norm(y, dim=-1).square_().div_(y.shape[-1])
    return ms.add_(inv.square().reciprocal_().mul_(eps)[..., None]).rsqrt_()


class _Folded(NamedTuple):
    """What :class:`_NormedProjection` derives from ``layer``'s norm and q/k weights alone."""

    wqk: Tensor  # [d, outq + outk]: the norm's weight (and centring) folded into W_q, W_k
    bqk: Tensor  # [outq + outk]: the norm's bias through them, plus their biases
    q_out: int  # outq = H * d_head
    eps: float
    centred: bool
    has_bias: bool  # whether bqk is not all zero


def _fold_qk(lay: Architecture, layer: int, x: Tensor) -> _Folded:
    """:class:`_Folded` of ``layer`` for inputs like ``x [N, T, d]`` (its dtype)."""
    d = x.shape[-1]
    wq, bq = lay.head_weights(layer, "q")  # [H, d, dh]
    wk, bk = lay.head_weights(layer, "k")
    _, _, w_norm, centred = lay.norm_parts(layer, x[:1, :1])
    eps, centred = norm_epsilon(lay, layer, d, x.device)
    flat = torch.cat([wq, wk]).permute(1, 0, 2).reshape(d, -1)  # [d, outq + outk]
    wc = flat.to(w_norm.dtype) * w_norm.reshape(d, 1)
    wqk = (wc - wc.mean(0, keepdim=True) if centred else wc).to(x.dtype).contiguous()
    zero = lay.ln_attn(layer, x.new_zeros(1, d))[0]  # the norm's bias (0 for RMSNorm)
    bqk = zero @ flat
    if bq is not None or bk is not None:
        bqk = bqk + torch.cat([
            (b.reshape(-1) if b is not None else bqk.new_zeros(w.shape[0] * w.shape[2]))
            for b, w in ((bq, wq), (bk, wk))])
    return _Folded(wqk, bqk, wq.shape[0] * wq.shape[2], eps, centred, bool(bqk.ne(0).any()))


class _NormedProjection:
    """The q/k projections of ``layer`` read from patched residual streams ``y = x +
    delta_u``, ``q(y) = inv(y) (y W_c) + b'``: the norm's weight and centring folded into
    ``W_c`` (``[d, out]``), its bias and the projection's in ``b'``, and ``inv(y) =
    1/sqrt(stat(y) + eps)`` from the clean stream's statistics and the difference's
    (``|y|^2 = |x|^2 + 2 x.delta + |delta|^2``, means likewise), so no patched stream is
    materialised. ``y W_c = x W_c + delta_u W_c`` with the clean part taken from the forward
    pass's projections, ``x W_c = (q(x) - b') / inv(x)``; for a head
    sender in head space (:class:`HeadSpace`) ``delta_h W_c = dz_h (W_O[h] W_c)`` (``d_head``-wide
    work instead of ``d``-wide). ``x.delta_u`` is one batched product of the differences with
    ``x`` (``d`` multiply-adds a position and sender: less than ``x W_O[h]^T``'s ``d d_head``);
    ``|delta_u|^2`` and ``sum delta_u`` do not depend on the receiving layer
    (:class:`_SenderStats`).

    Args:
        lay: The family adapter.
        layer: The receiving layer.
        x: ``[N, T, d]`` its clean input.
        rows: ``[P]`` the query rows wanted.
        heads_low: ``{sender layer: HeadSpace}``.
        stats: The senders' statistics.
        work: The call's buffers (the projections are written into them).
        clean: The forward pass's clean ``(q [N, T, H, dh], k [N, T, G, dh])`` of ``layer``
            (:meth:`QKFix.projections`).
    """

    def __init__(self, lay: Architecture, layer: int, x: Tensor, rows: Tensor,
                 heads_low: dict[int, HeadSpace], stats: _SenderStats, work: _Workspace,
                 clean: tuple[Tensor, Tensor]) -> None:
        n, t, d = x.shape
        self.work, self.stats = work, stats
        self.lay, self.layer, self.x, self.rows, self.d = lay, layer, x, rows, d
        sources = lay.qkv_sources(layer)
        fold = lay.derived(("qk_fix folded", layer, x.dtype), sources,
                           lambda: _fold_qk(lay, layer, x))
        self.wqk, self.bqk, self.q_out, self.eps, self.centred, self.has_bias = fold
        self.wq, self.wk = self.wqk[:, : self.q_out], self.wqk[:, self.q_out:]
        self.bq, self.bk = self.bqk[: self.q_out], self.bqk[self.q_out:]
        self.every_row = len(rows) == t  # queries at every position: one product for q and k
        self.sdt = stats.dtype  # the statistics' dtype
        xs = x.to(self.sdt)
        self.xc = xs - xs.mean(-1, keepdim=True) if self.centred else xs  # [N, T, d]
        self.stat_x = self.xc.pow(2).mean(-1).view(n * t, 1)  # [N*T, 1]
        # x W_c = (q(x) - b') sigma(x) from the forward pass's projections (no product)
        both = torch.cat([clean[0].reshape(n * t, -1), clean[1].reshape(n * t, -1)], 1)
        sigma = (self.stat_x + self.eps).sqrt_()
        self.xqk = ((both.to(self.sdt) - self.bqk) * sigma).to(x.dtype)  # [N*T, out]
        self.xk = self.xqk[:, self.q_out:]
        if self.every_row:
            self.xq = self.xqk[:, : self.q_out]
        else:
            self.xq = self.xqk.view(n, t, -1)[:, rows, : self.q_out].reshape(n * len(rows), -1)
        self.low = {}
        for m, hs in heads_low.items():  # W_O[h] W_c [H, dh, outq + outk]
            mqk = lay.derived(("qk_fix W_O W_c", m, layer, x.dtype),
                              None if sources is None else (hs.source, *sources),
                              partial(torch.matmul, hs.w_out, self.wqk))
            self.low[m] = (hs, mqk)

    def __call__(self, delta: Tensor, u0: int, u1: int, g: object, raw: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(q [N, P, c, H*dh], k [N, T, c, G*dh], None)`` of the senders ``u0:u1`` of
        ``delta [U, N, T, d]`` (``g`` the compute graph); with ``raw`` the projections
        before the norm's ``1/sigma`` and the bias, ``y W_c``, and ``1/sigma(y)`` ``[N, T,
        c]`` third (``q = 1/sigma (y W_c) + b'``: the caller applies both to the scores,
        which are fewer than the projections' values)."""
        x, rows, d = self.x, self.rows, self.d
        c = u1 - u0
        n, t, _ = x.shape
        p = len(rows)
        if self.every_row:  # one buffer for q and k [N*T, c, outq + outk]: each product
            # (and x W_c, in it) written straight into its senders' slots
            both_slots = self.work.take("qk", (n * t, c, self.wqk.shape[1]), x)
            q_slots, k_slots = both_slots[..., : self.q_out], both_slots[..., self.q_out:]
            qs, ks = q_slots.unflatten(0, (n, t)), k_slots.unflatten(0, (n, t))
        else:
            qs = self.work.take("q", (n, p, c, self.q_out), x)
            ks = self.work.take("k", (n, t, c, self.wk.shape[1]), x)
            q_slots, k_slots = qs.view(n * p, c, -1), ks.view(n * t, c, -1)  # [rows, c, out]
        direct: list[int] = []
        u = u0
        while u < u1:  # runs of one sender layer's heads (head space) or single senders
            run = self._run(u, u1, g)
            if run is None:
                direct.append(u)
                u += 1
                continue
            m, a, b = run
            hs, mqk = self.low[m]
            first = g.head_start[m]  # type: ignore[attr-defined]
            i0, i1, j0, j1 = a - first, b - first, a - u0, b - u0
            h = b - a
            dz = hs.dz[i0:i1]  # [h, N, T, dh]
            flat = dz.reshape(h, n * t, -1)
            # dz_h (W_O[h] W_c) in one product (contiguous), then x W_c added on the way
            # into the chunk's slots (senders inside: a strided write)
            if self.every_row:
                torch.baddbmm(self.xqk.expand(h, -1, -1), flat, mqk[i0:i1],
                              out=both_slots[:, j0:j1].transpose(0, 1))
            else:
                tq = torch.bmm(dz[:, :, rows].reshape(h, n * p, -1), mqk[i0:i1, :, : self.q_out])
                tk = torch.bmm(flat, mqk[i0:i1, :, self.q_out:])
                torch.add(tq, self.xq, out=q_slots[:, j0:j1].transpose(0, 1))
                torch.add(tk, self.xk, out=k_slots[:, j0:j1].transpose(0, 1))
            u = b
        for u in direct:  # the other senders' differences as they are, d-wide
            du = delta[u].to(x.dtype)  # [N, T, d]
            j = u - u0
            flat = du.reshape(n * t, d)
            if self.every_row:
                torch.addmm(self.xqk, flat, self.wqk, out=both_slots[:, j])
                continue
            tq, tk = du[:, rows].reshape(n * p, d) @ self.wq, flat @ self.wk
            torch.add(tq, self.xq, out=q_slots[:, j])
            torch.add(tk, self.xk, out=k_slots[:, j])
        # x.delta_u at each position, every sender of the chunk in one batched product
        part = delta[u0:u1].reshape(c, n * t, d)
        part = part if part.dtype == self.sdt else part.to(self.sdt)
        cross = torch.bmm(part.transpose(0, 1), self.xc.view(n * t, d, 1)).view(n * t, c)
        stat = self.stats.square[u0:u1].reshape(c, n * t).T + 2 * cross
        if self.centred:  # variance: the mean of the difference moves the mean
            mean = self.stats.total[u0:u1].reshape(c, n * t).T
            stat -= mean * mean / d
        stat.div_(d).add_(self.stat_x + self.eps)
        inv = torch.rsqrt_(stat).to(x.dtype).view(n, t, c, 1)  # [N, T, c, 1]
        if raw:
            return qs, ks, inv.view(n, t, c)
        if self.every_row:
            torch.addcmul(self.bqk, both_slots, inv.view(n * t, c, 1), out=both_slots)
        else:
            torch.addcmul(self.bq, qs, inv[:, rows], out=qs)
            torch.addcmul(self.bk, ks, inv, out=ks)
        return qs, ks, None

    def _run(self, u: int, u1: int, g: object) -> tuple[int, int, int] | None:
        """``(sender layer, u, end)`` of the run of low-rank heads starting at sender ``u``
        (ending before ``u1``), or ``None`` if ``u`` takes the direct path."""
        for m in self.low:
            h0 = g.head_start[m]  # type: ignore[attr-defined]
            if h0 <= u < h0 + g.n_heads:  # type: ignore[attr-defined]
                return m, u, min(u1, h0 + g.n_heads)  # type: ignore[attr-defined]
        return None
