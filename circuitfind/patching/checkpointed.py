"""Gradient edge attribution for long prompts: per-layer recomputation, attention in chunks of
query positions, and sender buffers that may live in host memory.

Why. :func:`circuitfind.patching.attribution.eap_pass` keeps what autograd saves for every
layer of the gradient run, including the attention scores and pattern (``O(H T^2)`` values
per layer and example), so one 2,048-token example of a 0.5B model needs tens of GB. This
module computes the same scores (EAP, EAP-IG and other gradient points) with what one layer
needs at a time.

Method. Eq. (2) of :mod:`circuitfind.patching.engine`, ``score[u, r] = sum_{n,t} delta_u .
d metric / d x_r``, with the backward pass run one layer at a time (gradient checkpointing,
Chen et al. 2016):

1. no-grad forwards fill one sender buffer ``[S, N, T, d]`` (the :class:`SenderStore`):
   the corrupted run's sender outputs, then the clean run subtracts its own in place
   (EAP: ``a' - a``; gradient points: ``a - a'``; no second sender-sized buffer), and the
   run the gradient is taken in keeps each block's input ``x_l`` (``[L, C N, T, d]``);
2. the metric's gradient with respect to the final residual is the logits receiver's;
3. for ``l = L-1 .. 0`` block ``l`` is run again from ``x_l`` with gradients and
   back-propagated from the gradient of its output: each receiver's gradient arrives in that
   backward pass (the q/k/v heads' from their projections' gradients, as in
   :class:`~circuitfind.patching.attribution._ReceiverGradients`; the MLP's at its input) and
   is contracted with the sender differences at once (:func:`contract_scores`); the gradient
   of the block's input goes on to block ``l - 1``.

Attention is computed in chunks of ``chunk`` query positions (each chunk attends to the keys
up to its last query), in the forward passes and in the backward pass, where each chunk's
pattern is recomputed (:class:`_ChunkedAttention`): at most ``chunk x T`` scores per head
exist at a time. Every other part of a block is position-wise and kept for one block only.
The scores sum over positions, so the contraction reads the sender buffer in chunks of
positions too: with the buffer in (pinned) host memory (``store`` on the CPU, the model on
a GPU) only one chunk of it is on the device at a time.

Cost. A corrupted forward, a clean forward (with gradient points also the stacked runs'
forward), then per block one recomputed forward and its backward, in which attention runs a
third time: about one plain forward more than :func:`~circuitfind.patching.attribution.eap_pass`
plus a third attention. The results equal ``eap_pass``'s up to floating-point rounding
(``tests/integration/test_checkpointed.py``), on every family (GPT-2, GPT-NeoX's parallel
blocks, grouped-query Llama, Gemma-2's post-norms and soft-capping).

Deviations. The last block runs at every position (``eap_pass`` runs it at the metric
positions only; the difference is one block's work, ``1 / L``). Modified backward rules
(GIM, RelP, AtP*) are not supported here.

References:
    Syed, Rager & Conmy (2023), "Attribution Patching Outperforms Automated Circuit
    Discovery", eq. 2; Hanna, Pezzelle & Belinkov (2024), "Have Faith in Faithfulness"
    (EAP-IG); Chen, Xu, Zhang & Guestrin (2016), "Training Deep Nets with Sublinear Memory
    Cost" (recomputation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError, HookError
from circuitfind.patching.architectures import Architecture
from circuitfind.patching.attribution import _ReceiverGradients, matmul_nt
from circuitfind.patching.placement import move

if TYPE_CHECKING:
    from circuitfind.patching.runner import BlockRunner

#: Bytes of sender differences moved to the device per step of a contraction from host memory.
STREAM_BYTES = 1 << 27


def attend_chunked(lay: Architecture, layer: int, q: Tensor, k: Tensor, v: Tensor,
                   chunk: int) -> Tensor:
    """Causal attention of ``lay`` in chunks of ``chunk`` query positions (no gradient kept).

    Each chunk ``[s, e)`` attends to keys ``[0, e)`` through the adapter's own
    :meth:`~Architecture.attend` with ``query_pos`` (so rotary positions, soft-capping,
    sliding windows and q/k norms are the family's): equal to ``lay.attend(layer, q, k, v)``
    up to float rounding, with at most ``chunk x T`` scores per head at a time.

    Args:
        q: ``[B, T, H, dh]`` queries; k, v: ``[B, T, G, dh]``.
        chunk: Query positions per chunk (``>= T``: one call, unchunked).

    Returns:
        ``z [B, T, H, dh]``.
    """
    t = q.shape[1]
    if chunk >= t:
        return lay.attend(layer, q, k, v)
    parts = [_attend_span(lay, layer, q, k, v, s, min(t, s + chunk)) for s in range(0, t, chunk)]
    return torch.cat(parts, 1)


def _attend_span(lay: Architecture, layer: int, q: Tensor, k: Tensor, v: Tensor, s: int,
                 e: int) -> Tensor:
    """Attention of the queries ``[s, e)`` over the keys ``[0, e)``: ``z [B, e - s, H, dh]``."""
    pos = torch.arange(s, e, device=q.device).expand(q.shape[0], -1)
    return lay.attend(layer, q[:, :e], k[:, :e], v[:, :e], query_pos=pos)


class _ChunkedAttention(torch.autograd.Function):
    """:func:`attend_chunked` whose backward recomputes each chunk's pattern (nothing of the
    attention is saved but ``q``, ``k`` and ``v``)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, layer: int, lay: Architecture,
                chunk: int) -> Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.layer, ctx.lay, ctx.chunk = layer, lay, chunk
        return attend_chunked(lay, layer, q, k, v, chunk)

    @staticmethod
    def backward(ctx: Any, dz: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v = ctx.saved_tensors
        t = q.shape[1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for s in range(0, t, ctx.chunk):
            e = min(t, s + ctx.chunk)
            with torch.enable_grad():
                qq, kk, vv = (a[:, :e].detach().requires_grad_(True) for a in (q, k, v))
                z = (_attend_span(ctx.lay, ctx.layer, qq, kk, vv, s, e) if ctx.chunk < t
                     else ctx.lay.attend(ctx.layer, qq, kk, vv))
                gq, gk, gv = torch.autograd.grad(z, (qq, kk, vv), dz[:, s:e])
            dq[:, s:e] += gq[:, s:e]  # earlier queries are not read by this chunk
            dk[:, :e] += gk
            dv[:, :e] += gv
        return dq, dk, dv, None, None, None


class SenderStore:
    """The sender buffer ``[S, N, T, d]`` of one chunk of examples, on the device the runner
    computes on or in host memory (offloaded).

    Writes and reads go through ``mover`` (default :func:`~circuitfind.patching.placement.move`),
    so the offloaded path runs on a CPU with a second CPU device name (``cpu:1``), as the
    placement tests do; on CUDA an offloaded buffer is pinned (page-locked: the copies to
    and from the GPU run at full bus speed).

    Args:
        shape: ``(S, N, T, d)``.
        dtype: The buffer's dtype (the model's).
        device: Where it lives.
        home: Where the runner computes.
        mover: How a tensor moves to a device.
    """

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device, home: torch.device,
                 mover: Callable[[Any, torch.device], Any] = move) -> None:
        pin = device.type == "cpu" and home.type == "cuda"
        self.data = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
        self.device, self.home, self.mover = device, home, mover

    @property
    def offloaded(self) -> bool:
        """Whether the buffer lives elsewhere than where the runner computes (device names
        compared as given: ``cpu:1`` is not ``cpu``)."""
        return self.device != self.home

    def get(self, index: int | slice) -> Tensor:
        """Senders ``index`` on the home device (a view when not offloaded)."""
        return self.mover(self.data[index], self.home) if self.offloaded else self.data[index]

    def put(self, index: int | slice, value: Tensor) -> None:
        """Write ``value`` (home device) into senders ``index``."""
        self.data[index].copy_(self.mover(value, self.device) if self.offloaded else value)

    def rows(self, n_up: int, r0: int, r1: int) -> Tensor:
        """Senders ``[:n_up]`` at the rows ``[r0, r1)`` of their ``N T`` (example, position)
        rows, on the home device: ``[n_up, r1 - r0, d]``."""
        s, n, t, d = self.data.shape
        part = self.data.view(s, n * t, d)[:n_up, r0:r1]
        return self.mover(part, self.home) if self.offloaded else part


def contract_streamed(scores: Tensor, store: SenderStore, n_up: int, r0: int, grad: Tensor,
                      sign: float) -> None:
    """Eq. (2) for the receivers ``r0 .. r0 + R'``: ``scores[:n_up, r0:r0+R'] += sign *
    delta . grad``, reading the senders' differences from ``store`` in chunks of rows
    (example x position) when it is offloaded (at most :data:`STREAM_BYTES` on the device at
    a time), in one matmul otherwise.

    Args:
        scores: ``[S, R]`` float64 scores, updated in place.
        store: The sender differences ``[S, N, T, d]``.
        grad: ``[R', N*T, d]`` the receivers' gradients.
        sign: ``+1`` where the store holds ``a' - a``, ``-1`` for ``a - a'``.
    """
    h, rows, d = grad.shape
    step = rows if not store.offloaded else max(
        1, STREAM_BYTES // max(1, n_up * d * store.data.element_size()))
    for x0 in range(0, rows, step):
        x1 = min(rows, x0 + step)
        part = matmul_nt(store.rows(n_up, x0, x1).reshape(n_up, -1),
                         grad[:, x0:x1].reshape(h, -1))
        scores[:n_up, r0: r0 + h] += sign * part.to(scores.dtype)


def checkpointed_pass(runner: BlockRunner, tokens: Tensor, positions: Tensor, metric: Any,
                      store: SenderStore, chunk: int,
                      points: list[tuple[str, float | Tensor]] | None = None) -> Tensor:
    """EAP (or, with ``points``, EAP-IG / clean-corrupted) scores with one block's
    activations alive at a time and attention in chunks of ``chunk`` query positions.

    See the module docstring for the method. For EAP ``store`` holds the ablated sender
    outputs ``a'`` on entry (:func:`fill_senders`) and ``a' - a`` on exit (the clean run
    subtracts its own in place); with ``points`` it holds ``a - a'``
    (:func:`subtract_senders`) and is left as it is (several passes over chunks of points
    read it).

    Args:
        runner: The block runner (its adapter and graph).
        tokens: ``[N, T]`` clean token ids.
        positions: ``[N, P]`` metric positions.
        metric: ``logits [C*N, P, V] -> scalar`` to differentiate (``C = len(points)``, 1
            without points).
        store: ``[S, N, T, d]`` ablated sender outputs ``a'`` (EAP; overwritten), or
            ``a - a'`` (with ``points``).
        chunk: Query positions per attention chunk (``>= T``: unchunked).
        points: ``(node group, alpha)`` of each stacked run, as in
            :func:`~circuitfind.patching.attribution.eap_pass`, or ``None`` (EAP).

    Returns:
        ``[S, R]`` float64 scores (0 off real edges), in the metric's unit.

    Raises:
        ConfigError: ``chunk < 1``.
        HookError: a receiver's gradient did not arrive.
    """
    if chunk < 1:
        raise ConfigError(f"The position chunk must be an int >= 1; got {chunk}.")
    return _Checkpointed(runner, tokens, positions, store, chunk, points).scores(metric)


def fill_senders(runner: BlockRunner, tokens: Tensor, store: SenderStore, chunk: int) -> None:
    """Write the sender outputs of the plain run on ``tokens [N, T]`` into ``store``
    (``[S, N, T, d]``), with attention in chunks of ``chunk`` query positions (no gradient)."""
    _Checkpointed(runner, tokens, None, store, chunk, None).forward_senders("set")


def subtract_senders(runner: BlockRunner, tokens: Tensor, store: SenderStore,
                     chunk: int) -> None:
    """Turn ``store``'s ablated sender outputs ``a'`` into ``a - a'`` in place, with ``a``
    the plain run on ``tokens [N, T]`` (attention in chunks of ``chunk`` query positions, no
    gradient): the differences gradient points interpolate along."""
    _Checkpointed(runner, tokens, None, store, chunk, None).forward_senders("from")


class _Checkpointed:
    """One checkpointed attribution pass (see :func:`checkpointed_pass`)."""

    def __init__(self, runner: BlockRunner, tokens: Tensor, positions: Tensor | None,
                 store: SenderStore, chunk: int,
                 points: list[tuple[str, float | Tensor]] | None) -> None:
        self.g, self.lay = runner.graph, runner.arch
        self.tokens, self.positions, self.store, self.chunk = tokens, positions, store, chunk
        self.n, self.t = tokens.shape
        self.points = points
        self.copies = 1 if points is None else len(points)
        self.moved: dict[str, dict[int, float | Tensor]] = {}
        for c, (node, alpha) in enumerate(points or []):
            self.moved.setdefault(node, {})[c] = (alpha if isinstance(alpha, Tensor)
                                                  else float(alpha))
        self.blocked = {node for node, cs in self.moved.items() if len(cs) == self.copies}
        self.sign = 1.0 if points is None else -1.0  # store: a' - a (EAP), a - a' (points)
        self.post = bool(self.lay.attn_post_norm)
        # post-norm families with gradient points: per layer J_l(S_l^c) (a - a')_heads
        # [H, C*N*T, d], the heads' differences through each copy's norm Jacobian
        self.pushed: dict[int, Tensor] = {}
        self.fired: set[str] = set()

    # ------------------------------------------------------------------ forwards
    def forward_senders(self, how: str, keep: list[Tensor] | None = None) -> None:
        """The plain run on the tokens: each sender's output combined into the store
        (``how``: "set" ``s = a``; "into" ``s = s - a``, making ``a' - a``; "from"
        ``s = a - s``, making ``a - a'``), with post-norm families' head rows of ``a' - a``
        through the norm's Jacobian (EAP). ``keep`` collects each block's input."""
        g, lay, st = self.g, self.lay, self.store
        jvp = self.post and how == "into"

        def combine(index: int | slice, value: Tensor,
                    at: tuple[int, Tensor] | None = None) -> None:
            """``value`` into the store at ``index``; ``at``: (layer, the heads' pre-norm
            sum) for the post-norm Jacobian."""
            if how == "set":
                st.put(index, value)
                return
            old = st.get(index)
            new = old - value if how == "into" else value - old
            if at is not None and jvp:
                layer, s_l = at
                new = lay.post_norm_jvp(layer, s_l.reshape(-1, s_l.shape[-1]),
                                        new.reshape(new.shape[0], -1, new.shape[-1])
                                        ).view(new.shape)
            st.put(index, new)

        with torch.no_grad():
            x = lay.embed(self.tokens)
            combine(0, x)
            for layer in range(g.n_layers):
                if keep is not None:
                    keep.append(x)
                q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
                z = attend_chunked(lay, layer, q, k, v, self.chunk)
                h0 = g.head_start[layer]
                heads = x.new_empty(g.n_heads, self.n, self.t, x.shape[-1])
                lay.head_outputs(layer, z, out=heads)
                pre = Architecture.attn_from_heads(lay, layer, heads, 0)
                combine(slice(h0, h0 + g.n_heads), heads, at=(layer, pre))
                del heads
                attn = lay.post_norm(layer, pre) if self.post else pre
                x_in, x = x, x + attn
                m = lay.mlp(layer, lay.ln_mlp(layer, x_in if lay.parallel else x))
                u = g.mlp_index[layer]
                assert u is not None  # the block runner has no attention-only graphs
                combine(u, m)
                x = x + m
            if keep is not None:
                keep.append(x)

    def interpolate(self, value: Tensor, node: str, change: Callable[[], Tensor]) -> Tensor:
        """``value [C*N, T, d]`` with the rows of the copies that move ``node`` replaced by
        the constants ``value - (1 - alpha) (a - a')`` (``change()`` = ``a - a'``), or by
        ``alpha`` itself where it is a tensor."""
        if node not in self.moved:
            return value
        rows = value.view(self.copies, self.n, *value.shape[1:])
        diff = change()
        parts = []
        for c in range(self.copies):
            alpha = self.moved[node].get(c)
            parts.append(rows[c] if alpha is None
                         else alpha.to(rows) if isinstance(alpha, Tensor)
                         else rows[c].detach() - (1 - alpha) * diff)
        return torch.cat(parts) if self.copies > 1 else parts[0]

    def block(self, layer: int, x: Tensor, grad: bool) -> Tensor:
        """Block ``layer`` of the run the gradient is taken in, from its input ``x [C*N, T,
        d]``: with ``grad``, the receivers' gradients arrive in its backward pass."""
        g, lay, st = self.g, self.lay, self.store
        if grad and f"a{layer}" not in self.blocked:
            q, k, v = _ReceiverGradients.apply(x, layer, lay, self.on_qkv(layer))
        else:
            q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
        z = (_ChunkedAttention.apply(q, k, v, layer, lay, self.chunk) if grad
             else attend_chunked(lay, layer, q, k, v, self.chunk))
        pre = Architecture.attn_out(lay, layer, z)
        h0 = g.head_start[layer]
        heads = slice(h0, h0 + g.n_heads)
        pre = self.interpolate(pre, f"a{layer}", lambda: st.get(heads).sum(0))
        if self.post and self.points is not None and not grad:
            # per copy: J_l(S_l) (a - a')_heads, for the head rows of later contractions
            s_l = pre.reshape(-1, pre.shape[-1])
            d_heads = st.get(heads).reshape(g.n_heads, -1, pre.shape[-1])
            self.pushed[layer] = lay.post_norm_jvp(layer, s_l, d_heads.repeat(1, self.copies, 1))
        attn = lay.post_norm(layer, pre) if self.post else pre
        x_mid = x + attn
        branch = x if lay.parallel else x_mid
        if grad and f"m{layer}" not in self.blocked:
            branch = branch + 0  # the MLP's own input: its gradient is the MLP receiver's
            branch.register_hook(self.on_receiver(f"m{layer}", g.mlp_receiver[layer]))
        m = lay.mlp(layer, lay.ln_mlp(layer, branch))
        u = g.mlp_index[layer]
        assert u is not None  # the block runner has no attention-only graphs
        m = self.interpolate(m, f"m{layer}", lambda: st.get(u))
        return x_mid + m

    # ------------------------------------------------------------------ gradients
    def contract(self, r0: int, grad: Tensor) -> None:
        """Eq. (2) for the receivers ``r0 .. r0 + R'`` from their gradients ``grad [R',
        C*N*T, d]`` (per copy): summed over the copies, and for post-norm families with
        gradient points the head rows per copy, through each copy's norm Jacobian."""
        g = self.g
        h = grad.shape[0]
        n_up = int(g.n_upstream[r0: r0 + h].max())
        rows = self.n * self.t
        folded = grad if self.copies == 1 else grad.view(h, self.copies, rows, -1).sum(1)
        contract_streamed(self.scores_, self.store, n_up, r0, folded, self.sign)
        if self.post and self.points is not None:
            flat = grad.reshape(h, -1)
            for layer, jd in self.pushed.items():
                heads = slice(g.head_start[layer], g.head_start[layer] + g.n_heads)
                if heads.stop <= n_up:
                    self.scores_[heads, r0: r0 + h] = self.sign * matmul_nt(
                        jd.reshape(g.n_heads, -1), flat).to(self.scores_.dtype)

    def on_receiver(self, key: str, r0: int | None) -> Any:
        """Hook on an MLP's or the logits' own input: its gradient is the receiver's."""
        assert r0 is not None  # the block runner has no attention-only graphs

        def hook(grad: Tensor) -> None:
            self.fired.add(key)
            gdt = torch.promote_types(grad.dtype, torch.float32)
            self.contract(r0, grad.reshape(1, -1, grad.shape[-1]).to(gdt))
        return hook

    def on_qkv(self, layer: int) -> Any:
        """The backward of ``layer``'s q/k/v projections: each head's receiver gradient
        (then contracted), and their sum, the residual's gradient through them."""
        g, lay = self.g, self.lay
        n_qkv = g.n_heads + 2 * g.n_kv_heads

        def backward(x: Tensor, grads: tuple[Tensor, Tensor, Tensor],
                     outputs: tuple[Tensor, Tensor, Tensor]) -> Tensor:
            norm = lay.norm_parts(layer, x)
            gdt = torch.promote_types(x.dtype, torch.float32)
            each = x.new_empty(n_qkv, x.shape[0] * self.t, x.shape[-1], dtype=gdt)
            dx = lay.qkv_input_grads(layer, norm, grads, out=each, outputs=outputs)
            self.fired.add(f"qkv{layer}")
            self.contract(g.q_start[layer], each)
            return dx.view(x.shape).to(x.dtype)
        return backward

    def scores(self, metric: Any) -> Tensor:
        """The pass: the sender differences, the stored block inputs, then the blocks'
        backward passes from the last to the first."""
        g, lay, st = self.g, self.lay, self.store
        assert self.positions is not None
        self.scores_ = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64,
                                   device=st.home)
        inputs: list[Tensor] = []
        if self.points is None:  # the clean run: a' - a, and the blocks' inputs
            self.forward_senders("into", keep=inputs)
        else:  # the stacked runs from the differences a - a' in the store
            with torch.no_grad():
                x = lay.embed(self.tokens).repeat(self.copies, 1, 1)
                x = self.interpolate(x, "input", lambda: st.get(0))
                for layer in range(g.n_layers):
                    inputs.append(x)
                    x = self.block(layer, x, grad=False)
                inputs.append(x)
        where = self.positions.repeat(self.copies, 1)  # [C*N, P]
        with torch.enable_grad():
            top = inputs.pop().detach().requires_grad_(True)
            top.register_hook(self.on_receiver("logits", g.n_receivers - 1))
            index = where[:, :, None].expand(-1, -1, top.shape[-1])
            metric(lay.final(top.gather(1, index))).backward()
            grad = top.grad
            for layer in reversed(range(g.n_layers)):
                x = inputs.pop().detach().requires_grad_(True)
                out = self.block(layer, x, grad=True)
                out.backward(grad)
                grad = x.grad
                del x, out
        expected = {"logits"} | {f"qkv{layer}" for layer in range(g.n_layers)
                                 if f"a{layer}" not in self.blocked} | {
            f"m{layer}" for layer in range(g.n_layers) if f"m{layer}" not in self.blocked}
        missing = sorted(expected - self.fired)
        if missing:
            raise HookError(f"Receivers {missing} received no gradient in the checkpointed "
                            "attribution pass; their edges' scores would silently be 0.")
        return self.scores_


__all__ = ["SenderStore", "attend_chunked", "checkpointed_pass", "contract_streamed",
           "fill_senders", "subtract_senders"]
