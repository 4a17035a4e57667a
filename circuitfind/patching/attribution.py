"""Gradient edge attribution on the block runner: eq. (2) of :mod:`circuitfind.patching.engine`.

:func:`attribute` runs one forward and backward pass through the runner's architecture adapter
and recovers every receiver's gradient in the backward pass (the per-head q/k/v inputs are
never materialised); :func:`contract_scores` is the one contraction of sender differences with
receiver gradients, shared with the engine's hooked path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError, HookError
from circuitfind.patching.architectures import Architecture
from circuitfind.patching.backward_rules import PLAIN, BackwardRules
from circuitfind.patching.qk_fix import QKFix

if TYPE_CHECKING:
    from circuitfind.patching.runner import BlockRunner


HALF_DTYPES = (torch.float16, torch.bfloat16)
ACCUMULATION_CHUNK_BYTES = 1 << 26  # float32 copies of one chunk of a half-precision contraction


def matmul_nt(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` accumulated in at least float32: ``[U, X] x [R, X] -> [U, R]``.

    For float32/float64 operands this is one matmul in ``a``'s dtype. Where either operand is
    float16 or bfloat16 (a half-precision model's sender differences or gradients), the sum
    over ``X`` (examples x positions x d_model: hundreds of thousands of terms) runs in
    float32: chunks of columns (at most :data:`ACCUMULATION_CHUNK_BYTES` of float32 copies)
    are converted and added into a float32 result, so no term nor the result is rounded to
    half precision (a half matmul rounds its result to 8 or 11 bits, and on GPUs may reduce in
    half precision).

    Returns:
        ``[U, R]``, float32 for half operands, else ``a``'s dtype.
    """
    if a.dtype not in HALF_DTYPES and b.dtype not in HALF_DTYPES:
        return a @ b.T.to(a)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    step = max(1, ACCUMULATION_CHUNK_BYTES // (4 * (a.shape[0] + b.shape[0])))
    for x0 in range(0, a.shape[1], step):
        out.addmm_(a[:, x0: x0 + step].float(), b[:, x0: x0 + step].float().T)
    return out


def contract_scores(scores: Tensor, delta: Tensor, r0: int, grad: Tensor,
                    sign: float = 1.0) -> None:
    """Eq. (2) for one block of receivers: ``scores[:U, r0:r0+R'] += sign * delta @ grad^T``.

    Args:
        scores: ``[S, R]`` float64 scores, updated in place.
        delta: ``[U, X]`` sender differences of the U senders upstream of the receivers
            (``a' - a`` with ``sign=1``; ``a - a'`` with ``sign=-1``), flattened over examples,
            positions and ``d_model``.
        r0: First receiver of the block.
        grad: ``[R', X]`` the receivers' gradients, flattened the same way.

    The sum over ``X`` runs in at least float32 (:func:`matmul_nt`), also for half-precision
    models.

    References:
        Syed, Rager & Conmy (2023), "Attribution Patching Outperforms Automated Circuit
        Discovery", eq. 2.
    """
    block = matmul_nt(delta, grad).to(scores.dtype)
    if sign == 1.0:
        scores[: delta.shape[0], r0: r0 + grad.shape[0]] += block
    else:
        scores[: delta.shape[0], r0: r0 + grad.shape[0]] += sign * block


def attribute(runner: BlockRunner, tokens: Tensor, ablated: Tensor, positions: Tensor,
              metric: Any, points: list[tuple[str, float | Tensor]] | None = None,
              diff: Tensor | None = None, rules: BackwardRules | None = None) -> Tensor:
    """:func:`eap_pass` under modified backward ``rules`` (GIM, RelP, AtP*; ``None``: the
    plain gradient), installed on the runner's adapter for the pass: the extension point of
    :mod:`circuitfind.patching.backward_rules`. With ``rules.qk_fix`` the q and k edges are
    rescored after the backward pass (:mod:`circuitfind.patching.qk_fix`).

    Raises:
        ConfigError: ``rules`` other than the plain gradient with gradient ``points``.
    """
    rules = rules or PLAIN
    if points is not None and not rules.plain:
        raise ConfigError(f"Modified backward rules ({rules.describe()}) apply to the clean "
                          "run's gradient only, not to gradient points (EAP-IG).")
    fix = QKFix(runner) if rules.qk_fix else None
    with runner.arch.backward_rules(rules, None if fix is None else fix.tap):
        return eap_pass(runner, tokens, ablated, positions, metric, points, diff, rules, fix)


def eap_pass(runner: BlockRunner, tokens: Tensor, ablated: Tensor, positions: Tensor,
             metric: Any, points: list[tuple[str, float | Tensor]] | None = None,
             diff: Tensor | None = None, rules: BackwardRules = PLAIN,
             fix: QKFix | None = None) -> Tensor:
    """EAP scores from one clean forward and backward pass through the runner (or, with
    ``points``, EAP-IG / clean-corrupted scores from one pass over stacked runs).

    Eq. (2) of :mod:`circuitfind.patching.engine`: ``score[u, r] = sum_{n,t} delta_u .
    d metric / d x_r``. The forward is the plain one (one norm and one q/k/v projection per
    layer for all heads); each receiver's gradient is recovered in the backward pass from
    the gradient of its projection, ``d x_r = J_norm(x)^T (d q_h W_q[h]^T)`` (the norm's
    backward in closed form, for all heads of a kind at once), and contracted with the
    sender differences layer by layer, so the per-head q/k/v inputs are never materialised
    in the forward pass.

    The clean sender outputs ``a_u`` are taken from this same forward pass (each head's
    from the attention's ``z`` outside the autograd graph, straight into ``a'_u - a_u``),
    so the pass costs a plain forward and backward, like the physical floor of EAP.

    Gradient points (EAP-IG, clean-corrupted; see
    :class:`circuitfind.patching.engine.GradientPoint`): the batch holds ``C = len(points)``
    copies of the N clean rows; in copy ``c`` the outputs of the node group ``points[c][0]``
    (``input``, ``a{L}``: all heads of layer L, ``m{L}``) become ``a - (1 - alpha) (a - a')``
    (or, where ``alpha`` is a ``[N, T, d]`` tensor, that tensor: a point off the straight
    line, such as EAP-GP's gradient path) and are held constant (no gradient flows back through them). Each receiver's gradient
    is recovered per copy (the norm's Jacobian differs between copies), summed over the
    copies and contracted with ``diff``, the sender differences of the plain clean and
    corrupted runs.

    Args:
        tokens: ``[N, T]`` clean token ids.
        ablated: ``[S, N|1, T|1, d]`` ablated sender outputs ``a'_u``.
        positions: ``[N, P]`` metric positions.
        metric: ``logits [C*N, P, V] -> scalar`` to differentiate (``C = 1`` without
            points).
        points: ``(node group, alpha)`` of each stacked run (``alpha`` a float, or the node
            group's output itself ``[N, T, d]``), or ``None`` (EAP).
        diff: ``[S, N, T, d]`` clean minus ablated sender outputs; required with
            ``points`` (unused without).
        rules: Backward rules already installed on the adapter (GradDrop acts here, at each
            layer's outputs).
        fix: The QK fix's collector, or ``None``.

    Returns:
        ``[S, R]`` float64 scores (0 off real edges), in the metric's unit.

    Raises:
        HookError: a receiver group's gradient did not arrive (its scores would be 0).

    References:
        Syed, Rager & Conmy (2023), "Attribution Patching Outperforms Automated Circuit
        Discovery", eq. 2.
    """
    g, lay = runner.graph, runner.arch
    n, t = tokens.shape
    copies = 1 if points is None else len(points)
    if points is not None and diff is None:
        raise ConfigError("Gradient points need the sender differences `diff` (clean "
                          "minus ablated outputs, [S, N, T, d]).")
    scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64,
                         device=ablated.device)
    # a'_u - a_u: filled during the forward pass for EAP (the hooks run in the backward
    # pass); from the plain clean and corrupted runs for gradient points
    delta = (ablated.new_empty(g.n_senders, n, t, ablated.shape[-1]) if diff is None
             else -diff)
    flat = delta.reshape(g.n_senders, -1)
    # gradient points by node group: {copy: alpha}
    moved: dict[str, dict[int, float | Tensor]] = {}
    for c, (node, alpha) in enumerate(points or []):
        moved.setdefault(node, {})[c] = alpha if isinstance(alpha, Tensor) else float(alpha)
    # node groups held constant in every copy: their receivers get no gradient
    blocked = {node for node, cs in moved.items() if len(cs) == copies}

    def fold(grad: Tensor) -> Tensor:
        """A receiver's gradient ``[C*N, ...]`` summed over the copies -> ``[N, ...]``."""
        return grad if copies == 1 else grad.view(copies, n, *grad.shape[1:]).sum(0)

    def interpolate(value: Tensor, node: str, change: Tensor) -> Tensor:
        """``value [C*N, T, d]`` with the rows of the copies that move ``node`` replaced by
        the constants ``value - (1 - alpha) change`` (``change [N, T, d]`` = ``a - a'``)."""
        if node not in moved:
            return value
        rows = value.view(copies, n, *value.shape[1:])
        parts = []
        for c in range(copies):
            alpha = moved[node].get(c)
            parts.append(rows[c] if alpha is None
                         else alpha.to(rows) if isinstance(alpha, Tensor)  # the value itself
                         else rows[c].detach() - (1 - alpha) * change)
        return torch.cat(parts) if copies > 1 else parts[0]

    # Families whose heads' sum passes a norm (Gemma-2): a head's score goes through that
    # norm's Jacobian at each layer's pre-norm sum S_l of the run the gradient was taken in,
    # (a'_h - a_h) . J_l(S_l)^T d metric / d x_r = J_l(S_l) (a'_h - a_h) . d metric / d x_r:
    # the heads' differences are pushed through the norm once a layer in the forward pass
    # (in place: eq. (2) then contracts them like any sender's). With several gradient
    # points the Jacobians differ per copy: the pushed differences are kept per copy
    # (``pushed``) and contracted with per-copy receiver gradients (``[h, C*N*T, d]``).
    post = lay.attn_post_norm
    pushed: dict[int, Tensor] = {}  # layer -> J_l (a'_h - a_h) [H, C*N*T*d] (copies > 1)

    def contract(r0: int, n_up: int, grad: Tensor) -> None:
        """``scores[:n_up, r0:r0+h] += delta . grad`` for ``grad [h, N*T, d]`` (for post-norm
        families with several copies ``[h, C*N*T, d]``, per copy)."""
        h = grad.shape[0]
        if not post or copies == 1:
            contract_scores(scores, flat[:n_up], r0, grad.reshape(h, -1))
            return
        per_copy = grad.reshape(h, -1)
        contract_scores(scores, flat[:n_up], r0, per_copy.view(h, copies, -1).sum(1))
        for layer, jd in pushed.items():  # the head rows: per copy, through its Jacobian
            heads = slice(g.head_start[layer], g.head_start[layer] + g.n_heads)
            if heads.stop <= n_up:
                scores[heads, r0: r0 + h] = matmul_nt(jd, per_copy).to(scores.dtype)

    fired: set[int] = set()  # first receiver of each group whose gradient arrived

    # Per layer during the backward pass: the norm's parts (q, k and v read one norm of
    # one residual) and the receivers' gradients ``[1 + H + 2G, N*T, d]``: the previous
    # layer's MLP receiver (row 0; it is the receiver just before this layer's q and its
    # gradient arrives just after theirs) and this layer's q/k/v receivers, contracted in
    # one matmul once all have arrived (the sender differences are read once a layer; the
    # one pair that is no edge, the MLP into its own receiver, is zeroed after).
    norms: dict[int, tuple[Tensor, Tensor, Tensor, bool]] = {}
    grads: dict[int, tuple[Tensor, list[str]]] = {}
    offset = {"q": 0, "k": g.n_heads, "v": g.n_heads + g.n_kv_heads}

    def merged(layer: int) -> bool:
        """Whether the MLP receiver of ``layer - 1`` is contracted with ``layer``'s q/k/v."""
        if layer == 0:
            return False
        r, u = g.mlp_receiver[layer - 1], g.mlp_index[layer - 1]
        if r is None or u is None:
            return False
        return (r + 1 == g.q_start[layer] and int(g.n_upstream[r]) == u
                and g.head_start[layer] == u + 1)

    # layers still waiting for the previous MLP receiver's gradient, and layers whose
    # previous MLP receiver was contracted alone (its gradient came before any q/k/v's)
    waiting = {layer for layer in range(g.n_layers) if merged(layer)}
    alone: set[int] = set()
    for layer in list(waiting):  # the MLP before it gets no gradient: contract without it
        if f"m{layer - 1}" in blocked:
            waiting.discard(layer)
            alone.add(layer)

    def flush(layer: int) -> None:
        """Contract ``layer``'s buffer (all of its receivers have arrived)."""
        buf, _ = grads.pop(layer)
        norms.pop(layer, None)
        if not merged(layer):
            contract(g.q_start[layer], g.head_start[layer], buf)
        elif layer in alone:
            contract(g.q_start[layer], g.head_start[layer], buf[1:])
        else:
            contract(g.q_start[layer] - 1, g.head_start[layer], buf)
            scores[g.mlp_index[layer - 1], g.mlp_receiver[layer - 1]] = 0

    def on_receiver(r0: int, n_up: int, layer: int | None = None) -> Any:
        def hook(grad: Tensor) -> None:
            fired.add(r0)
            grad = grad if post else fold(grad)
            if layer is not None and layer + 1 in waiting:
                waiting.discard(layer + 1)
                if layer + 1 in grads:
                    buf, arrived = grads[layer + 1]
                    buf[0] = grad.reshape(buf.shape[1:])
                    if len(arrived) == 3:
                        flush(layer + 1)
                    return
                alone.add(layer + 1)
            contract(r0, n_up, grad.unsqueeze(0))
        return hook

    def on_projection(layer: int, kind: str, r0: int, x: Tensor) -> Any:
        def hook(grad: Tensor) -> None:  # grad [N, T, h, dh]
            fired.add(r0)
            lead = int(merged(layer))
            if layer not in norms:
                norms[layer] = lay.norm_parts(layer, x.detach())
                xh = norms[layer][0]
                rows = n * t * (copies if post else 1)  # summed over copies unless post-norm
                grads[layer] = (xh.new_empty(lead + g.n_heads + 2 * g.n_kv_heads, rows,
                                             xh.shape[-1]), [])
            buf, arrived = grads[layer]
            s0 = lead + offset[kind]
            if copies == 1 or post:
                lay.projection_input_grads(layer, kind, norms[layer], grad,
                                           out=buf[s0: s0 + grad.shape[2]])
            else:  # per copy (each its own norm Jacobian), then summed
                per_copy = lay.projection_input_grads(layer, kind, norms[layer], grad)
                torch.sum(per_copy.view(grad.shape[2], copies, n * t, -1), 1,
                          out=buf[s0: s0 + grad.shape[2]])
            arrived.append(kind)
            if len(arrived) == 3 and layer not in waiting:
                flush(layer)
        return hook

    x = lay.embed(tokens).detach()  # the weights need no gradient
    if diff is None:
        torch.sub(ablated[0], x, out=delta[0])
    if copies > 1:
        x = x.repeat(copies, 1, 1)
    x = interpolate(x, "input", diff[0] if diff is not None else x)
    x = x.detach().requires_grad_(True)
    for layer in range(g.n_layers):
        if fix is not None:
            fix.block_input(layer, x)
        q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
        for kind, t_, r0 in (("q", q, g.q_start[layer]), ("k", k, g.k_start[layer]),
                             ("v", v, g.v_start[layer])):
            t_.register_hook(on_projection(layer, kind, r0, x))
        z = lay.attend(layer, q, k, v)
        h0 = g.head_start[layer]
        if diff is None:
            lay.head_deltas(layer, z.detach(), ablated[h0: h0 + g.n_heads],
                            out=delta[h0: h0 + g.n_heads])
        if post:  # interpolate the heads' pre-norm sum, then the norm
            pre = Architecture.attn_out(lay, layer, z)
            if f"a{layer}" in moved and diff is not None:  # (points come with diff)
                pre = interpolate(pre, f"a{layer}", diff[h0: h0 + g.n_heads].sum(0))
            s_l = pre.detach().reshape(-1, pre.shape[-1])  # [C*N*T, d]
            d_heads = delta[h0: h0 + g.n_heads].view(g.n_heads, n * t, -1)
            if copies == 1:
                d_heads.copy_(lay.post_norm_jvp(layer, s_l, d_heads))
            else:
                pushed[layer] = lay.post_norm_jvp(layer, s_l, d_heads.repeat(1, copies, 1)
                                                  ).reshape(g.n_heads, -1)
            attn = lay.post_norm(layer, pre)
        else:
            attn = lay.attn_out(layer, z)
            if f"a{layer}" in moved and diff is not None:  # (points come with diff)
                attn = interpolate(attn, f"a{layer}", diff[h0: h0 + g.n_heads].sum(0))
        x_in, x = x, x + rules.through(layer, attn)
        # the MLP's own input (the block's input in parallel blocks): its gradient is the
        # MLP receiver's
        branch = (x_in if lay.parallel else x) + 0
        r_mlp, u = g.mlp_receiver[layer], g.mlp_index[layer]
        assert r_mlp is not None and u is not None  # the block runner has no attention-only graphs
        if f"m{layer}" not in blocked:
            branch.register_hook(on_receiver(r_mlp, u, layer))
        m = lay.mlp(layer, lay.ln_mlp(layer, branch))
        if diff is None:
            torch.sub(ablated[u], m.detach(), out=delta[u])
        x = x + rules.through(layer, interpolate(
            m, f"m{layer}", diff[u] if diff is not None and f"m{layer}" in moved else m))
    branch = x + 0
    branch.register_hook(on_receiver(g.n_receivers - 1, g.n_senders))
    idx = positions.repeat(copies, 1)[:, :, None].expand(-1, -1, branch.shape[-1])
    metric(lay.final(branch.gather(1, idx))).backward()
    groups = [r0 for layer in range(g.n_layers) for r0 in (
        [] if f"a{layer}" in blocked else [g.q_start[layer], g.k_start[layer],
                                           g.v_start[layer]])
        + ([] if f"m{layer}" in blocked else [g.mlp_receiver[layer]]) if r0 is not None]
    missing = [g.receivers[r].name for r in groups + [g.n_receivers - 1] if r not in fired]
    if missing:
        raise HookError(f"Receivers {missing} received no gradient in the attribution pass; "
                        "their edges' scores would silently be 0.")
    if fix is not None:
        fix.rescore(scores, delta)
    return scores
