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
from circuitfind.patching.masked_pass import KeptFormMemo, MaskedPass


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


def block_runner(model: Any, graph: ComputeGraph) -> BlockRunner | None:
    """The :class:`BlockRunner` for ``model``, or ``None`` (with a warning) for unknown families.

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
        self.receiver_layer = torch.tensor([r.layer for r in graph.receivers])
        self.memo = KeptFormMemo()  # kept-form outputs from the last pass (see MaskedPass)

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
        layers = self.receiver_layer[touched.cpu()]
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
        return MaskedPass(self, cache, ablated, removed, positions, start, frozen, diff,
                          abl_resid).logits()
