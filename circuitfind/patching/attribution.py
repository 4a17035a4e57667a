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
from circuitfind.patching.backward_rules import PLAIN, BackwardRules, for_repeated_backward
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


def contract_magnitudes(scores: Tensor, delta: Tensor, r0: int, grad: Tensor) -> None:
    """Each example's eq. (2) in magnitude: ``scores[:U, r0:r0+R'] += sum_n |delta_n . grad_n|``.

    GradDrop's estimates are taken in absolute value prompt pair by prompt pair before the mean
    over pairs (Kramar et al. 2024, eq. 11): the contraction keeps the examples apart.

    Args:
        scores: ``[S, R]`` float64 sums of magnitudes, updated in place.
        delta: ``[N, U, X]`` sender differences ``a' - a`` of the U senders upstream of the
            receivers, per example, flattened over positions and ``d_model`` (any strides
            with a contiguous last dimension).
        r0: First receiver of the block.
        grad: ``[R', N, X]`` the receivers' gradients, flattened the same way.

    Half-precision operands are contracted in float32, like :func:`matmul_nt`: a few examples
    at a time (at most :data:`ACCUMULATION_CHUNK_BYTES` of float32 copies, one example at
    least), each example's sum in float32.
    """
    u, r = delta.shape[1], grad.shape[0]
    target = scores[:u, r0: r0 + r]
    if delta.dtype not in HALF_DTYPES and grad.dtype not in HALF_DTYPES:
        block = torch.bmm(delta, grad.permute(1, 2, 0).to(delta))  # [N, U, R']
        target += block.abs_().sum(0).to(scores.dtype)
        return
    step = max(1, ACCUMULATION_CHUNK_BYTES // (4 * (u + r) * delta.shape[2]))
    for n0 in range(0, delta.shape[0], step):
        block = torch.bmm(delta[n0: n0 + step].float(),
                          grad[:, n0: n0 + step].float().permute(1, 2, 0))
        target += block.abs_().sum(0).to(scores.dtype)


class _ReceiverGradients(torch.autograd.Function):
    """``q, k, v = qkv(ln_attn(x))`` of one layer, whose backward pass is EAP's.

    Autograd would compute the residual's gradient through the norm and the three
    projections for all heads at once; EAP needs each q/k/v receiver's gradient (the same
    matrix products, one head at a time), whose sum is that residual gradient. The backward
    therefore hands the projections' gradients to a callback that computes the receivers'
    gradients (and contracts them) and returns their sum: the work is done once.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: int, lay: Architecture,
                backward: Any) -> tuple[Tensor, Tensor, Tensor]:
        ctx.backward = backward
        q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
        ctx.save_for_backward(x, q, k, v)  # the projections: the norm's backward reads them
        return q, k, v

    @staticmethod
    def backward(ctx: Any, dq: Tensor, dk: Tensor, dv: Tensor
                 ) -> tuple[Tensor, None, None, None]:
        x, q, k, v = ctx.saved_tensors
        return ctx.backward(x, (dq, dk, dv), (q, k, v)), None, None, None


class _SummedHeads(torch.autograd.Function):
    """The attention output before any post-norm, ``sum_h a_h + b_O``, from the heads'
    outputs ``a_h = z_h W_O[h]`` that EAP computes anyway (for ``a'_h - a_h``), with the
    output projection's backward to ``z`` (``dz = d out W_O^T``): the projection is not
    computed a second time.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, heads: Tensor, layer: int,
                lay: Architecture) -> Tensor:
        ctx.w = lay.w_out(layer)[0]  # [H*dh, d], frozen
        ctx.shape = z.shape
        return Architecture.attn_from_heads(lay, layer, heads, 0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor
                 ) -> tuple[Tensor, None, None, None]:
        w = ctx.w
        return (grad.reshape(-1, w.shape[1]) @ w.T).view(ctx.shape), None, None, None


def attribute(runner: BlockRunner, tokens: Tensor, ablated: Tensor, positions: Tensor,
              metric: Any, points: list[tuple[str, float | Tensor]] | None = None,
              diff: Tensor | None = None, rules: BackwardRules | None = None,
              drop_each_layer: bool = False, overwrite: bool = False) -> Tensor:
    """:func:`eap_pass` under modified backward ``rules`` (GIM, RelP, AtP*; ``None``: the
    plain gradient), installed on the runner's adapter for the pass: the extension point of
    :mod:`circuitfind.patching.backward_rules`. With ``rules.qk_fix`` the q and k edges are
    rescored after the backward pass (:mod:`circuitfind.patching.qk_fix`); with
    ``drop_each_layer`` the scores of every GradDrop pass come back, ``[L, S, R]``.

    Raises:
        ConfigError: ``rules`` other than the plain gradient, or ``drop_each_layer``, with
            gradient ``points``.
    """
    rules = rules or PLAIN
    if points is not None and (not rules.plain or drop_each_layer):
        raise ConfigError(f"Modified backward rules ({rules.describe()}) and GradDrop apply to "
                          "the clean run's gradient only, not to gradient points (EAP-IG).")
    fix = QKFix(runner, magnitudes=drop_each_layer) if rules.qk_fix else None
    installed = for_repeated_backward(rules) if drop_each_layer else rules
    with runner.arch.backward_rules(installed, None if fix is None else fix.tap):
        return eap_pass(runner, tokens, ablated, positions, metric, points, diff, rules, fix,
                        drop_each_layer, overwrite)


def eap_pass(runner: BlockRunner, tokens: Tensor, ablated: Tensor, positions: Tensor,
             metric: Any, points: list[tuple[str, float | Tensor]] | None = None,
             diff: Tensor | None = None, rules: BackwardRules = PLAIN,
             fix: QKFix | None = None, drop_each_layer: bool = False,
             overwrite: bool = False) -> Tensor:
    """EAP scores from one clean forward and backward pass through the runner (or, with
    ``points``, EAP-IG / clean-corrupted scores from one pass over stacked runs).

    Eq. (2) of :mod:`circuitfind.patching.engine`: ``score[u, r] = sum_{n,t} delta_u .
    d metric / d x_r``. The forward is the plain one (one norm and one q/k/v projection per
    layer for all heads); each receiver's gradient is recovered in the backward pass from
    the gradient of its projection, ``d x_r = J_norm(x)^T (d q_h W_q[h]^T)`` (the norm's
    backward in closed form, for all q/k/v heads of a layer at once), and contracted with
    the sender differences one group of consecutive receivers at a time (a layer's q/k/v
    with one MLP receiver), so the per-head q/k/v inputs are never materialised in the
    forward pass. The residual's gradient through a layer's norm and q/k/v projections is
    the sum of those receivers' gradients, so autograd does not compute it a second time
    (:class:`_ReceiverGradients`). The last block runs at the metric positions only.

    The clean sender outputs ``a_u`` are taken from this same forward pass (each head's
    from the attention's ``z`` outside the autograd graph, straight into ``a'_u - a_u``, and
    summed for the attention output: :class:`_SummedHeads`), so the pass costs a plain
    forward and backward plus the contraction, like the physical floor of EAP.

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
        drop_each_layer: GradDrop (Kramar et al. 2024, §3.1.2) from this one forward pass:
            after the plain backward pass, for each layer ``l >= 1`` a backward pass from
            layer ``l``'s input seeded with the plain gradient at its output (what reaches
            layer ``l``'s input when no gradient passes through its attention and MLP
            outputs) recovers the receivers below ``l``; receivers above ``l`` keep the plain
            gradient and those of layer ``l`` get none. ``L (L - 1) / 2`` layer-backward
            passes in all instead of ``L`` full forward and backward passes. Each pass
            scores each example apart and adds the magnitudes (eq. 11 of arXiv v1 takes
            the absolute value per prompt pair; :func:`contract_magnitudes`): row ``l``
            equals the sum over examples of ``|scores|`` of one-example passes with
            :attr:`BackwardRules.drop_layer` ``= l``, up to rounding.
        overwrite: ``ablated`` (contiguous, ``[S, N, T, d]``, the caller's own) may be
            overwritten: the sender differences are written into it instead of a new buffer
            (EAP only; one ``[S, N, T, d]`` buffer less). The buffers of the pass itself come
            from :meth:`BlockRunner.scratch`.

    Returns:
        ``[S, R]`` float64 scores (0 off real edges), in the metric's unit; with
        ``drop_each_layer`` ``[L, S, R]``, row ``l`` the sum over the examples of each
        example's ``|score|`` with layer ``l`` dropped (non-negative).

    Raises:
        HookError: a receiver group's gradient did not arrive (its scores would be 0).

    References:
        Syed, Rager & Conmy (2023), "Attribution Patching Outperforms Automated Circuit
        Discovery", eq. 2.
    """
    g, lay = runner.graph, runner.arch
    n, t = tokens.shape
    d = ablated.shape[-1]
    copies = 1 if points is None else len(points)
    if points is not None and diff is None:
        raise ConfigError("Gradient points need the sender differences `diff` (clean "
                          "minus ablated outputs, [S, N, T, d]).")
    scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64,
                         device=ablated.device)
    # a'_u - a_u: filled during the forward pass for EAP (the hooks run in the backward
    # pass); from the plain clean and corrupted runs for gradient points
    if overwrite and (diff is not None or not ablated.is_contiguous()
                      or ablated.shape != (g.n_senders, n, t, d)):
        raise ConfigError("overwrite needs EAP (no gradient points) and the ablated outputs "
                          f"as one contiguous [S, N, T, d] tensor; got {tuple(ablated.shape)}.")
    delta = (ablated if overwrite
             else runner.scratch("eap differences", (g.n_senders, n, t, d), ablated)
             if diff is None
             else -diff)
    flat = delta.reshape(g.n_senders, -1)
    # GradDrop's passes score each example apart, in magnitude (:func:`contract_magnitudes`):
    # the differences example-major ``[N, S, T*d]``, filled in after the forward pass
    per_example: Tensor | None = None
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
    # points the Jacobians differ per copy: the pushed differences are kept per copy, the
    # layers' heads stacked in one buffer (``pushed``), and contracted with per-copy receiver
    # gradients (``[h, C*N*T, d]``), all earlier layers' heads in one matmul.
    post = lay.attn_post_norm
    pushed: list[Tensor] = []  # [L*H, C*N*T*d]: J_l (a'_h - a_h) per copy (copies > 1)
    n_pushed = [0]  # layers written into it
    head_rows: list[Tensor] = []  # the heads' sender rows, layer by layer (made when needed)

    def contract(r0: int, n_up: int, grad: Tensor) -> None:
        """``scores[:n_up, r0:r0+h] += delta . grad`` for ``grad [h, N*T, d]`` (for post-norm
        families with several copies ``[h, C*N*T, d]``, per copy)."""
        h = grad.shape[0]
        if per_example is not None:  # GradDrop: each example's score in magnitude
            contract_magnitudes(scores, per_example[:, :n_up], r0, grad.reshape(h, n, -1))
            return
        if not post or copies == 1:
            contract_scores(scores, flat[:n_up], r0, grad.reshape(h, -1))
            return
        per_copy = grad.reshape(h, -1)
        contract_scores(scores, flat[:n_up], r0, per_copy.view(h, copies, -1).sum(1))
        # the head rows: per copy, through their Jacobians (the layers upstream of r0)
        m = g.n_heads * sum(1 for layer in range(n_pushed[0])
                            if g.head_start[layer] + g.n_heads <= n_up)
        if m:
            if not head_rows:
                head_rows.append(torch.tensor([g.head_start[layer] + i
                                               for layer in range(g.n_layers)
                                               for i in range(g.n_heads)], device=scores.device))
            scores[head_rows[0][:m], r0: r0 + h] = matmul_nt(pushed[0][:m], per_copy).to(
                scores.dtype)

    # Receivers are contracted in groups of consecutive receivers, one matmul a group, so
    # that the sender differences are read once a group: each layer's q/k/v receivers with
    # the MLP receiver just before them (sequential blocks: the previous layer's, whose
    # senders are all but that MLP) or just after them (parallel blocks: this layer's, which
    # reads the block's input like q/k/v), and the last MLP receiver with the logits. A
    # group's block of scores spans the senders of its widest receiver; the pairs in it that
    # are no edge (an MLP into its own receiver) are zeroed after. The gradients wait in the
    # group's buffer ``[receivers, N*T, d]`` until all have arrived: one group at a time.
    n_qkv = g.n_heads + 2 * g.n_kv_heads
    # with the QK fix the q and k receivers score from exact patterns: their gradients are
    # summed into the residual's only, never written nor contracted (AtP*)
    skip = g.n_heads + g.n_kv_heads if fix is not None else 0
    memo: dict[int, Tensor] = {}  # folded q/k/v weights, shared by every backward pass
    norms: dict[int, tuple[Tensor, Tensor, Tensor, bool]] = {}  # GradDrop: each layer's norm
    parts: list[tuple[str, int, int, bool]] = []  # (key, first receiver, receivers, blocked)
    for layer in range(g.n_layers):
        parts.append((f"qkv{layer}", g.q_start[layer] + skip, n_qkv - skip,
                      f"a{layer}" in blocked))
        mlp_r = g.mlp_receiver[layer]
        if mlp_r is not None:
            parts.append((f"m{layer}", mlp_r, 1, f"m{layer}" in blocked))
    parts.append(("logits", g.n_receivers - 1, 1, False))
    # receivers that group with the part after them
    joins = {f"m{layer}" for layer in range(g.n_layers) if not lay.parallel}
    joins |= {f"qkv{layer}" for layer in range(g.n_layers) if lay.parallel}
    group_of: dict[str, tuple[int, int]] = {}  # part -> (group, first row)
    groups: list[list[tuple[str, int, int, bool]]] = []
    for i, part in enumerate(parts):
        prev = parts[i - 1] if i else None
        if (prev is not None and prev[0] in joins and prev[1] + prev[2] == part[1]
                and len(groups[-1]) == 1):
            groups[-1].append(part)
        else:
            groups.append([part])
        group_of[part[0]] = (len(groups) - 1, sum(p[2] for p in groups[-1][:-1]))
    gdt = torch.promote_types(ablated.dtype, torch.float32)  # the norms' backward dtype
    folded = copies > 1 and not post  # receivers' gradients summed over copies
    brows = n * t if folded else n * t * copies
    buffers: dict[int, Tensor] = {}
    # GradDrop's backward passes from layer ``below``'s input reach the receivers below it only
    below: int | None = None
    layer_of = {p[0]: int(runner.receiver_layer[p[1]]) for p in parts}

    def active(part: tuple[str, int, int, bool]) -> bool:
        """Whether ``part``'s gradient arrives in the current backward pass."""
        return not part[3] and (below is None or layer_of[part[0]] < below)

    pending = [{p[0] for p in grp if active(p)} for grp in groups]
    # a group's block of scores spans the senders of its widest receiver; the pairs in it
    # that are no edge are zeroed once a pass, after all groups (``scores *= edges``)
    n_upstream: list[int] = g.n_upstream.tolist()
    edges = g.edge_mask.to(scores.device)
    fired: set[str] = set()  # parts whose gradient arrived
    examples = torch.arange(n, device=positions.device)[:, None]  # [N, 1]
    # [N, P, 1]: a metric position's first occurrence in its example
    first_read = (~(positions[:, :, None] == positions[:, None, :]).tril(-1).any(2))[..., None]
    # rows ``example * T + position`` of the metric positions, each once
    at_metric = torch.unique(torch.arange(n, device=positions.device)[:, None] * t
                             + positions)

    def buffer(key: str) -> Tensor:
        """The buffer of ``key``'s group (made at its first arrival; rows of parts that get no
        gradient are zero)."""
        gi, _ = group_of[key]
        if gi not in buffers:
            grp = groups[gi]
            shape = (sum(p[2] for p in grp), brows, d)
            # one group at a time (see above) takes the pass's scratch buffer
            buf = buffers[gi] = (runner.scratch("eap group", shape, flat.new_empty(0, dtype=gdt))
                                 if not buffers else flat.new_empty(shape, dtype=gdt))
            row = 0
            for part in grp:
                if not active(part):
                    buf[row: row + part[2]] = 0
                row += part[2]
        return buffers[gi]

    def arrive(key: str) -> None:
        """Mark ``key``'s gradient arrived; contract its group once all parts have."""
        fired.add(key)
        gi, _ = group_of[key]
        pending[gi].discard(key)
        if pending[gi]:
            return
        grp = [p for p in groups[gi] if active(p)]  # (GradDrop may reach a group's first part only)
        r0, r1 = grp[0][1], grp[-1][1] + grp[-1][2]
        n_up = max(n_upstream[r0:r1])
        row0 = r0 - groups[gi][0][1]
        buf = buffers.pop(gi)[row0: row0 + r1 - r0]
        if gi == len(groups) - 1 and per_example is not None:
            # per example, at its metric positions (each once: a repeated position's gradient
            # already holds both reads)
            n_r = r1 - r0
            rows = delta.reshape(g.n_senders, n, t, d)[:n_up, examples, positions]
            grads = buf.view(n_r, n, t, d)[:, examples, positions] * first_read
            contract_magnitudes(scores, rows.transpose(0, 1).reshape(n, n_up, -1), r0,
                                grads.reshape(n_r, n, -1))
        elif gi == len(groups) - 1 and (copies == 1 or folded):
            # the last MLP's and the logits' gradients are 0 off the metric positions: the
            # contraction reads those rows only
            contract_scores(scores, delta.reshape(g.n_senders, n * t, d)[:n_up, at_metric]
                            .reshape(n_up, -1), r0, buf[:, at_metric].reshape(r1 - r0, -1))
        else:
            contract(r0, n_up, buf)

    # The last block runs at the metric positions only (its queries, heads' outputs and
    # MLP; keys and values at every position): nothing at other positions reaches the
    # metric. Its senders' differences are then known at the metric positions only and are
    # 0 elsewhere in ``delta``, which is exact: the only receivers that read them (the last
    # MLP's and the logits) have no gradient elsewhere.
    # The QK fix reads the last layer's pattern at those query rows only (its tap puts them
    # back among all T rows, :meth:`QKFix.tap`). GradDrop's passes start at or below the
    # last block's input, the one dropping the last layer from the gradient at its output
    # (0 off the metric positions, put back among all T rows). (With modified backward rules
    # or points given as tensors over every position, every block runs at every position.)
    last = g.n_layers - 1
    trim = rules.plain_gradient and not any(
        isinstance(alpha, Tensor) for alpha in (a for cs in moved.values() for a in cs.values()))
    where = positions.repeat(copies, 1)  # [C*N, P]
    if fix is not None and trim:
        fix.query_pos = where

    def pick(value: Tensor, at: Tensor) -> Tensor:
        """``value [..., B, T, d]`` at the positions ``at [B, P]`` -> ``[..., B, P, d]``."""
        lead = value.shape[:-3]
        index = at[:, :, None].expand(*lead, -1, -1, value.shape[-1])
        return value.expand(*lead, at.shape[0], t, value.shape[-1]).gather(-2, index)

    def place(target: Tensor, at: Tensor, value: Tensor) -> Tensor:
        """``target [..., B, T, d]`` zeroed, with ``value [..., B, P, d]`` written at the
        positions ``at [B, P]``."""
        index = at[:, :, None].expand(*value.shape)
        return target.zero_().scatter_(-2, index, value)

    def on_receiver(key: str, spread: bool = False) -> Any:
        """Hook on an MLP's or the logits' own input: its gradient is the receiver's (with
        ``spread``, at the metric positions only: put back in place, 0 elsewhere; repeated
        positions add)."""
        def hook(grad: Tensor) -> None:
            if spread:
                full = grad.new_zeros(grad.shape[0], t, grad.shape[-1])
                grad = full.scatter_add_(1, where[:, :, None].expand(*grad.shape), grad)
            grad = grad if post else fold(grad)
            buffer(key)[group_of[key][1]] = grad.reshape(brows, -1)
            arrive(key)
        return hook

    def on_qkv(layer: int) -> Any:
        """The backward of ``layer``'s q/k/v projections (see :class:`_ReceiverGradients`):
        each head's receiver gradient from its projection's gradient, then their sum, the
        residual's gradient through the projections."""
        key = f"qkv{layer}"

        def backward(x: Tensor, grads: tuple[Tensor, Tensor, Tensor],
                     outputs: tuple[Tensor, Tensor, Tensor]) -> Tensor:
            norm = norms.get(layer) or lay.norm_parts(layer, x)
            if drop_each_layer:  # the same input in every backward pass
                norms[layer] = norm
            row = group_of[key][1]
            rows = buffer(key)[row: row + n_qkv - skip]  # summed over the copies where folded
            dx = lay.qkv_input_grads(layer, norm, grads, out=rows, outputs=outputs,
                                     copies=copies if folded else 1, skip=skip, memo=memo)
            arrive(key)
            return dx.view(x.shape).to(x.dtype)
        return backward

    x = lay.embed(tokens).detach()  # the weights need no gradient
    if diff is None:
        torch.sub(ablated[0], x, out=delta[0])
    if copies > 1:
        x = x.repeat(copies, 1, 1)
    x = interpolate(x, "input", diff[0] if diff is not None else x)
    x = x.detach().requires_grad_(True)
    layer_in: list[Tensor] = []  # each layer's input (GradDrop's passes start there)
    seeds: dict[int, Tensor] = {}  # the plain gradient at each layer's input (and at L: output)

    def seed(layer: int) -> Any:
        def hook(grad: Tensor) -> None:
            if below is None:
                if grad.shape[1] != t:  # the trimmed last block's output [N, P, d]
                    full = grad.new_zeros(grad.shape[0], t, grad.shape[-1])
                    grad = full.scatter_add_(1, where[:, :, None].expand(*grad.shape), grad)
                seeds[layer] = grad
        return hook

    for layer in range(g.n_layers):
        if drop_each_layer:
            layer_in.append(x)
            if layer > 1:
                x.register_hook(seed(layer))
        if fix is not None:
            fix.block_input(layer, x)
        if f"a{layer}" in blocked:  # no gradient reaches this layer's q/k/v receivers
            q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
        else:
            q, k, v = _ReceiverGradients.apply(x, layer, lay, on_qkv(layer))
        if fix is not None:  # the clean q/k projections, which the QK fix starts from
            fix.projections(layer, q, k)
        tail = trim and layer == last
        z = lay.attend(layer, q, k, v, query_pos=where if tail else None)  # [C*N, T|P, H, dh]
        h0 = g.head_start[layer]
        heads = delta[h0: h0 + g.n_heads]  # [H, N, T, d]
        if diff is None:  # a_h, their sum, then a'_h - a_h (in place unless over ablated)
            own = (heads.new_empty(g.n_heads, n, positions.shape[1], d) if tail
                   else runner.scratch("eap heads", heads.shape, heads) if overwrite
                   else heads)
            lay.head_outputs(layer, z.detach(), out=own)
            pre = _SummedHeads.apply(z, own, layer, lay)
            abl = ablated[h0: h0 + g.n_heads]
            torch.sub(pick(abl, positions) if tail else abl, own,
                      out=own if tail else heads)
            own = own if tail else heads
        else:
            pre = Architecture.attn_out(lay, layer, z)
            own = pick(heads, positions) if tail else heads
        if f"a{layer}" in moved:
            assert diff is not None  # moved nodes come with their differences
            change = diff[h0: h0 + g.n_heads].sum(0)
            pre = interpolate(pre, f"a{layer}", pick(change, positions) if tail else change)
        if post:  # the heads' (interpolated) pre-norm sum, then the norm
            s_l = pre.detach().reshape(-1, d)  # [C*N*(T|P), d]
            d_heads = own.reshape(g.n_heads, -1, d)
            if copies == 1:
                own.copy_(lay.post_norm_jvp(layer, s_l, d_heads).view(own.shape))
            else:
                jd = lay.post_norm_jvp(layer, s_l, d_heads)  # [H, C*N*(T|P), d]
                if not pushed:
                    pushed.append(jd.new_empty(g.n_layers * g.n_heads, copies * n * t * d))
                rows = pushed[0][layer * g.n_heads: (layer + 1) * g.n_heads]
                if tail:  # per copy, in place among T positions
                    place(rows.view(g.n_heads, copies * n, t, d), where,
                          jd.view(g.n_heads, copies * n, -1, d))
                else:
                    rows.copy_(jd.reshape(g.n_heads, -1))
                n_pushed[0] = layer + 1
            attn = lay.post_norm(layer, pre)
        else:
            attn = pre
        if tail and (diff is None or (post and copies == 1)):
            place(heads, positions, own)
        x_in = pick(x, where) if tail else x
        x = x_in + rules.through(layer, attn)
        # the MLP's own input (the block's input in parallel blocks): its gradient is the
        # MLP receiver's
        branch = (x_in if lay.parallel else x) + 0
        r_mlp, u = g.mlp_receiver[layer], g.mlp_index[layer]
        assert r_mlp is not None and u is not None  # the block runner has no attention-only graphs
        if f"m{layer}" not in blocked:
            branch.register_hook(on_receiver(f"m{layer}", spread=tail))
        m = lay.mlp(layer, lay.ln_mlp(layer, branch))
        if diff is None and tail:
            place(delta[u], positions, pick(ablated[u], positions) - m.detach())
        elif diff is None:
            torch.sub(ablated[u], m.detach(), out=delta[u])
        if f"m{layer}" in moved:
            assert diff is not None  # moved nodes come with their differences
            change = pick(diff[u], positions) if tail else diff[u]
        else:
            change = m
        x = x + rules.through(layer, interpolate(m, f"m{layer}", change))
    if drop_each_layer and g.n_layers > 1:
        x.register_hook(seed(g.n_layers))
    branch = x + 0  # [C*N, P, d] (trimmed) or [C*N, T, d]
    branch.register_hook(on_receiver("logits", spread=trim))
    if drop_each_layer:  # the differences are complete: once example-major for every pass
        per_example = delta.reshape(g.n_senders, n, -1).transpose(0, 1)
    metric(lay.final(branch if trim else pick(branch, where))).backward(
        retain_graph=drop_each_layer and g.n_layers > 1)

    def check() -> None:
        """Raise if a receiver got no gradient in this pass; zero its pairs that are no edge."""
        missing = [g.receivers[part[1]].name for part in parts
                   if active(part) and part[0] not in fired]
        if missing:
            raise HookError(f"Receivers {missing} received no gradient in the attribution "
                            "pass; their edges' scores would silently be 0.")
        scores.mul_(edges)
    check()
    passes: dict[int | None, Tensor] = {None: scores}
    for below in range(1, g.n_layers if drop_each_layer else 0):  # GradDrop's passes
        scores = torch.zeros_like(passes[None])
        pending = [{p[0] for p in grp if active(p)} for grp in groups]
        fired, buffers = set(), {}
        if fix is not None:
            fix.current = below
        torch.autograd.backward(layer_in[below], seeds[below + 1],
                                retain_graph=below < g.n_layers - 1)
        check()
        passes[below] = scores
    if fix is not None:
        fix.rescore(passes, delta)
    if not drop_each_layer:
        return passes[None]
    per_layer = passes[None].expand(g.n_layers, -1, -1).clone()  # [L, S, R]
    receiver_layer = runner.receiver_layer.to(per_layer.device)
    for layer in range(g.n_layers):
        per_layer[layer][:, receiver_layer == layer] = 0
        if layer:
            lower = receiver_layer < layer
            per_layer[layer][:, lower] = passes[layer][:, lower]
    return per_layer
