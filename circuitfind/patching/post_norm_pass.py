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

Cost. Only the (mask, receiver) pairs a mask touches get their own input, built for all
touched receivers of a layer (or the MLP, or the logits) at once and normalised and projected
together, in two parts:

- *static*: what the senders before the start layer change (clean in every mask, so it
  depends only on the receiver's weights over them): one weighted sum of their differences
  and one norm per earlier layer with a removed head edge, computed once per distinct weight
  column and kept in the runner's memo (:class:`~circuitfind.patching.masked_pass.KeptFormMemo`)
  until the next pass. ACDC tests a layer's edges against receivers after it whose weights do
  not change from pass to pass, so their static parts are computed once per layer, not once a
  pass; the start layer's untested receivers share one row across masks.
- *dynamic*: what the senders computed in the pass change, ``sum_{l >= start} D_{l, r}`` plus
  the MLPs'. With the post-norm an RMSNorm (:meth:`Architecture.post_norm_rms`), ``D_{l, r}
  = scale (S_l (inv(S_l) - inv(y)) + inv(y) C)`` for the mixture ``y = S_l - C``, ``C =
  sum_h w[h, r] (a_h - a'_h)``: a combination of the layer's basis vectors ``S_l`` and ``a_h -
  a'_h`` whose coefficients vary by position only through ``inv(y) = 1 / sqrt(mean(y^2) +
  eps)``, and ``|y|^2 = u^T G u`` (``u = [1, -w]``) from the basis' Gram matrix ``G``
  (float64 values; one float32 matmul for float32 models, with the few mixtures that cancel
  recomputed in float64, :func:`mixture_norms`). A layer's basis and Gram matrices are built
  once a pass; every receiver group's change is then one batched matmul (coefficients ``[R',
  J]`` times basis ``[J, d]`` per mask and position), with no per-receiver mixture or norm. Where few masks touch a receiver
  (exact patching's MLP at the start layer) and with gradients, the norms are computed
  directly (one batched matmul and one norm per layer of heads).

For float32 models (where the input norm computes in the model's dtype) the input RMSNorm's
scale folds into the q/k/v projections and ``1/rms`` scales their outputs (``W (c x inv(x)) =
(W diag(c)) x inv(x)``, :meth:`Architecture.ln_attn_rms`): each own input is read by one
reduction and one matmul, not normalised first; where every mask touches every receiver of a
layer (ACDC's later layers) the own inputs ``x - static - dynamic`` are written in place into
the Gram form's ``[K, X, R', d]`` change (no separate inputs tensor).

At the start layer every mask reads the clean residual, so a head's attention is recomputed
only for the masks touching its q/k/v, once for all of them where its inputs agree (ACDC's
candidates differ in one receiver); the others keep its cached output. The start layer's
shared q/k/v (of the clean residual) and the outputs of its heads whose inputs every mask
shares (ACDC's receivers of that layer tested before the candidate) are kept in the memo from
pass to pass. The last block builds its queries' own inputs and computes head outputs, MLP and
logits at the metric positions only (its keys and values need every position).

Mask-invariant nodes (no gradients, no frozen edges). Since ``S_l - sum_h w_h (a_h - a'_h) =
S'_l + sum_h k_h (a_h - a'_h)`` (``k = 1 - w`` on real edges, ``S'_l`` the ablated heads' sum),
a receiver also reads its *kept form*: the residual with every computed sender ablated, minus
its static part, plus its kept computed MLPs' differences and, per layer with a kept head,
``PostNorm_l(S'_l + sum_h k_h (a_h - a'_h)) - PostNorm_l(S'_l)``. A receiver after the start
layer whose weights agree in every mask and whose kept computed senders are all invariant
therefore reads the same input in every mask: it is built once in kept form and projected
once; a head whose q, k and v receivers are such, and an MLP whose receiver is, run once; the
logits too. Each gets a content key (its weights and its kept computed senders' keys), and
its output is kept in the memo for the next pass (ACDC's sparse circuits: after the tested
receiver's layer only nodes reached through kept edges from the changed head vary, and what
does not vary is usually unchanged since the last pass). In a pass of one mask every node is
invariant: there a receiver missing from the memo that keeps a head edge from a computed layer
is built in the removed form (Gram basis shared), under its key all the same
(:meth:`PostNormPass._kept_pays`; dense circuits' keys are new in every pass). Varying logits that keep no head edge
from a computed layer read their kept form per mask (no norm; a few MLP differences); the
other varying receivers keep the removed form above, where a circuit keeping much (ACDC's at tau 1e-3
keeps 44% of the edges) leaves little to skip. Where every mask's every receiver of a layer
has its own input, no shared q/k/v projection is computed. On a 6-layer d256 8-head Gemma-2
(batch 8 x 16, one thread, plain Hugging Face forwards, ``benchmarks/results/families.md``
and ``acdc_families.md``): ACDC 0.80-0.81 per test at tau 1e-3 (0.87 before the float32 Gram
matrices on that machine's earlier load, 0.81-0.84 interleaved; 1.1 before the folded
projections and the start-layer memo; per-receiver norms: 1.8-1.9) and 0.42-0.47 at the
sparse tau 0.0178 (1.8% of the edges kept; 0.87-0.97 before the invariant nodes), exact
patching 0.26-0.28 per edge; the work floor of ACDC per test there is 0.18
(``benchmarks/bench_gemma2_acdc_floor.py``). The pass is differentiable in ``removed`` and ``frozen`` (every real edge then counts as touched).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuitfind.patching.architectures import Architecture
from circuitfind.patching.masked_pass import (ablated_input, fully_removed, host_array,
                                             memo_cap, receiver_changes)

if TYPE_CHECKING:
    from circuitfind.patching.runner import BlockRunner, RunCache


# A float32 Gram matrix's squared mixture norm is trusted where it is at least this fraction
# of its triangle-inequality bound (mixture_norms); below it, float64 recomputes it.
CANCELLATION = 2.0 ** -10


def mixture_norms(gram: Tensor, us: Tensor) -> tuple[Tensor, Tensor]:
    """Squared norms of mixtures read off Gram matrices, and where they cancel.

    ``|y|^2 = u^T G u`` for the mixtures ``y = sum_j u_j v_j`` of the basis vectors ``v_j``
    whose Gram matrix is ``G``. An entry of a Gram matrix computed in float32 errs by up to
    about ``sqrt(d) eps32 |v_i| |v_j|``, so ``u^T G u`` errs by up to about ``sqrt(d) eps32
    B`` with ``B = (sum_j |u_j| |v_j|)^2`` (the triangle-inequality bound on ``|y|^2``): its
    relative error is small unless ``|y|^2`` is much smaller than ``B``, i.e. the mixture
    cancels. Entries with ``|y|^2 < CANCELLATION * B`` are flagged (orthogonal basis vectors
    of equal weight give ``|y|^2 = B / J``, far above).

    Args:
        gram: ``[K, X, J, J]`` Gram matrices (float64 values).
        us: ``[K, J, R]`` mixture weights of ``R`` receivers (float64).

    Returns:
        ``(|y|^2 [K, X, R], suspect [K, X, R] bool)``.
    """
    sq = ((gram @ us[:, None]) * us[:, None]).sum(2)
    root = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # [K, X, J]: |v_j|
    bound = (root @ us.abs()).square_()  # [K, X, R]
    return sq, sq < bound.mul_(CANCELLATION)


class PostNormPass:
    """K masked runs over N examples from one start layer for a post-norm family (arguments as
    in :meth:`circuitfind.patching.runner.BlockRunner.run`, plus the runner itself).

    Raises:
        ConfigError: ``start`` out of range, or a mask touches a receiver before ``start``.
    """

    def __init__(self, runner: BlockRunner, cache: RunCache, ablated: Tensor, removed: Tensor,
                 positions: Tensor, start: int | None = None, frozen: Tensor | None = None,
                 diff: Tensor | None = None,
                 abl_resid: tuple[Tensor, Tensor] | None = None) -> None:
        g = runner.graph
        self.runner, self.g, self.lay, self.cache = runner, g, runner.arch, cache
        self.ablated, self.removed, self.frozen = ablated, removed, frozen
        self.positions = positions.to(cache.resid.device)
        self.k = removed.shape[0]
        # every real edge counts as touched when the weights carry gradients (the autograd
        # reference of EAP differentiates at weight 0)
        self.grads = removed.requires_grad or (frozen is not None and frozen.requires_grad)
        weights = removed.detach() if frozen is None else removed.abs() + frozen.abs()
        touched = (g.edge_mask.to(weights.device).bool().unsqueeze(0).expand(self.k, -1, -1)
                   if self.grads else weights.detach().ne(0))
        self.touched = touched.any(1).cpu()  # [K, R]: (mask, receiver) pairs with own inputs
        # which weights are nonzero [K, S, R] (no gradients), read on the host (_dynamic_gram)
        self.nonzero = None if self.grads else (
            host_array(removed) != 0, None if frozen is None else host_array(frozen) != 0)
        # pairs reading the fully ablated run's residual ``abl`` (see _ablated_rows)
        self.full, self.abl = fully_removed(g.edge_mask, removed, frozen), abl_resid
        self.full_sums: dict[tuple[int, bool], tuple[Tensor, bool]] = {}  # see _ablated_sums
        # senders some edge of which is removed or frozen in some mask (every sender with
        # gradients): the only ones whose differences a receiver's input reads
        self.read = (torch.ones(g.n_senders, dtype=torch.bool) if self.grads
                     else weights.detach().ne(0).any(2).any(0).cpu())
        self.start = runner.resolve_start(self.touched.any(0), start)
        self.diff = cache.senders - ablated if diff is None else diff  # [S, n, T, d]
        n, t, d = cache.resid.shape[1:]
        self.n, self.t, self.d = n, t, d
        self.at_pos = False  # the last block: every tensor at the metric positions only
        # the senders the pass computes, by first sender u of a group (a layer's heads, or one
        # MLP): ``a - a'`` and, with frozen edges, ``a - a(clean)``, [K, U, n, T, d]; ``None``
        # where no edge of the group is removed or frozen (never read)
        self.removed_diff: dict[int, Tensor | None] = {}
        self.frozen_diff: dict[int, Tensor | None] = {}
        # per layer: the summed head outputs S_l [K|1, n, T, d] and PostNorm_l(S_l)
        self.sums: dict[int, Tensor] = {}
        self.normed: dict[int, Tensor] = {}
        # senders before the start layer: clean in every mask ("static")
        self.n_static = g.head_start[self.start] if self.start < g.n_layers else g.n_senders
        self.plain = [0] + [u for u in g.mlp_index if u is not None]  # the input and the MLPs
        self.clean_sums: dict[tuple[int, bool], tuple[Tensor, Tensor]] = {}
        # the post-norm as an RMSNorm of each layer, (scale, eps), where the adapter says so
        # (the Gram-matrix form of the receivers' norms, _dynamic_gram), and its bases
        rms = [self.lay.post_norm_rms(layer) for layer in range(g.n_layers)]
        self.rms: list[tuple[Tensor, float]] | None = (
            None if any(r is None for r in rms) else [r for r in rms if r is not None])
        self.dtype = cache.resid.dtype
        self.buf: Tensor | None = None  # the basis buffer (_fill), grown as it is filled
        self.grams: dict[int, Tensor] = {}
        self.filled: set[int] = set()
        self.folds: dict[int, tuple[dict[str, tuple[Tensor, Tensor | None]], float] | None] = {}
        self._columns()
        # the basis columns the touched receivers read (the buffer's width; ACDC: all)
        ups = [int(g.n_upstream[r]) for r in self.touched.any(0).nonzero()[:, 0].tolist()]
        top = max(ups, default=0)
        self.n_cols_read = self.col_before.get(top, self.n_cols) if top > self.n_static else 0
        self.written: set[int] = set()  # groups whose basis columns hold values (or zeros)
        # the static parts of receiver inputs, kept from pass to pass (see _static_of), for
        # one data tensor: the engine's memoised ``diff`` (held, so that its memory cannot be
        # reused under the same address) and the slice of it and the positions in use
        self.memo = runner.memo
        self.fresh: dict[Any, Tensor] = {}  # this pass's entries: the next pass's memo
        if not self.grads:
            owner = self.diff if self.diff._base is None else self.diff._base
            self.memo.follow(owner, (self.diff.storage_offset(), tuple(self.diff.shape),
                                     self.positions.cpu().numpy().tobytes()))
        self.abl_resid = abl_resid
        self._invariants()

    # ------------------------------------------------------------------ mask-invariant nodes
    def _invariants(self) -> None:
        """Set up the bookkeeping of mask-invariant nodes (no gradients, no frozen edges): a
        receiver whose weights are the same in every mask and whose kept edges from senders
        computed in the pass all leave invariant senders reads the same input in every mask;
        a head whose q, k and v receivers are invariant, and an MLP whose receiver is, has the
        same output in every mask. Each gets a content key (interned, as in
        :meth:`MaskedPass._intern`): its weights and its kept computed senders' keys."""
        self.kept_ok = not self.grads and self.frozen is None
        self.ids: dict[Any, int] = {}
        self.rkeys: dict[int, int | None] = {}  # receiver -> content key, None: varies
        self.skeys: dict[int, int] = {}  # computed invariant sender -> content key
        self.bases: dict[Any, Tensor] = {}
        self.abl_sums: dict[Any, tuple[Tensor, Tensor]] = {}
        if not self.kept_ok:
            return
        w0 = self.removed[0]
        self.same = (self.removed == w0).all(0).all(0).cpu().tolist()  # [R]
        kept = self.g.edge_mask.to(w0.device, w0.dtype) - w0  # [S, R] kept weights, mask 0
        self.kept_w = kept.T.contiguous()  # [R, S]
        self.kept_nz = kept.T.ne(0).cpu().numpy()
        w0 = w0.T.contiguous()
        self.w0 = (w0.float() if w0.dtype == torch.bfloat16 else w0).cpu().numpy()

    def _intern(self, key: tuple[Any, ...]) -> int:
        """A small stable id for a flat key (ids kept from pass to pass in the memo)."""
        if key not in self.ids:
            self.ids[key] = self.memo.ids.get(key) or self.memo.new_id()
        return self.ids[key]

    def _recv_key(self, r: int) -> int | None:
        """Receiver ``r``'s content key if its input is the same in every mask, else
        ``None`` (see :meth:`_invariants`)."""
        if not self.kept_ok:
            return None
        if r not in self.rkeys:
            key = None
            if self.same[r]:
                lo, hi = self.n_static, int(self.g.n_upstream[r])
                ups = (self.kept_nz[r, lo:hi].nonzero()[0] + lo).tolist() if hi > lo else []
                senders = [self.skeys.get(u) for u in ups]
                if all(k is not None for k in senders):
                    key = self._intern(("r", self.start, r, self.w0[r].tobytes(),
                                        tuple(senders)))
            self.rkeys[r] = key
        return self.rkeys[r]

    def _sender_keys(self, layer: int) -> None:
        """Content keys of block ``layer``'s invariant heads (once its heads are computed)."""
        if not self.kept_ok:
            return
        g = self.g
        rep = g.n_heads // g.n_kv_heads
        for head in range(g.n_heads):
            keys = (self._recv_key(g.q_start[layer] + head),
                    self._recv_key(g.k_start[layer] + head // rep),
                    self._recv_key(g.v_start[layer] + head // rep))
            if all(k is not None for k in keys):
                self.skeys[g.head_start[layer] + head] = self._intern(("h", layer, head, keys))

    def _base(self, abl: int) -> Tensor:
        """``x(clean)_start - x'_start + x'`` ``[1, n*T|P*d]``: the residual stream in which
        every sender computed in the pass reaching it is ablated, with ``x'`` the ablated
        run's stream :meth:`BlockRunner.ablated_residuals` ``abl`` (index into ``pre`` for
        ``abl >= 0``, into ``mid`` as ``-1 - layer``), at the current positions."""
        key = (abl, self.at_pos)
        if key not in self.bases:
            if self.abl_resid is None:
                self.abl_resid = self.runner.ablated_residuals(self.ablated, self.n, self.t)
            pre, mid = self.abl_resid
            x_abl = pre[abl] if abl >= 0 else mid[-1 - abl]
            base = (self.cache.resid[self.start] if abl == self.start  # (no rounding)
                    else self.cache.resid[self.start] - pre[self.start] + x_abl)
            self.bases[key] = self._rows(base[None]).reshape(1, -1)
        return self.bases[key]

    def _ablated_sum(self, layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """``S'_l`` and ``PostNorm_l(S'_l)`` ``[1, n*T|P*d]`` of the ablated heads' sum."""
        key = (layer, self.at_pos)
        if key not in self.abl_sums:
            h0 = self.g.head_start[layer]
            heads = self._rows(self.ablated[h0: h0 + self.g.n_heads])
            s = Architecture.attn_from_heads(self.lay, layer, heads, 0)
            s = s.expand(like.shape).contiguous()
            self.abl_sums[key] = (s.reshape(1, -1), self.lay.post_norm(layer, s).reshape(1, -1))
        return self.abl_sums[key]

    def _kept_pays(self, r: int) -> bool:
        """Whether invariant receiver ``r`` (:meth:`_recv_key`), missing from the memo, is built
        in kept form (:meth:`_kept_inputs`, once for every mask) rather than in the removed
        form: where the pass has several masks (the removed form would build it per mask), and
        in a pass of one mask where it keeps no head edge from a layer computed in the pass
        (:meth:`_no_kept_heads`: no norm, a few MLP differences). A one-mask pass builds a
        receiver in kept form with one own mixture and post-norm per computed layer with a
        kept head edge, unfolded input norm and one projection per receiver; the removed form
        shares one Gram basis per layer among the receivers. ACDC's one-mask passes at tau
        1e-3 (44% of the edges kept; nearly every later receiver keeps a head edge from every
        computed layer, and its key is new in each pass) measured 5% slower in kept form than
        before the kept form (replayed passes, 2026-12-04); in the removed form 10% faster
        than that, with the sparse tau 0.0178 unchanged."""
        return self.k > 1 or self._no_kept_heads(r)

    def _no_kept_heads(self, r: int) -> bool:
        """Whether receiver ``r`` keeps no head edge (in mask 0) from a layer computed in the
        pass."""
        g = self.g
        hi = int(g.n_upstream[r])
        return not any(self.kept_nz[r, g.head_start[layer]: g.head_start[layer] + g.n_heads].any()
                       for layer in range(self.start, g.n_layers) if g.head_start[layer] < hi)

    def _sparse(self, r: int) -> bool:
        """Whether the logits receiver ``r`` (weights equal in every mask) keeps no head edge
        from a layer computed in the pass: its kept-form input (:meth:`_kept_inputs`, at the
        metric positions) then needs no norm, only its kept MLPs' differences. (Varying q/k/v
        and MLP receivers keep the Gram form: their kept form per mask, at every position,
        measured slower at tau 1e-3.)"""
        return self.kept_ok and self.same[r] and self._no_kept_heads(r)

    def _kept_inputs(self, rs: list[int], abl: int, per_mask: bool = False) -> Tensor:
        """Inputs ``[1, R', n, T|P, d]`` of invariant receivers ``rs`` (one row serves every
        mask; with ``per_mask`` ``[K, R', n, T|P, d]`` of receivers whose weights agree in every
        mask but whose kept senders vary), in kept form: ``x_r = base - static_r + sum_{u computed, plain} k[u, r] (a_u
        - a'_u) + sum_{l >= start} [PostNorm_l(S'_l + sum_h k[h, r] (a_h - a'_h)) -
        PostNorm_l(S'_l)]`` with ``k = 1 - removed`` on real edges, ``S'_l`` the ablated
        heads' sum (:meth:`_ablated_sum`), ``base`` :meth:`_base` and ``static_r``
        (:meth:`_static_of`) what senders before the start layer change, as in the removed
        form. Equal to the removed form (``S_l - sum_h w_h (a_h - a'_h) = S'_l + sum_h k_h
        (a_h - a'_h)``) up to rounding; only kept senders are read (from mask 0 unless
        ``per_mask``), so the cost follows the kept edges, not the removed ones."""
        g, lay = self.g, self.lay
        base = self._base(abl)
        shape = (self.n, base.shape[1] // (self.n * self.d), self.d)
        static, order = self._static_of(torch.zeros(len(rs), dtype=torch.long),
                                        torch.tensor(rs))
        out = (base - static[torch.tensor(order, device=base.device)])[None]  # [1, R', X]
        k = self.k if per_mask else 1
        hi = max(int(g.n_upstream[r]) for r in rs)
        ridx = torch.tensor(rs, device=self.kept_w.device)
        kw = self.kept_w[ridx]  # [R', S]
        for u in self.plain:
            if self.n_static <= u < hi and bool(kw[:, u].ne(0).any()):
                diff = self._diff(u)[:k, 0].reshape(k, 1, -1)
                out = out + kw[:, u: u + 1].to(out.dtype) * diff
        for layer in range(self.start, g.n_layers):
            h0 = g.head_start[layer]
            if h0 >= hi:
                break
            w = kw[:, h0: h0 + g.n_heads]
            sel = w.ne(0).any(1)
            if not bool(sel.any()):
                continue
            s_abl, n_abl = self._ablated_sum(layer, base.view(*shape))
            diffs = self._diff(h0)[:k].reshape(k, g.n_heads, -1)
            mix = s_abl + w[sel].to(out.dtype) @ diffs  # [k, R'', X]
            d_l = lay.post_norm(layer, mix.view(-1, *shape)).reshape(mix.shape) - n_abl
            if out.shape[0] < k:
                out = out.expand(k, -1, -1).clone()
            out[:, sel] += d_l
        out = out.view(out.shape[0], len(rs), *shape)
        if self.full is not None:  # fully removed: the ablated run itself (see _ablated_rows)
            for i, r in enumerate(rs):  # (weights agree in every mask: mask 0 decides)
                if bool(self.full[0, r]):
                    out[:, i] = self._ablated_input(r)
        return out

    def _diff(self, u: int) -> Tensor:
        """``a - a'`` ``[K, U, n, T|P, d]`` of the sender group from ``u`` computed in the
        pass (kept for every group with no frozen edges, :meth:`_computed`)."""
        diff = self.removed_diff[u]
        assert diff is not None  # kept_ok: every computed group's differences are kept
        return diff

    # ------------------------------------------------------------------ the receivers' inputs
    def _rows(self, value: Tensor) -> Tensor:
        """``value [..., n|1, T|1, d]`` (all positions) at the metric positions, ``[..., n, P,
        d]``, once the pass is in its last block; itself before, or when it does not vary with
        position."""
        if not self.at_pos or value.shape[-2] == 1:
            return value
        pos = self.positions
        value = value.expand(*value.shape[:-3], self.n, self.t, self.d)
        idx = pos.view(*(1,) * (value.ndim - 3), *pos.shape, 1)
        return value.gather(-2, idx.expand(*value.shape[:-3], *pos.shape, self.d))

    def _clean_sum(self, layer: int) -> tuple[Tensor, Tensor]:
        """``S_l`` and ``PostNorm_l(S_l)`` ``[1, n*T|P*d]`` of a layer before the start (the
        clean run's summed head outputs with bias), at the pass's current positions."""
        key = (layer, self.at_pos)
        if key not in self.clean_sums:
            g = self.g
            h0 = g.head_start[layer]
            heads = self._rows(self.cache.senders[h0: h0 + g.n_heads])
            s = Architecture.attn_from_heads(self.lay, layer, heads, 0)[None]
            self.clean_sums[key] = (s.reshape(1, -1),
                                    self.lay.post_norm(layer, s).reshape(1, -1))
        return self.clean_sums[key]

    def _static_parts(self, cols: Tensor) -> Tensor:
        """What the senders before the start layer change in receivers with removal weights
        ``cols [M, n_static]`` over them: ``sum_{u plain} w_u (a_u - a'_u) + sum_{l < start}
        D_l`` ``[M, n*T|P*d]`` (frozen edges change nothing there: those senders are clean in
        every mask). Rows whose weights into a layer's heads are all 0 skip its norm (their
        ``D_l`` is 0)."""
        g, lay = self.g, self.lay
        plain = [u for u in self.plain if u < self.n_static]
        values = self._rows(self.diff[plain])  # [U, n, T|P, d]
        shape = values.shape[1:]
        out = cols[:, plain] @ values.reshape(len(plain), -1)
        for layer in range(self.start):
            h0 = g.head_start[layer]
            w = cols[:, h0: h0 + g.n_heads]
            sel = w.ne(0).any(1) if not self.grads else None
            if sel is not None:
                if not bool(sel.any()):
                    continue
                if bool(sel.all()):
                    sel = None
            heads = self._rows(self.diff[h0: h0 + g.n_heads]).reshape(g.n_heads, -1)
            s, normed = self._clean_sum(layer)
            w_sel = w if sel is None else w[sel]
            mixed = s - w_sel @ heads  # [m, X]
            full = self._ablated_sums(layer, w_sel[:, :, None], None)
            if full is not None:  # mixtures of ablated heads only: S'_l itself
                mixed[full[0][:, 0]] = full[1]
            d_l = normed - lay.post_norm(layer, mixed.view(-1, *shape)).reshape(mixed.shape)
            if sel is None:
                out = out + d_l
            else:
                out[sel] += d_l
        return out

    def _static_of(self, kk: Tensor, rr: Tensor) -> tuple[Tensor, list[int]]:
        """The static parts (:meth:`_static_parts`) of the (mask, receiver) pairs ``(kk, rr)``:
        ``(rows [M, X], row of each pair)``, one row per distinct (receiver, weights over the
        static senders). Rows are kept in the runner's memo from one pass to the next (ACDC's
        later receivers keep their weights while it tests a layer's edges; the start layer's
        untested receivers share theirs across masks); only new ones are computed."""
        dev = self.removed.device
        cols = self.removed[kk.to(dev), : self.n_static, rr.to(dev)]  # [P, n_static]
        if self.grads:
            return self._static_parts(cols), list(range(len(kk)))
        flat = cols.cpu().double().numpy()  # lossless for every float dtype (bfloat16 too)
        head = (self.n_static, self.at_pos)
        index: dict[Any, int] = {}
        order = [index.setdefault((head, r, flat[i].tobytes()), len(index))
                 for i, r in enumerate(rr.tolist())]
        found: list[Tensor | None] = [self.memo.entries.get(key) for key in index]
        missing = [i for i, got in enumerate(found) if got is None]
        if missing:
            first: dict[int, int] = {}
            for p, i in enumerate(order):
                first.setdefault(i, p)
            new = self._static_parts(cols[[first[i] for i in missing]])
            for j, i in enumerate(missing):
                found[i] = new[j]
        rows = []
        for key, got in zip(index, found):
            assert got is not None  # every missing row was computed above
            self.fresh[key] = got
            rows.append(got)
        return torch.stack(rows), order

    def _dynamic(self, rs: list[int], kk: Tensor, jj: Tensor) -> tuple[Tensor, Tensor] | None:
        """What the senders computed in this pass (at or after the start layer) change in the
        receivers ``rs`` for the masks of the pairs ``(kk, rs[jj])``: ``(masks K' (sorted),
        change [K', R', X] (or a ``[K', R', X', d]`` view))``, or ``None`` where they change
        nothing. Computed for every (mask, receiver) of the pairs' masks and receivers at once:
        from the layers' Gram matrices (:meth:`_dynamic_gram`) where the post-norm is an
        RMSNorm and no gradient is taken, else directly (one batched matmul per sender group,
        one norm per layer of heads, in chunks of receivers)."""
        g, lay, dev = self.g, self.lay, self.removed.device
        n_up = int(g.n_upstream[rs].max())
        if n_up <= self.n_static:
            return None
        if (not self.grads and self.rms is not None
                and int(torch.unique(kk).numel()) * len(rs) >= self.k):
            # the Gram form's basis holds every mask: worth it where the pairs' rows are as
            # many (ACDC's and random circuits' later receivers), not for a few masks'
            # receiver (exact patching's MLP at the start layer)
            return self._dynamic_gram(rs, kk, jj, n_up)
        kset = torch.unique(kk)  # sorted
        every = len(kset) == self.k
        kd = kset.to(dev)
        removed = self.removed if every else self.removed[kd]
        frozen = None if self.frozen is None else (self.frozen if every else self.frozen[kd])

        def values(store: dict[int, Tensor | None], u: int) -> Tensor | None:
            value = store.get(u)
            if value is None:
                return None
            value = value if every else value[kd]
            return value.reshape(value.shape[0], value.shape[1], -1)  # [K', U, X]

        groups: list[tuple[int, int, int | None]] = []  # (first sender, size, heads' layer)
        for u in self.plain:
            if self.n_static <= u < n_up:
                groups.append((u, 1, None))
        for layer in range(self.start, g.n_layers):
            h0 = g.head_start[layer]
            if h0 + g.n_heads <= n_up:
                groups.append((h0, g.n_heads, layer))
        chunk = max(1, 64 // len(kset))
        parts = []
        for c0 in range(0, len(rs), chunk):
            ridx = torch.tensor(rs[c0: c0 + chunk], device=dev)
            out: Tensor | None = None
            for u, size, heads_of in groups:
                w_r = removed[:, u: u + size][:, :, ridx]  # [K', U, R']
                w_f = None if frozen is None else frozen[:, u: u + size][:, :, ridx]
                if not self.grads and not bool(w_r.ne(0).any()) and (
                        w_f is None or not bool(w_f.ne(0).any())):
                    continue
                v_r, v_f = values(self.removed_diff, u), values(self.frozen_diff, u)
                change = None if v_r is None else receiver_changes(w_r, v_r)
                if w_f is not None and v_f is not None:
                    change = receiver_changes(w_f, v_f, change)
                if change is None:
                    continue
                if heads_of is not None:  # D_l = PostNorm(S_l) - PostNorm(S_l - change)
                    s, normed = self.sums[heads_of], self.normed[heads_of]
                    if s.shape[0] > 1 and not every:
                        s, normed = s[kd], normed[kd]
                    s = s.reshape(s.shape[0], 1, -1)
                    normed = normed.reshape(normed.shape[0], 1, -1)
                    shape = self.sums[heads_of].shape[1:]
                    mixed = s - change  # [K', R', X]
                    full = self._ablated_sums(heads_of, w_r, w_f)
                    if full is not None:  # mixtures of ablated heads only: S'_l itself
                        mixed[full[0]] = full[1]
                    change = normed - lay.post_norm(
                        heads_of, mixed.view(-1, *shape)).view(change.shape)
                out = change if out is None else out + change
            if out is None:
                continue
            parts.append((c0, out))
        if not parts:
            return None
        x_size = parts[0][1].shape[-1]
        total = parts[0][1].new_zeros(len(kset), len(rs), x_size)
        for c0, out in parts:
            total[:, c0: c0 + out.shape[1]] = out
        return kset, total

    def _columns(self) -> None:
        """Lay out the basis buffer's columns: per layer from the start, ``S_l``, then each
        head's ``a_h - a'_h`` (and ``a_h - a_h(clean)`` with frozen edges), then the MLP's
        (likewise): the senders upstream of any receiver are a prefix of the columns."""
        g, f = self.g, 1 if self.frozen is None else 2
        self.col_heads: dict[int, int] = {}
        self.col_mlp: dict[int, int] = {}
        # columns before each sender at or after the start: the prefix a receiver reads
        self.col_before: dict[int, int] = {}
        j = 0
        for layer in range(self.start, g.n_layers):
            h0, u = g.head_start[layer], g.mlp_index[layer]
            assert u is not None  # post-norm families have MLPs
            self.col_before[h0] = j
            self.col_heads[layer], j = j, j + 1 + f * g.n_heads
            self.col_before[u] = j
            self.col_mlp[layer], j = j, j + f
        self.col_before[g.n_senders] = j
        self.n_cols = j

    def _fill(self, u: int) -> None:
        """Write the sender group starting at ``u`` (a layer's heads with its ``S_l``, or an
        MLP), computed in this pass, into the basis buffer ``[K, n*T|P, J, d]`` (scaled by
        its layer's post-norm scale for heads) and, for heads, their Gram matrices ``[K,
        n*T|P, J_l, J_l]`` (:meth:`_gram`: a mixture's squared norm is read off them by a
        quadratic form, in float64). Zero columns where no receiver reads
        the group."""
        if u in self.filled:
            return
        self.filled.add(u)
        removed = self.removed_diff.get(u)
        if removed is None:
            return
        g, k, d = self.g, self.k, self.d
        frozen = self.frozen_diff.get(u)
        groups = [removed] if frozen is None else [removed, frozen]
        layer = next((lv for lv in range(self.start, g.n_layers) if g.head_start[lv] == u), None)
        # the buffer holds the columns the touched receivers read, allocated once and not
        # zeroed (:meth:`_zero_unwritten` clears the columns of groups never written)
        end = (self.col_heads[layer] + 1 + len(groups) * g.n_heads if layer is not None
               else self.col_before[u] + len(groups))
        if self.buf is None or self.buf.shape[2] < end:
            x_size = removed.shape[-2] * removed.shape[-3]
            old = self.buf
            self.buf = removed.new_empty(k, x_size, max(end, self.n_cols_read), d)
            if old is not None:
                self.buf[:, :, : old.shape[2]] = old
        self.written.add(u)
        buf = self.buf
        if layer is None:  # an MLP
            layer = next(lv for lv in range(self.start, g.n_layers) if g.mlp_index[lv] == u)
            for i, value in enumerate(groups):
                buf[:, :, self.col_mlp[layer] + i] = value.reshape(k, -1, d)
            return
        c0, h = self.col_heads[layer], g.n_heads
        cols = buf[:, :, c0: c0 + 1 + len(groups) * h]  # [K, X', J_l, d]
        cols[:, :, 0] = self.sums[layer].reshape(self.sums[layer].shape[0], -1, d)
        for i, value in enumerate(groups):
            cols[:, :, 1 + i * h: 1 + (i + 1) * h] = value.reshape(k, h, -1, d).transpose(1, 2)
        self.grams[layer] = self._gram(cols)
        assert self.rms is not None  # the Gram form runs only for RMS post-norms
        cols.mul_(self.rms[layer][0].to(cols.dtype))

    def _gram(self, cols: Tensor) -> Tensor:
        """The Gram matrices ``[K, X', J_l, J_l]`` (float64) of a layer's basis columns ``cols
        [K, X', J_l, d]``: one float32 matmul for float32 models (each entry then carries
        float32 rounding, which :func:`mixture_norms` bounds and :meth:`_exact_norms` repairs
        where a mixture cancels), float64 for every other dtype."""
        if cols.dtype == torch.float32:
            return (cols @ cols.transpose(-1, -2)).double()
        v64 = cols.double()
        return v64 @ v64.transpose(-1, -2)

    def _exact_norms(self, layer: int, kd: Tensor | None, us: Tensor, sq: Tensor,
                     suspect: Tensor) -> Tensor:
        """``sq [K', X', R']`` with the entries flagged by ``suspect`` recomputed from a float64
        Gram matrix of the layer's unscaled basis (its summed head outputs and head
        differences, kept in the pass), for the masks ``kd`` (``None``: all)."""
        g, d = self.g, self.d
        h0 = g.head_start[layer]
        groups = [self.removed_diff[h0]] + ([self.frozen_diff[h0]] if self.frozen is not None
                                            else [])
        s = self.sums[layer]
        vs = [s.reshape(s.shape[0], 1, -1, d).expand(self.k, 1, -1, d)]
        vs += [v.reshape(self.k, g.n_heads, -1, d) for v in groups if v is not None]
        v64 = torch.cat(vs, 1).double().transpose(1, 2)  # [K, X', J_l, d]
        if kd is not None:
            v64 = v64[kd]
        rows = suspect.any(2).nonzero(as_tuple=True)  # (mask, position) pairs to redo
        part = v64[rows]  # [M, J_l, d]
        gram = part @ part.transpose(-1, -2)
        u = us[rows[0]]  # [M, J_l, R']
        sq = sq.clone()
        sq[rows] = ((gram @ u) * u).sum(1)
        return sq

    def _zero_unwritten(self, n_cols: int) -> None:
        """Zero the basis buffer's columns below ``n_cols`` of sender groups never written
        (their coefficients are 0, and 0 times an uninitialised value may be NaN)."""
        g, buf = self.g, self.buf
        assert buf is not None  # called once a group was filled
        f = 1 if self.frozen is None else 2
        for layer in range(self.start, g.n_layers):
            u = g.mlp_index[layer]
            assert u is not None  # post-norm families have MLPs
            for first, c0, width in ((g.head_start[layer], self.col_heads[layer],
                                      1 + f * g.n_heads), (u, self.col_mlp[layer], f)):
                if c0 < min(n_cols, buf.shape[2]) and first not in self.written:
                    buf[:, :, c0: c0 + width].zero_()
                    self.written.add(first)

    def _dynamic_gram(self, rs: list[int], kk: Tensor, jj: Tensor, n_up: int
                      ) -> tuple[Tensor, Tensor] | None:
        """:meth:`_dynamic` through the RMS post-norm's algebra. With ``y = S_l - C`` the
        receiver's mixture (``C = sum_h w_h (a_h - a'_h)``) and ``inv(y) = 1 / sqrt(mean(y^2)
        + eps)`` per position, ``D_l = scale (S_l inv(S_l) - y inv(y)) = scale S_l (inv(S_l)
        - inv(y)) + inv(y) sum_h w_h scale (a_h - a'_h)``: a combination of the layer's basis
        vectors (:meth:`_fill`) whose coefficients vary by position only through ``inv(y)``,
        and ``|y|^2 = u^T G u`` with ``u = [1, -w]`` and ``G`` the basis' Gram matrix. Every
        receiver's change from every computed sender is then one batched matmul per mask and
        position (coefficients ``[R', J]`` times basis ``[J, d]``, the basis columns of the
        senders upstream of ``rs``): no per-receiver norm, no per-receiver mixture."""
        g, dev, d = self.g, self.removed.device, self.d
        kset = torch.unique(kk)  # sorted
        every = len(kset) == self.k
        kd = kset.to(dev)
        ridx = torch.tensor(rs, device=dev)
        removed = (self.removed if every else self.removed[kd])[:, :, ridx]  # [K', S, R']
        frozen = None if self.frozen is None else (
            self.frozen if every else self.frozen[kd])[:, :, ridx]
        n_cols = self.col_before[n_up]
        coef: Tensor | None = None  # [K', X', R', J]
        assert self.nonzero is not None  # the Gram form runs without gradients
        nz_all, nzf_all = self.nonzero
        nz_r = nz_all[kset.numpy()][:, :, rs]  # [K', S, R']
        nz_f = None if nzf_all is None else nzf_all[kset.numpy()][:, :, rs]

        def coefficients(x_size: int) -> Tensor:
            nonlocal coef
            if coef is None:
                coef = removed.new_zeros(len(kset), x_size, len(rs), n_cols, dtype=self.dtype)
            return coef

        for layer in range(self.start, g.n_layers):
            h0, u = g.head_start[layer], g.mlp_index[layer]
            if h0 >= n_up:
                break
            w = removed[:, h0: h0 + g.n_heads]  # [K', H, R']
            if frozen is not None:
                w = torch.cat([w, frozen[:, h0: h0 + g.n_heads]], 1)
            if nz_r[:, h0: h0 + g.n_heads].any() or (
                    nz_f is not None and nz_f[:, h0: h0 + g.n_heads].any()):
                self._fill(h0)
                if layer in self.grams:
                    gram = self.grams[layer] if every else self.grams[layer][kd]
                    us = torch.cat([torch.ones_like(w[:, :1]), -w], 1).double()  # [K', J, R']
                    sq, suspect = mixture_norms(gram, us)  # [K', X', R']: |y|^2
                    full = self._ablated_sums(
                        layer, removed[:, h0: h0 + g.n_heads],
                        None if frozen is None else frozen[:, h0: h0 + g.n_heads])
                    # mixtures of ablated heads only, with S'_l = 0 (zero ablation): their
                    # norms are not read (below)
                    zero = (full[0].to(sq.device)[:, None] if full is not None and full[2]
                            else None)
                    if zero is not None:
                        suspect &= ~zero
                    if self.dtype == torch.float32 and bool(suspect.any()):  # see _gram
                        sq = self._exact_norms(layer, None if every else kd, us, sq, suspect)
                    assert self.rms is not None  # as above
                    eps = self.rms[layer][1]
                    inv = torch.rsqrt(sq / d + eps)
                    if zero is not None:  # D_l = PostNorm_l(S_l) - PostNorm_l(0)
                        inv.masked_fill_(zero, 0)
                    inv_s = torch.rsqrt(gram[..., :1, 0] / d + eps)  # [K', X', 1]
                    c0 = self.col_heads[layer]
                    out = coefficients(sq.shape[1])
                    out[..., c0] = inv_s - inv
                    out[..., c0 + 1: c0 + w.shape[1] + 1] = (
                        inv.unsqueeze(-1) * w.double().transpose(1, 2)[:, None])
            assert u is not None  # post-norm families have MLPs
            if u >= n_up:
                break
            for i, (weights, nz) in enumerate(((removed, nz_r), (frozen, nz_f))):
                if weights is None or nz is None or not nz[:, u].any():
                    continue
                self._fill(u)
                if self.removed_diff.get(u) is not None:
                    x_size = self.removed_diff[u].shape[-2] * self.n  # type: ignore[union-attr]
                    coefficients(x_size)[..., self.col_mlp[layer] + i] = weights[:, u, None]
        if coef is None or self.buf is None:
            return None
        self._zero_unwritten(n_cols)
        basis = self.buf[:, :, :n_cols]  # columns of groups never filled have coefficient 0
        out = torch.matmul(coef[..., : basis.shape[2]], basis if every else basis[kd])
        return kset, out.transpose(1, 2)  # [K', R', X', d]

    def receiver_inputs(self, rs: list[int], x: Tensor
                        ) -> tuple[Tensor, list[tuple[int, Tensor, slice]]] | None:
        """The inputs of the receivers ``rs`` in the masks that touch them, from the current
        residual stream ``x [K|1, n, T|P, d]`` reaching them: ``(inputs [P', n, T|P, d],
        [(r, ks, rows of inputs)])`` with ``ks`` the masks touching ``r`` (one row serves them
        all where ``x`` has one row, nothing computed in the pass reaches ``r`` and every mask
        weighs its edges alike: the start layer's untested receivers); ``None`` if no mask
        touches any of them."""
        parts = self._parts(rs)
        return None if parts is None else self._assemble(rs, x, *parts)

    def _parts(self, rs: list[int]
               ) -> tuple[Tensor, Tensor, Tensor, list[int], tuple[Tensor, Tensor] | None] | None:
        """The pieces of the receivers ``rs``' own inputs (:meth:`receiver_inputs`): the
        touched (mask, receiver) pairs ``kk, jj`` (grouped by receiver), their static rows and
        the row of each pair (:meth:`_static_of`) and the dynamic change (:meth:`_dynamic`);
        ``None`` if no mask touches any of them."""
        sub = self.touched[:, rs]  # [K, R']
        if not bool(sub.any()):
            return None
        jj, kk = sub.T.nonzero(as_tuple=True)  # pairs grouped by receiver
        rr = torch.tensor(rs)[jj]
        static, order = self._static_of(kk, rr)  # [M, X]
        return kk, jj, static, order, self._dynamic(rs, kk, jj)

    def _assemble(self, rs: list[int], x: Tensor, kk: Tensor, jj: Tensor, static: Tensor,
                  order: list[int], dynamic: tuple[Tensor, Tensor] | None
                  ) -> tuple[Tensor, list[tuple[int, Tensor, slice]]]:
        """:meth:`receiver_inputs` from its pieces (:meth:`_parts`)."""
        dev = x.device
        x_rows = x.reshape(x.shape[0], -1)
        counts = torch.bincount(jj, minlength=len(rs)).tolist()
        pieces = []
        if dynamic is None and x.shape[0] == 1:
            rows: list[int] = []
            p = 0
            for r, count in zip(rs, counts):
                if not count:
                    continue
                own = order[p: p + count]
                ks = kk[p: p + count].to(dev)
                if count == self.k and all(o == own[0] for o in own):
                    own = own[:1]
                pieces.append((r, ks, slice(len(rows), len(rows) + len(own))))
                rows += own
                p += count
            inputs = x_rows - static[torch.tensor(rows, device=dev)]
        elif len(kk) == self.k * len(rs):  # every mask touches every receiver
            k, n_r = self.k, len(rs)
            # [R', K|1, X]: one static row per receiver where every mask weighs it alike
            same = all(len(set(order[j * k: (j + 1) * k])) == 1 for j in range(n_r))
            idx = torch.tensor(order[::k] if same else order, device=dev)
            static = static[idx].view(n_r, 1 if same else k, -1)
            inputs = x_rows[None] - static  # [R', K|1, X]
            if dynamic is not None:
                change = dynamic[1].transpose(0, 1)  # [R', K, X(', d)]
                inputs = torch.sub(inputs.view(n_r, inputs.shape[1], *change.shape[2:]),
                                   change).view(n_r, k, -1)
            inputs = inputs.expand(n_r, k, -1)
            ks = torch.arange(k, device=dev)
            pieces = [(r, ks, slice(j * k, (j + 1) * k)) for j, r in enumerate(rs)]
        else:
            inputs = x_rows[kk.to(dev) if x.shape[0] > 1 else [0] * len(kk)] - static[
                torch.tensor(order, device=dev)]
            if dynamic is not None:
                kset, change = dynamic
                change = change.reshape(*change.shape[:2], -1)
                inputs = inputs - change[torch.searchsorted(kset, kk).to(dev), jj.to(dev)]
            p = 0
            for r, count in zip(rs, counts):
                if count:
                    pieces.append((r, kk[p: p + count].to(dev), slice(p, p + count)))
                    p += count
        return self._ablated_rows(inputs.reshape(-1, *x.shape[1:]), pieces), pieces

    def _ablated_input(self, r: int) -> Tensor:
        """Receiver ``r``'s input in the fully ablated run ``[n, T|P, d]`` (at the pass's
        current positions): :meth:`BlockRunner.ablated_residuals`, whose heads enter through
        each layer's post-norm of their ablated sum."""
        if self.abl is None:
            self.abl = self.runner.ablated_residuals(self.ablated, self.n, self.t)
        return self._rows(ablated_input(self.abl, self.g.receivers[r]))

    def _ablated_sums(self, layer: int, removed: Tensor, frozen: Tensor | None
                      ) -> tuple[Tensor, Tensor, bool] | None:
        """Where a receiver's mixture of layer ``layer`` holds only ablated heads: ``(pairs
        [...] bool, S'_l [n*T|P*d], whether S'_l is 0)``, with ``pairs`` over the leading
        dimensions of the head weights ``removed [..., H, R']`` (every head's weight exactly
        1; none frozen in ``frozen``, same shape) and ``S'_l = sum_h a'_h + b_O`` the ablated
        heads' sum at the pass's current positions; ``None`` where no pair is such (or with
        gradients).

        The mixture ``S_l - sum_h (a_h - a'_h)`` is then ``S'_l`` only up to rounding, and
        where ``S'_l`` is small (zero ablation: 0 without an output bias) that noise is all
        it holds, which the post-norm scales up to unit size (as :func:`~circuitfind.
        patching.masked_pass.fully_removed` for whole inputs): such mixtures read ``S'_l``
        itself (the static and direct forms; the Gram form where ``S'_l = 0``, see
        ``docs/decisions.md``). ``S'_l`` is kept in the runner's memo from pass to pass."""
        if self.grads:
            return None
        pairs = removed.eq(1).all(-2)
        if frozen is not None:
            pairs &= frozen.eq(0).all(-2)
        if not bool(pairs.any()):
            return None
        key = (layer, self.at_pos)
        if key not in self.full_sums:
            memo_key = ("ablated heads' sum",) + key
            value = self.memo.entries.get(memo_key)
            if value is None:
                h0, h = self.g.head_start[layer], self.g.n_heads
                t = self.positions.shape[1] if self.at_pos else self.t
                heads = self._rows(self.ablated[h0: h0 + h]).expand(h, self.n, t, self.d)
                value = Architecture.attn_from_heads(self.lay, layer, heads, 0).reshape(-1)
            self.fresh[memo_key] = value
            self.full_sums[key] = (value, not bool(value.any()))
        value, zero = self.full_sums[key]
        return pairs, value, zero

    def _ablated_rows(self, inputs: Tensor, pieces: list[tuple[int, Tensor, slice]]
                      ) -> Tensor:
        """``inputs [P', n, T|P, d]`` with the rows of masks that remove every edge into
        their receiver (:func:`~circuitfind.patching.masked_pass.fully_removed`) set to the
        fully ablated run's input, in place: the own mixture would read it as a difference of
        equal sums, rounding noise that the receiver's norm scales up to unit size."""
        full = self.full
        if full is None:
            return inputs
        for r, ks, rows in pieces:
            hit = full[:, r][ks.cpu()]
            if rows.stop - rows.start < len(ks):  # one row serves every mask (same weights)
                hit = hit[:1]
            if bool(hit.any()):
                inputs[rows][hit.to(inputs.device)] = self._ablated_input(r)
        return inputs

    # ------------------------------------------------------------------ the pass
    def _projections(self, layer: int, x: Tensor, last: bool
                     ) -> tuple[dict[str, Tensor], dict[tuple[str, int], tuple[Tensor, Tensor]]]:
        """Block ``layer``'s shared q/k/v ``[rows*n, T, h, dh]`` of the residual ``x [rows, n,
        T, d]`` and, for every touched receiver ``(kind, i)``, ``(ks, own [k|1, n, T, dh])``: the
        masks touching it and its projection of its own input in each. In the last block the
        queries' own inputs are built at the metric positions only (``own [k|1, n, P, dh]``; the
        pass is then at the positions, :meth:`_to_positions`): only those queries are read.
        The start layer's shared projections (of the clean residual, every mask alike) are kept
        in the memo from pass to pass."""
        g, lay, t, k = self.g, self.lay, self.t, self.k
        first = {"q": g.q_start[layer], "k": g.k_start[layer], "v": g.v_start[layer]}
        count = {"q": g.n_heads, "k": g.n_kv_heads, "v": g.n_kv_heads}
        own: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        kind_of = {first[kind] + i: (kind, i) for kind in "qkv" for i in range(count[kind])}

        def own_of(rs: list[int], xs: Tensor) -> None:
            later = layer > self.start
            fixed = [r for r in rs if self._recv_key(r) is not None] if later else []
            if fixed:
                self._kept_projections(layer, fixed, kind_of, xs, own)
            self._own_projections(layer, [r for r in rs if r not in fixed], kind_of, xs, own)

        if last:
            own_of([r for r in kind_of if kind_of[r][0] != "q"], x)
            self._to_positions()
            own_of([r for r in kind_of if kind_of[r][0] == "q"], self._rows(x))
        else:
            own_of(list(kind_of), x)
        key = ("clean qkv", layer)
        clean = layer == self.start and not self.grads  # x: the clean residual
        covered = layer > self.start and all(
            len(own.get(kind_of[r], ((),))[0]) == k for r in kind_of)
        if covered:  # every mask's every receiver has its own input: nothing shared to read
            rows, dh = k * x.shape[1], lay.head_weights(layer, "q")[0].shape[-1]
            q = (x.new_zeros if last else x.new_empty)(rows, t, g.n_heads, dh)
            kk = x.new_empty(rows, t, g.n_kv_heads, dh)
            v = x.new_empty(rows, t, g.n_kv_heads, dh)
        elif clean and key in self.memo.entries:
            q, kk, v = self.memo.entries[key].split([g.n_heads, g.n_kv_heads, g.n_kv_heads], 2)
        else:
            q, kk, v = lay.qkv(layer, lay.ln_attn(layer, x.reshape(-1, t, self.d)))
        if clean:  # (read only: the start layer's projections are copied before any write)
            self.fresh[key] = torch.cat([q, kk, v], 2)
        return {"q": q, "k": kk, "v": v}, own

    def _kept_projections(self, layer: int, rs: list[int], kind_of: dict[int, tuple[str, int]],
                          x: Tensor, own: dict[tuple[str, int], tuple[Tensor, Tensor]]) -> None:
        """Add to ``own`` the invariant receivers ``rs`` of block ``layer`` (after the start):
        ``(every mask, projection [1, n, T|P, dh])`` of the input :meth:`_kept_inputs` builds
        once for all masks, or the memo's (keyed by the receiver's content key). In a pass of
        one mask, receivers whose kept form does not pay (:meth:`_kept_pays`) are built in the
        removed form from the residual ``x [1, n, T|P, d]`` (untouched ones read ``x`` itself,
        through the shared projection, and are not kept)."""
        ks = torch.arange(self.k, device=self.cache.resid.device)
        keys = {r: ("pn recv", self._recv_key(r)) for r in rs}
        missing = [r for r in rs if keys[r] not in self.memo.entries]
        removed = [r for r in missing if not self._kept_pays(r)]
        if removed:
            self._own_projections(layer, removed, kind_of, x, own)
            for r in removed:
                if kind_of[r] in own:
                    self.fresh[keys[r]] = own[kind_of[r]][1]
            rs = [r for r in rs if r not in removed]
            missing = [r for r in missing if r not in removed]
        if missing:
            normed = self.lay.ln_attn(layer, self._kept_inputs(missing, layer))[0]
            for j, r in enumerate(missing):
                kind, i = kind_of[r]
                self.memo.entries[keys[r]] = self.lay.project(layer, kind, i, normed[j: j + 1])
        for r in rs:
            self.fresh[keys[r]] = projected = self.memo.entries[keys[r]]
            own[kind_of[r]] = (ks, projected)

    def _folded(self, layer: int) -> tuple[dict[str, tuple[Tensor, Tensor | None]], float] | None:
        """Layer ``layer``'s per-head q/k/v weights ``[heads, d, dh]`` with the input norm's
        scale folded in, and biases, and its ``eps``, where its input norm is an RMSNorm
        computed in the model's dtype (:meth:`Architecture.ln_attn_rms`: float32 models) and
        no gradient is taken; ``None`` otherwise (the inputs are then normalised first). The
        folded weights are kept from pass to pass by :meth:`Architecture.derived` (three
        products of ``[heads, d, dh]`` per layer and pass otherwise), within its cap
        (``DERIVED_BYTES``; beyond it they are made anew per pass), the same tensors bit for
        bit."""
        if self.grads or self.dtype != torch.float32:
            return None
        if layer not in self.folds:
            rms = self.lay.ln_attn_rms(layer)
            if rms is None:
                self.folds[layer] = None
            else:
                scale, eps = rms
                heads = {}
                # kept from pass to pass among the adapter's weight-derived values, within its
                # cap (:meth:`Architecture.derived`), not in the memo: copies of a large model's
                # weights would hold memory that the memory plan does not count; never with
                # autograd on (a kept value would carry its graph)
                sources = None if torch.is_grad_enabled() else self.lay.qkv_sources(layer)
                for kind in "qkv":
                    w, b = self.lay.head_weights(layer, kind)
                    folded = self.lay.derived(
                        ("pn folded", layer, kind), sources,
                        partial(torch.mul, scale.to(w.dtype)[:, None], w))
                    heads[kind] = (folded, b)
                self.folds[layer] = (heads, eps)
        return self.folds[layer]

    def _own_projections(self, layer: int, rs: list[int], kind_of: dict[int, tuple[str, int]],
                         x: Tensor, own: dict[tuple[str, int], tuple[Tensor, Tensor]]) -> None:
        """Add to ``own`` each touched receiver ``(kind, i)`` of ``rs``: ``(ks, its projection
        [k|1, n, T|P, dh] of its own input in the masks ks)`` (the inputs from :meth:`_parts`).

        Where the input norm folds into the projections (:meth:`_folded`), ``W (c x inv(x)) =
        (W diag(c)) x inv(x)``: one reduction and one matmul read each input, and the ``1/rms``
        scales the projection (the norm alone reads and writes the inputs four times). Where
        every mask touches every receiver and the dynamic change comes from the Gram form
        (``[K, X, R', d]``, :meth:`_dynamic_gram`), the inputs ``x - static - change`` are
        written in place into that change (no separate ``[R', K, X, d]`` inputs), and each
        receiver's projection reads its strided rows."""
        lay = self.lay
        parts = self._parts(rs)
        if parts is None:
            return
        kk, jj, static, order, dynamic = parts
        fold = self._folded(layer)
        k, n_r, d = self.k, len(rs), self.d
        if (fold is not None and dynamic is not None and dynamic[1].dim() == 4
                and len(kk) == k * n_r):
            heads, eps = fold
            mix = dynamic[1].transpose(1, 2)  # [K, X, R', d], contiguous: the change
            x_size = mix.shape[1]
            same = all(len(set(order[j * k: (j + 1) * k])) == 1 for j in range(n_r))
            idx = torch.tensor(order[::k] if same else order, device=mix.device)
            st = static[idx].view(n_r, 1 if same else k, x_size, d).permute(1, 2, 0, 3)
            mix.neg_().add_(x.reshape(x.shape[0], x_size, 1, d)).sub_(st)  # the inputs
            if self.full is not None:  # (see _ablated_rows)
                for j, r in enumerate(rs):
                    hit = self.full[:, r]
                    if bool(hit.any()):
                        mix[hit.to(mix.device), :, j] = self._ablated_input(r).reshape(-1, d)
            inv = torch.linalg.vector_norm(mix, 2, -1, keepdim=True).square_().div_(d)
            inv = torch.rsqrt(inv.add_(eps))  # [K, X, R', 1]
            ks = torch.arange(k, device=mix.device)
            for j, r in enumerate(rs):
                kind, i = kind_of[r]
                w, b = heads[kind]
                out = torch.matmul(mix[:, :, j], w[i]).mul_(inv[:, :, j])  # [K, X, dh]
                if b is not None:
                    out = out.add_(b[i])
                own[kind, i] = (ks, out.view(k, self.n, -1, out.shape[-1]))
            return
        inputs, pieces = self._assemble(rs, x, *parts)
        if fold is None:
            normed = lay.ln_attn(layer, inputs)  # one norm for every touched receiver
            for r, ks, rows in pieces:
                kind, i = kind_of[r]
                own[kind, i] = (ks, lay.project(layer, kind, i, normed[rows]))
            return
        heads, eps = fold
        inv = torch.linalg.vector_norm(inputs, 2, -1, keepdim=True).square_().div_(d)
        inv = torch.rsqrt(inv.add_(eps))
        for r, ks, rows in pieces:
            kind, i = kind_of[r]
            w, b = heads[kind]
            out = torch.matmul(inputs[rows], w[i]).mul_(inv[rows])
            own[kind, i] = (ks, out if b is None else out.add_(b[i]))

    def _put(self, value: Tensor, rows: Tensor, projected: Tensor, query: bool,
             head: int | None = None) -> None:
        """Write ``projected [m|1, n, T|P, dh]`` into the rows ``rows`` of ``value [M, n, T,
        dh]`` (``[M, n, T, h, dh]`` at head ``head``; written in place): at the metric positions
        for a query's own projection in the last block (:meth:`_projections`)."""
        at: tuple[int, ...] = () if head is None else (head,)
        if not (query and self.at_pos):
            value[(rows, slice(None), slice(None)) + at] = projected
            return
        pos = self.positions
        n_idx = torch.arange(self.n, device=pos.device)
        value[(rows.view(-1, 1, 1), n_idx[None, :, None], pos[None]) + at] = projected

    def _start_heads(self, layer: int, shared: dict[str, Tensor],
                     own: dict[tuple[str, int], tuple[Tensor, Tensor]], last: bool
                     ) -> Tensor | None:
        """Head outputs ``[K, H, n, T|P, d]`` of the start layer, where every mask reads the
        clean residual: a head's attention is recomputed only for the masks touching its q, k
        or v receiver, once for all of them where its inputs are the same in each (ACDC's
        candidates differ in one receiver); every other mask keeps the cached clean output.
        ``None`` when that would compute more than half of the (mask, head) rows (the batched
        per-mask attention is then cheaper)."""
        g, lay, k, n, t, d = self.g, self.lay, self.k, self.n, self.t, self.d
        rep = g.n_heads // g.n_kv_heads
        plans: list[tuple[Tensor, bool, dict[str, tuple[Tensor, Tensor] | None]] | None] = []
        rows = 0
        for head in range(g.n_heads):
            found = {kind: own.get((kind, head if kind == "q" else head // rep))
                     for kind in "qkv"}
            sets = [f[0] for f in found.values() if f is not None]
            if not sets:
                plans.append(None)
                continue
            masks = torch.unique(torch.cat(sets))  # sorted
            once = all(f is None or (f[1].shape[0] == 1 and len(f[0]) == len(masks))
                       for f in found.values())
            plans.append((masks, once, found))
            rows += 1 if once else len(masks)
        if self.grads or 2 * rows > k * g.n_heads:
            return None
        h0 = g.head_start[layer]
        clean = self.cache.senders[h0: h0 + g.n_heads]  # [H, n, T, d]
        if last:
            pos = self.positions
            clean = clean.gather(2, pos[None, :, :, None].expand(g.n_heads, n, pos.shape[1], d))
        heads = clean.unsqueeze(1).repeat(1, k, 1, 1, 1)  # [H, K, n, T|P, d]
        for head, plan in enumerate(plans):
            if plan is None:
                continue
            masks, once, found = plan
            m = 1 if once else len(masks)
            key = self._head_key(layer, head, last) if once and len(masks) == k else None
            if key is not None and key in self.memo.entries:
                heads[head, masks] = self.fresh[key] = self.memo.entries[key]
                continue
            parts = []
            for kind in "qkv":
                i = head if kind == "q" else head // rep
                value = shared[kind][:, :, i].unsqueeze(0).repeat(m, 1, 1, 1)  # [m, n, T, dh]
                got = found[kind]
                if got is not None:
                    ks, projected = got
                    rows_of = (torch.searchsorted(masks, ks) if m > 1
                               else torch.zeros(1, dtype=torch.long, device=value.device))
                    self._put(value, rows_of, projected, kind == "q")
                parts.append(value.reshape(m * n, t, 1, -1))
            z = lay.attend(layer, parts[0], parts[1], parts[2], grouped=False,
                           query_pos=self.positions.repeat(m, 1) if last else None)
            idx = torch.zeros(1, dtype=torch.long, device=z.device)
            res = lay.head_results(layer, z, idx, heads=idx + head)  # [m*n, T|P, 1, d]
            heads[head, masks] = res.view(m, n, -1, d)
            if key is not None:
                self.fresh[key] = res.view(m, n, -1, d)
        return heads.transpose(0, 1)

    def _head_key(self, layer: int, head: int, last: bool) -> Any:
        """The memo key of a start-layer head whose q, k and v inputs are the same in every
        mask (ACDC's receivers of the start layer tested before the current candidate): the
        removal weights of its three receivers (all their senders come before the start layer,
        so they fix its inputs and its output); ``None`` with frozen edges."""
        if self.frozen is not None:
            return None
        g = self.g
        rep = g.n_heads // g.n_kv_heads
        cols = self.removed[0, :, [g.q_start[layer] + head, g.k_start[layer] + head // rep,
                                   g.v_start[layer] + head // rep]]
        return ("start head", layer, head, last, cols.cpu().double().numpy().tobytes())

    def _heads(self, layer: int, x: Tensor, last: bool) -> Tensor:
        """Block ``layer``'s head outputs ``[K, H, n, T|P, d]`` (the metric positions in the
        last block) from the residual stream ``x [K|1, n, T, d]`` (one row: the start layer,
        where every mask reads the clean residual)."""
        g, lay, k, n, t, d = self.g, self.lay, self.k, self.n, self.t, self.d
        shared, own = self._projections(layer, x, last)
        if layer == self.start:  # (not merely one row: a single mask's later layers have one)
            heads = self._start_heads(layer, shared, own, last)
            if heads is not None:
                return heads
            # copies (also for one mask: the start layer's projections may be the memo's)
            shared = {kind: value.repeat(k, *(1,) * (value.dim() - 1))
                      for kind, value in shared.items()}
        else:
            once = self._invariant_heads(layer, shared, own, last)
            if once is not None:
                return once
        for kind, value in shared.items():
            stacked = self._stacked(kind, value.shape[2], own, k)
            if stacked is not None:
                shared[kind] = stacked.view(value.shape)
                continue
            for (kind_r, i), (ks, projected) in own.items():
                if kind_r == kind:
                    self._put(value.view(k, n, t, *value.shape[2:]), ks, projected,
                              kind == "q", i)
        query_pos = self.positions.repeat(k, 1) if last else None
        z = lay.attend(layer, shared["q"], shared["k"], shared["v"], query_pos=query_pos)
        return self._all_heads(layer, z).view(k, n, -1, g.n_heads, d).permute(0, 3, 1, 2, 4)

    def _stacked(self, kind: str, count: int,
                 own: dict[tuple[str, int], tuple[Tensor, Tensor]], rows: int) -> Tensor | None:
        """The ``kind`` projections ``[rows, n, T, count, dh]`` of a layer where each of its
        ``count`` receivers has its own in every mask (``own``, one row or ``rows``) at every
        position: stacked in one copy instead of written receiver by receiver into a copy of the
        shared projection (:meth:`_put`); ``None`` otherwise (and for the last block's queries,
        which are at the metric positions only)."""
        if kind == "q" and self.at_pos:
            return None
        found = [own.get((kind, i)) for i in range(count)]
        values = []
        for got in found:
            if got is None or len(got[0]) != self.k:
                return None
            values.append(got[1].expand(rows, *got[1].shape[1:]))
        return torch.stack(values, -2)

    def _all_heads(self, layer: int, z: Tensor) -> Tensor:
        """Every head's output ``z_h W_O[h]`` ``[B, T|P, H, d]`` of ``z [B, T|P, H, dh]``:
        :meth:`Architecture.head_results` of every head, whose ``W_O`` ``[H, dh, d]`` (and
        ``z``) it copies per call to index them; here ``W_O``'s contiguous copy is kept from
        pass to pass by :meth:`Architecture.derived`, within its cap (with autograd off;
        adapters that override ``head_results`` keep theirs, and so does a wrapper such as a
        placement over devices). The same product on the same operands: equal to it bit for
        bit."""
        lay, h = self.lay, self.g.n_heads
        if (self.grads or torch.is_grad_enabled() or not isinstance(lay, Architecture)
                or type(lay).head_results is not Architecture.head_results):
            return lay.head_results(layer, z, torch.arange(h, device=z.device))
        w_o, _ = lay.w_out(layer)  # [H*dh, d]
        w = lay.derived(("pn w_out", layer), (w_o,),
                        lambda: w_o.reshape(h, -1, w_o.shape[-1]).contiguous())
        return torch.einsum("bthe,hed->bthd", z.contiguous(), w)

    def _invariant_heads(self, layer: int, shared: dict[str, Tensor],
                         own: dict[tuple[str, int], tuple[Tensor, Tensor]], last: bool
                         ) -> Tensor | None:
        """Block ``layer``'s head outputs ``[K, H, n, T|P, d]`` (one row, expanded) where
        every q/k/v receiver of the layer is invariant (:meth:`_recv_key`): attention runs
        once, or the memo's outputs are taken; ``None`` otherwise."""
        g, lay, k, n = self.g, self.lay, self.k, self.n
        keys = []
        for kind, first, count in (("q", g.q_start, g.n_heads), ("k", g.k_start, g.n_kv_heads),
                                   ("v", g.v_start, g.n_kv_heads)):
            keys += [self._recv_key(first[layer] + i) for i in range(count)]
        if any(key is None for key in keys):
            return None
        key = ("pn heads", layer, tuple(keys))
        res = self.memo.entries.get(key)
        if res is None:
            one = torch.zeros(1, dtype=torch.long, device=self.positions.device)
            parts = {}
            for kind, value in shared.items():
                stacked = self._stacked(kind, value.shape[2], own, 1)
                if stacked is not None:
                    parts[kind] = stacked.view(n, *value.shape[1:])
                    continue
                value = value[: n].clone()  # one mask's rows, every entry written below
                for (kind_r, i), (_, projected) in own.items():
                    if kind_r == kind:
                        self._put(value.view(1, n, *value.shape[1:]), one, projected,
                                  kind == "q", i)
                parts[kind] = value
            z = lay.attend(layer, parts["q"], parts["k"], parts["v"],
                           query_pos=self.positions if last else None)
            res = self._all_heads(layer, z).view(1, n, -1, g.n_heads, self.d).permute(
                0, 3, 1, 2, 4)
        self.fresh[key] = res
        return res.expand(k, -1, -1, -1, -1)

    def _computed(self, u: int, values: Tensor) -> None:
        """Keep the differences of the senders ``u, u+1, ...`` whose values in this pass are
        ``values [K, U, n, T|P, d]`` (at the metric positions in the last block)."""
        sl = slice(u, u + values.shape[1])
        if not self.kept_ok and not bool(self.read[sl].any()):  # no receiver reads these senders' differences
            self.removed_diff[u] = self.frozen_diff[u] = None
            return
        self.removed_diff[u] = values - self._rows(self.ablated[sl])
        if self.frozen is not None:
            self.frozen_diff[u] = values - self._rows(self.cache.senders[sl])

    def _to_positions(self) -> None:
        """From here on (the last block's MLP and the logits) keep the metric positions only:
        the values computed so far are cut to them (once: later calls do nothing)."""
        if self.at_pos:
            return
        self.at_pos = True
        if self.buf is not None:  # the basis buffer and Gram matrices, position-major
            self.buf = self._positions_of(self.buf)
            self.grams = {layer: self._positions_of(gram) for layer, gram in self.grams.items()}
        for diffs in (self.removed_diff, self.frozen_diff):
            for key, value in diffs.items():
                diffs[key] = None if value is None else self._rows(value)
        for store in (self.sums, self.normed):
            for key, tensor in store.items():
                store[key] = self._rows(tensor)

    def _positions_of(self, value: Tensor) -> Tensor:
        """``value [K, n*T, ...]`` (position-major) at the metric positions, ``[K, n*P,
        ...]``."""
        rest = value.shape[2:]
        value = value.view(value.shape[0], self.n, self.t, -1)
        pos = self.positions[None, :, :, None].expand(value.shape[0], -1, -1, value.shape[-1])
        return value.gather(2, pos).view(value.shape[0], -1, *rest)

    def logits(self) -> Tensor:
        """``[K, N, P, V]`` logits at the metric positions."""
        g, lay, k = self.g, self.lay, self.k
        x = self.cache.resid[self.start].unsqueeze(0)  # [1, n, T, d]: the same in every mask
        for layer in range(self.start, g.n_layers):
            last = layer == g.n_layers - 1
            heads = self._heads(layer, x, last)  # [K, H, n, T|P, d]
            if last:
                self._to_positions()
                x = self._rows(x)
            self._computed(g.head_start[layer], heads)
            self._sender_keys(layer)
            s = Architecture.attn_from_heads(lay, layer, heads, 1)  # pre-norm [K, n, T|P, d]
            self.sums[layer], self.normed[layer] = s, lay.post_norm(layer, s)
            x_in, x = x, x + self.normed[layer]
            xm = (x_in if lay.parallel else x).expand(k, -1, -1, -1)
            r_mlp, u_mlp = g.mlp_receiver[layer], g.mlp_index[layer]
            assert r_mlp is not None and u_mlp is not None  # post-norm families have MLPs
            key = self._recv_key(r_mlp)
            if key is not None:  # the same MLP output in every mask: computed once
                found = self.memo.entries.get(("pn mlp", key))
                if found is None and not self._kept_pays(r_mlp):  # one mask: removed form
                    found = lay.mlp(layer, lay.ln_mlp(layer, self._patched(r_mlp, xm)))
                elif found is None:
                    xm = self._kept_inputs([r_mlp], layer if lay.parallel else -1 - layer)
                    found = lay.mlp(layer, lay.ln_mlp(layer, xm[:, 0]))
                self.fresh["pn mlp", key] = found
                m = found.expand(k, -1, -1, -1)
                self.skeys[u_mlp] = self._intern(("m", key))
            else:
                xm = self._patched(r_mlp, xm)
                m = lay.mlp(layer, lay.ln_mlp(layer, xm))
            self._computed(u_mlp, m.unsqueeze(1))
            x = x + m
        if not self.at_pos:  # no block ran (only the logits' edges are touched)
            self._to_positions()
            x = self._rows(x)
        r = g.n_receivers - 1
        key = self._recv_key(r)
        if self._kept_pays(r) if key is not None else self._sparse(r):  # (same in every mask)
            x = self._kept_inputs([r], g.n_layers, key is None)[:, 0]
        else:
            x = self._patched(g.n_receivers - 1, x.expand(k, -1, -1, -1))
        if not self.grads:
            # the next pass reuses this pass's static parts and invariant nodes
            self.memo.keep(self.fresh, self.ids, None,
                           memo_cap(g, self.start, self.cache.resid[0]))
        return lay.final(x).expand(k, -1, -1, -1)

    def _patched(self, r: int, x: Tensor) -> Tensor:
        """``x [K, n, T|P, d]`` with receiver ``r``'s own input in the masks touching it."""
        found = self.receiver_inputs([r], x)
        if found is None:
            return x
        inputs, [(_, ks, rows)] = found
        x = x.clone()
        x[ks] = inputs[rows]
        return x
