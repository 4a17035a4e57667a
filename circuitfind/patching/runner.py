"""Run a model's blocks ``start..stop`` ourselves, with masked receivers, from a cached residual.

Why. Corrupting an edge into a receiver of layer ``L`` changes nothing before layer ``L``, so a
masked pass may start at ``L`` from the clean run's residual stream. transformer-lens 4.3's
``forward(start_at_layer=L)`` still runs blocks ``0..L-1``, and the bridge's own forward with
split q/k/v inputs costs 1.8-2.7 plain Hugging Face forwards; this module therefore runs the
wrapped Hugging Face model's blocks itself with plain tensor functions over the weights of its
modules, read in place through the bridge's ``original_component`` wrappers (nothing is copied,
so a model changed in place stays in sync; the wrappers' own forwards would add their
overhead), plus the model's own rotary module. It installs no hooks.

Method. Equation (1) of :mod:`circuitfind.patching.engine`: the input of receiver ``r`` is

    x_r = x(current run) - sum_u removed[u, r] * (a_u(current run) - a'_u)
                         - sum_u frozen[u, r]  * (a_u(current run) - a_u(clean run))

with ``a'`` the ablation value of each sender (the corrupted run for resample ablation, zeros,
means ...). Per layer the shared path is the plain forward (one norm, one q/k/v projection for
all heads); only receivers that some mask touches are recomputed, for the masks that touch them,
and written into the shared q/k/v tensors before attention (so the cost of patching one
receiver is one ``[d_model, d_head]`` projection of its rows, not a per-head copy of the
residual stream). In *dense* layers, where the masks touch at least half of the (mask, q/k/v
receiver) pairs (random and faithfulness-curve circuits), every receiver's input is built at
once: one batched matmul of the coefficients ``[1; -removed]`` with a buffer holding the
residual stream, the static senders' differences and the per-mask senders' values, then one
norm and one batched projection per kind. Senders before ``start`` are clean by construction, so
their differences are shared by all K masks; senders at or after ``start`` are recomputed per
mask. What a pass skips: blocks before ``start`` (cached clean residuals), positions after the
last metric position (causal model), everything but the metric positions' queries, attention
output and MLP in the last block, and, at the start layer, every head a mask does not touch
(its output is the cached clean one).

Kept form. Since the residual stream is the sum of its upstream senders' outputs (plus biases),
eq. (1) also reads ``x_r = x'_L + sum_u kept[u, r] (a_u(current run) - a'_u)``, with ``x'_L``
the residual of the run in which every edge is ablated (:meth:`BlockRunner.ablated_residuals`).
When the masks keep fewer edges after the start layer than they remove (ACDC's circuits, small
top-n circuits), a pass uses that form: only senders a kept edge leaves are computed, nodes
nothing reaches are skipped, and receivers equal in every mask are computed once for all K.
Those mask-invariant nodes' outputs are also kept until the next pass, keyed by the content of
their inputs (weights and the senders' own keys), so consecutive passes over a circuit that
changed in one place (ACDC) recompute only what the change reaches.

Cost. A pass over K masks and N examples costs ``K N`` rows through blocks ``start..`` (the last
one at the metric positions only) plus, per layer, one matmul of the touched (mask, receiver)
pairs' weights with the shared buffer and one batched matmul with the per-mask buffer (in a
dense layer, one batched matmul with the combined buffer). A dense layer writes, normalises
and projects one residual-sized stream per receiver, which costs more than a whole plain block
on a CPU: a dense masked forward costs 1.6-3.3 plain forwards (``benchmarks/results``).

A per-head output ``a_{L.h} = z_h W_O[h]`` excludes the attention output bias (as in
transformer-lens' ``hook_result`` of ``HookedTransformer``); the bias is a constant of the
residual stream, not part of any head. Differences ``a - a'`` do not depend on this choice;
zero ablation does.

Supported layouts (checked against the bridge and plain Hugging Face in the tests, to 1e-5 in
float32): ``GPT2LMHeadModel`` (LayerNorm, learned positions, biases) and ``LlamaForCausalLM``
(RMSNorm, rotary embeddings, gated MLP, grouped-query attention). Any other architecture gets
``None`` from :func:`block_runner` (the engine then falls back to the bridge's full forward
with hooks and warns once). Prompts are right-padded (see :mod:`circuitfind.tasks.base`): in a
causal model padding after the real tokens cannot change the logits at real positions, so no
attention mask is used.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError, HookError
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.patching.architectures import Architecture, architecture_for, supported, unwrap


@dataclass(frozen=True)
class RunCache:
    """Activations of one unpatched run, to start masked passes from any layer.

    Attributes:
        resid: ``[n_layers + 1, N, T, d_model]``; ``resid[L]`` is the residual stream entering
            block ``L`` (``resid[n_layers]`` enters the final norm).
        senders: ``[S, N, T, d_model]`` every sender's output (``input`` = embeddings).
        mid: ``[n_layers, N, T, d_model]``; ``mid[L]`` is the residual stream after block
            ``L``'s attention (the MLP's input).
    """

    resid: Tensor
    senders: Tensor
    mid: Tensor

    def subset(self, es: slice) -> RunCache:
        """The cache of examples ``es``."""
        return RunCache(self.resid[:, es], self.senders[:, es], self.mid[:, es])


class _Form:
    """Weights of one form of eq. (1) for a pass: over the senders before the start layer
    (``w_shared [K, A, R]`` with their ``shared [A, X]`` clean - ablated values) and the
    senders computed in the pass (``w_dyn [K, J, R]``), and which receivers they touch
    (``touched [K, R]``, on the CPU)."""

    def __init__(self, w_shared: Tensor | None, w_dyn: Tensor, shared: Tensor | None,
                 touched: Tensor) -> None:
        self.w_shared = None if shared is None else w_shared
        self.w_dyn, self.shared, self.touched = w_dyn, shared, touched
        self.touched_any = touched.any(0).tolist()
        self.k = int(w_dyn.shape[0])  # masks

    def first_mask(self) -> _Form:
        """The same form for the first mask only (receivers equal in every mask)."""
        return _Form(None if self.w_shared is None else self.w_shared[:1], self.w_dyn[:1],
                     self.shared, self.touched[:1])


def block_runner(model: Any, graph: ComputeGraph) -> BlockRunner | None:
    """The :class:`BlockRunner` for ``model``, or ``None`` (with a warning) if its layout is unknown.

    Args:
        model: A ``TransformerBridge`` (its ``original_model`` is run) or a Hugging Face causal LM.
        graph: The model's graph.

    Returns:
        A runner, or ``None`` when the architecture (or a graph feature such as parallel
        attention/MLP) is not one the runner implements; callers then use the bridge's forward.
    """
    hf = unwrap(getattr(model, "original_model", model))
    name = type(hf).__name__
    arch = architecture_for(name)
    if arch is None or graph.parallel_attn_mlp or graph.attn_only:
        warnings.warn(f"circuitfind's block runner does not implement {name} "
                      f"(known: {', '.join(supported())}); masked passes fall back to the "
                      "bridge's full forward with hooks (correct, but slower and unable to start "
                      "at a later layer).", RuntimeWarning, stacklevel=2)
        return None
    return BlockRunner(arch(hf, graph.n_heads, graph.n_kv_heads), graph)


class BlockRunner:
    """Masked forward passes over a Hugging Face model's blocks, from any start layer.

    Args:
        arch: The model family's adapter (built by :func:`block_runner`).
        graph: The model's graph (sender and receiver indexing).
    """

    def __init__(self, arch: Architecture, graph: ComputeGraph) -> None:
        self.arch = arch
        self.graph = graph
        self._receiver_layer = torch.tensor([r.layer for r in graph.receivers])
        # kept form: outputs of mask-invariant nodes from the last pass, by the content of
        # their inputs (see ``run``), and the data they belong to
        self._memo: dict[Any, Tensor] = {}
        self._memo_data: tuple[Tensor, Any] | None = None
        self._ids: dict[Any, int] = {}  # flat keys -> ids (see ``run``)
        self._next_id = 0

    # ------------------------------------------------------------------ plain runs
    @torch.no_grad()
    def cache(self, tokens: Tensor) -> RunCache:
        """Run the unpatched model and keep what a masked pass starting at any layer needs.

        Args:
            tokens: ``[N, T]`` int64 token ids (right-padded).

        Returns:
            The :class:`RunCache` of this run.
        """
        g, lay = self.graph, self.arch
        x = lay.embed(tokens)
        n, t, d = x.shape
        resid = x.new_empty(g.n_layers + 1, n, t, d)
        mid = x.new_empty(g.n_layers, n, t, d)
        senders = x.new_empty(g.n_senders, n, t, d)
        senders[0] = x
        all_heads = torch.arange(g.n_heads, device=x.device)
        for layer in range(g.n_layers):
            resid[layer] = x
            q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
            z = lay.attend(layer, q, k, v)
            h0 = g.head_start[layer]
            res = lay.head_results(layer, z, all_heads)  # [N, T, H, d]
            senders[h0: h0 + g.n_heads] = res.permute(2, 0, 1, 3)
            x = x + lay.attn_from_heads(layer, res, 2)
            mid[layer] = x
            m = lay.mlp(layer, lay.ln_mlp(layer, x))
            senders[g.mlp_index[layer]] = m
            x = x + m
        resid[g.n_layers] = x
        return RunCache(resid, senders, mid)

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        """Plain forward: ``[N, T]`` token ids -> ``[N, T, V]`` logits (for checks)."""
        return self.arch.final(self.cache(tokens).resid[-1])

    def ablated_residuals(self, ablated: Tensor, n: int, t: int) -> tuple[Tensor, Tensor]:
        """Residual streams of the run in which every edge carries its ablated value.

        The residual stream entering a block is the embedding (sender ``input``) plus every
        earlier head's and MLP's output plus the attention output biases, so the fully ablated
        run's is ``x'_L = sum_{u upstream of L} a'_u + sum_{l < L} b_O[l]``: summed directly
        (not as ``resid - sum (a - a')``, whose cancellation leaves rounding noise that a
        norm would amplify where the exact value is 0, e.g. zero ablation without biases). For
        resample ablation this is the corrupted run's residual stream.

        Args:
            ablated: ``[S, N|1, T|1, d]`` ablated sender values.
            n, t: Examples and positions of the result.

        Returns:
            ``(pre [L+1, n, t, d], mid [L, n, t, d])``: entering each block (and the final
            norm), and after each block's attention (the MLP input).
        """
        g, lay = self.graph, self.arch
        d = ablated.shape[-1]
        pre = ablated.new_empty(g.n_layers + 1, n, t, d)
        mid = ablated.new_empty(g.n_layers, n, t, d)
        acc = ablated.new_zeros(n, t, d)
        done = 0
        for layer in range(g.n_layers):
            acc += ablated[done: g.head_start[layer]].sum(0)
            done = g.head_start[layer]
            pre[layer] = acc
            end = g.mlp_index[layer]
            acc += ablated[done: end].sum(0)
            _, bias = lay.w_out(layer)
            if bias is not None:
                acc += bias
            done = end
            mid[layer] = acc
        acc += ablated[done:].sum(0)
        pre[g.n_layers] = acc
        return pre, mid

    def attribute(self, tokens: Tensor, ablated: Tensor, positions: Tensor, metric: Any,
                  points: list[tuple[str, float]] | None = None,
                  diff: Tensor | None = None) -> Tensor:
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
        and are held constant (no gradient flows back through them). Each receiver's gradient
        is recovered per copy (the norm's Jacobian differs between copies), summed over the
        copies and contracted with ``diff``, the sender differences of the plain clean and
        corrupted runs.

        Args:
            tokens: ``[N, T]`` clean token ids.
            ablated: ``[S, N|1, T|1, d]`` ablated sender outputs ``a'_u``.
            positions: ``[N, P]`` metric positions.
            metric: ``logits [C*N, P, V] -> scalar`` to differentiate (``C = 1`` without
                points).
            points: ``(node group, alpha)`` of each stacked run, or ``None`` (EAP).
            diff: ``[S, N, T, d]`` clean minus ablated sender outputs; required with
                ``points`` (unused without).

        Returns:
            ``[S, R]`` float64 scores (0 off real edges), in the metric's unit.

        Raises:
            HookError: a receiver group's gradient did not arrive (its scores would be 0).

        References:
            Syed, Rager & Conmy (2023), "Attribution Patching Outperforms Automated Circuit
            Discovery", eq. 2.
        """
        g, lay = self.graph, self.arch
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
        moved: dict[str, dict[int, float]] = {}
        for c, (node, alpha) in enumerate(points or []):
            moved.setdefault(node, {})[c] = float(alpha)
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
            parts = [rows[c].detach() - (1 - moved[node][c]) * change if c in moved[node]
                     else rows[c] for c in range(copies)]
            return torch.cat(parts) if copies > 1 else parts[0]

        def contract(r0: int, n_up: int, grad: Tensor) -> None:
            """``scores[:n_up, r0:r0+h] += delta . grad`` for ``grad [h, N*T, d]``."""
            h = grad.shape[0]
            scores[:n_up, r0: r0 + h] += (flat[:n_up] @ grad.reshape(h, -1).T.to(flat)).double()

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
            if layer == 0 or g.mlp_receiver[layer - 1] is None:
                return False
            r, u = g.mlp_receiver[layer - 1], g.mlp_index[layer - 1]
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
                grad = fold(grad)
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
                    grads[layer] = (xh.new_empty(lead + g.n_heads + 2 * g.n_kv_heads, n * t,
                                                 xh.shape[-1]), [])  # summed over copies
                buf, arrived = grads[layer]
                s0 = lead + offset[kind]
                if copies == 1:
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
            q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
            for kind, t_, r0 in (("q", q, g.q_start[layer]), ("k", k, g.k_start[layer]),
                                 ("v", v, g.v_start[layer])):
                t_.register_hook(on_projection(layer, kind, r0, x))
            z = lay.attend(layer, q, k, v)
            h0 = g.head_start[layer]
            if diff is None:
                lay.head_deltas(layer, z.detach(), ablated[h0: h0 + g.n_heads],
                                out=delta[h0: h0 + g.n_heads])
            attn = lay.attn_out(layer, z)
            if f"a{layer}" in moved:
                attn = interpolate(attn, f"a{layer}", diff[h0: h0 + g.n_heads].sum(0))
            x = x + attn
            branch = x + 0  # the MLP's own input: its gradient is the MLP receiver's
            u = g.mlp_index[layer]
            if f"m{layer}" not in blocked:
                branch.register_hook(on_receiver(g.mlp_receiver[layer], u, layer))
            m = lay.mlp(layer, lay.ln_mlp(layer, branch))
            if diff is None:
                torch.sub(ablated[u], m.detach(), out=delta[u])
            x = x + interpolate(m, f"m{layer}", diff[u] if f"m{layer}" in moved else m)
        branch = x + 0
        branch.register_hook(on_receiver(g.n_receivers - 1, g.n_senders))
        idx = positions.repeat(copies, 1)[:, :, None].expand(-1, -1, branch.shape[-1])
        metric(lay.final(branch.gather(1, idx))).backward()
        groups = [r0 for layer in range(g.n_layers) for r0 in (
            [] if f"a{layer}" in blocked else [g.q_start[layer], g.k_start[layer],
                                               g.v_start[layer]])
            + ([] if f"m{layer}" in blocked else [g.mlp_receiver[layer]])]
        missing = [g.receivers[r].name for r in groups + [g.n_receivers - 1] if r not in fired]
        if missing:
            raise HookError(f"Receivers {missing} received no gradient in the attribution pass; "
                            "their edges' scores would silently be 0.")
        return scores

    def start_layer(self, touched: Tensor) -> int:
        """First layer any of the ``touched [R]`` (bool) receivers belongs to (``n_layers`` if none
        but the logits; ``n_layers + 1`` if none at all)."""
        layers = self._receiver_layer[touched.cpu()]
        return int(layers.min()) if len(layers) else self.graph.n_layers + 1

    # ------------------------------------------------------------------ masked runs
    @torch.no_grad()
    def run(self, cache: RunCache, ablated: Tensor, removed: Tensor, positions: Tensor,
            start: int | None = None, frozen: Tensor | None = None,
            diff: Tensor | None = None,
            abl_resid: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Logits at ``positions`` of K masked runs, starting at layer ``start``.

        Args:
            cache: The clean run's :class:`RunCache` for these N examples.
            ablated: ``[S, N, T, d]`` (or broadcastable in N/T) value each sender's edges carry
                when removed (the corrupted run for resample ablation).
            removed: ``[K, S, R]`` weights ``1 - M`` (0 = edge kept, 1 = removed; fractional
                values interpolate). Must be 0 off real edges.
            positions: ``[N, P]`` metric positions.
            start: First block to run (default: the first layer with a touched receiver). Every
                receiver before it must be untouched.
            frozen: Optional ``[K, S, R]`` weights of kept edges frozen to their clean values
                (path patching), same rules as ``removed``.
            diff: Optional ``[S, N, T, d]`` ``cache.senders - ablated``, when the caller keeps
                it across passes (computed here otherwise).
            abl_resid: Optional :meth:`ablated_residuals` of ``ablated``, likewise.

        Returns:
            ``[K, N, P, V]`` logits.

        Raises:
            ConfigError: ``start`` out of range, or a mask touches a receiver before ``start``.
        """
        g, lay = self.graph, self.arch
        k_masks = removed.shape[0]
        weights = removed if frozen is None else torch.cat([removed, frozen], 1)  # [K, S or 2S, R]
        touched_r = weights.ne(0).any(1)  # [K, R]
        first = self.start_layer(touched_r.any(0))
        if start is None:
            start = min(first, g.n_layers)
        if not 0 <= start <= g.n_layers:
            raise ConfigError(f"The start layer must lie in [0, {g.n_layers}] for this "
                              f"{g.n_layers}-layer model; got {start}.")
        if first < start:
            raise ConfigError(f"A mask removes or freezes an edge into a receiver of layer "
                              f"{first}, before the start layer {start}; start at layer "
                              f"{first} or earlier (or leave start unset).")
        n, t, d = cache.resid.shape[1:]
        dev, dtype = cache.resid.device, cache.resid.dtype
        active = weights.ne(0).any(2).any(0)  # senders with a removed/frozen edge
        if frozen is not None:
            active = active[: g.n_senders] | active[g.n_senders:]
        n_static = g.head_start[start] if start < g.n_layers else g.n_senders
        static = active[:n_static].nonzero()[:, 0].tolist()
        # Kept form: after the start layer, a receiver's input is the ablated run's residual
        # plus its kept edges' differences, x_r = x'_L + sum_u kept[u, r] (a_u - a'_u), which
        # equals eq. (1); used when the masks keep fewer edges there than they remove (sparse
        # circuits: ACDC, small faithfulness-curve sizes). Senders then only need computing
        # if a kept edge leaves them (or a removed edge into a start-layer receiver).
        kept_w = None
        if frozen is None and start < g.n_layers:
            # receivers after the start layer's q/k/v inputs (those read the clean residual)
            later = (self._receiver_layer > start).to(dev)
            later[g.mlp_receiver[start]] = True
            kept_all = g.edge_mask.to(removed) - removed  # [K, S, R]
            if int(kept_all[:, :, later].ne(0).sum()) < int(removed[:, :, later].ne(0).sum()):
                kept_w = kept_all
                needed = (kept_all[:, :, later].ne(0).any(2).any(0)
                          | removed[:, :, ~later].ne(0).any(2).any(0))
                dynamic = (needed[n_static:].nonzero()[:, 0] + n_static).tolist()
        if kept_w is None:
            dynamic = (active[n_static:].nonzero()[:, 0] + n_static).tolist()
            self._memo = {}  # kept-form outputs are only reused by kept-form passes
        # Shared-over-masks buffer: static senders' clean - ablated values (and, for frozen
        # edges, dynamic senders' ablated - clean values). Dynamic senders' per-mask buffer
        # ``current`` holds a_u(current run) - a'_u, so that eq. (1) for a dynamic sender is
        # (removed + frozen) * current + frozen * (a' - clean).
        if diff is None:
            diff = cache.senders - ablated  # [S, n, T, d]
        if frozen is None:
            # every sender before ``start`` (a view; inactive ones have zero weights)
            shared = diff[:n_static].reshape(n_static, -1) if static else None
            w_shared = removed[:, :n_static] if static else None  # [K, A, R]
        else:
            parts = [diff[static]] if static else []
            cols = [removed[:, static]] if static else []
            if dynamic:
                parts.append(-diff[dynamic])
                cols.append(frozen[:, dynamic])
            shared = torch.cat(parts).reshape(-1, n * t * d) if parts else None
            w_shared = torch.cat(cols, 1) if cols else None  # [K, A, R]
        w_dyn = removed[:, dynamic] if frozen is None else removed[:, dynamic] + frozen[:, dynamic]
        dyn_slot = {u: i for i, u in enumerate(dynamic)}
        touched_cpu = touched_r.cpu()
        qkv_of = [list(range(g.q_start[layer], g.v_start[layer] + g.n_kv_heads))
                  for layer in range(g.n_layers)]
        # Dense layers (the masks touch at least half of the (mask, q/k/v receiver) pairs:
        # random and curve circuits): one buffer ``buf [K, 1 + A + J, n*T*d]`` holds the
        # residual stream, the shared rows of eq. (1) (the active static senders' clean -
        # ablated values, and for frozen edges the dynamic senders' ablated - clean values)
        # and the dynamic senders' ``current`` values, so that all of a layer's receiver inputs
        # (x itself where a mask touches none) are one batched matmul with the coefficients
        # ``coef [K, 1 + A + J, R] = [1; -w_shared; -w_dyn]``.
        dense_layers = ({layer for layer in range(start, g.n_layers)
                         if 2 * int(touched_cpu[:, qkv_of[layer]].sum())
                         >= touched_cpu[:, qkv_of[layer]].numel()}
                        if kept_w is None else set())
        buf = coef = None
        n_pre = 0  # rows of ``buf`` before the dynamic senders
        if dense_layers:
            # without frozen edges ``shared`` is a view of every static sender: copy the
            # active ones only
            rows, w_rows = ((diff[static].reshape(len(static), n * t * d), removed[:, static])
                            if frozen is None else (shared, w_shared))
            n_pre = 1 + (0 if rows is None else rows.shape[0])
            buf = torch.empty(k_masks, n_pre + len(dynamic), n * t * d, device=dev, dtype=dtype)
            if rows is not None:
                buf[:, 1:n_pre] = rows
            coef = torch.cat([removed.new_ones(k_masks, 1, g.n_receivers)]
                             + ([] if w_rows is None else [-w_rows]) + [-w_dyn], 1)
            current = buf[:, n_pre:]
        else:
            # uninitialised: in the last block only the metric positions are written, and
            # every position of the output depends only on the same position of the buffer
            current = (torch.empty(k_masks, len(dynamic), n * t * d, device=dev, dtype=dtype)
                       if dynamic else None)
        dyn_cpu = torch.tensor(dynamic, dtype=torch.long)

        def dense_inputs(rs: list[int], x: Tensor) -> Tensor:
            """Inputs ``[K, R', n*T*d]`` of receivers ``rs`` (of a dense layer, all their
            senders computed) from the residual stream ``x [K*n, T, d]`` (eq. (1))."""
            assert buf is not None and coef is not None
            buf[:, 0] = x.view(k_masks, -1)
            rows = n_pre + int((dyn_cpu < int(g.n_upstream[rs].max())).sum())
            w = coef[:, :rows][:, :, torch.tensor(rs, device=dev)].transpose(1, 2)
            return torch.bmm(w, buf[:, :rows])
        # the weights of eq. (1) (removed form) and, in kept form, of the kept edges
        forms = {"removed": _Form(w_shared, w_dyn, shared, touched_cpu)}
        if kept_w is not None:
            forms["kept"] = _Form(kept_w[:, :n_static] if n_static else None, kept_w[:, dynamic],
                                  diff[:n_static].reshape(n_static, -1) if n_static else None,
                                  kept_w.ne(0).any(1).cpu())

        def deltas(receivers: list[int], form: str = "removed"
                   ) -> list[tuple[int, Tensor | slice, Tensor]]:
            """``(r, masks touching r, patch [k_r, n, T, d])`` for the touched ``receivers``:
            ``sum_u w[u, r] (a_u - a'_u)`` with the weights of ``form``.

            One matmul over the shared buffer and one batched matmul over the per-mask
            buffer for all of them (each buffer is read once per layer, not once per receiver).
            """
            wf = forms[form]
            w_shared, w_dyn, shared, touched_cpu = wf.w_shared, wf.w_dyn, wf.shared, wf.touched
            k_masks = wf.k
            rs = [r for r in receivers if wf.touched_any[r]]
            if not rs:
                return []
            sub = touched_cpu[:, rs]  # [K, R']
            n_up = int(g.n_upstream[rs].max())
            j = int((dyn_cpu < n_up).sum())  # dynamic senders upstream of these receivers
            if bool(sub.all()):
                return dense_deltas(rs, j, wf)
            jj, kk = sub.T.nonzero(as_tuple=True)  # pairs grouped by receiver
            rr = torch.tensor(rs)[jj]
            kd, rd = kk.to(dev), rr.to(dev)
            out = None
            if w_shared is not None:
                weights = w_shared[kd, :, rd]  # [P, A]
                if k_masks > 1:
                    # Receivers whose weights are the same in every mask (e.g. the base circuit
                    # shared by ACDC's candidates) need one row, not K: matmul the distinct
                    # rows only and gather.
                    rows, index = torch.unique(weights, dim=0, return_inverse=True)
                    if rows.shape[0] < weights.shape[0]:
                        out = (rows @ shared)[index]
                if out is None:
                    out = weights @ shared  # [P, X]
            if j:
                term = torch.einsum("pa,pax->px", w_dyn[kd, :j, rd], current[kd, :j])
                out = term if out is None else out + term
            assert out is not None
            counts = torch.bincount(jj, minlength=len(rs)).tolist()
            result = []
            for r, ks_cpu, dlt in zip(rs, kk.split(counts), out.split(counts)):
                ks: Tensor | slice = slice(None) if len(ks_cpu) == k_masks else ks_cpu.to(dev)
                result.append((r, ks, dlt.view(-1, n, t, d)))
            return result

        def dense_deltas(rs: list[int], j: int, wf: _Form
                         ) -> list[tuple[int, Tensor | slice, Tensor]]:
            """:func:`deltas` when every mask touches every receiver in ``rs``: the patches as
            one ``[K, R', n*T*d]`` tensor, mask-major, no gathers."""
            w_shared, w_dyn, shared, k_masks = wf.w_shared, wf.w_dyn, wf.shared, wf.k
            cur = current[:k_masks] if current is not None else None
            idx = torch.tensor(rs, device=dev)
            out = None
            if w_shared is not None:
                weights = w_shared[:, :, idx]  # [K, A, R']
                if k_masks > 1 and bool((weights == weights[:1]).all()):
                    # the same weights in every mask (e.g. the base circuit ACDC's candidates
                    # share): one matmul, broadcast over the masks
                    out = (weights[0].T @ shared).unsqueeze(0)  # [1, R', X]
                else:
                    out = torch.matmul(weights.transpose(1, 2), shared)  # [K, R', X]
            if j:
                w = w_dyn[:, :j][:, :, idx].transpose(1, 2)  # [K, R', j]
                out = (torch.bmm(w, cur[:, :j]) if out is None
                       else torch.baddbmm(out.expand(k_masks, -1, -1), w, cur[:, :j]))
            assert out is not None
            out = out.expand(k_masks, -1, -1)
            return [(r, slice(None), out[:, i].view(k_masks, n, t, d)) for i, r in enumerate(rs)]

        pos = positions.to(dev)
        n_pos = pos.shape[1]
        row_pos = pos.repeat(k_masks, 1)  # [K*n, P]

        def at_positions(values: Tensor) -> Tensor:
            """``[k, n, T, d]`` -> ``[k, n, P, d]`` at the metric positions."""
            idx = pos[None, :, :, None].expand(values.shape[0], n, n_pos, values.shape[-1])
            return values.gather(2, idx)

        def put(slot: int, values: Tensor, at_pos: bool) -> None:
            """Write senders' current values ``[K, h, n, T, d]`` (or ``[K, h, n, P, d]`` at the
            metric positions when ``at_pos``: the last block) minus their ablation values into
            ``current`` from ``slot``."""
            h = values.shape[1]
            abl = ablated[dynamic[slot: slot + h]]  # [h, n|1, T|1, d]
            if not at_pos:
                dst = current[:, slot: slot + h].view(k_masks, h, n, t, d)
                if values.shape[0] > 1 and values.stride(0) == 0:  # equal in every mask
                    dst.copy_(values[:1] - abl)
                else:
                    torch.sub(values, abl, out=dst)
                return
            if abl.shape[2] > 1:
                abl = abl.expand(h, n, t, d).gather(2, pos[None, :, :, None].expand(h, n, n_pos, d))
            idx = pos[None, None, :, :, None].expand(k_masks, h, n, n_pos, d)
            current[:, slot: slot + h].view(k_masks, h, n, t, d).scatter_(3, idx, values - abl)

        def clean_minus_ablated(u: int) -> Tensor:
            """``a_u(clean) - a'_u`` flattened to ``[n*T*d]``."""
            return diff[u].reshape(-1)

        def sparse_attention(layer: int, patches: list[tuple[int, Tensor | slice, Tensor]]
                             ) -> Tensor | None:
            """Block ``layer``'s residual after attention ``[K*n, T, d]`` from the clean run plus,
            per mask, the change of only the heads whose q/k/v inputs it touches.

            Used at the start layer, where every other head's output is its clean value; returns
            ``None`` when most (mask, head) pairs are touched (the dense path is cheaper).
            """
            rep = g.n_heads // g.n_kv_heads
            affected = torch.zeros(k_masks, g.n_heads, dtype=torch.bool)
            rows: dict[int, Tensor] = {}  # receiver -> row of each mask in its patch, or -1
            for r, ks, _ in patches:
                rec = g.receivers[r]
                heads = [rec.head] if rec.kind == "q" else range(rec.head * rep, (rec.head + 1) * rep)
                sel = torch.zeros(k_masks, dtype=torch.bool)
                sel[ks if isinstance(ks, slice) else ks.cpu()] = True
                affected[:, list(heads)] |= sel[:, None]
                rows[r] = torch.full((k_masks,), -1, dtype=torch.long)
                rows[r][sel] = torch.arange(int(sel.sum()))
            if 2 * int(affected.sum()) > affected.numel():
                return None
            patch_of = {r: dlt for r, _, dlt in patches}
            base = cache.resid[layer]  # [n, T, d]
            clean_ln = lay.ln_attn(layer, base)
            x_mid = cache.mid[layer].unsqueeze(0).repeat(k_masks, 1, 1, 1)  # [K, n, T, d]
            h0 = g.head_start[layer]
            for head in affected.any(0).nonzero()[:, 0].tolist():
                ks_h = affected[:, head].nonzero()[:, 0]
                inputs = []
                for kind, r in (("q", g.q_start[layer] + head),
                                ("k", g.k_start[layer] + head // rep),
                                ("v", g.v_start[layer] + head // rep)):
                    idx = head if kind == "q" else head // rep
                    out = lay.project(layer, kind, idx, clean_ln).unsqueeze(0).repeat(
                        len(ks_h), 1, 1, 1)  # [k_h, n, T, dh]
                    if r in rows:
                        row = rows[r][ks_h]
                        sel = row >= 0
                        if sel.any():
                            xr = base - patch_of[r][row[sel].to(dev)]
                            out[sel.to(dev)] = lay.project(layer, kind, idx, lay.ln_attn(layer, xr))
                    inputs.append(out.reshape(len(ks_h) * n, t, 1, -1))
                z = lay.attend(layer, *inputs, grouped=False)  # [k_h*n, T, 1, dh]
                one = torch.tensor([head], device=dev)
                change = lay.head_results(layer, z, torch.zeros(1, dtype=torch.long, device=dev),
                                          heads=one)[:, :, 0].view(len(ks_h), n, t, d)
                change -= cache.senders[h0 + head]
                x_mid.index_add_(0, ks_h.to(dev), change)
                if h0 + head in dyn_slot:
                    slot = dyn_slot[h0 + head]
                    current[:, slot] = clean_minus_ablated(h0 + head)
                    current[ks_h.to(dev), slot] += change.reshape(len(ks_h), -1)
            for u in dynamic:  # untouched dynamic heads of this layer: clean values
                if h0 <= u < h0 + g.n_heads and not affected[:, u - h0].any():
                    current[:, dyn_slot[u]] = clean_minus_ablated(u)
            return x_mid.view(k_masks * n, t, d)

        def mlp_block(layer: int, x: Tensor, last: bool) -> Tensor:
            """The MLP of ``layer`` on the residual after attention ``x [K*n, T|P, d]``."""
            r = g.mlp_receiver[layer]
            if (layer in dense_layers and not last
                    and 2 * int(touched_cpu[:, r].sum()) >= k_masks):
                xm = dense_inputs([r], x).view_as(x)
            else:
                xm = x
                for _, ks, dlt in deltas([r]):
                    xm = x.clone()
                    xm.view(k_masks, n, -1, d)[ks] -= at_positions(dlt) if last else dlt
            m = lay.mlp(layer, lay.ln_mlp(layer, xm))
            u = g.mlp_index[layer]
            if u in dyn_slot:
                put(dyn_slot[u], m.view(k_masks, 1, n, -1, d), last)
            return x + m

        def kept_layers() -> Tensor:
            """Blocks ``start..`` and the logits in kept form: only senders in ``dynamic`` are
            computed; each receiver reads ``x'_L`` plus its kept edges, except the start layer's
            q/k/v inputs, which read the clean residual minus their removed edges (eq. (1); all
            their senders are cached). A receiver whose weights are equal in every mask and
            whose senders are all mask-invariant (cached, or computed once) is computed once
            and broadcast over the masks; only what depends on a mask's own edges runs K times
            (ACDC's candidates differ in one receiver)."""
            pre, mid = (abl_resid if abl_resid is not None
                        else self.ablated_residuals(ablated, n, t))
            rep = g.n_heads // g.n_kv_heads
            for name in list(forms):
                forms[name + "1"] = forms[name].first_mask()
            weights = {"removed": removed, "kept": kept_w}
            equal = {name: (w == w[:1]).all(0).all(0).cpu() for name, w in weights.items()}
            variant = torch.zeros(g.n_senders, dtype=torch.bool, device=dev)
            # Outputs of invariant nodes are kept across passes (ACDC tests one receiver after
            # another against a circuit that changes only there), keyed by the content of
            # their inputs: the receivers' weights and their senders' own keys, down to the
            # cached senders. ``memo`` holds this pass's entries and replaces the old memo.
            # the data: the engine's memoised ``diff`` (the base tensor of this slice, held
            # here so that its memory cannot be reused under the same address) and the slice
            owner = diff if diff._base is None else diff._base
            data_key = (diff.storage_offset(), tuple(diff.shape))
            if self._memo_data is None or self._memo_data[0] is not owner or (
                    self._memo_data[1] != data_key):
                self._memo, self._memo_data, self._ids = {}, (owner, data_key), {}
            keys: dict[int, Any] = {}
            memo: dict[Any, Tensor] = {}
            ids: dict[Any, int] = {}

            def intern(key: tuple[Any, ...]) -> int:
                """A small stable id for a flat key, so that keys nest by id, not by content
                (nested content would make hashing grow with depth)."""
                if key not in ids:
                    ids[key] = self._ids.get(key)
                    if ids[key] is None:
                        self._next_id += 1
                        ids[key] = self._next_id
                return ids[key]

            def invariant(rs: list[int], form: str) -> list[bool]:
                """Whether each receiver's input is the same in every mask."""
                reads = weights[form][0][:, rs].ne(0) & variant[:, None]
                return (equal[form][rs] & ~reads.any(0).cpu()).tolist()

            def heads_pass(layer: int, subset: list[int], form: str, base: Tensor,
                           sign: float, last: bool) -> bool:
                """Compute the heads ``subset`` of ``layer`` (into ``current``); True if they were
                computed per mask."""
                groups = sorted({hh // rep for hh in subset})
                want = {"q": subset, "k": groups, "v": groups}
                first = {"q": g.q_start[layer], "k": g.k_start[layer], "v": g.v_start[layer]}
                patches = deltas([first[kind] + i for kind in "qkv" for i in want[kind]], form)
                kk = forms[form].k if patches else 1
                base_in = lay.ln_attn(layer, base)  # [n, T, d]
                qkv = {kind: lay.project_some(layer, kind, base_in, want[kind])
                       .unsqueeze(0).repeat(kk, 1, 1, 1, 1) for kind in "qkv"}  # [kk,n,T,h,dh]
                for r, ks, dlt in patches:
                    kind = g.receivers[r].kind
                    i = r - first[kind]
                    qkv[kind][ks, :, :, want[kind].index(i)] = lay.project(
                        layer, kind, i, lay.ln_attn(layer, torch.add(base, dlt, alpha=sign)))
                per_head = [groups.index(hh // rep) for hh in subset]
                q = qkv["q"].view(kk * n, t, len(subset), -1)
                k = qkv["k"][:, :, :, per_head].reshape(kk * n, t, len(subset), -1)
                v = qkv["v"][:, :, :, per_head].reshape(kk * n, t, len(subset), -1)
                z = lay.attend(layer, q, k, v, grouped=False,
                               query_pos=pos.repeat(kk, 1) if last else None)
                res = lay.head_results(layer, z, torch.arange(len(subset), device=dev),
                                       heads=torch.tensor(subset, device=dev))
                return res.view(kk, n, -1, len(subset), d).permute(0, 3, 1, 2, 4)

            def put_heads(layer: int, subset: list[int], res: Tensor, last: bool) -> None:
                """Write heads ``subset``'s outputs ``[kk, h, n, T, d]`` (``[kk, h, n, P, d]``
                in the last block) into ``current``."""
                h0 = g.head_start[layer]
                for i, hh in enumerate(subset):
                    put(dyn_slot[h0 + hh], res[:, i: i + 1].expand(k_masks, -1, -1, -1, -1),
                        last)

            def input_key(r: int, form: str, layer: int) -> tuple[Any, ...]:
                """What an invariant receiver's input is made of: its weights (mask 0), the
                content keys of its computed senders, and how it is read (start layer or not)."""
                col = weights[form][0][:, r]
                nz = col.nonzero()[:, 0].tolist()
                return (r, layer == start, col.cpu().numpy().tobytes(),
                        tuple(keys[u] for u in nz if u >= n_static))

            for layer in range(start, g.n_layers):
                last = layer == g.n_layers - 1
                base = cache.resid[layer] if layer == start else pre[layer]
                form, sign = ("removed", -1.0) if layer == start else ("kept", 1.0)
                h0 = g.head_start[layer]
                heads = [u - h0 for u in dynamic if h0 <= u < h0 + g.n_heads]
                if heads:
                    q0, k0, v0 = g.q_start[layer], g.k_start[layer], g.v_start[layer]
                    rs = [q0 + hh for hh in heads] + [k0 + hh // rep for hh in heads] + [
                        v0 + hh // rep for hh in heads]
                    same = invariant(rs, form)
                    nh = len(heads)
                    once = [hh for i, hh in enumerate(heads)
                            if same[i] and same[nh + i] and same[2 * nh + i]]
                    per_mask = [hh for hh in heads if hh not in once]
                    if once:
                        key = intern(("heads", layer, tuple(once), tuple(
                            input_key(r, form, layer) for i, r in enumerate(rs)
                            if heads[i % nh] in once)))
                        res = self._memo.get(key)
                        if res is None:
                            res = heads_pass(layer, once, form + "1", base, sign, last)
                        memo[key] = res
                        put_heads(layer, once, res, last)
                        for i, hh in enumerate(once):
                            keys[h0 + hh] = (key, i)
                    if per_mask:
                        res = heads_pass(layer, per_mask, form, base, sign, last)
                        put_heads(layer, per_mask, res, last)
                        for hh in per_mask:
                            if res.shape[0] > 1:
                                variant[h0 + hh] = True
                            else:  # no patches: the receivers read the base alone
                                keys[h0 + hh] = ("base", layer, hh, layer == start)
                u = g.mlp_index[layer]
                if u in dyn_slot:
                    r = g.mlp_receiver[layer]
                    once_m = invariant([r], "kept")[0]
                    key = intern(("mlp", input_key(r, "kept", layer))) if once_m else None
                    m = self._memo.get(key) if once_m else None
                    if m is None:
                        mform = "kept1" if once_m else "kept"
                        patches = deltas([r], mform)
                        xm = mid[layer].unsqueeze(0)
                        if patches:
                            xm = xm.repeat(forms[mform].k, 1, 1, 1)
                            for _, ks, dlt in patches:
                                xm[ks] += dlt
                            variant[u] = forms[mform].k > 1
                        if last:
                            xm = at_positions(xm)
                        m = lay.mlp(layer, lay.ln_mlp(layer, xm))
                    if once_m:
                        memo[key] = m
                        keys[u] = key
                    put(dyn_slot[u], m.unsqueeze(1).expand(k_masks, -1, -1, -1, -1), last)
            self._memo, self._ids = memo, ids
            xf = at_positions(pre[g.n_layers].unsqueeze(0)).repeat(k_masks, 1, 1, 1)
            for _, ks, dlt in deltas([g.n_receivers - 1], "kept"):
                xf[ks] += at_positions(dlt)
            return lay.final(xf)

        x = cache.resid[start].unsqueeze(0).expand(k_masks, n, t, d).reshape(k_masks * n, t, d)
        if kept_w is not None:
            return kept_layers()
        for layer in range(start, g.n_layers):
            xk = x.view(k_masks, n, t, d)
            last = layer == g.n_layers - 1
            if layer in dense_layers:
                sizes = {"q": g.n_heads, "k": g.n_kv_heads, "v": g.n_kv_heads}
                # receiver-major inputs [K, R', n*T, d]: one norm, one batched projection
                # per kind
                n_r = len(qkv_of[layer])
                inputs = dense_inputs(qkv_of[layer], x).view(k_masks, n_r, n * t, d)
                projected = lay.project_heads_normed(layer, inputs)
                if projected is None:
                    normed, projected, s0 = lay.ln_attn(layer, inputs), [], 0
                    for kind in "qkv":
                        projected.append(lay.project_heads(
                            layer, kind, normed[:, s0: s0 + sizes[kind]]))
                        s0 += sizes[kind]
                qkv = {}
                for kind, out in zip("qkv", projected):
                    # attention layout [K*n, T, heads, dh] as a view of [K*n, heads, T, dh]
                    qkv[kind] = (out.view(k_masks, sizes[kind], n, t, -1).transpose(1, 2)
                                 .reshape(k_masks * n, sizes[kind], t, -1).transpose(1, 2))
                q, k, v = qkv["q"], qkv["k"], qkv["v"]
                # the last block: queries, head outputs and residual at the metric positions
                z = lay.attend(layer, q, k, v, query_pos=row_pos if last else None)
                h0 = g.head_start[layer]
                res = lay.head_results_all(layer, z, k_masks)  # [K, H, n*(T|P), d]
                heads = [u - h0 for u in dynamic if h0 <= u < h0 + g.n_heads]
                if heads:  # consecutive slots of ``current``
                    i0, nh = dyn_slot[h0 + heads[0]], len(heads)
                    values = (res if nh == g.n_heads else res[:, heads]).view(
                        k_masks, nh, n, -1, d)
                    if last:
                        put(i0, values, True)
                    else:
                        torch.sub(values, ablated[h0 + heads[0]: h0 + heads[-1] + 1]
                                  if nh == g.n_heads else ablated[[h0 + h for h in heads]],
                                  out=current[:, i0: i0 + nh].view(k_masks, nh, n, t, d))
                if last:
                    x = at_positions(x.view(k_masks, n, t, d)).view(k_masks * n, n_pos, d)
                x = x + lay.attn_from_heads(layer, res, 1).view(k_masks * n, -1, d)
                x = mlp_block(layer, x, last)
                continue
            patches = deltas(qkv_of[layer])
            if layer == start:
                x_mid = sparse_attention(layer, patches)
                if x_mid is not None:
                    x = x_mid
                    if last:
                        x = at_positions(x.view(k_masks, n, t, d)).view(k_masks * n, n_pos, d)
                    x = mlp_block(layer, x, last)
                    continue
            # the shared path: one norm and projection for all heads; the touched receivers
            # of each mask recomputed from their own inputs
            q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
            qkv = {"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous()}
            first = {"q": g.q_start[layer], "k": g.k_start[layer], "v": g.v_start[layer]}
            for r, ks, dlt in patches:
                kind = g.receivers[r].kind
                head = r - first[kind]
                out = lay.project(layer, kind, head, lay.ln_attn(layer, xk[ks] - dlt))
                target = qkv[kind]
                target.view(k_masks, n, t, *target.shape[2:])[ks, :, :, head] = out
            q, k, v = qkv["q"], qkv["k"], qkv["v"]
            # the last block only has to produce the metric positions: queries, attention
            # output, MLP and residual there only (keys and values still cover every position)
            z = lay.attend(layer, q, k, v, query_pos=row_pos if last else None)
            h0 = g.head_start[layer]
            heads = [u - h0 for u in dynamic if h0 <= u < h0 + g.n_heads]
            if heads:
                res = lay.head_results(layer, z, torch.tensor(heads, device=dev))  # [B,T|P,h,d]
                res = res.view(k_masks, n, -1, len(heads), d).permute(0, 3, 1, 2, 4)
                i0 = dyn_slot[h0 + heads[0]]
                put(i0, res, last)
            if last:
                x = at_positions(x.view(k_masks, n, t, d)).view(k_masks * n, n_pos, d)
            x = x + lay.attn_out(layer, z)
            x = mlp_block(layer, x, last)
        x = x.view(k_masks, n, -1, d)
        xf = x if start < g.n_layers else at_positions(x)  # [K, n, P, d]
        for _, ks, dlt in deltas([g.n_receivers - 1]):
            xf = xf.clone()
            xf[ks] -= at_positions(dlt)
        return lay.final(xf)
