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
output and MLP in the last block, with sliding windows every position outside the metric's
dependency cone (a layer's queries from where the next layer's keys start, its keys from
``window - 1`` before: ``MaskedPass.removed_spans``, per node in the kept form), and, at the
start layer, every head a mask does not touch (its output is the cached clean one).

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

Parallel blocks. Where attention and MLP read the same residual (GPT-NeoX/Pythia with
``use_parallel_residual``, :attr:`Architecture.parallel`), a block computes
``x + attn(ln1(x)) + mlp(ln2(x))``: the MLP receiver of layer ``L`` reads the block's input, so
the graph has no edge from layer ``L``'s heads into ``m{L}`` (``parallel_attn_mlp``) and eq. (1)
for that receiver runs over the senders before layer ``L`` only. Every place that builds an MLP
input follows the flag: :meth:`BlockRunner.cache` (``mid`` is still the residual after
attention, which the sparse start layer continues from; the MLP reads ``resid[L]``),
:meth:`BlockRunner.ablated_residuals` (the fully ablated run's MLP input excludes layer ``L``'s
heads and attention bias), every masked strategy (``MaskedPass.mlp_block`` is handed the
block's input), and EAP, which takes the MLP receiver's gradient on the block's input (its
merged contraction with the next layer's q/k/v then does not apply). Sequential blocks take
the same code with no extra work (tests/integration/test_parallel_blocks.py pins both wirings
to plain Hugging Face hooks).

A per-head output ``a_{L.h} = z_h W_O[h]`` excludes the attention output bias (as in
transformer-lens' ``hook_result`` of ``HookedTransformer``); the bias is a constant of the
residual stream, not part of any head. Differences ``a - a'`` do not depend on this choice;
zero ablation does.

Devices. A model split across devices (the bridge's ``device_map`` / ``n_devices``) runs each
block's primitives on that block's device and keeps the buffers on the home device
(:mod:`circuitfind.patching.placement`); on one device nothing changes.

Where the code lives. Each model family's weights and the few functions that differ (norms,
positions, attention extras) are an adapter in :mod:`circuitfind.patching.architectures`
(registered by Hugging Face class; checked against plain Hugging Face in the tests); this
module runs plain passes and caches (:class:`BlockRunner`); one masked pass, with its
strategies and the kept-form memo, is :class:`circuitfind.patching.masked_pass.MaskedPass`
(families whose attention output passes a norm after the heads' sum, Gemma-2, take
:class:`circuitfind.patching.post_norm_pass.PostNormPass` instead: eq. (1) does not hold there);
gradient attribution is :mod:`circuitfind.patching.attribution`. A model whose class has no
adapter gets ``None`` from :func:`block_runner` (the engine then falls back to the bridge's
full forward with hooks and warns once). Prompts are right-padded (see :mod:`circuitfind.tasks.base`): in a
causal model padding after the real tokens cannot change the logits at real positions, so no
attention mask is used.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.patching.architectures import Architecture, architecture_for, supported, unwrap
from circuitfind.patching.attribution import attribute
from circuitfind.patching.backward_rules import BackwardRules
from circuitfind.patching.masked_pass import (DataMemo, GraphTables, KeptFormMemo, LayerViews,
                                              MaskedPass)
from circuitfind.patching.placement import PlacedArchitecture, placed
from circuitfind.patching.post_norm_pass import PostNormPass


SCRATCH_BYTES = 256 << 20
"""Bytes of buffers a runner keeps between passes (:meth:`BlockRunner.scratch`): EAP's sender
differences and receiver-gradient group of small models (bench_families' shape: 7.2 + 3.3
MiB) and the masked passes' per-mask buffers (``[K, J, n*T*d]``: up to ~190 MiB in ACDC's
passes of 32 masks at that shape, whose fresh pages cost ~6% of its run in page faults under
a 64 MiB cap); larger ones are allocated per pass as before. Held between passes, never
beyond one pass's buffers, which the engine's memory budget already counts."""


@dataclass(frozen=True)
class RunCache:
    """Activations of one unpatched run, to start masked passes from any layer.

    Attributes:
        resid: ``[n_layers + 1, N, T, d_model]``; ``resid[L]`` is the residual stream entering
            block ``L`` (``resid[n_layers]`` enters the final norm).
        senders: ``[S, N, T, d_model]`` every sender's output (``input`` = embeddings).
        mid: ``[n_layers, N, T, d_model]``; ``mid[L]`` is the residual stream after block
            ``L``'s attention (the MLP's input in sequential blocks; a parallel block's MLP
            reads ``resid[L]``).
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
        A runner, or ``None`` when no adapter implements the model's class (or the graph is
        attention-only); callers then use the bridge's forward.

    Raises:
        ConfigError: the graph's wiring (parallel or sequential attention and MLP) is not the
            model's, or a block of a model split across devices spans several
            (:mod:`circuitfind.patching.placement`).
    """
    hf = unwrap(getattr(model, "original_model", model))
    name = type(hf).__name__
    arch = architecture_for(name)
    if arch is not None and graph.attn_only:
        arch = None
    if arch is not None:
        adapter = arch(hf, graph.n_heads, graph.n_kv_heads)
        if adapter.parallel != graph.parallel_attn_mlp:
            raise ConfigError(f"The graph ({graph}) says attention and MLP run "
                              f"{'in parallel' if graph.parallel_attn_mlp else 'in sequence'}, "
                              f"but this {name} runs them "
                              f"{'in parallel' if adapter.parallel else 'in sequence'}; build "
                              "the graph from this model (ComputeGraph.from_model).")
        return BlockRunner(placed(adapter), graph)  # each block on its own device
    warnings.warn(f"circuitfind's block runner does not implement {name} "
                  f"(known: {', '.join(supported())}); masked passes fall back to the "
                  "bridge's full forward with hooks (correct, but slower and unable to start "
                  "at a later layer).", RuntimeWarning, stacklevel=2)
    return None


class BlockRunner:
    """Masked forward passes over a Hugging Face model's blocks, from any start layer.

    Args:
        arch: The model family's adapter (built by :func:`block_runner`; for a model split
            across devices, placed on them by :func:`~circuitfind.patching.placement.placed`).
        graph: The model's graph (sender and receiver indexing).
    """

    def __init__(self, arch: Architecture | PlacedArchitecture, graph: ComputeGraph) -> None:
        self.arch = arch
        self.graph = graph
        self.receiver_layer = torch.tensor([r.layer for r in graph.receivers])
        self.memo = KeptFormMemo()  # kept-form outputs from the last pass (see MaskedPass)
        self.data_memo = DataMemo()  # values of the data alone, from pass to pass (MaskedPass)
        self.layers = LayerViews.of(graph)  # per-layer index views every masked pass reads
        self.tables = GraphTables.of(graph)  # the graph's indexing on the host (MaskedPass)
        self._scratch: dict[str, Tensor] = {}  # buffers kept between passes (see scratch)

    # ------------------------------------------------------------------ plain runs
    @torch.no_grad()
    def cache(self, tokens: Tensor) -> RunCache:
        """Run the unpatched model and keep what a masked pass starting at any layer needs.

        Args:
            tokens: ``[N, T]`` int64 token ids (right-padded).

        Returns:
            The :class:`RunCache` of this run.
        """
        return self._plain(tokens, residuals=True)

    def scratch(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised contiguous buffer of ``shape`` (``like``'s dtype and device) for
        ``name``, in the same memory from one call to the next while it fits there (up to
        :data:`SCRATCH_BYTES` for all names; beyond that a new tensor each call, nothing
        kept). A larger shape replaces the memory kept under ``name``; a smaller one takes the
        start of it (a masked pass's buffers, whose mask count changes from pass to pass).

        Why: a fresh buffer of a few MiB per pass is mapped from the operating system anew
        each time (glibc's allocator maps allocations at or above its adaptive threshold, which
        a freed buffer of the same size sets), and its first writes page-fault: on
        ``bench_families``' GPT-NeoX shape ~2,000-4,000 faults per EAP pass, about a tenth of
        the pass in system time. The caller owns the buffer until its next call with ``name``:
        only for values that do not outlive one pass.
        """
        numel = 1
        for size in shape:
            numel *= size
        held = self._scratch.get(name)
        if (held is not None and held.numel() >= numel and held.dtype == like.dtype
                and held.device == like.device):
            return held[:numel].view(shape)
        self._scratch.pop(name, None)
        buf = like.new_empty(numel)
        used = sum(t.numel() * t.element_size() for t in self._scratch.values())
        if used + buf.numel() * buf.element_size() <= SCRATCH_BYTES:
            self._scratch[name] = buf
        return buf.view(shape)

    @torch.no_grad()
    def sender_outputs(self, tokens: Tensor, positions: Tensor | None = None,
                       scratch: str | None = None) -> Tensor:
        """Every sender's output in the unpatched run (the senders of :meth:`cache` without
        its residual streams, which attribution does not read).

        Args:
            tokens: ``[N, T]`` int64 token ids (right-padded).
            positions: ``[N, P]`` metric positions, or ``None``. Given, the last block runs
                at those positions only (its queries, heads' outputs and MLP; keys and
                values at every position), as EAP's clean pass does: its senders' outputs
                are 0 elsewhere (EAP reads them at the metric positions only).
            scratch: Write into the :meth:`scratch` buffer of this name (every entry is
                written; the caller owns it until the next call with that name), or ``None``
                (a new tensor).

        Returns:
            ``[S, N, T, d_model]`` sender outputs (``input`` = embeddings).
        """
        return self._plain(tokens, residuals=False, positions=positions, scratch=scratch).senders

    def _plain(self, tokens: Tensor, residuals: bool,
               positions: Tensor | None = None, scratch: str | None = None) -> RunCache:
        """The unpatched run: its sender outputs and, with ``residuals``, its residual
        streams (empty ``[0, N, T, d]`` tensors without); with ``positions`` (no residuals)
        the last block at those positions only (see :meth:`sender_outputs`)."""
        g, lay = self.graph, self.arch
        x = lay.embed(tokens)
        n, t, d = x.shape
        kept = g.n_layers if residuals else 0
        resid = x.new_empty(kept + int(residuals), n, t, d)
        mid = x.new_empty(kept, n, t, d)
        senders = (x.new_empty(g.n_senders, n, t, d) if scratch is None
                   else self.scratch(scratch, (g.n_senders, n, t, d), x))
        senders[0] = x
        for layer in range(g.n_layers):
            if positions is not None and not residuals and layer == g.n_layers - 1:
                self._last_block_at(x, positions, senders)
                break
            if residuals:
                resid[layer] = x
            q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
            z = lay.attend(layer, q, k, v, prefer_fused=True)
            heads = senders[g.head_start[layer]: g.head_start[layer] + g.n_heads]
            lay.head_outputs(layer, z, out=heads)  # written in place, head-major
            x_in, x = x, x + lay.attn_from_heads(layer, heads, 0)
            if residuals:
                mid[layer] = x
            m = lay.mlp(layer, lay.ln_mlp(layer, x_in if lay.parallel else x))
            senders[g.mlp_index[layer]] = m
            x = x + m
        if residuals:
            resid[g.n_layers] = x
        return RunCache(resid, senders, mid)

    def _last_block_at(self, x: Tensor, positions: Tensor, senders: Tensor) -> None:
        """The last block's senders from its input ``x [N, T, d]`` at the ``positions [N, P]``
        only (keys and values at every position), written into ``senders`` (0 elsewhere)."""
        g, lay = self.graph, self.arch
        layer = g.n_layers - 1
        n, p, d = positions.shape[0], positions.shape[1], x.shape[-1]
        q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
        z = lay.attend(layer, q, k, v, query_pos=positions, prefer_fused=True)  # [N, P, H, dh]
        heads = lay.head_outputs(layer, z, out=x.new_empty(g.n_heads, n, p, d))
        index = positions[:, :, None].expand(n, p, d)
        x_at = x.gather(1, index)
        attn = lay.attn_from_heads(layer, heads, 0)
        m = lay.mlp(layer, lay.ln_mlp(layer, x_at if lay.parallel else x_at + attn))
        h0 = g.head_start[layer]
        senders[h0: h0 + g.n_heads].zero_().scatter_(2, index.expand(g.n_heads, -1, -1, -1),
                                                      heads)
        senders[g.mlp_index[layer]].zero_().scatter_(1, index, m)

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        """Plain forward: ``[N, T]`` token ids -> ``[N, T, V]`` logits (for checks)."""
        return self.arch.final(self.cache(tokens).resid[-1])

    def ablated_residuals(self, ablated: Tensor, n: int, t: int) -> tuple[Tensor, Tensor]:
        """Residual streams of the run in which every edge carries its ablated value.

        The residual stream entering a block is the embedding (sender ``input``) plus every
        earlier head's and MLP's output plus the attention output biases, so the fully ablated
        run's is ``x'_L = sum_{u upstream of L} a'_u + sum_{l < L} b_O[l]`` (with a post-norm,
        :attr:`Architecture.attn_post_norm`, each layer's heads enter as ``PostNorm_l(sum_h a'_h
        + b_O[l])``): summed directly
        (not as ``resid - sum (a - a')``, whose cancellation leaves rounding noise that a
        norm would amplify where the exact value is 0, e.g. zero ablation without biases). For
        resample ablation this is the corrupted run's residual stream.

        Args:
            ablated: ``[S, N|1, T|1, d]`` ablated sender values.
            n, t: Examples and positions of the result.

        Returns:
            ``(pre [L+1, n, t, d], mid [L, n, t, d])``: entering each block (and the final
            norm), and the MLP input (after each block's attention; the block's input in
            parallel blocks).
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
            if lay.parallel:
                mid[layer] = acc
            end = done + g.n_heads  # after the layer's heads (then its MLP, if any)
            attn = ablated[done: end].sum(0)
            _, bias = lay.w_out(layer)
            if bias is not None:
                attn = attn + bias
            # post-norm families: every receiver reads the norm of the ablated heads' sum
            acc += lay.post_norm(layer, attn) if lay.attn_post_norm else attn
            done = end
            if not lay.parallel:
                mid[layer] = acc
        acc += ablated[done:].sum(0)
        pre[g.n_layers] = acc
        return pre, mid

    def attribute(self, tokens: Tensor, ablated: Tensor, positions: Tensor, metric: Any,
                  points: list[tuple[str, float | Tensor]] | None = None,
                  diff: Tensor | None = None, rules: BackwardRules | None = None,
                  drop_each_layer: bool = False, overwrite: bool = False) -> Tensor:
        """EAP (or, with ``points``, EAP-IG / clean-corrupted; with ``rules``, GIM, RelP,
        AtP*) scores from one forward and backward pass (with ``drop_each_layer``, GradDrop's
        ``[L, S, R]`` from one forward pass):
        :func:`circuitfind.patching.attribution.attribute` on this runner."""
        return attribute(self, tokens, ablated, positions, metric, points, diff, rules,
                         drop_each_layer, overwrite)

    def start_layer(self, touched: Tensor) -> int:
        """First layer any of the ``touched [R]`` (bool) receivers belongs to (``n_layers`` if none
        but the logits; ``n_layers + 1`` if none at all)."""
        layers = self.tables.receiver_layer[touched.cpu().numpy()]
        return int(layers.min()) if len(layers) else self.graph.n_layers + 1

    def resolve_start(self, touched: Tensor, start: int | None) -> int:
        """The start layer of a masked pass whose masks touch the ``touched [R]`` (bool)
        receivers: ``start``, checked, or by default the first layer with a touched receiver.

        Raises:
            ConfigError: ``start`` outside ``[0, n_layers]``, or after a touched receiver.
        """
        g = self.graph
        first = self.start_layer(touched)
        if start is None:
            start = min(first, g.n_layers)
        if not 0 <= start <= g.n_layers:
            raise ConfigError(f"The start layer must lie in [0, {g.n_layers}] for this "
                              f"{g.n_layers}-layer model; got {start}.")
        if first < start:
            raise ConfigError(f"A mask removes or freezes an edge into a receiver of layer "
                              f"{first}, before the start layer {start}; start at layer "
                              f"{first} or earlier (or leave start unset).")
        return start

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
        if self.arch.attn_post_norm:  # receivers read a norm of their own mixture: not eq. (1)
            return PostNormPass(self, cache, ablated, removed, positions, start, frozen,
                                diff, abl_resid).logits()
        return MaskedPass(self, cache, ablated, removed, positions, start, frozen, diff,
                          abl_resid).logits()
