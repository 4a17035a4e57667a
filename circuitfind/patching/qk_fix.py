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
``R_i^T k_j`` and ``R_j^T q_i`` (``N H P T d_head`` values) are computed once a layer, and
``R_t`` itself by rotating the identity with the family's own rotation. Queries are projected
at the query rows some gradient reaches only (all but the metric positions in the last layer
carry none). The pattern's contraction with the gradient is a batched matrix product. The
patched streams ``x + delta_u`` are never materialised: the norm is ``1/sigma`` times a linear
map, so the projections are ``1/sigma(x + delta_u) (x W_c + delta_u W_c)`` plus a bias, with
``1/sigma`` from the clean stream's statistics and reductions of ``delta_u`` (``|delta_u|^2``
once a call, ``x . delta_u`` one batched product a layer), ``x W_c`` from the forward pass's
own projections (:meth:`QKFix.projections`), each product written straight into its senders'
slots of one q/k buffer. A head sender's
difference is ``dz_h W_O[h]`` (the difference of two head outputs ``z W_O``; recovered by least
squares once a call and checked to lie in ``W_O[h]``'s row space, else the direct path is
taken), so its projection is ``dz_h (W_O[h] W_c)``: ``d_head``-wide instead of ``d``-wide
(:class:`_NormedProjection`). Gemma-2's head differences, pushed through its post-norm, take
the direct path. The ``W_O[h] W_c`` products and the head-space solves are kept on the adapter
between calls (each weight compared with its kept copy once a call), and one workspace a call
holds the projections, scores and patterns (:class:`_Workspace`).

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

import weakref
from collections.abc import Hashable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from circuitfind.patching.architectures import Architecture
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
        _products(lay).begin()
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
        rot = rotation_matrices(lay, t, dh, q0.dtype, q0.device)
        if rot is None:  # the clean sides as they are: k^T [G, N, dh, T], q [G, N, rep*P, dh]
            key_side = (k0 * scale).permute(1, 0, 3, 2)
            query_side = (q_rows * scale).transpose(0, 1)
            grad_k = gx.permute(2, 1, 3, 4, 0).reshape(groups, n, -1, m)  # (x, j)
        else:  # R_i^T k_j [G, N, P, dh, T] and R_j^T q_i [G, N, T, rep*P, dh]
            # (contiguous once: each head's and group's product would copy its slice)
            key_side = torch.einsum("iae,ngja->gniej", rot[0][rows] * scale, k0).contiguous()
            query_side = torch.einsum("jae,ngxa->gnjxe", rot[1] * scale, q_rows).contiguous()
            grad_k = gx.permute(2, 1, 4, 3, 0).reshape(groups, n, -1, m)  # (j, x)
        grad_k = grad_k.contiguous()
        hidden = lay.hidden_keys(layer, t, q0.device)[rows]  # [P, T] (i, j)
        hidden_x = hidden.repeat(rep, 1)  # [rep*P, T] (x, j)
        sdt = lay.softmax_dtype or q0.dtype  # the patterns' dtype
        proj = _NormedProjection(lay, layer, x, rows, heads_low, stats, work,
                                 self.projected[layer])
        val_q = grad.new_empty(m, n, u_up, heads)  # per example (GradDrop's magnitudes)
        val_k = grad.new_empty(m, n, u_up, groups)
        step = max(1, CHUNK_SCORES // (n * heads * p * t))
        for u0 in range(0, u_up, step):
            u1 = min(u_up, u0 + step)
            c = u1 - u0
            qs, ks = proj(delta, u0, u1, g)  # [N, P, c, H*dh], [N, T, c, G*dh]
            qs, ks = lay.qk_norm(layer, qs.view(n, p * c, heads, dh),
                                 ks.view(n, t * c, groups, dh), scratch=True)
            qs, ks = qs.view(n, p, c, heads, dh), ks.view(n, t, c, groups, dh)
            s_q = work.take("s", (heads, n, p, c, t), qs)  # patched queries, clean keys
            for h in range(heads):
                side = key_side[h // rep]
                if rot is None:
                    torch.matmul(qs[:, :, :, h].reshape(n, p * c, dh), side,
                                 out=s_q[h].view(n, p * c, t))
                else:
                    torch.matmul(qs[:, :, :, h], side, out=s_q[h])
            a_q = lay.pattern_from_scores(layer, s_q, hidden.view(1, 1, p, 1, t), -1,
                                          out=work.take("a", s_q.shape, s_q, sdt))
            got = torch.matmul(a_q.to(gdt), grad_q).sum(2)  # [H, N, c, m]
            val_q[:, :, u0:u1] = got.permute(3, 1, 2, 0)
            if rot is None:  # clean queries, patched keys: [G, N, rep*P, T, c]
                s_k = work.take("s", (groups, n, rep * p, t, c), ks)
                key_dim, mask = 3, hidden_x.view(1, 1, rep * p, t, 1)
            else:  # [G, N, T, rep*P, c]
                s_k = work.take("s", (groups, n, t, rep * p, c), ks)
                key_dim, mask = 2, hidden_x.T.reshape(1, 1, t, rep * p, 1)
            for gi in range(groups):
                kg = ks[:, :, :, gi]  # [N, T, c, dh]
                if rot is None:
                    torch.matmul(query_side[gi], kg.reshape(n, t * c, dh).transpose(1, 2),
                                 out=s_k[gi].view(n, rep * p, t * c))
                else:
                    torch.matmul(query_side[gi], kg.transpose(-1, -2), out=s_k[gi])
            a_k = lay.pattern_from_scores(layer, s_k, mask, key_dim,
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
        cache = _products(lay)
        for m in range(last):  # heads of the last tapped layer feed no q or k
            h0 = g.head_start[m]
            wd = lay.w_out(m)[0].reshape(g.n_heads, -1, d).to(delta.dtype)  # [H, dh, d]
            left, gd = cache.solve(m, wd)
            rows = delta[h0: h0 + g.n_heads].reshape(g.n_heads, n * t, d)
            dz = torch.bmm(rows, left)
            # the part off the row space is orthogonal to it: |miss|^2 = |delta|^2 - |dz W|^2
            whole = stats.square[h0: h0 + g.n_heads].reshape(g.n_heads, n * t)
            miss = whole - (torch.bmm(dz, gd) * dz).sum(-1)
            if bool((miss <= ROW_SPACE_TOL ** 2 * whole.amax(1, keepdim=True)).all()):
                out[m] = HeadSpace(dz.view(g.n_heads, n, t, -1), wd)
        return out


class HeadSpace(NamedTuple):
    """One sender layer's head differences in head space (``delta_h = dz_h W_O[h]``)."""

    dz: Tensor  # [H, N, T, dh]
    w_out: Tensor  # [H, dh, d]


class _SenderStats:
    """What the patched norms need of each sender's difference ``delta [S, N, T, d]`` that
    does not depend on the receiving layer, once a call (in the statistics' dtype, float32 at
    least): ``square`` ``|delta_u|^2`` ``[S, N, T]`` and, for centred norms (LayerNorm),
    ``total`` ``sum_d delta_u`` ``[S, N, T]`` (made on first use)."""

    def __init__(self, delta: Tensor) -> None:
        self.dtype = torch.promote_types(delta.dtype, torch.float32)
        self.delta = delta
        wide = delta if delta.dtype == self.dtype else delta.to(self.dtype)
        self.square = torch.linalg.vecdot(wide, wide)  # [S, N, T]
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


PRODUCT_CACHE_BYTES = 1 << 26  # per model: W_O W_c products kept between calls (64 MiB)
_PRODUCTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _WeightProducts:
    """What the QK fix derives from the weights alone, kept on the adapter (weakly) between
    calls while it fits in :data:`PRODUCT_CACHE_BYTES`: ``W_O[h] W_c`` ``[H, d_head, out]``
    for each pair of a sender layer's heads (``w_out [H, d_head, d]``) and a receiving
    layer's folded q/k weights (``w_c [d, out]``), ``d^2 out`` multiply-adds a pair, and each
    sender layer's least-squares solve for its head space (:meth:`QKFix._head_space`).

    Every entry is used again only while the weights it came from are equal to copies kept
    beside it; each weight is compared once a call (:meth:`begin` starts a call), not once
    per product (one ``d x out`` comparison per layer instead of one per pair of layers).
    """

    def __init__(self) -> None:
        self.outs: dict[int, Tensor] = {}  # sender layer -> w_out copy
        self.folded: dict[int, Tensor] = {}  # receiving layer -> w_c copy
        self.products: dict[tuple[int, int], Tensor] = {}
        self.solves: dict[int, tuple[Tensor, Tensor]] = {}
        self.checked: dict[tuple[str, int], bool] = {}

    def begin(self) -> None:
        """Start a call: every weight is compared again on its first use."""
        self.checked = {}

    def _held(self) -> int:
        tensors = [*self.outs.values(), *self.folded.values(), *self.products.values(),
                   *(t for pair in self.solves.values() for t in pair)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _fits(self, *new: Tensor) -> bool:
        extra = sum(t.numel() * t.element_size() for t in new)
        return self._held() + extra <= PRODUCT_CACHE_BYTES

    def _same(self, kind: str, key: int, w: Tensor) -> bool:
        """Whether ``w`` equals the copy kept for ``(kind, key)`` (compared once a call); on
        a change the entries made from the old copy are dropped and ``w`` kept instead."""
        if (kind, key) in self.checked:
            return self.checked[(kind, key)]
        store = self.outs if kind == "out" else self.folded
        old = store.get(key)
        same = (old is not None and old.shape == w.shape and old.dtype == w.dtype
                and old.device == w.device and _equal(old, w))
        if not same:
            store.pop(key, None)
            self.products = {k: v for k, v in self.products.items()
                             if k[0 if kind == "out" else 1] != key}
            if kind == "out":
                self.solves.pop(key, None)
            if self._fits(w):
                store[key] = w.clone()
        self.checked[(kind, key)] = same
        return same

    def product(self, sender: int, layer: int, w_out: Tensor, w_c: Tensor) -> Tensor:
        """``w_out @ w_c`` ``[H, d_head, out]``, reused while both factors are unchanged."""
        same = self._same("out", sender, w_out) & self._same("c", layer, w_c)
        hit = self.products.get((sender, layer)) if same else None
        if hit is not None:
            return hit
        out = w_out @ w_c
        if sender in self.outs and layer in self.folded and self._fits(out):
            self.products[(sender, layer)] = out
        return out

    def solve(self, sender: int, w_out: Tensor) -> tuple[Tensor, Tensor]:
        """``(left [H, d, d_head], gram [H, d_head, d_head])`` of ``w_out [H, d_head, d]`` (in
        float64, returned in ``w_out``'s dtype): ``delta left`` is the least-squares ``dz``
        of ``delta = dz w_out`` and ``gram = w_out w_out^T``."""
        hit = self.solves.get(sender) if self._same("out", sender, w_out) else None
        if hit is not None:
            return hit
        w64 = w_out.double()
        gram = w64 @ w64.transpose(1, 2)  # [H, dh, dh]
        left = torch.linalg.solve(gram, w64).transpose(1, 2)  # [H, d, dh]
        out = left.to(w_out.dtype).contiguous(), gram.to(w_out.dtype)
        if sender in self.outs and self._fits(*out):
            self.solves[sender] = out
        return out


def _equal(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape, dtype, device) hold the same bits (compared as
    64-bit words where both are contiguous: about twice as fast as :func:`torch.equal` on a
    CPU; bitwise, so ``-0.0`` differs from ``0.0``, which at worst recomputes a product)."""
    if (a.is_contiguous() and b.is_contiguous() and a.numel() * a.element_size() % 8 == 0
            and a.numel()):
        return torch.equal(a.view(-1).view(torch.int64), b.view(-1).view(torch.int64))
    return torch.equal(a, b)


def _products(lay: Architecture) -> _WeightProducts:
    """The adapter's :class:`_WeightProducts` (made on first use)."""
    cache = _PRODUCTS.get(lay)
    if cache is None:
        cache = _PRODUCTS[lay] = _WeightProducts()
    return cache


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
        wq, bq = lay.head_weights(layer, "q")  # [H, d, dh]
        wk, bk = lay.head_weights(layer, "k")
        _, _, w_norm, centred = lay.norm_parts(layer, x[:1, :1])
        self.eps, self.centred = norm_epsilon(lay, layer, d, x.device)
        flat = torch.cat([wq, wk]).permute(1, 0, 2).reshape(d, -1)  # [d, outq + outk]
        wc = flat.to(w_norm.dtype) * w_norm.reshape(d, 1)
        self.wqk = (wc - wc.mean(0, keepdim=True) if centred else wc).to(x.dtype)
        self.q_out = wq.shape[0] * wq.shape[2]
        self.wq, self.wk = self.wqk[:, : self.q_out], self.wqk[:, self.q_out:]
        zero = lay.ln_attn(layer, x.new_zeros(1, d))[0]  # the norm's bias (0 for RMSNorm)
        self.bqk = zero @ flat
        if bq is not None or bk is not None:
            self.bqk = self.bqk + torch.cat([
                (b.reshape(-1) if b is not None else self.bqk.new_zeros(w.shape[0] * w.shape[2]))
                for b, w in ((bq, wq), (bk, wk))])
        self.bq, self.bk = self.bqk[: self.q_out], self.bqk[self.q_out:]
        self.every_row = len(rows) == t  # queries at every position: one product for q and k
        self.sdt = stats.dtype  # the statistics' dtype
        xs = x.to(self.sdt)
        self.xc = xs - xs.mean(-1, keepdim=True) if centred else xs  # [N, T, d]
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
        products = _products(lay)
        for m, hs in heads_low.items():
            mqk = products.product(m, layer, hs.w_out, self.wqk)  # [H, dh, outq + outk]
            self.low[m] = (hs, mqk)

    def __call__(self, delta: Tensor, u0: int, u1: int, g: object
                 ) -> tuple[Tensor, Tensor]:
        """``(q [N, P, c, H*dh], k [N, T, c, G*dh])`` of the senders ``u0:u1`` of ``delta
        [U, N, T, d]`` (``g`` the compute graph)."""
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
        if self.every_row:
            torch.addcmul(self.bqk, both_slots, inv.view(n * t, c, 1), out=both_slots)
        else:
            torch.addcmul(self.bq, qs, inv[:, rows], out=qs)
            torch.addcmul(self.bk, ks, inv, out=ks)
        return qs, ks

    def _run(self, u: int, u1: int, g: object) -> tuple[int, int, int] | None:
        """``(sender layer, u, end)`` of the run of low-rank heads starting at sender ``u``
        (ending before ``u1``), or ``None`` if ``u`` takes the direct path."""
        for m in self.low:
            h0 = g.head_start[m]  # type: ignore[attr-defined]
            if h0 <= u < h0 + g.n_heads:  # type: ignore[attr-defined]
                return m, u, min(u1, h0 + g.n_heads)  # type: ignore[attr-defined]
        return None
