"""The batched edge-patching engine: the only code that installs hooks on a model.

Method. A receiver's input is the sum of its upstream senders' outputs (plus constant biases).
With sender outputs ``a_u`` in the current run, ``a'_u`` in the corrupted run and a keep-mask
``M[u, r]`` (1 = the edge carries the current value, 0 = it carries the corrupted value), the
patched receiver input is

    x_r = x_r(current run) - sum_u (1 - M[u, r]) * (a_u(current run) - a'_u)        (1)

evaluated with one batched matmul per receiver group (q, k, v inputs of a layer, an MLP input,
the final residual) over a buffer of sender-output differences ``[K, S, N, T, d_model]``. K masks
are evaluated in one forward pass by stacking K copies of the clean batch; masks may be
fractional (0 < M < 1 interpolates, which is what derivatives with respect to an edge need).

Edge attribution patching (EAP; Syed, Rager & Conmy 2023, "Attribution Patching Outperforms
Automated Circuit Discovery", eq. 2) is the first-order Taylor estimate of the metric change when
an edge is corrupted:

    score(u -> r) = sum_{batch, pos} (a'_u - a_u) . d metric / d x_r   (clean run)          (2)

computed from one corrupted forward pass (caching ``a'``) and one clean forward + backward pass,
accumulating (2) inside backward hooks with one matmul per receiver group. By (1),
``score(e) = -d metric / d M_e`` at ``M = 1``, which the tests check by finite differences.

Cost. ``evaluate`` on K masks costs one forward pass of K x N rows plus, per receiver group, a
``[R', U] x [U, N*T*d]`` matmul; ``edge_attribution`` costs one corrupted forward, one clean
forward and one backward plus one ``[U, N*T*d] x [N*T*d, R']`` matmul per receiver group.

The metric is the batch mean of the task's per-example metric (so scores are in the task's
unit, e.g. logits for a logit difference). Work is split into chunks of examples and masks to
stay within ``memory_budget`` bytes; results do not depend on the split.

Resuming. Masked passes run on :mod:`circuitfind.patching.runner` (our own block runner over the
wrapped Hugging Face model, checked against the bridge and Hugging Face): a pass starts at the
first layer any mask touches, from the cached clean residual stream, reads only the metric
positions, and skips positions after the last metric position (the model is causal). Models
whose architecture the runner does not implement fall back to the bridge's full forward with
hooks (one warning).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import CircuitFindError, ConfigError, HookError
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.patching.hooks import HookTable
from circuitfind.patching.attribution import contract_scores
from circuitfind.patching.checkpointed import (SenderStore, checkpointed_pass, fill_senders,
                                               subtract_senders)
from circuitfind.patching.masked_pass import fully_removed, host_array, receiver_changes
from circuitfind.patching.backward_rules import BackwardRules
from circuitfind.patching import plan as memory_plan
from circuitfind.patching.plan import MemoryPlan, ModelShape
from circuitfind.patching.runner import BlockRunner, RunCache, block_runner
from circuitfind.patching.spec import Ablation
from circuitfind.tasks.base import TaskData

HookFn = Callable[[Tensor, Any], Tensor | None]


@dataclass(frozen=True)
class _Group:
    """A contiguous block of receivers read through one hook, all with the same upstream."""

    hook: str
    start: int  # first receiver index
    stop: int
    n_up: int  # number of upstream senders
    per_head: bool  # hook tensor has a head axis [batch, pos, heads, d]


@dataclass(frozen=True)
class GradientPoint:
    """One run at which :meth:`PatchingEngine.edge_attribution` takes receiver gradients.

    The run reads the clean tokens, except that the outputs of the node group ``node`` are
    replaced by ``alpha * clean + (1 - alpha) * corrupted`` (held constant: no gradient flows
    back through them). ``alpha = 1`` at ``input`` is the clean run (EAP); ``alpha = 0`` at
    ``input`` is the corrupted run, because the input embedding is all a run takes from the
    tokens (right-padded causal models need no attention mask).

    Attributes:
        alpha: Interpolation weight of the clean value, usually in [0, 1].
        node: ``"input"`` (the embeddings), ``"a{L}"`` (every head of layer L together) or
            ``"m{L}"`` (the MLP of layer L): the node groups the EAP-IG library interpolates.
    """

    alpha: float
    node: str = "input"


class PatchingEngine:
    """Masked and batched forward passes and edge attributions over a ComputeGraph.

    Args:
        model: A ``TransformerBridge`` from :func:`circuitfind.load_model` (split q/k/v inputs,
            per-head results and MLP-input hooks on).
        graph: The model's graph (default: ``ComputeGraph.from_model(model)``).
        memory_budget: Bytes the run may hold on its device, the model's weights and the
            engine's caches included (sizes the chunks of examples, gradient runs and masks;
            :mod:`circuitfind.patching.plan`): an int or a size such as ``"4GiB"``
            (:func:`~circuitfind.patching.spec.parse_memory`); default the weights plus 2 GiB.
        use_runner: Run masked passes on the block runner where the architecture has one
            (default); ``False`` forces the bridge's full forward with hooks (the slow
            reference the runner is tested against).
        ablation: What removed edges carry when a call does not say (``"resample"``, the
            default, ``"zero"``, ``"mean"``, ``"mean_positional"`` or an :class:`Ablation`).
            Algorithms run on an engine use its ablation, so one spec reaches every algorithm.

    Raises:
        HookError: the model lacks a hook the engine needs.
        ConfigError: ``graph`` does not match the model, or ``memory_budget`` < 1 MiB.
    """

    def __init__(self, model: Any, graph: ComputeGraph | None = None,
                 memory_budget: int | str | None = None, use_runner: bool = True,
                 ablation: Ablation | str | None = None) -> None:
        self.model = model
        self.ablation = Ablation.parse(ablation)
        self.graph = graph if graph is not None else ComputeGraph.from_model(model)
        self.table = HookTable(self.graph)
        self.table.check(model)
        cfg = model.cfg
        if (cfg.n_layers, cfg.n_heads) != (self.graph.n_layers, self.graph.n_heads):
            raise ConfigError(f"The graph ({self.graph}) does not match the model "
                              f"({cfg.n_layers} layers, {cfg.n_heads} heads).")
        self.d_model = int(cfg.d_model)
        self.groups = self._receiver_groups()
        self.runner: BlockRunner | None = block_runner(model, self.graph) if use_runner else None
        #: the model's shape, as the memory model (:mod:`circuitfind.patching.plan`) sees it
        self.shape = ModelShape.from_model(model, self.graph, runner=self.runner is not None)
        self.memory_budget = memory_plan.resolve_budget(memory_budget, self.shape)
        self._memo: dict[str, tuple[Any, ...]] = {}  # key -> (what it was made of..., value)
        # the model's parameters, listed once (walking the bridge's modules costs about a
        # third of a millisecond, a percent of a small model's EAP pass)
        self._parameters = list(model.parameters())

    # ------------------------------------------------------------------ model facts
    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    def _receiver_groups(self) -> list[_Group]:
        g, t = self.graph, self.table
        up = g.n_upstream.tolist()
        groups = []
        for layer in range(g.n_layers):
            for kind, start, size in (("q", g.q_start[layer], g.n_heads),
                                      ("k", g.k_start[layer], g.n_kv_heads),
                                      ("v", g.v_start[layer], g.n_kv_heads)):
                groups.append(_Group(t.qkv_input(layer, kind), start, start + size, up[start], True))
            r = g.mlp_receiver[layer]
            if r is not None:
                groups.append(_Group(t.mlp_in(layer), r, r + 1, up[r], False))
        r = g.n_receivers - 1
        groups.append(_Group(t.final, r, r + 1, up[r], False))
        return groups

    # ------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def hooked(self, fwd_hooks: list[tuple[str, HookFn]]) -> Iterator[None]:
        """Install forward hooks for the duration of the block; always removes them.

        Errors raised inside a hook are re-raised as :class:`HookError` naming the hook.
        """
        wrapped = [(name, self._wrap(name, fn)) for name, fn in fwd_hooks]
        with self.model.hooks(fwd_hooks=wrapped, reset_hooks_end=True):
            yield

    @staticmethod
    def _wrap(name: str, fn: HookFn) -> HookFn:
        def hook(tensor: Tensor, hook: Any) -> Tensor | None:
            try:
                return fn(tensor, hook)
            except CircuitFindError:
                raise
            except Exception as err:
                raise HookError(f"The patching hook at {name!r} failed on a tensor of shape "
                                f"{tuple(tensor.shape)}: {type(err).__name__}: {err}") from err

        return hook

    def _sender_hooks(self, buf: Tensor, n: int, mode: str, make_leaf: bool = False,
                      active: Tensor | None = None) -> list[tuple[str, HookFn]]:
        """Hooks writing sender outputs into ``buf [G, A, n, T, d]`` (``mode`` "set" or "add").

        ``active`` (sorted sender indices, default all S senders) says which senders the buffer
        holds: slot ``i`` of ``buf`` is sender ``active[i]``. With ``make_leaf`` the input hook
        returns a detached tensor that requires grad, so that a backward pass reaches every
        receiver without computing parameter gradients.
        """
        g, t = self.graph, self.table
        slot = torch.full((g.n_senders,), -1, dtype=torch.long)
        senders = torch.arange(g.n_senders) if active is None else active.cpu()
        slot[senders] = torch.arange(len(senders))

        def write(index: slice | int | Tensor, value: Tensor) -> None:
            value = value.detach()
            if mode == "set":
                buf[:, index] = value
            else:
                buf[:, index] += value

        hooks: list[tuple[str, HookFn]] = []
        if slot[0] >= 0 or make_leaf:
            def input_hook(x: Tensor, hook: Any) -> Tensor:
                if slot[0] >= 0:
                    write(int(slot[0]), x.view(-1, n, *x.shape[1:]))
                return x.detach().requires_grad_(True) if make_leaf else x

            hooks.append((t.input, input_hook))
        for layer in range(g.n_layers):
            h0 = g.head_start[layer]
            slots = slot[h0: h0 + g.n_heads]
            if (slots >= 0).any():
                heads_on = (slots >= 0).nonzero()[:, 0]
                contiguous = bool((slots[heads_on] == slots[heads_on[0]] + torch.arange(
                    len(heads_on))).all())
                target: slice | Tensor = (slice(int(slots[heads_on[0]]), int(slots[heads_on[-1]]) + 1)
                                          if contiguous else slots[heads_on].to(buf.device))
                select = None if len(heads_on) == g.n_heads else heads_on.to(buf.device)

                def head_hook(x: Tensor, hook: Any, target: slice | Tensor = target,
                              select: Tensor | None = select) -> Tensor:
                    heads = x.view(-1, n, *x.shape[1:]).permute(0, 3, 1, 2, 4)  # [G, H, n, T, d]
                    write(target, heads if select is None else heads[:, select])
                    return x

                hooks.append((t.head_result(layer), head_hook))
            m = g.mlp_index[layer]
            if m is not None and slot[m] >= 0:
                def mlp_hook(x: Tensor, hook: Any, i: int = int(slot[m])) -> Tensor:
                    write(i, x.view(-1, n, *x.shape[1:]))
                    return x

                hooks.append((t.mlp_out(layer), mlp_hook))
        return hooks

    # ------------------------------------------------------------------ sender outputs
    @torch.no_grad()
    def sender_outputs(self, tokens: Tensor) -> Tensor:
        """Run the model on ``tokens`` and return every sender's output.

        Args:
            tokens: ``[N, T]`` int64 token ids.

        Returns:
            ``[S, N, T, d_model]`` sender outputs in the model's dtype (S = graph.n_senders).
        """
        tokens = self._tokens(tokens)
        if self.runner is not None:
            return self.runner.sender_outputs(tokens)
        n, t = tokens.shape
        buf = torch.empty(1, self.graph.n_senders, n, t, self.d_model, device=self.device,
                          dtype=self.dtype)
        with self.hooked(self._sender_hooks(buf, n, "set")):
            self.model(tokens)
        return buf[0]

    def _memoised(self, key: str, tokens: Tensor, make: Callable[[Tensor], Any]) -> Any:
        """``make(tokens)``, memoised for the last tensor seen under ``key``.

        The memo holds a reference to that tensor (so its identity cannot be reused by a new
        tensor) and its in-place version counter.
        """
        if not self._memo_holds(key, tokens):
            self._memo[key] = (tokens, tokens._version, make(tokens))
        return self._memo[key][2]

    def _memo_holds(self, key: str, tokens: Tensor) -> bool:
        """Whether the memo under ``key`` is for ``tokens`` as they are now."""
        memo = self._memo.get(key)
        return memo is not None and memo[0] is tokens and memo[1] == tokens._version

    def corrupted_outputs(self, data: TaskData) -> Tensor:
        """``sender_outputs(data.corrupted)`` ``[S, N, T, d]``, memoised for the last corrupted
        tensor seen."""
        return self._memoised("corrupted", data.corrupted, self.sender_outputs)

    def clean_cache(self, data: TaskData) -> RunCache:
        """The clean run's residual streams and sender outputs (runner only), memoised.

        Only the first ``max(positions) + 1`` positions are kept: in a causal model later
        positions cannot change the metric.

        Returns:
            A :class:`RunCache`: residual streams ``[n_layers + 1, N, T', d]`` and
            ``[n_layers, N, T', d]`` (after attention), sender outputs ``[S, N, T', d]``, with
            ``T' = max(positions) + 1``, in the model's dtype.

        Raises:
            ConfigError: the model has no block runner.
        """
        if self.runner is None:
            raise ConfigError("This model's architecture has no block runner; clean caches "
                              "are only used by runner passes.")
        runner = self.runner
        t = self._used_len(data)
        return self._memoised("clean", data.clean,
                              lambda tokens: runner.cache(self._tokens(tokens)[:, :t]))

    def ablation_values(self, data: TaskData, ablation: Ablation | str | None = None) -> Tensor:
        """Value each sender's removed edges carry, ``[S, N|1, T|1, d]`` (see :class:`Ablation`).

        ``ablation=None`` means the engine's own ablation (:attr:`ablation`).

        Raises:
            ConfigError: an ablation the data cannot supply (e.g. a mean over one example).
        """
        spec = self.ablation if ablation is None else Ablation.parse(ablation)
        key = f"ablation:{spec.kind}"
        return self._memoised(key, data.corrupted,
                              lambda _: spec.values(self.corrupted_outputs(data), data))

    def _used_len(self, data: TaskData) -> int:
        """Positions a causal model needs to produce the metric positions' logits (memoised
        for the last positions tensor: one host read, not one per pass)."""
        return self._memoised("used length", data.positions,
                              lambda positions: int(positions.max()) + 1)

    def on_device(self, data: TaskData) -> TaskData:
        """``data`` with its tensors on the model's device (itself when they already are)."""
        return data if data.clean.device == self.device else data.to(self.device)

    def _tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype != torch.long:
            raise ConfigError("Tokens must be an int64 tensor of shape [N, T]; got "
                              f"{getattr(tokens, 'dtype', type(tokens))} "
                              f"{tuple(getattr(tokens, 'shape', ()))}.")
        vocab = int(self.model.cfg.d_vocab)
        if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
            raise ConfigError(f"Token ids must lie in [0, {vocab}) for this model; got ids up to "
                              f"{int(tokens.max())}. Was the data built with this model's "
                              "tokenizer?")
        return tokens.to(self.device)

    # ------------------------------------------------------------------ masks
    def _edge_weights(self, like: Tensor) -> Tensor:
        """The graph's edge mask ``[S, R]`` as 1/0 in ``like``'s dtype and device (made per
        call: held across passes it would be memory the plan does not count)."""
        return self.graph.edge_mask.to(like)

    def _masks(self, masks: Tensor) -> Tensor:
        masks = self.graph.check_edge_matrix(masks, "masks", batched=True)
        if masks.ndim == 2:
            masks = masks[None]
        return masks.to(device=self.device, dtype=self.dtype)

    def _receiver_hooks(self, buf: Tensor, removed: Tensor, n: int, active: Tensor,
                        ablated_inputs: dict[str, Tensor] | None = None
                        ) -> list[tuple[str, HookFn]]:
        """Hooks applying eq. (1) with ``removed = 1 - M`` ``[G, S, R]``.

        ``buf [G, A, n, T, d]`` holds ``a - a'`` of the senders ``active`` (sorted indices).
        The q, k and v groups of a layer share their upstream senders and are contiguous
        receivers: the first of their hooks to fire computes the patch for all three with one
        batched matmul (one read of the buffer instead of three) and the others take their
        slice of it. With ``ablated_inputs`` (hook name -> the fully ablated run's value,
        :meth:`_ablated_inputs`), the (mask, receiver) pairs whose every edge is removed read
        that value instead (:func:`~circuitfind.patching.masked_pass.fully_removed`).
        """
        full = None if ablated_inputs is None else fully_removed(self.graph.edge_mask, removed)
        hooks: list[tuple[str, HookFn]] = []
        groups_g = buf.shape[0]
        active_cpu = active.cpu()
        blocks: dict[int, list[_Group]] = {}  # first receiver -> groups sharing one matmul
        for grp in self.groups:
            key = grp.n_up if grp.per_head else -1 - grp.start
            blocks.setdefault(key, []).append(grp)
        pending: dict[int, list[Any]] = {}  # block -> [delta [G, n, T, R_block, d], hooks left]
        for members in blocks.values():
            n_up, start, stop = members[0].n_up, members[0].start, members[-1].stop
            k = int((active_cpu < n_up).sum())  # active senders upstream of the block
            if k == 0:
                continue
            w = removed[:, active[:k], start:stop]  # [G, k, R_block]
            used = [grp for grp in members if bool(w[:, :, grp.start - start: grp.stop - start].any())]
            if not used:
                continue  # every edge into this block is kept: nothing to patch

            def block_delta(t: int, w: Tensor = w, k: int = k) -> Tensor:
                diff = buf[:, :k].reshape(groups_g, k, -1)  # [G, k, n*T*d]
                delta = receiver_changes(w, diff)  # [G, R_block, n*T*d]: eq. (1)
                return delta.view(groups_g, w.shape[2], n, t, -1).permute(0, 2, 3, 1, 4)

            for grp in used:
                def hook(x: Tensor, hook: Any, grp: _Group = grp, start: int = start,
                         n_used: int = len(used), block_delta: Callable[[int], Tensor] = block_delta
                         ) -> Tensor:
                    entry = pending.get(start)
                    if entry is None:
                        entry = pending[start] = [block_delta(x.shape[1]), n_used]
                    entry[1] -= 1
                    if entry[1] == 0:
                        del pending[start]
                    delta = entry[0][:, :, :, grp.start - start: grp.stop - start]
                    delta = delta.reshape(groups_g * n, x.shape[1], grp.stop - grp.start, -1)
                    out = x - (delta if grp.per_head else delta[:, :, 0])
                    hit = None if full is None else full[:, grp.start: grp.stop]  # [G, R_g]
                    if hit is None or not bool(hit.any()):
                        return out
                    assert ablated_inputs is not None  # full is set only with them
                    value = ablated_inputs[grp.hook]  # [n, T, (R_g,) d]
                    shape = (groups_g, n, *x.shape[1:])
                    where = hit.to(x.device).view(groups_g, 1, 1, -1, *(
                        (1,) if grp.per_head else ()))
                    return torch.where(where, value, out.view(shape)).view_as(x)

                hooks.append((grp.hook, hook))
        return hooks

    # ------------------------------------------------------------------ chunking
    def rows_per_pass(self, seq_len: int, n_buffer: int | None = None,
                      n_examples: int | None = None) -> int:
        """Model-batch rows (sequences of ``seq_len`` tokens) one masked pass may use.

        What ``memory_budget`` leaves after the weights and the caches of ``n_examples``
        examples (default 1), divided by one row's bytes with ``n_buffer`` senders' outputs
        buffered (default: all S): :func:`circuitfind.patching.plan.masked_rows`, the model
        ``circuitfind plan`` uses.

        Raises:
            ConfigError: the budget cannot hold the weights, the caches and a single row (the
                message gives the minimum).
        """
        return memory_plan.masked_rows(self.shape, n_examples or 1, seq_len, self.memory_budget,
                                       n_buffer)

    def masks_per_pass(self, data: TaskData, batch_size: int | None = None,
                       n_buffer: int | None = None, cap: int | None = None) -> int:
        """How many masks of ``data`` (its examples, or ``batch_size`` of them) one pass holds
        within ``memory_budget`` (:meth:`rows_per_pass`, the caches of all of ``data``'s
        examples counted) and, on the CPU, within its caches (:meth:`_pass_rows`), at
        least 1 and at most ``cap``: the one place algorithms size their batched passes.

        Raises:
            ConfigError: the budget cannot hold the caches and a single row.
        """
        rows = self._pass_rows(self._used_len(data), n_buffer, data.n)
        k = max(1, rows // min(data.n, batch_size or data.n))
        return k if cap is None else min(cap, k)

    def _pass_rows(self, seq_len: int, n_buffer: int | None, n_examples: int) -> int:
        """Rows a pass holds: :meth:`rows_per_pass` (the budget), on the CPU at most those
        that stay in its caches (:func:`circuitfind.patching.plan.cache_rows`).

        Raises:
            ConfigError: as :meth:`rows_per_pass`.
        """
        return min(self.rows_per_pass(seq_len, n_buffer, n_examples),
                   memory_plan.cache_rows(self.shape, seq_len, self.device.type))

    def _chunks(self, n_masks: int, n_examples: int, seq_len: int, batch_size: int | None,
                n_buffer: int | None = None) -> Iterator[tuple[slice, slice]]:
        rows = self._pass_rows(seq_len, n_buffer, n_examples)
        n = min(n_examples, batch_size or n_examples, rows)
        k = max(1, min(n_masks, rows // n))
        for e0 in range(0, n_examples, n):
            for k0 in range(0, n_masks, k):
                yield slice(k0, min(n_masks, k0 + k)), slice(e0, min(n_examples, e0 + n))

    # ------------------------------------------------------------------ masked runs
    def run(self, data: TaskData, masks: Tensor, batch_size: int | None = None,
            start: int | None = None, ablation: Ablation | str | None = None,
            frozen: Tensor | None = None) -> Tensor:
        """Logits of the circuits ``masks`` at the metric positions.

        Args:
            data: Task data (clean input; corrupted sender outputs are cached).
            masks: ``[S, R]`` or ``[K, S, R]`` keep-masks in [0, 1] (1 = edge kept; entries off
                real edges are ignored).
            batch_size: Examples per forward pass (default: as many as ``memory_budget`` allows).
            start: First block to run (default: the first layer whose receivers a mask
                touches; blocks before it are taken from the cached clean run). Runner only.
            ablation: What removed edges carry: ``"resample"`` (the corrupted run),
                ``"zero"``, ``"mean"``, ``"mean_positional"`` or an :class:`Ablation`
                (default: the engine's :attr:`ablation`).
            frozen: Optional ``[S, R]``/``[K, S, R]`` mask of kept edges frozen to their clean
                values instead of recomputed (path patching). Runner only.

        Returns:
            ``[K, N, P, V]`` logits gathered at ``data.positions`` (model dtype).

        Raises:
            ConfigError: masks of the wrong shape, tokens outside the model's vocabulary, a start
                layer out of range or after a touched receiver, or ``start``/``frozen`` on a
                model without a block runner.
        """
        masks = self._masks(masks)
        out: Tensor | None = None
        for ks, es, logits in self._iter_runs(data, masks, batch_size, start, ablation, frozen):
            if out is None:
                if (ks.start, ks.stop, es.start, es.stop) == (0, masks.shape[0], 0, data.n):
                    return logits  # one pass covers every mask and example: no copy
                out = logits.new_empty(masks.shape[0], data.n, *logits.shape[2:])
            out[ks, es] = logits
        assert out is not None
        return out

    @torch.no_grad()
    def evaluate(self, data: TaskData, masks: Tensor, batch_size: int | None = None,
                 start: int | None = None, ablation: Ablation | str | None = None,
                 frozen: Tensor | None = None, per_example: bool = False) -> Tensor:
        """Mean task metric of each circuit (or each example's metric).

        Args:
            data: Task data.
            masks: ``[S, R]`` or ``[K, S, R]`` keep-masks (see :meth:`run`).
            batch_size, start, ablation, frozen: As in :meth:`run`.
            per_example: Return every example's metric instead of the mean (for bootstrap
                confidence intervals over examples).

        Returns:
            ``[K]`` float64 metric means over the N examples, in the task's metric unit; with
            ``per_example``, ``[K, N]`` float64 per-example metrics (their mean over N is the
            default result).
        """
        masks = self._masks(masks)
        values_kn = torch.zeros(masks.shape[0], data.n, dtype=torch.float64, device=self.device)
        on_device = self.on_device(data)  # answers etc. beside the logits for the metric
        for ks, es, logits in self._iter_runs(data, masks, batch_size, start, ablation, frozen):
            values = (on_device.subset(es) if (es.start, es.stop) != (0, data.n)
                      else on_device).metric(logits)  # float32 for half-precision logits
            values_kn[ks, es] = values.double().reshape(-1, es.stop - es.start)
        return (values_kn if per_example else values_kn.sum(-1) / data.n).cpu()

    @torch.no_grad()
    def _iter_runs(self, data: TaskData, masks: Tensor, batch_size: int | None,
                   start: int | None = None, ablation: Ablation | str | None = None,
                   frozen: Tensor | None = None) -> Iterator[tuple[slice, slice, Tensor]]:
        edges = self._edge_weights(masks)
        removed = (1 - masks).mul_(edges)
        if frozen is not None:
            frozen = self._masks(frozen).expand_as(removed) * edges
        if self.runner is None:
            if start is not None or frozen is not None:
                raise ConfigError("start= and frozen= need the block runner, which this "
                                  "model's architecture does not have.")
            yield from self._iter_hooked_runs(data, removed, batch_size, ablation)
            return
        t = self._used_len(data)
        weights = removed if frozen is None else removed + frozen
        # rows of a pass hold the current values of senders at or after the start layer
        n_dynamic = int(host_array(weights).any((0, 2)).sum())
        self.rows_per_pass(t, n_dynamic, data.n)  # a budget too small is refused before work
        cache = self.clean_cache(data)
        values = self.ablation_values(data, ablation)  # memoised: the key of ``diff``
        ablated = values[:, :, :t] if values.shape[2] > 1 else values
        # on the model's device once (the runner keeps values of the data keyed by it)
        positions = self._memoised("positions", data.positions,
                                   lambda positions: positions.to(self.device))
        diff, pre, mid = self._pass_constants(cache, values, ablated)
        for ks, es in self._chunks(masks.shape[0], data.n, t, batch_size, n_dynamic):
            sub = cache.subset(es)
            abl = ablated[:, es] if ablated.shape[1] > 1 else ablated
            yield ks, es, self.runner.run(sub, abl, removed[ks], positions[es], start=start,
                                          frozen=None if frozen is None else frozen[ks],
                                          diff=diff[:, es], abl_resid=(pre[:, es], mid[:, es]))

    def _pass_constants(self, cache: RunCache, values: Tensor, ablated: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """``cache.senders - ablated`` ``[S, N, T', d]`` (``ablated``: ``values`` cut to the
        cache's positions) and the ablated run's residual streams (``pre [L+1, N, T', d]``,
        ``mid [L, N, T', d]``, see :meth:`BlockRunner.ablated_residuals`),
        memoised for the last (cache, ``values``) pair: every masked pass over the same data
        reads them. They are held beside the clean cache (about as much memory again) and,
        like it, count against ``memory_budget`` (:func:`~circuitfind.patching.plan.
        masked_cache_bytes`)."""
        assert self.runner is not None  # only the block runner's passes read them
        memo = self._memo.get("diff")
        if memo is None or memo[0] is not cache or memo[1] is not values:
            diff = cache.senders - ablated
            n, t = diff.shape[1:3]
            memo = self._memo["diff"] = (cache, values,
                                         (diff, *self.runner.ablated_residuals(ablated, n, t)))
        return memo[2]

    @torch.no_grad()
    def _iter_hooked_runs(self, data: TaskData, removed: Tensor, batch_size: int | None,
                          ablation: Ablation | str | None) -> Iterator[tuple[slice, slice, Tensor]]:
        """The bridge's full forward with eq. (1) applied in hooks (no start layer)."""
        corrupted = self.ablation_values(data, ablation).expand(
            -1, data.n, data.seq_len, -1)  # [S, N, T, d]
        clean = self._tokens(data.clean)
        positions = data.positions.to(self.device)
        # only senders with a removed (or fractional) outgoing edge need buffering
        n_active = int(removed.ne(0).any(2).any(0).sum())
        for ks, es in self._chunks(removed.shape[0], data.n, data.seq_len, batch_size, n_active):
            g, n = ks.stop - ks.start, es.stop - es.start
            active = removed[ks].ne(0).any(2).any(0).nonzero()[:, 0]  # sorted sender indices
            buf = (-corrupted[active][:, es]).unsqueeze(0).repeat(g, 1, 1, 1, 1)  # [G, A, n, T, d]
            full = fully_removed(self.graph.edge_mask, removed[ks])
            ablated = (None if full is None
                       else self._ablated_inputs(clean[es], corrupted[:, es]))
            hooks = (self._sender_hooks(buf, n, "add", active=active)
                     + self._receiver_hooks(buf, removed[ks], n, active, ablated))
            tokens = clean[es].repeat(g, 1)
            with self.hooked(hooks):
                logits = self.model(tokens)
            logits = logits.view(g, n, *logits.shape[1:])
            pos = positions[es]  # [n, P]
            idx = pos[None, :, :, None].expand(g, n, pos.shape[1], logits.shape[-1])
            yield ks, es, logits.gather(2, idx)

    def _ablated_inputs(self, tokens: Tensor, ablated: Tensor) -> dict[str, Tensor]:
        """Every receiver hook's input in the fully ablated run (each sender's output replaced
        by its ablated value, the model adding them and its biases as it does): hook name ->
        ``[n, T, d]`` (``[n, T, heads, d]`` for q/k/v inputs). What a receiver whose every edge
        is removed reads (:func:`~circuitfind.patching.masked_pass.fully_removed`).

        Args:
            tokens: ``[n, T]`` token ids (any: every sender is replaced).
            ablated: ``[S, n, T, d]`` ablated sender values.
        """
        g, t = self.graph, self.table
        captured: dict[str, Tensor] = {}

        def replace(value: Tensor) -> HookFn:
            return lambda x, hook: value.to(x.dtype).expand_as(x).contiguous()

        def capture(name: str) -> HookFn:
            def hook(x: Tensor, hook: Any) -> Tensor:
                captured[name] = x.detach().clone()
                return x

            return hook

        hooks = [(t.input, replace(ablated[0]))]
        for layer in range(g.n_layers):
            h0 = g.head_start[layer]
            hooks.append((t.head_result(layer),
                          replace(ablated[h0: h0 + g.n_heads].permute(1, 2, 0, 3))))
            m = g.mlp_index[layer]
            if m is not None:
                hooks.append((t.mlp_out(layer), replace(ablated[m])))
        hooks += [(name, capture(name))
                  for name in dict.fromkeys(grp.hook for grp in self.groups)]
        with self.hooked(hooks):
            self.model(tokens)
        return captured

    # ------------------------------------------------------------------ attribution
    def edge_attribution(self, data: TaskData, batch_size: int | None = None,
                         points: Sequence[GradientPoint] | None = None,
                         ablation: Ablation | str | None = None,
                         rules: BackwardRules | None = None,
                         drop_each_layer: bool = False) -> Tensor:
        """Gradient-based edge scores: ``sum (a'_u - a_u) . mean_p d metric / d x_r (run p)``.

        With ``points=None`` this is EAP, eq. (2): the gradient of the clean run. Otherwise the
        receiver gradients are averaged over the runs ``points`` describe (EAP-IG,
        clean-corrupted; see :class:`GradientPoint`), all taking the sender differences
        ``a' - a`` from the plain clean and corrupted runs.

        Where the model has a block runner, EAP (``points=None``) runs one plain forward and
        backward pass through it (:meth:`BlockRunner.attribute`: receiver gradients recovered
        from the q/k/v projections' gradients, no split inputs), and gradient points run as
        stacked copies of the clean rows in one such pass per chunk of points; other
        architectures use the bridge's hooks.

        Memory. Work is split into chunks of examples (and, for several points, of points
        stacked on the batch) sized by ``memory_budget`` (see :meth:`attribution_plan`); the
        corrupted sender outputs are cached for all examples only when they fit in half the
        budget, and are otherwise recomputed per chunk. Receiver gradients are never held for
        more than one layer: they are contracted with the sender differences inside the
        backward pass. The result does not depend on the split beyond floating-point rounding.
        Where one example's plain gradient pass does not fit (long prompts), the plan takes
        the checkpointed pass (:mod:`circuitfind.patching.checkpointed`: one block's
        activations at a time, attention in chunks of query positions, on a GPU the sender
        differences in host memory if need be), with the same scores; it supports neither
        modified backward ``rules`` nor mean ablations.

        ``a'_u`` is the ablation value (the corrupted run for resample ablation, zero, or a
        mean over the corrupted examples; see :class:`Ablation`).

        Args:
            data: Task data; the metric is ``data.metric`` averaged over the N examples.
            batch_size: Examples per pass (default: from ``memory_budget``).
            points: Runs to average gradients over (default: the clean run only, i.e. EAP).
            ablation: What removed edges carry (default: the engine's :attr:`ablation`);
                EAP-IG and clean-corrupted (``points``) support the resample ablation only.
            rules: Modified backward rules (GIM, RelP, AtP*;
                :class:`~circuitfind.patching.backward_rules.BackwardRules`) for the clean
                run's gradient (default: the plain gradient, EAP); block runner only, not with
                ``points``.
            drop_each_layer: AtP*'s GradDrop: the scores with each layer's gradient dropped
                in turn, from one forward pass per chunk of examples
                (:func:`circuitfind.patching.attribution.eap_pass`); block runner only, not
                with ``points``. Memory: ``L`` score matrices, the pass's autograd graph
                kept through the ``L`` backward passes and, with the QK fix, the pattern
                gradients of every pass (``L (L + 1) / 2`` tensors of ``N H T^2``) until the
                patterns are rescored.

        Returns:
            ``[S, R]`` float32 scores (0 off real edges), in the task's metric unit: an
            estimate of ``metric(all edges but e) - metric(full model)``; with
            ``drop_each_layer`` ``[L, S, R]``, row ``l`` with layer ``l`` dropped: the mean
            over examples of each example's ``|score|`` (GradDrop's per-prompt-pair
            magnitudes, Kramar et al. 2024 eq. 11), non-negative.

        Raises:
            ConfigError: an empty ``points``, a point naming no node group of the graph, or a
                ``memory_budget`` too small for one example (the message gives the minimum).

        Raises:
            ConfigError: an unknown ablation, or one the data cannot supply (a mean over one
                example).

        References:
            Syed, Rager & Conmy (2023), "Attribution Patching Outperforms Automated Circuit
            Discovery", eq. 2; Hanna, Pezzelle & Belinkov (2024), "Have Faith in
            Faithfulness", §3 (EAP-IG).
        """
        if drop_each_layer and (points is not None or self.runner is None):
            raise ConfigError("GradDrop (drop_each_layer) needs the block runner (a supported "
                              "model family) and the clean run's gradient (no gradient points).")
        if rules is not None and not rules.plain and (points is not None or self.runner is None):
            raise ConfigError(f"Modified backward rules ({rules.describe()}) need the block "
                              "runner (a supported model family) and the clean run's gradient "
                              "(no gradient points).")
        if points is not None:
            points = list(points)
            if not points:
                raise ConfigError("points must hold at least one GradientPoint; got none.")
            for point in points:
                self._node_group(point.node)
        g = self.graph
        n_points = 1 if points is None else len(points)
        plan = self.plan_attribution(data.n, data.seq_len, n_points, batch_size,
                                     int(data.positions.shape[1]))
        n_chunk, p_chunk, cache = plan.examples_per_pass, plan.points_per_pass, \
            plan.cache_corrupted
        scores = torch.zeros(*([g.n_layers] if drop_each_layer else []), g.n_senders,
                             g.n_receivers, dtype=torch.float64, device=self.device)
        spec = self.ablation if ablation is None else Ablation.parse(ablation)
        if points is not None and spec.kind != "resample":
            raise ConfigError(f"Gradient points (EAP-IG, clean-corrupted) interpolate towards the "
                              f"corrupted run; the {spec.kind!r} ablation is not supported for "
                              "them. Use the resample ablation, or EAP / exact with "
                              f"{spec.kind!r}.")
        if plan.position_chunk is not None:  # long prompts: one block at a time
            return self._checkpointed_attribution(data, plan, points, spec, rules)
        clean = self._tokens(data.clean)
        on_device = self.on_device(data)
        # EAP with the plain gradient runs the last block at the metric positions only
        # (:func:`circuitfind.patching.attribution.eap_pass`)
        last_block_trimmed = points is None and (rules is None or rules.plain_gradient)
        with frozen_parameters(self.model, self._parameters), torch.enable_grad():
            for e0 in range(0, data.n, n_chunk):
                es = slice(e0, min(data.n, e0 + n_chunk))
                n = es.stop - es.start
                sub = on_device if n == data.n else on_device.subset(es)
                private = False  # whether ``corrupted`` is this pass's own buffer
                if spec.kind != "resample":  # [S, 1|n, 1|T, d] values: no memory to speak of
                    values = self.ablation_values(data, spec)
                    corrupted = (values[:, es] if values.shape[1] > 1 else values).expand(
                        -1, n, data.seq_len, -1)
                elif self.runner is not None and last_block_trimmed and not self._memo_holds(
                        "corrupted", data.corrupted):
                    # EAP's clean pass reads the last block's senders at the metric
                    # positions only: the corrupted run computes no more of it (and is not
                    # memoised, being partial), into the runner's scratch buffer, which the
                    # clean pass then overwrites with the sender differences
                    corrupted = self.runner.sender_outputs(
                        self._tokens(data.corrupted[es])[:, :self._used_len(data)],
                        positions=sub.positions, scratch="eap delta")
                    private = True
                elif cache:
                    corrupted = self.corrupted_outputs(data)[:, es]
                else:
                    corrupted = self.sender_outputs(data.corrupted[es])
                if self.runner is not None:
                    # on the block runner: plain forwards, receiver gradients recovered in the
                    # backward pass (no split q/k/v inputs); gradient points as stacked copies
                    t = self._used_len(data)
                    ablated = corrupted[:, :, :t] if corrupted.shape[2] > 1 else corrupted
                    tokens = clean[es][:, :t]
                    if points is None:
                        def metric(logits: Tensor, sub: TaskData = sub) -> Tensor:
                            return sub.metric(logits).sum() / data.n

                        scores += self.runner.attribute(
                            tokens, ablated, sub.positions, metric, rules=rules,
                            drop_each_layer=drop_each_layer,
                            overwrite=private and ablated.is_contiguous())
                    else:
                        diff = self.sender_outputs(tokens).sub_(ablated)  # a - a'
                        for p0 in range(0, n_points, p_chunk):
                            chunk = points[p0: p0 + p_chunk]

                            def chunk_metric(logits: Tensor, sub: TaskData = sub,
                                             c: int = len(chunk)) -> Tensor:
                                picked = logits.view(c, n, *logits.shape[1:]) if c > 1 else logits
                                return sub.metric(picked).sum() / (data.n * n_points)

                            scores += self.runner.attribute(
                                tokens, ablated, sub.positions, chunk_metric,
                                points=[(p.node, p.alpha) for p in chunk], diff=diff)
                        del diff
                    del corrupted, ablated
                    continue
                if points is None:  # EAP: the clean run's sender hooks complete a - a'
                    buf = (-corrupted).unsqueeze(0).clone()  # [1, S, n, T, d]
                    del corrupted
                    hooks = self._sender_hooks(buf, n, "add", make_leaf=True)
                    gradient_hooks, check = self._gradient_hooks(buf, scores, n)
                    with self.hooked(hooks + gradient_hooks):
                        self._metric(self.model(clean[es]), sub, data.n).backward()
                    check()
                    continue
                diff = self.sender_outputs(clean[es]).sub_(corrupted).unsqueeze(0)  # a - a'
                del corrupted
                for p0 in range(0, n_points, p_chunk):
                    chunk = points[p0: p0 + p_chunk]
                    hooks = self._interpolation_hooks(diff, chunk, n)
                    # receivers that only feed a node held constant in every copy get no gradient
                    exempt = frozenset.intersection(*(self._blocked(p.node) for p in chunk))
                    gradient_hooks, check = self._gradient_hooks(diff, scores, n, copies=len(chunk),
                                                                 exempt=exempt)
                    with self.hooked(hooks + gradient_hooks):
                        logits = self.model(clean[es].repeat(len(chunk), 1))
                        self._metric(logits, sub, data.n * n_points, len(chunk)).backward()
                    check()
        return (scores * g.edge_mask.to(scores.device)).float().cpu()

    def _checkpointed_attribution(self, data: TaskData, plan: MemoryPlan,
                                  points: list[GradientPoint] | None, spec: Ablation,
                                  rules: BackwardRules | None) -> Tensor:
        """:meth:`edge_attribution` on long prompts, as ``plan`` splits it: per chunk of
        examples one sender buffer (in host memory where ``plan.offload``) and checkpointed
        passes with attention in chunks of ``plan.position_chunk`` query positions
        (:mod:`circuitfind.patching.checkpointed`).

        Raises:
            ConfigError: modified backward rules, which the checkpointed pass does not apply;
                a mean ablation (its average over every corrupted example is not held).
        """
        if rules is not None and not rules.plain:
            raise ConfigError(f"Modified backward rules ({rules.describe()}) are not applied by "
                              "the checkpointed pass that long prompts need under this "
                              "memory_budget; raise memory_budget or shorten the prompts.")
        if spec.kind not in ("resample", "zero"):
            raise ConfigError(f"The {spec.kind!r} ablation averages the corrupted run over all "
                              "examples, which the checkpointed pass that long prompts need "
                              "under this memory_budget does not hold; use the resample or "
                              "zero ablation, or raise memory_budget.")
        assert self.runner is not None and plan.position_chunk is not None  # see the plan
        g, runner, chunk = self.graph, self.runner, plan.position_chunk
        t = self._used_len(data)
        clean, corrupted = self._tokens(data.clean), self._tokens(data.corrupted)
        on_device = self.on_device(data)
        home = self.device
        where = torch.device("cpu") if plan.offload else home
        n_points = 1 if points is None else len(points)
        scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64, device=home)
        with frozen_parameters(self.model):
            for e0 in range(0, data.n, plan.examples_per_pass):
                es = slice(e0, min(data.n, e0 + plan.examples_per_pass))
                n = es.stop - es.start
                sub = on_device if n == data.n else on_device.subset(es)
                store = SenderStore((g.n_senders, n, t, self.d_model), self.dtype, where, home)
                if spec.kind == "resample":
                    fill_senders(runner, corrupted[es][:, :t], store, chunk)
                else:  # zero: nothing to run
                    store.data.zero_()
                tokens = clean[es][:, :t]
                if points is None:
                    def metric(logits: Tensor, sub: TaskData = sub) -> Tensor:
                        return sub.metric(logits).sum() / data.n

                    scores += checkpointed_pass(runner, tokens, sub.positions, metric, store,
                                                chunk)
                    continue
                subtract_senders(runner, tokens, store, chunk)  # a - a'
                for p0 in range(0, n_points, plan.points_per_pass):
                    part = points[p0: p0 + plan.points_per_pass]

                    def part_metric(logits: Tensor, sub: TaskData = sub,
                                    c: int = len(part)) -> Tensor:
                        picked = logits.view(c, n, *logits.shape[1:]) if c > 1 else logits
                        return sub.metric(picked).sum() / (data.n * n_points)

                    scores += checkpointed_pass(runner, tokens, sub.positions, part_metric,
                                                store, chunk, [(p.node, p.alpha) for p in part])
                del store
        return (scores * g.edge_mask.to(scores.device)).float().cpu()

    def attribution_plan(self, n_examples: int, seq_len: int, n_points: int = 1,
                         batch_size: int | None = None, positions: int = 1
                         ) -> tuple[int, int, bool]:
        """How :meth:`edge_attribution` splits its work to stay within ``memory_budget``.

        :func:`circuitfind.patching.plan.attribution_plan` (the model ``circuitfind plan``
        uses): the weights, the corrupted sender outputs of all N examples when they fit in
        half of what the weights leave, per example of a chunk its sender buffers, and per
        model-batch row of a gradient pass what autograd keeps (:meth:`gradient_row_bytes`).

        Args:
            n_examples: N examples to score.
            seq_len: Tokens per example.
            n_points: Gradient runs per example (1 for EAP, ``steps`` for EAP-IG).
            batch_size: Cap on examples per pass (``None``: none).
            positions: Metric positions per example.

        Returns:
            ``(examples per chunk, points per pass, cache)`` where ``cache`` says whether the
            corrupted sender outputs of all N examples are kept.

        Raises:
            ConfigError: the budget cannot hold the weights and one example with one gradient
                run; the message gives the minimum.
        """
        plan = self.plan_attribution(n_examples, seq_len, n_points, batch_size, positions)
        return plan.examples_per_pass, plan.points_per_pass, plan.cache_corrupted

    def plan_attribution(self, n_examples: int, seq_len: int, n_points: int = 1,
                         batch_size: int | None = None, positions: int = 1,
                         algorithm: str = "eap") -> MemoryPlan:
        """The full :class:`~circuitfind.patching.plan.MemoryPlan` behind
        :meth:`attribution_plan` (predicted peak by part, chunks, time)."""
        return memory_plan.attribution_plan(self.shape, n_examples, seq_len, n_points,
                                            self.memory_budget, batch_size, positions,
                                            algorithm=algorithm, device=str(self.device))

    def gradient_row_bytes(self, seq_len: int) -> int:
        """Estimated bytes autograd keeps per model-batch row during a gradient pass
        (:func:`circuitfind.patching.plan.gradient_row_bytes`)."""
        return memory_plan.gradient_row_bytes(self.shape, seq_len)

    def _metric(self, logits: Tensor, data: TaskData, total: int, copies: int = 1) -> Tensor:
        """Sum of the metric over ``copies`` stacked copies of ``data``'s rows, over ``total``."""
        n = data.n
        pos = data.positions.to(self.device)
        idx = pos[None, :, :, None].expand(copies, n, pos.shape[1], logits.shape[-1])
        picked = logits.view(copies, n, *logits.shape[1:]).gather(2, idx)
        values = data.metric(picked if copies > 1 else picked[0])
        return values.sum() / total

    def _node_group(self, node: str) -> tuple[str, list[int]]:
        """Hook name and sender indices of a node group: ``input``, ``a{L}`` or ``m{L}``."""
        g, t = self.graph, self.table
        groups = {"input": (t.input, [0])}
        for layer in range(g.n_layers):
            h0 = g.head_start[layer]
            groups[f"a{layer}"] = (t.head_result(layer), list(range(h0, h0 + g.n_heads)))
            m = g.mlp_index[layer]
            if m is not None:
                groups[f"m{layer}"] = (t.mlp_out(layer), [m])
        if node not in groups:
            close = difflib.get_close_matches(node, list(groups), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"No node group {node!r} in this graph.{hint} Node groups: input, "
                              f"a0..a{g.n_layers - 1} (all heads of a layer), and m{{L}} for "
                              "layers with an MLP.")
        return groups[node]

    def _blocked(self, node: str) -> frozenset[str]:
        """Receiver hooks whose only reader is the node group ``node`` (``a{L}``: its q/k/v
        inputs; ``m{L}``: its MLP input; ``input``: none)."""
        t = self.table
        if node.startswith("a"):
            return frozenset(t.qkv_input(int(node[1:]), k) for k in "qkv")
        if node.startswith("m"):
            return frozenset({t.mlp_in(int(node[1:]))})
        return frozenset()

    def _interpolation_hooks(self, diff: Tensor, points: Sequence[GradientPoint],
                             n: int) -> list[tuple[str, HookFn]]:
        """Forward hooks for ``len(points)`` copies of ``n`` clean rows stacked on the batch.

        In copy ``p``, the outputs of ``points[p].node`` become
        ``alpha a + (1 - alpha) a' = a - (1 - alpha) (a - a')`` (with ``diff [1, S, n, T, d]`` =
        ``a - a'``) and are constants: no gradient flows back through them, as in the EAP-IG
        library's interpolation hooks. The input embedding is always made a leaf that requires
        grad, so that the backward pass reaches every receiver.
        """
        by_hook: dict[str, tuple[list[int], list[tuple[int, float]]]] = {}
        for p, point in enumerate(points):
            hook, senders = self._node_group(point.node)
            by_hook.setdefault(hook, (senders, []))[1].append((p, float(point.alpha)))
        by_hook.setdefault(self.table.input, ([0], []))

        def make(senders: list[int], targets: list[tuple[int, float]], leaf: bool) -> HookFn:
            moved = dict(targets)
            # sender differences laid out like the hook's tensor: [n, T, d] or [n, T, H, d]
            delta = diff[0, senders[0]] if len(senders) == 1 else diff[0, senders].permute(1, 2, 0, 3)

            def hook(x: Tensor, hook: Any) -> Tensor:
                rows = x.view(len(points), n, *x.shape[1:])
                parts = [(rows[p].detach() - (1 - moved[p]) * delta) if p in moved else rows[p]
                         for p in range(len(points))]
                out = torch.cat(parts) if len(parts) > 1 else parts[0]
                return out.detach().requires_grad_(True) if leaf else out

            return hook

        return [(name, make(senders, targets, name == self.table.input))
                for name, (senders, targets) in by_hook.items()]

    def _gradient_hooks(self, buf: Tensor, scores: Tensor, n: int, copies: int = 1,
                        exempt: frozenset[str] = frozenset()
                        ) -> tuple[list[tuple[str, HookFn]], Callable[[], None]]:
        """Backward hooks accumulating eq. (2) into ``scores [S, R]``, and a check to call after
        the backward pass.

        The check raises :class:`HookError` naming the receiver groups that received no
        gradient (a silently skipped group would leave its edges' scores at zero), except the
        hooks in ``exempt`` (receivers that only feed a node held constant in every copy).

        ``buf [1, S, n, T, d]`` holds ``a - a'``. With ``copies > 1`` the model batch holds that
        many copies of the ``n`` rows (one per gradient point) and their gradients are summed
        before the contraction (the metric already weights each copy).

        The q, k and v groups of a layer share their upstream senders and are contiguous
        receivers, so their gradients are collected and contracted with the sender differences
        in one matmul per layer (one read of the ``[U, n*T*d]`` buffer instead of three).
        """
        hooks: list[tuple[str, HookFn]] = []
        pending: dict[int, list[Tensor | None]] = {}  # first receiver of a layer -> q, k, v grads
        layers: dict[int, list[_Group]] = {}
        for grp in self.groups:
            if grp.per_head:
                layers.setdefault(grp.n_up, []).append(grp)

        contracted: list[_Group] = []

        def contract(groups: list[_Group], grads: list[Tensor]) -> None:
            contracted.extend(groups)
            n_up, start = groups[0].n_up, groups[0].start
            diff = buf[0, :n_up].reshape(n_up, -1)  # [U, n*T*d] = a - a'
            grad = torch.cat(grads, 0) if len(grads) > 1 else grads[0]  # [R', n*T*d]
            contract_scores(scores, diff, start, grad, sign=-1.0)

        for grp in self.groups:
            siblings = layers.get(grp.n_up, [grp]) if grp.per_head else [grp]
            slot = siblings.index(grp)

            def hook(x: Tensor, hook: Any, grp: _Group = grp, siblings: list[_Group] = siblings,
                     slot: int = slot) -> Tensor:
                if not x.requires_grad:
                    raise HookError("No gradient reaches the receivers; is the model frozen "
                                    "in an unusual way?")

                def accumulate(grad: Tensor) -> None:
                    width = grp.stop - grp.start
                    if copies > 1:
                        grad = grad.view(copies, n, *grad.shape[1:]).sum(0)
                    g = grad if grp.per_head else grad.unsqueeze(2)  # [n, T, R', d]
                    g = g.permute(2, 0, 1, 3).reshape(width, -1)  # [R', n*T*d]
                    if len(siblings) == 1:
                        contract(siblings, [g])
                        return
                    got = pending.setdefault(siblings[0].start, [None] * len(siblings))
                    got[slot] = g
                    if all(t is not None for t in got):
                        del pending[siblings[0].start]
                        contract(siblings, [t for t in got if t is not None])

                # A fresh tensor: the hook may receive the residual stream itself (hook_mlp_in
                # fires on ln2's input), whose gradient also flows down the skip connection.
                y = x.view_as(x)
                y.register_hook(accumulate)
                return y

            hooks.append((grp.hook, hook))

        def check() -> None:
            missing = [grp.hook for grp in self.groups
                       if grp not in contracted and grp.hook not in exempt]
            if missing or pending:
                raise HookError(f"{len(missing)} receiver group(s) received no gradient in the "
                                f"backward pass (e.g. {', '.join(missing[:3])}); their edges' "
                                "scores would silently be zero. Is part of the model detached?")

        return hooks, check


@contextlib.contextmanager
def frozen_parameters(model: Any, params: list[Any] | None = None) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter; restore the flags after.

    Args:
        model: The model whose parameters to freeze.
        params: Its parameters, when the caller has listed them already (default:
            ``list(model.parameters())``).
    """
    params = list(model.parameters()) if params is None else params
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
