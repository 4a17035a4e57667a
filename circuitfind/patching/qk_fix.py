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
of the same backward pass (with GradDrop, of the pass with a layer dropped). Gemma-2's head
senders enter as their differences pushed through the post-norm's Jacobian (the pass's own
linearisation of that norm); every other step before the scores is exact.

Cost. Per layer, for the ``U`` senders upstream of it: the norm and q/k projections of ``U``
patched residual streams (``U N T d`` values) and ``2 U`` patterns of ``N H T^2`` scores, in
chunks of senders; no extra backward pass. The values are computed without autograd.

References:
    Kramar, Lieberum, Shah & Nanda (2024), "AtP*: An efficient and scalable method for
    localizing LLM behaviour to components", arXiv:2403.00745, §3.1.1 (QK fix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from circuitfind.patching.runner import BlockRunner

CHUNK_SCORES = 1 << 24  # pattern entries per chunk of senders (memory: ~64 MiB in float32)


class QKFix:
    """Collects what the QK fix needs during an attribution pass and rescores q/k edges.

    Calling order (inside :func:`circuitfind.patching.attribution.attribute`): the forward pass
    calls :meth:`block_input` with each block's input and the adapter calls :meth:`tap` with
    each layer's rotated q, k and pattern; after the backward pass :meth:`rescore` replaces the
    scores of the q and k edges.

    Args:
        runner: The block runner of the pass.
    """

    def __init__(self, runner: BlockRunner) -> None:
        self.runner = runner
        self.inputs: dict[int, Tensor] = {}
        self.qk: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.grads: dict[int, Tensor] = {}

    def block_input(self, layer: int, x: Tensor) -> None:
        """Record ``layer``'s input residual ``x [N, T, d]`` (clean run)."""
        self.inputs[layer] = x.detach()

    def tap(self, layer: int, q: Tensor, k: Tensor, pattern: Tensor) -> None:
        """Record ``layer``'s rotated ``q [N,H,T,dh]``, ``k [N,G,T,dh]`` and pattern
        ``[N,H,T,T]``, and catch the pattern's gradient in the backward pass."""
        self.qk[layer] = (q.detach(), k.detach(), pattern.detach())
        if pattern.requires_grad:
            def keep(grad: Tensor, layer: int = layer) -> None:
                self.grads[layer] = grad
            pattern.register_hook(keep)

    @torch.no_grad()
    def rescore(self, scores: Tensor, delta: Tensor) -> None:
        """Overwrite the scores of every q and k edge with the QK-fixed estimate.

        Args:
            scores: ``[S, R]`` float64 scores of the pass, updated in place.
            delta: ``[S, N, T, d]`` the pass's sender differences ``a' - a`` (Gemma-2's heads
                already pushed through the post-norm's Jacobian).
        """
        g, lay = self.runner.graph, self.runner.arch
        with lay.backward_rules(None):  # plain values, no tap, while recomputing
            for layer, x in self.inputs.items():
                q0, k0, a0 = self.qk[layer]
                grad = self.grads.get(layer)
                u_up = g.head_start[layer]
                heads, groups = q0.shape[1], k0.shape[1]
                rep = heads // groups
                q_cols = slice(g.q_start[layer], g.q_start[layer] + heads)
                k_cols = slice(g.k_start[layer], g.k_start[layer] + groups)
                # query rows some gradient reaches (all but the metric positions in the last
                # layer carry none): the only rows whose pattern change counts
                rows = (None if grad is None
                        else grad.ne(0).any(3).any(1).any(0).nonzero()[:, 0])  # [P]
                if grad is None or rows is None or len(rows) == 0:  # no gradient reached the
                    # pattern (GradDrop)
                    scores[:u_up, q_cols] = 0
                    scores[:u_up, k_cols] = 0
                    continue
                n, t, d = x.shape
                p, dh = len(rows), q0.shape[-1]
                # each key/value head's query heads stacked along the query axis (no copies of
                # keys per query head): rows of query head g*rep + r at [g, r*P:(r+1)*P]
                pos = rows.repeat(rep)[None].expand(n, -1)  # [N, rep*P]
                grad = grad[:, :, rows]  # [N, H, P, T]
                q_act = q0[:, :, rows].reshape(n, groups, rep * p, dh)
                base = torch.einsum("nhpj,nhpj->h", a0[:, :, rows].to(grad.dtype), grad)
                step = max(1, CHUNK_SCORES // (n * heads * p * t))
                for u0 in range(0, u_up, step):
                    u1 = min(u_up, u0 + step)
                    c = u1 - u0
                    xs = (x[None] + delta[u0:u1].to(x.dtype)).reshape(c * n, t, d)
                    qs, ks = lay.qk(layer, lay.ln_attn(layer, xs))
                    qs, ks = lay.qk_norm(layer, qs, ks)
                    qs, ks = lay.rotate(qs.transpose(1, 2), ks.transpose(1, 2))
                    qs = qs[:, :, rows].reshape(c, n, groups, rep * p, dh)
                    # patched queries with clean keys; clean queries with patched keys (the
                    # clean side broadcast over the c senders, not copied)
                    a_q = lay.attention_pattern(layer, qs, k0[None], pos)
                    a_k = lay.attention_pattern(layer, q_act[None],
                                                ks.reshape(c, n, groups, t, dh), pos)
                    for a_new, cols, per in ((a_q, q_cols, 1), (a_k, k_cols, rep)):
                        a_new = a_new.view(c, n, heads, p, t).to(grad.dtype)
                        val = a_new.mul_(grad).sum((-1, -2)).sum(1) - base
                        val = val.view(c, -1, per).sum(-1) if per > 1 else val
                        scores[u0:u1, cols] = val.to(scores.dtype)
