"""One masked forward pass of the block runner: the three strategies and the kept-form memo.

:class:`MaskedPass` evaluates K masks over N examples from a start layer (see
:mod:`circuitfind.patching.runner` for the method, eq. (1) and the costs). Its constructor
decides, from the masks, how each layer is computed and fills the buffers of eq. (1); then
:meth:`MaskedPass.logits` runs one of two forms:

- the *removed form* (:meth:`MaskedPass.removed_form`), eq. (1) itself, layer by layer: a
  *dense* layer builds every q/k/v receiver's input by one batched matmul
  (:meth:`MaskedPass.dense_inputs`); the *sparse start layer* recomputes only the heads the
  masks touch (:meth:`MaskedPass.sparse_attention`); other layers take the *shared path* (one
  norm and projection for all heads, touched receivers recomputed from
  :meth:`MaskedPass.deltas`);
- the *kept form* (:meth:`MaskedPass.kept_form`), for sparse circuits: receivers read the
  fully ablated run's residual plus their kept edges; mask-invariant nodes are computed once
  and kept in :class:`KeptFormMemo` until the next pass.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from circuitfind.patching.architectures.base import heads_matmul
from circuitfind.patching.plan import memo_rows

if TYPE_CHECKING:
    from circuitfind.graphs.graph import ComputeGraph
    from circuitfind.patching.runner import BlockRunner, RunCache


def receiver_changes(weights: Tensor, values: Tensor, base: Tensor | None = None) -> Tensor:
    """The sum of eq. (1), ``sum_u w[b, u, r] v[b, u]``: what patching edges changes in each
    receiver's input (its correction), for every row ``b`` at once.

    This is the one place eq. (1) is evaluated: the block runner's masked passes (removed and
    kept form, dense layers), the post-norm pass's per-layer mixtures and the hooked
    fallback's receiver hooks (:meth:`circuitfind.patching.engine.PatchingEngine.run`) all
    call it.

    Args:
        weights: ``[B, U, R]`` weights of the edges from U senders into R receivers in each row
            (a mask, or a (mask, receiver) pair): ``removed = 1 - M`` (removed form), the
            kept edges (kept form) or the frozen ones (path patching); fractional values
            interpolate.
        values: The senders' differences ``a_u - a'_u`` (or ``a_u - a_u(clean)``) flattened
            over examples, positions and ``d_model``: ``[B, U, X]`` per row, or ``[U, X]`` when
            every row reads the same values (senders before the start layer).
        base: Optional ``[B|1, R, X]`` added to the sum (one fused batched matmul).

    Returns:
        ``[B, R, X]`` in the values' unit (the residual stream's), or ``[1, R, X]`` where the
        values are shared and the weights are the same in every row (one matmul serves all:
        ACDC's candidates share their base circuit; not taken when the weights carry
        gradients).

    References:
        Eq. (1) of :mod:`circuitfind.patching.engine` (Conmy et al. 2023, edge patching;
        Syed et al. 2023 for its derivative, EAP).
    """
    w = weights.transpose(1, 2)  # [B, R, U]
    if values.ndim == 2:
        if (w.shape[0] > 1 and not weights.requires_grad
                and bool((weights == weights[:1]).all())):
            out = (w[0] @ values).unsqueeze(0)
        else:
            out = torch.matmul(w, values)
        if base is None:
            return out
        return out.add_(base) if base.shape[0] <= out.shape[0] else base + out
    out = torch.bmm(w, values)
    # the base added in place after the product: MKL's ``baddbmm`` with a broadcast base
    # runs these skinny products (R ~ 10 rows, X ~ 3e4 columns) about 1.7x slower
    return out if base is None else out.add_(base)


def host_array(values: Tensor) -> np.ndarray:
    """``values`` as a numpy array on the host (float32 for floating dtypes numpy lacks, which
    hold bfloat16 and float16 exactly): where a masked pass inspects its masks (which edges
    are removed, kept, equal in every mask), once per pass, instead of one small tensor
    operation per question."""
    values = values.detach()
    if values.dtype not in (torch.float32, torch.float64, torch.bool):
        values = values.float()
    return values.cpu().numpy()


def _any(values: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """``values.any(axis)`` (an array, typed as one)."""
    return np.asarray(values.any(axis))


def _all_removed(edge: np.ndarray, removed: np.ndarray, frozen: np.ndarray | None
                 ) -> Tensor | None:
    """:func:`fully_removed` on host arrays (``frozen``: which frozen weights are nonzero)."""
    full = np.asarray((removed == edge).all(1))  # [K, R]
    if frozen is not None:
        full &= ~_any(frozen, 1)
    return torch.from_numpy(full) if full.any() else None


def fully_removed(edge_mask: Tensor, removed: Tensor, frozen: Tensor | None = None
                  ) -> Tensor | None:
    """The (mask, receiver) pairs whose every incoming edge is removed (weight exactly 1, none
    frozen): ``[K, R]`` bool on the CPU, or ``None`` where there is none (or where the
    weights carry gradients, whose derivative eq. (1) defines).

    Such a receiver reads the fully ablated run's residual ``x'_r`` (``sum_u a'_u`` plus the
    biases; 0 under zero ablation of a bias-free model). Eq. (1) gives it as ``x - sum_u (a_u -
    a'_u)``, whose two sums agree only to rounding (``eps |x|``): where ``x'_r`` is much
    smaller than ``x`` (zero ablation), that noise is all the input holds, and the receiver's
    norm (RMSNorm; Qwen3's q/k norms after the projection) scales it up to unit size
    (``1/sqrt(eps)`` at most). Every masked pass therefore reads ``x'_r`` itself for these
    pairs (:meth:`MaskedPass.ablated_rows`, ``PostNormPass._ablated_rows``, the hooked
    engine's receiver hooks): exact for every ablation, at the cost of this one comparison.

    Args:
        edge_mask: ``[S, R]`` the graph's real edges (1).
        removed: ``[K, S, R]`` removal weights ``1 - M`` (0 off real edges).
        frozen: Optional ``[K, S, R]`` weights of frozen edges (path patching).

    Returns:
        ``[K, R]`` bool (CPU) or ``None``.
    """
    if removed.requires_grad or (frozen is not None and frozen.requires_grad):
        return None
    return _all_removed(host_array(edge_mask), host_array(removed),
                        None if frozen is None else host_array(frozen) != 0)


def ablated_input(residuals: tuple[Tensor, Tensor], receiver: Any) -> Tensor:
    """What ``receiver`` (a :class:`~circuitfind.graphs.graph.Receiver`) reads in the fully
    ablated run, from :meth:`BlockRunner.ablated_residuals`' ``(pre [L+1, n, T, d], mid [L, n,
    T, d])``: the stream after its layer's attention for an MLP, before its layer otherwise
    (q/k/v inputs; the logits at layer ``L``). ``[n, T, d]``, the model's dtype. The value
    :func:`fully_removed` pairs read in every masked pass."""
    pre, mid = residuals
    return mid[receiver.layer] if receiver.kind == "mlp" else pre[receiver.layer]


@dataclass
class KeptFormMemo:
    """Outputs of mask-invariant nodes kept from one kept-form pass to the next.

    ACDC tests one receiver after another against a circuit that changes in one place, so
    consecutive passes share most nodes. Entries are keyed by the content of their inputs
    (receiver weights and the senders' own keys, as small interned ids) and belong to one data
    tensor (``data``: the engine's memoised sender differences and the slice of them in use);
    a pass over other data starts afresh.

    Attributes:
        entries: key id -> node outputs of the last kept-form pass.
        data: ``(owner tensor, slice key)`` the entries belong to, or ``None``.
        ids: flat key -> small stable id (see :meth:`MaskedPass._intern`).
        next_id: The last id handed out.
        sums: ``(form, receiver, weights)`` -> eq. (1)'s sum over the static senders ``[X]``
            read in the last kept-form pass (see :meth:`MaskedPass.static_sums`).
        nbytes: Bytes of the tensors the entries and sums hold (each storage once).
    """

    entries: dict[Any, Tensor] = field(default_factory=dict)
    data: tuple[Tensor, Any] | None = None
    ids: dict[Any, int] = field(default_factory=dict)
    next_id: int = 0
    sums: dict[Any, Tensor] = field(default_factory=dict)
    nbytes: int = 0

    def keep(self, entries: dict[Any, Tensor], ids: dict[Any, int],
             sums: dict[Any, Tensor] | None, cap: int) -> None:
        """Make a pass's entries (and static sums) the memo, in the order they were made, as
        far as ``cap`` bytes allow; the rest are dropped, to be computed anew when a later
        pass needs them. The cap is what the memory plan allows (:func:`memo_cap`), so that a
        long run's memo cannot outgrow its budget. A view of a larger buffer is kept as a
        copy of its own values (a view holds its whole buffer: rows of a batch of static parts
        would otherwise keep the batch alive after the others are dropped); storages shared
        by several entries count once."""
        held: set[int] = set()
        total = 0

        def kept(items: dict[Any, Tensor]) -> dict[Any, Tensor]:
            nonlocal total
            out = {}
            for key, value in items.items():
                ptr = value.untyped_storage().data_ptr()
                if ptr not in held:
                    size = value.untyped_storage().nbytes()
                    own = value.numel() * value.element_size()
                    if total + min(size, own) > cap:
                        continue
                    if size > own:
                        value = value.clone()
                        ptr, size = value.untyped_storage().data_ptr(), own
                    held.add(ptr)
                    total += size
                out[key] = value
            return out

        self.entries = kept(entries)
        self.sums = {} if sums is None else kept(sums)
        self.ids, self.nbytes = ids, total

    def follow(self, owner: Tensor, key: Any) -> None:
        """Start afresh unless the entries belong to ``owner`` (held, so that its memory cannot
        be reused under the same address) at the slice ``key``."""
        if self.data is None or self.data[0] is not owner or self.data[1] != key:
            self.entries, self.data, self.ids, self.sums = {}, (owner, key), {}, {}
            self.nbytes = 0

    def new_id(self) -> int:
        """A fresh id for an interned key."""
        self.next_id += 1
        return self.next_id


def memo_cap(graph: ComputeGraph, start: int, rows: Tensor) -> int:
    """Bytes the kept-form memo may keep after a pass from layer ``start``: the memory plan's
    allowance (:func:`~circuitfind.patching.plan.memo_rows`) for the pass's examples, ``rows
    [n, T, d]`` (one example-batch's residual stream, in the model's dtype).

    Raises:
        ConfigError: ``start`` is not a layer from 0 to ``L``.
    """
    return memo_rows(graph, start) * rows.numel() * rows.element_size()


def _data_key(values: Tensor | None) -> tuple[Any, ...] | None:
    """What identifies a data tensor from one pass to the next: the tensor it views (held,
    so that its memory cannot be reused under the same address), where in it, and its
    version (bumped by every in-place change)."""
    if values is None:
        return None
    owner = values if values._base is None else values._base
    return (owner, values.storage_offset(), tuple(values.shape), values.stride(),
            values._version)


def _same_key(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    """Whether two :func:`_data_key` tuples name the same data (owners by identity)."""
    if a is None or b is None:
        return a is b
    return a[0] is b[0] and a[1:] == b[1:]


@dataclass
class DataMemo:
    """Values a masked pass derives from its data alone, never from its masks (the ablated
    values, the senders' differences and the fully ablated run's residuals gathered at the
    metric positions, index tensors), kept from one pass to the next while the data stays
    (:meth:`follow`); ACDC's hundreds of passes over the same examples build them once.

    Attributes:
        keys: :func:`_data_key` of each data tensor the values belong to.
        values: name -> value.
    """

    keys: tuple[tuple[Any, ...] | None, ...] = ()
    values: dict[Any, Tensor] = field(default_factory=dict)

    def follow(self, *data: Tensor | None) -> None:
        """Start afresh unless the values belong to these data tensors as they are now."""
        keys = tuple(_data_key(t) for t in data)
        if len(keys) != len(self.keys) or not all(
                _same_key(a, b) for a, b in zip(keys, self.keys)):
            self.keys, self.values = keys, {}

    def get(self, name: Any, make: Callable[[], Tensor]) -> Tensor:
        """The value ``name``, made by ``make()`` the first time."""
        got = self.values.get(name)
        if got is None:
            got = self.values[name] = make()
        return got


@dataclass(frozen=True)
class GraphTables:
    """A graph's indexing as host lists and arrays, built once per runner (:meth:`of`): what
    a masked pass's set-up reads for every pass without a tensor operation per question.

    Attributes:
        n_upstream: Senders before each receiver (``ComputeGraph.n_upstream`` as a list).
        upstream: The same as an ``[R]`` array.
        edge: ``[S, R]`` bool, the real edges.
        receiver_layer: ``[R]`` each receiver's layer.
        later: Per start layer, ``[R]`` bool: the receivers a kept-form pass reads from the
            fully ablated run (after the start layer's q/k/v inputs: its MLP and later).
    """

    n_upstream: list[int]
    upstream: np.ndarray
    edge: np.ndarray
    receiver_layer: np.ndarray
    later: list[np.ndarray]

    @staticmethod
    def of(graph: Any) -> GraphTables:
        """The tables of ``graph`` (a :class:`ComputeGraph`)."""
        layer = np.array([r.layer for r in graph.receivers])
        later = []
        for start in range(graph.n_layers):
            after = layer > start
            after[graph.mlp_receiver[start]] = True
            later.append(after)
        return GraphTables(graph.n_upstream.tolist(), graph.n_upstream.numpy().copy(),
                           host_array(graph.edge_mask), layer, later)


class _Form:
    """Weights of one form of eq. (1) for a pass: over the senders before the start layer
    (``w_shared [K, A, R]`` with their ``shared [A, X]`` clean - ablated values) and the
    senders computed in the pass (``w_dyn [K, J, R]``), and which receivers they touch
    (``touched_np [K, R]``, a bool host array)."""

    def __init__(self, w_shared: Tensor | None, w_dyn: Tensor, shared: Tensor | None,
                 touched: np.ndarray) -> None:
        self.w_shared = None if shared is None else w_shared
        self.touched_any: list[bool] = _any(touched, 0).tolist()
        self.k = int(w_dyn.shape[0])  # masks
        # what the methods read (the arguments and the buffers above)
        self.w_dyn, self.shared, self.touched_np = w_dyn, shared, touched
        self._spans: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}  # see senders

    def senders(self, part: str, rs: list[int], limit: int) -> tuple[int, int]:
        """The senders ``[lo, hi)`` of ``part`` (``"shared"``: rows of ``shared``; ``"dyn"``:
        rows of the per-mask buffer) outside which every weight into the receivers ``rs`` is 0
        in every mask, cut at ``limit``; ``(0, 0)`` where there is none. Eq. (1)'s sums over
        ``[lo, hi)`` equal those over every sender (the others add exact zeros) and read far
        fewer buffer rows: a sparse circuit's receivers have a few kept edges each (ACDC,
        Llama: 1-2 of 6-25 computed senders). Per-receiver spans are found once per form, and
        only for sums over 16 or more buffer rows in all (masks x senders): shorter ones read
        less than finding the span costs (GPT-2's passes, 3% slower otherwise)."""
        if limit * self.k < 16:  # a short sum: not worth finding its span
            return (0, limit) if limit else (0, 0)
        if part not in self._spans:
            w = self.w_shared if part == "shared" else self.w_dyn
            spans: tuple[np.ndarray, np.ndarray] | None = None
            if w is not None and w.shape[1]:
                nz = w.ne(0).any(0).cpu().numpy()  # [U, R]
                u = nz.shape[0]
                has = nz.any(0)
                spans = (np.where(has, nz.argmax(0), u),
                         np.where(has, u - nz[::-1].argmax(0), 0))
            self._spans[part] = spans
        found = self._spans[part]
        if found is None:
            return 0, 0
        first, last = found
        lo, hi = int(first[rs].min()), min(int(last[rs].max()), limit)
        return (lo, hi) if lo < hi else (0, 0)

    def first_mask(self) -> _Form:
        """The same form for the first mask only (receivers equal in every mask)."""
        return _Form(None if self.w_shared is None else self.w_shared[:1], self.w_dyn[:1],
                     self.shared, self.touched_np[:1])


@dataclass(frozen=True)
class LayerViews:
    """Where one layer's nodes sit in a graph's sender and receiver indexing: what every
    masked pass reads, built once per runner (:meth:`of`).

    Attributes:
        qkv: The layer's q, k and v receivers (contiguous: q heads, then k and v groups).
        first: First receiver of each kind, ``{"q": .., "k": .., "v": ..}``.
        sizes: Receivers of each kind (query heads; key/value groups).
        heads: Sender indices of the layer's heads.
        mlp: Sender index of the layer's MLP.
        mlp_receiver: Receiver index of the MLP's input.
    """

    qkv: list[int]
    first: dict[str, int]
    sizes: dict[str, int]
    heads: range
    mlp: int
    mlp_receiver: int

    @staticmethod
    def of(graph: Any) -> list[LayerViews]:
        """The views of every layer of ``graph`` (a :class:`ComputeGraph`)."""
        g = graph
        sizes = {"q": g.n_heads, "k": g.n_kv_heads, "v": g.n_kv_heads}
        return [LayerViews(list(range(g.q_start[layer], g.v_start[layer] + g.n_kv_heads)),
                           {"q": g.q_start[layer], "k": g.k_start[layer], "v": g.v_start[layer]},
                           sizes, range(g.head_start[layer], g.head_start[layer] + g.n_heads),
                           g.mlp_index[layer], g.mlp_receiver[layer])
                for layer in range(g.n_layers)]


class MaskedPass:
    """K masked runs over N examples from one start layer (arguments as in
    :meth:`circuitfind.patching.runner.BlockRunner.run`, plus the runner itself).

    The constructor decides how the pass runs: which senders are read from the clean cache
    (*static*: before the start layer) and which are computed per pass (*dynamic*)
    (:meth:`_choose_senders`, which also picks the kept form for sparse circuits), the weights
    of each form of eq. (1) (:meth:`_forms`) and the per-mask buffers (:meth:`_buffers`).

    Raises:
        ConfigError: ``start`` out of range, or a mask touches a receiver before ``start``.
    """

    def __init__(self, runner: BlockRunner, cache: RunCache, ablated: Tensor, removed: Tensor,
                 positions: Tensor, start: int | None = None, frozen: Tensor | None = None,
                 diff: Tensor | None = None,
                 abl_resid: tuple[Tensor, Tensor] | None = None) -> None:
        self.runner, self.memo, self.g, self.lay = runner, runner.memo, runner.graph, runner.arch
        self.layers: list[LayerViews] = runner.layers
        self.tables: GraphTables = runner.tables
        self.cache, self.ablated, self.removed, self.frozen = cache, ablated, removed, frozen
        self.abl_resid = abl_resid
        self._abl = abl_resid  # the fully ablated run's residuals, once read (ablated_rows)
        self.k_masks = removed.shape[0]
        self.n, self.t, self.d = cache.resid.shape[1:]
        self.dev, self.dtype = cache.resid.device, cache.resid.dtype
        self.diff = cache.senders - ablated if diff is None else diff  # [S, n, T, d]
        self.positions = positions
        self.pos = positions.to(self.dev)  # [n, P]
        self.n_pos = self.pos.shape[1]
        self.full_reach = 0  # see _position_demand
        # set by kept_form: each form's weights on the host, and the senders whose output
        # differs by mask (read by static_sums and dynamic_sums; None in the removed form)
        self.host_weights: dict[str, np.ndarray] | None = None
        self.variant: np.ndarray | None = None
        self._shared_pos: tuple[Tensor, Tensor] | None = None  # see shared_at_positions
        # values of the data alone (at the metric positions), kept from pass to pass
        self.data_memo: DataMemo = runner.data_memo
        self.data_memo.follow(self.diff, ablated, self.pos,
                              *(abl_resid if abl_resid is not None else (None, None)))
        # one past the last metric position (no later position reaches the metric) and the
        # first metric position of the batch: the ends of the position cone (read on the
        # host once per data)
        ends = self.data_memo.get("position cone ends", lambda: torch.stack(
            [self.pos.max() + 1, self.pos.min()]).cpu())
        self.hi, self.p_lo = int(ends[0]), int(ends[1])
        # the masks on the host, inspected there once per pass: removal weights [K, S, R],
        # which are nonzero, which frozen ones are, the receivers each mask touches [K, R]
        self.removed_host = host_array(removed)
        self.removed_nz = self.removed_host != 0
        self.frozen_nz = None if frozen is None else host_array(frozen) != 0
        touched = _any(self.removed_nz, 1)
        if self.frozen_nz is not None:
            touched |= _any(self.frozen_nz, 1)
        self.touched_np = touched
        self.touched_cpu = torch.from_numpy(touched)  # [K, R]
        self.full = (None if removed.requires_grad or (frozen is not None and frozen.requires_grad)
                     else _all_removed(self.tables.edge, self.removed_host, self.frozen_nz))
        self.full_any: list[bool] | None = (None if self.full is None
                                            else _any(self.full.numpy(), 0).tolist())
        self.start = runner.resolve_start(self.touched_cpu.any(0), start)
        self._choose_senders()
        self._forms()
        self._buffers()

    def _choose_senders(self) -> None:
        """Set ``static`` (active senders before the start layer, read from the cache),
        ``dynamic`` (senders the pass computes) and ``kept_w`` (the kept edges' weights
        ``[K, S, R]`` when the pass runs in kept form, else ``None``; then also
        ``kept_host``, the same on the host, and ``kept_nz``, which are nonzero).

        Kept form: after the start layer, a receiver's input is the ablated run's residual
        plus its kept edges' differences, ``x_r = x'_L + sum_u kept[u, r] (a_u - a'_u)``,
        which equals eq. (1); used when the masks keep fewer edges there than they remove
        (sparse circuits: ACDC, small faithfulness-curve sizes). Senders then only need
        computing if a kept edge leaves them (or a removed edge into a start-layer
        receiver)."""
        g, removed, start, tables = self.g, self.removed, self.start, self.tables
        nz = self.removed_nz
        active = _any(nz, (0, 2))  # senders with a removed/frozen edge
        if self.frozen_nz is not None:
            active |= _any(self.frozen_nz, (0, 2))
        n_static = g.head_start[start] if start < g.n_layers else g.n_senders
        self.n_static = n_static
        self.static = np.flatnonzero(active[:n_static]).tolist()
        self.kept_w = None
        self.kept_host: np.ndarray | None = None
        self.kept_nz: np.ndarray | None = None
        if self.frozen_nz is None and start < g.n_layers:
            # receivers after the start layer's q/k/v inputs (those read the clean residual)
            later = tables.later[start]
            kept_host = tables.edge.astype(self.removed_host.dtype) - self.removed_host
            kept_nz = kept_host != 0  # [K, S, R]
            # in the last block every later receiver is read at the metric positions only,
            # so the kept form's sums are short whatever the edge counts; it is taken there
            # when the removed form would run the block dense (most of its q/k/v inputs
            # touched: ACDC past the block's first receivers)
            qkv = self.touched_np[:, self.layers[start].qkv]
            last_dense = start == g.n_layers - 1 and 2 * int(qkv.sum()) >= qkv.size
            if last_dense or (int(kept_nz[:, :, later].sum())
                              < int(nz[:, :, later].sum())):
                self.kept_w = g.edge_mask.to(removed) - removed  # [K, S, R]
                self.kept_host, self.kept_nz = kept_host, kept_nz
                active = _any(kept_nz[:, :, later], (0, 2)) | _any(nz[:, :, ~later], (0, 2))
        if self.kept_w is None:
            # kept-form outputs are only reused by kept-form passes (the static sums stay)
            self.memo.keep({}, self.memo.ids, self.memo.sums, self.memo.nbytes)
        self.dynamic = (np.flatnonzero(active[n_static:]) + n_static).tolist()
        self.dyn_slot = {u: i for i, u in enumerate(self.dynamic)}

    @cached_property
    def row_pos(self) -> Tensor:
        """The metric positions of every (mask, example) row, ``[K*n, P]``."""
        return self.pos.repeat(self.k_masks, 1)

    def upstream_dynamic(self, rs: list[int]) -> int:
        """How many of the dynamic senders (the first rows of the per-mask buffers) lie
        upstream of some receiver of ``rs``."""
        n_up = self.tables.n_upstream
        return bisect_left(self.dynamic, max(n_up[r] for r in rs))

    def _forms(self) -> None:
        """The weights of eq. (1) (removed form) and, in kept form, of the kept edges
        (``forms``), over the static senders' shared values and the dynamic senders.

        Shared-over-masks values: the static senders' clean - ablated values (and, for frozen
        edges, the dynamic senders' ablated - clean values). A dynamic sender's per-mask
        buffer ``current`` holds ``a_u(current run) - a'_u``, so that eq. (1) for it is
        ``(removed + frozen) * current + frozen * (a' - clean)``."""
        diff, dynamic, frozen, n_static = self.diff, self.dynamic, self.frozen, self.n_static
        removed, static = self.removed, self.static
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
            shared = torch.cat(parts).reshape(-1, self.n * self.t * self.d) if parts else None
            w_shared = torch.cat(cols, 1) if cols else None  # [K, A, R]
        self.shared, self.w_shared = shared, w_shared
        self.w_dyn = (removed[:, dynamic] if frozen is None
                      else removed[:, dynamic] + frozen[:, dynamic])  # [K, J, R]
        self.forms = {"removed": _Form(w_shared, self.w_dyn, shared, self.touched_np)}
        kept_w = self.kept_w
        if kept_w is not None:
            assert self.kept_nz is not None  # set with kept_w
            self.forms["kept"] = _Form(
                kept_w[:, :n_static] if n_static else None, kept_w[:, dynamic],
                diff[:n_static].reshape(n_static, -1) if n_static else None,
                _any(self.kept_nz, 1))

    def _buffers(self) -> None:
        """The per-mask buffer ``current [K, J, n*T*d]`` of the dynamic senders and, for
        dense layers, the combined buffer ``buf`` and its coefficients ``coef``.

        Dense layers (the masks touch at least half of the (mask, q/k/v receiver) pairs:
        random and curve circuits; never in kept form): one buffer ``buf [K, 1 + A + J,
        n*T*d]`` holds the residual stream, the shared rows of eq. (1) and the dynamic
        senders' ``current`` values, so that all of a layer's receiver inputs (x itself where
        a mask touches none) are one batched matmul with the coefficients ``coef [K, 1 + A +
        J, R] = [1; -w_shared; -w_dyn]``.

        The buffers are the runner's scratch memory (:meth:`BlockRunner.scratch`), the same
        from pass to pass: uninitialised (in the last block only the metric positions are
        written, and every position of the output depends only on the same position of the
        buffer), and not mapped and page-faulted anew by every pass."""
        g, k_masks, touched = self.g, self.k_masks, self.touched_np
        size = self.n * self.t * self.d
        self.dense_layers = set()
        if self.kept_w is None:
            self.dense_layers = {layer for layer in range(self.start, g.n_layers)
                                 if 2 * int(touched[:, self.layers[layer].qkv].sum())
                                 >= touched[:, self.layers[layer].qkv].size}
        self.buf = self.coef = None
        self.n_pre = 0  # rows of ``buf`` before the dynamic senders
        n_dyn = len(self.dynamic)
        like = self.cache.resid
        if self.dense_layers:
            # without frozen edges ``shared`` is a view of every static sender: copy the
            # active ones only
            static = self.static
            rows, w_rows = ((self.diff[static].reshape(len(static), size),
                             self.removed[:, static])
                            if self.frozen is None else (self.shared, self.w_shared))
            self.n_pre = 1 + (0 if rows is None else rows.shape[0])
            self.buf = self.runner.scratch("masked pass: buf", (k_masks, self.n_pre + n_dyn, size),
                                           like)
            if rows is not None:
                self.buf[:, 1:self.n_pre] = rows
            ones = self.removed.new_ones(k_masks, 1, g.n_receivers)
            self.coef = torch.cat([ones] + ([] if w_rows is None else [-w_rows])
                                  + [-self.w_dyn], 1)
            self.current = self.buf[:, self.n_pre:]
        else:
            self.current = self.runner.scratch("masked pass: current", (k_masks, n_dyn, size),
                                               like)
        self.current_pos = None if self.kept_w is None else self.runner.scratch(
            "masked pass: current at positions", (k_masks, n_dyn, self.n * self.n_pos * self.d),
            like)

    def dense_inputs(self, rs: list[int], x: Tensor, lo: int = 0) -> Tensor:
        """Inputs ``[K, R', n*T*d]`` of receivers ``rs`` (of a dense layer, all their
        senders computed) from the residual stream ``x [K*n, T', d]`` at the positions
        ``lo..lo+T'`` (eq. (1); the inputs at other positions are stale: every position of
        the output depends only on the same position of the buffers)."""
        buf, coef, dev = self.buf, self.coef, self.dev
        k_masks, n, n_pre, t, d = self.k_masks, self.n, self.n_pre, self.t, self.d
        assert buf is not None and coef is not None
        tx = x.shape[1]
        if tx == t:
            buf[:, 0] = x.reshape(k_masks, -1)
        else:
            buf[:, 0].view(k_masks, n, t, d)[:, :, lo: lo + tx] = x.view(k_masks, n, tx, d)
        rows = n_pre + self.upstream_dynamic(rs)
        return self.ablated_block(rs, receiver_changes(
            coef[:, :rows][:, :, torch.tensor(rs, device=dev)], buf[:, :rows]))

    def deltas(self, receivers: list[int], form: str = "removed", at_pos: bool = False
               ) -> list[tuple[int, Tensor | slice, Tensor]]:
        """``(r, masks touching r, patch [k_r, n, T, d])`` for the touched ``receivers``:
        ``sum_u w[u, r] (a_u - a'_u)`` with the weights of ``form``; ``[k_r, n, P, d]`` at
        the metric positions only with ``at_pos`` (receivers whose node is read there only).

        One matmul over the shared buffer and one batched matmul over the per-mask
        buffer for all of them (each buffer is read once per layer, not once per receiver).
        """
        current, d, dev = self.current, self.d, self.dev
        n, t = self.n, self.t
        wf = self.forms[form]
        w_shared, w_dyn, shared = wf.w_shared, wf.w_dyn, wf.shared
        k_masks = wf.k
        rs = [r for r in receivers if wf.touched_any[r]]
        if not rs:
            return []
        sub = wf.touched_np[:, rs]  # [K, R']
        j = self.upstream_dynamic(rs)  # dynamic senders upstream of these receivers
        # only the senders with a nonzero weight into ``rs`` (see _Form.senders)
        a0, a1 = (0, 0) if shared is None else wf.senders("shared", rs, shared.shape[0])
        j0, j1 = wf.senders("dyn", rs, j)
        rows_at: int | None = j0  # the buffer row ``current[:, j0]`` holds (dense_deltas)
        if at_pos:  # the buffers' rows at the metric positions
            t = self.n_pos
            if self.current_pos is not None:  # kept form: written there by put
                current = self.current_pos
            elif j1:
                current, j0, j1 = self.pos_rows(current[:, j0:j1]), 0, j1 - j0
                rows_at = None
            if shared is not None:
                shared = self.shared_at_positions(shared)
        sums = ((None if w_shared is None or not a1 else w_shared[:, a0:a1]),
                (None if shared is None or not a1 else shared[a0:a1]),
                (w_dyn[:, j0:j1] if j1 else None), (current[:, j0:j1] if j1 else None))
        if sub.all():
            return self.dense_deltas(rs, wf, sums, t, form, rows_at)
        w_sh, sh, w_d, cur = sums
        jj, kk = torch.from_numpy(sub).T.nonzero(as_tuple=True)  # pairs grouped by receiver
        rr = torch.tensor(rs)[jj]
        kd, rd = kk.to(dev), rr.to(dev)
        out = None
        if w_sh is not None:
            assert sh is not None  # _Form keeps w_shared only with shared
            weights = w_sh[kd, :, rd]  # [P, A]
            if k_masks > 1:
                # Receivers whose weights are the same in every mask (e.g. the base circuit
                # shared by ACDC's candidates) need one row, not K: matmul the distinct
                # rows only and gather.
                rows, index = torch.unique(weights, dim=0, return_inverse=True)
                if rows.shape[0] < weights.shape[0]:
                    out = receiver_changes(rows[:, :, None], sh)[index, 0]
            if out is None:
                out = receiver_changes(weights[:, :, None], sh)[:, 0].expand(
                    weights.shape[0], -1)  # [P, X]
        if w_d is not None and cur is not None:
            out = receiver_changes(w_d[kd, :, rd][:, :, None], cur[kd],
                                   None if out is None else out[:, None])[:, 0]
        if out is None:  # touched by edges that carry nothing here (weight 0 on both sums)
            out = current.new_zeros(len(kk), n * t * d)
        counts = torch.bincount(jj, minlength=len(rs)).tolist()
        result = []
        for r, ks_cpu, dlt in zip(rs, kk.split(counts), out.split(counts)):
            ks: Tensor | slice = slice(None) if len(ks_cpu) == k_masks else ks_cpu.to(dev)
            result.append((r, ks, dlt.view(-1, n, t, d)))
        return result

    def dense_deltas(self, rs: list[int], wf: _Form,
                     sums: tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None],
                     t: int, form: str | None = None, j0: int | None = None
                     ) -> list[tuple[int, Tensor | slice, Tensor]]:
        """:func:`deltas` when every mask touches every receiver in ``rs``: the patches as
        one ``[K, R', n*t*d]`` tensor, mask-major, no gathers. ``sums``: the weights and
        values of eq. (1)'s two sums, ``(w_shared [K, A', R], shared [A', n*t*d], w_dyn [K,
        J', R], current [K, J', n*t*d])`` over the senders that carry anything (``None``
        where a sum has none); ``form``: their form's name, for :meth:`static_sums`; ``j0``:
        the first per-mask buffer row ``current`` starts at, for :meth:`dynamic_sums`
        (``None``: summed as one product)."""
        d, dev, n = self.d, self.dev, self.n
        w_sh, sh, w_d, cur = sums
        k_masks = wf.k
        idx = torch.tensor(rs, device=dev)
        out = None
        if w_sh is not None and t == self.t and form is not None:
            out = self.static_sums(form, rs)
        if w_sh is not None and out is None:
            assert sh is not None  # _Form keeps w_shared only with shared
            # [1, R', X] where every mask has the same weights (ACDC's base circuit)
            out = receiver_changes(w_sh[:, :, idx], sh)  # [K|1, R', X]
        if w_d is not None and cur is not None:
            out = (receiver_changes(w_d[:, :, idx], cur[:k_masks], out) if j0 is None
                   else self.dynamic_sums(w_d[:, :, idx], cur[:k_masks], j0, out))
        if out is None:  # touched by edges that carry nothing here
            out = self.current.new_zeros(1, len(rs), n * t * d)
        out = out.expand(k_masks, -1, -1)
        return [(r, slice(None), out[:, i].view(k_masks, n, t, d)) for i, r in enumerate(rs)]

    def receiver_inputs(self, rs: list[int], form: str, base: Tensor, sign: float
                        ) -> tuple[Tensor, list[int]] | None:
        """Inputs ``[k, R_t, n*T*d]`` of the receivers among ``rs`` that every mask of
        ``form`` touches, ``base + sign * sum_u w[u, r] (a_u - a'_u)`` (eq. (1): ``sign =
        -1`` over removed edges from the clean residual, ``+1`` over kept edges from the
        ablated one), and their positions in ``rs``; one batched matmul with the base fused,
        no per-receiver copies. The others read ``base`` alone. ``None`` when some receiver
        is touched by some masks only, or by none of them all."""
        wf = self.forms[form]
        sub = wf.touched_np[:, rs]  # [k, R']
        every = sub.all(0)
        if not (every | ~sub.any(0)).all() or not every.any():
            return None
        hit = np.flatnonzero(every).tolist()
        hit_rs = [rs[i] for i in hit]
        j = self.upstream_dynamic(hit_rs)
        idx = torch.tensor(hit_rs, device=self.dev)
        out = base.reshape(1, 1, -1).expand(1, len(hit_rs), -1)
        static = self.static_sums(form, hit_rs)
        if static is not None:
            out = torch.add(out, static, alpha=sign)
        elif wf.w_shared is not None:
            assert wf.shared is not None  # _Form keeps w_shared only with shared
            a0, a1 = wf.senders("shared", hit_rs, wf.shared.shape[0])
            if a1:
                out = receiver_changes(wf.w_shared[:, a0:a1][:, :, idx] * sign,
                                       wf.shared[a0:a1], out)
        j0, j1 = wf.senders("dyn", hit_rs, j)
        if j1:
            out = self.dynamic_sums(wf.w_dyn[:, j0:j1][:, :, idx] * sign,
                                    self.current[:wf.k, j0:j1], j0, out)
        return out.expand(wf.k, -1, -1), hit

    def dynamic_sums(self, weights: Tensor, values: Tensor, j0: int, base: Tensor | None
                     ) -> Tensor:
        """:func:`receiver_changes` over the per-mask buffer's rows ``j0..`` (``weights [K,
        J', R']``, ``values [K, J', X]``, ``base``). In a kept-form pass of several masks the
        rows of mask-invariant senders (written once and copied to every mask, see
        :meth:`put`) outside the span of the variant ones are read from the first mask only
        (one matmul for every mask), and only the variant span per mask: a skinny product
        that reads its buffer rows, so about a quarter less memory traffic in ACDC's passes."""
        variant = self.variant
        k, j = values.shape[0], values.shape[1]
        if variant is None or k < 2:
            return receiver_changes(weights, values, base)
        var = np.flatnonzero(variant[self.dynamic[j0: j0 + j]])
        v0, v1 = (int(var[0]), int(var[-1]) + 1) if len(var) else (0, 0)
        if v1 - v0 == j:
            return receiver_changes(weights, values, base)
        out = base
        for a, b in ((0, v0), (v1, j)):  # invariant runs: the first mask's rows
            if b > a:
                out = receiver_changes(weights[:, a:b], values[0, a:b], out)
        if v1 > v0:
            out = receiver_changes(weights[:, v0:v1], values[:, v0:v1], out)
        assert out is not None  # some run is nonempty (j > 0)
        return out

    def static_sums(self, form: str, rs: list[int]) -> Tensor | None:
        """Eq. (1)'s sum over the static senders (before the start layer), ``sum_u w[u, r]
        (a_u - a'_u)`` with the weights of ``form``, for the receivers ``rs`` whose weights from
        them are the same in every mask: ``[1, R', n*T*d]``, or ``None`` (the caller sums them
        batched) outside the kept form, where some receiver's weights differ between masks,
        or where the weights carry gradients (a kept row would hold another pass's graph).

        Each receiver's row is summed over its own senders alone and kept in the kept-form
        memo (:attr:`KeptFormMemo.sums`) by its weights: ACDC's consecutive passes recompute
        the same receivers downstream of the tested one, whose edges from before the start
        layer rarely change, so most rows are read from there, not summed again."""
        host = self.host_weights
        wf = self.forms[form]
        if host is None or wf.shared is None or wf.w_shared is None or wf.w_shared.requires_grad:
            return None
        name = form.removesuffix("1")
        w = host[name][:wf.k, :self.n_static][:, :, rs]  # [k, A, R']
        if wf.k > 1 and not (w == w[:1]).all():
            return None
        memo, fresh, shared = self.memo.sums, self.fresh_sums, wf.shared
        rows = []
        for i, r in enumerate(rs):
            col = w[0, :, i]
            key = (name, r, col.tobytes())
            got = fresh.get(key)
            if got is None:
                got = memo.get(key)
            if got is None:
                nz = np.flatnonzero(col)
                if len(nz):
                    a0, a1 = int(nz[0]), int(nz[-1]) + 1
                    got = wf.w_shared[0, a0:a1, r] @ shared[a0:a1]  # [X]
                else:
                    got = shared.new_zeros(shared.shape[1])
            fresh[key] = got
            rows.append(got)
        return torch.stack(rows)[None]

    def pos_rows(self, values: Tensor) -> Tensor:
        """Flat buffer rows ``[..., n*T*d]`` -> ``[..., n*P*d]`` at the metric positions."""
        n, t, d = self.n, self.t, self.d

        def flat() -> Tensor:  # flat indices of the metric positions' values
            rows = (torch.arange(n, device=self.dev)[:, None] * t + self.pos)  # [n, P]
            return (rows[:, :, None] * d + torch.arange(d, device=self.dev)).reshape(-1)

        index = self.data_memo.get(("flat positions", n, t, d), flat)
        return values.index_select(-1, index)  # reads a strided slice in place

    def shared_at_positions(self, shared: Tensor) -> Tensor:
        """The rows ``shared [A, n*T*d]`` at the metric positions, ``[A, n*P*d]``: from the
        data memo where they are the first senders' clean - ablated values (no frozen edges;
        kept from pass to pass), else gathered (once per pass)."""
        diff = self.diff
        if (self.frozen is None and diff.is_contiguous() and shared.data_ptr() == diff.data_ptr()
                and shared.shape[1] == self.n * self.t * self.d):
            every = self.data_memo.get("differences at positions", lambda: self.pos_rows(
                diff.view(diff.shape[0], -1)))
            return every[: shared.shape[0]]
        if self._shared_pos is None or self._shared_pos[0] is not shared:
            self._shared_pos = (shared, self.pos_rows(shared))
        return self._shared_pos[1]

    def ablated_rows(self, r: int, ks: Tensor | slice, inputs: Tensor, at_pos: bool = False,
                     lo: int = 0) -> Tensor:
        """Receiver ``r``'s inputs ``inputs [k_r, ...]`` (``n*T*d`` or ``n*P*d`` values per
        row; rows: the masks ``ks``) with the rows of masks that remove every edge into ``r``
        set to the fully ablated run's input (:func:`fully_removed`: eq. (1) leaves rounding
        noise there), at the metric positions with ``at_pos`` (else at the positions
        ``lo..``: ``inputs`` may hold fewer than ``T``); written in place (a tensor
        broadcast over its rows is copied first), returned."""
        full = self.full
        if full is None or self.full_any is None or not self.full_any[r]:
            return inputs
        rows = full[:, r][ks if isinstance(ks, slice) else ks.cpu()]
        if not bool(rows.any()):
            return inputs
        if self._abl is None:
            self._abl = self.runner.ablated_residuals(self.ablated, self.n, self.t)
        value = ablated_input(self._abl, self.g.receivers[r])
        if inputs.shape[0] > 1 and inputs.stride(0) == 0:
            inputs = inputs.clone()
        dst = inputs.view(inputs.shape[0], self.n, -1, self.d)
        if at_pos:
            value = self.at_positions(value[None])[0]
        elif lo or dst.shape[2] != self.t:
            value = value[:, lo: lo + dst.shape[2]]
        dst[rows.to(self.dev)] = value
        return inputs

    def ablated_block(self, rs: list[int], inputs: Tensor, ks: slice = slice(None)) -> Tensor:
        """:meth:`ablated_rows` of each receiver of ``rs`` in ``inputs [k, R', ...]``."""
        if self.full_any is None or not any(self.full_any[r] for r in rs):
            return inputs
        if inputs.shape[0] > 1 and inputs.stride(0) == 0:
            inputs = inputs.contiguous()
        for i, r in enumerate(rs):
            self.ablated_rows(r, ks, inputs[:, i])
        return inputs

    @cached_property
    def common_pos(self) -> Tensor | slice | None:
        """The metric positions where every example has the same ones (kept in the data
        memo): a slice where they are consecutive, else ``[P]`` indices; ``None`` where the
        examples' positions differ. Then values are selected at them along ``T`` by a
        strided copy (``narrow``, ``index_select``, ``index_copy_``) instead of an
        element-wise ``gather``/``scatter_`` (about 4-12x faster at ``[K, h, n, T, d]``)."""
        pos = self.pos

        def make() -> Tensor:  # [3]: (shared, consecutive, first) as integers
            row = pos[:1]
            shared = bool((pos == row).all()) and pos.shape[1] > 0
            steps = row[0, 1:] - row[0, :-1]
            run = shared and bool((steps == 1).all())
            return torch.tensor([shared, run, int(row[0, 0]) if shared else 0])

        shared, run, first = self.data_memo.get("common positions", make).tolist()
        if not shared:
            return None
        return slice(first, first + self.n_pos) if run else pos[0]

    def select_pos(self, values: Tensor, dim: int, fresh: bool = True) -> Tensor:
        """``values`` at the metric positions along ``dim`` (the ``T`` axis, the examples'
        axis just before it): ``[..., n, T, ...]`` -> ``[..., n, P, ...]``, a new
        contiguous tensor (without ``fresh`` possibly a view of ``values``, for a caller
        that copies it)."""
        common = self.common_pos
        if isinstance(common, slice):
            view = values.narrow(dim, common.start, self.n_pos)
            return view.clone(memory_format=torch.contiguous_format) if fresh else view
        if common is not None:
            return values.index_select(dim, common)
        shape = [1] * values.dim()
        shape[dim - 1], shape[dim] = self.n, self.n_pos
        idx = self.pos.reshape(shape).expand(*values.shape[:dim], self.n_pos,
                                          *values.shape[dim + 1:])
        return values.gather(dim, idx)

    def write_pos(self, target: Tensor, values: Tensor, dim: int) -> None:
        """``target [..., n, T, ...]`` at the metric positions along ``dim`` set to
        ``values [..., n, P, ...]`` (in place; the inverse of :meth:`select_pos`)."""
        common = self.common_pos
        if isinstance(common, slice):
            target.narrow(dim, common.start, self.n_pos).copy_(values)
        elif common is not None:
            target.index_copy_(dim, common, values.expand(
                *target.shape[:dim], self.n_pos, *target.shape[dim + 1:]))
        else:
            shape = [1] * target.dim()
            shape[dim - 1], shape[dim] = self.n, self.n_pos
            idx = self.pos.reshape(shape).expand(*target.shape[:dim], self.n_pos,
                                              *target.shape[dim + 1:])
            target.scatter_(dim, idx, values.expand(idx.shape))

    def at_positions(self, values: Tensor, lo: int = 0) -> Tensor:
        """``[k, n, T, d]`` -> ``[k, n, P, d]`` at the metric positions (``values`` holding
        the positions ``lo..`` with ``lo``)."""
        if not lo:
            return self.select_pos(values, 2)
        n, n_pos = self.n, self.n_pos
        pos = self.data_memo.get(("metric positions from", lo), lambda: self.pos - lo)
        idx = pos[None, :, :, None].expand(values.shape[0], n, n_pos, values.shape[-1])
        return values.gather(2, idx)

    def ablated_at_positions(self, resid: Tensor, layer: int) -> Tensor:
        """``resid[layer]`` of the fully ablated run's ``pre`` or ``mid`` (``[L|L+1, n, T,
        d]``) at the metric positions, ``[1, n, P, d]``: kept in the data memo from pass to
        pass when the caller handed the residuals in (the engine's memoised ones)."""
        if self.abl_resid is None:
            return self.at_positions(resid[layer].unsqueeze(0))
        which = "pre" if resid is self.abl_resid[0] else "mid"
        return self.data_memo.get(("ablated residual at positions", which, layer),
                                  lambda: self.at_positions(resid[layer].unsqueeze(0)))

    def put(self, slot: int, values: Tensor, at_pos: bool, written: bool = False,
            lo: int = 0) -> None:
        """Write senders' current values ``[K, h, n, T', d]`` at the positions ``lo..lo+T'``
        (or ``[K, h, n, P, d]`` at the metric positions when ``at_pos``) minus their ablation
        values into ``current`` from ``slot``; in kept form also into ``current_pos``, the
        same rows at the metric positions (what receivers read there only), and values at
        the metric positions go there alone. ``written``: ``values`` are already those rows
        of ``current`` (every position; :meth:`_heads_pass` computed them there): only the
        ablation values are subtracted, in place. Rows written from ``lo > 0`` have their
        earlier positions zeroed where a receiver may read them with weight 0 (before
        :attr:`full_reach`)."""
        ablated, current, d, dynamic = self.ablated, self.current, self.d, self.dynamic
        k_masks, n, n_pos, t = self.k_masks, self.n, self.n_pos, self.t
        at_p = self.current_pos
        h = values.shape[1]
        u0 = dynamic[slot]
        consecutive = dynamic[slot + h - 1] == u0 + h - 1
        once = values.shape[0] > 1 and values.stride(0) == 0  # equal in every mask
        if once:
            values = values[:1]
        if at_pos:
            if ablated.shape[2] > 1:  # the ablated values at the metric positions
                abl_all = self.data_memo.get("ablated at positions", lambda: self.select_pos(
                    ablated.expand(ablated.shape[0], n, t, d), 2))
            else:
                abl_all = ablated
            abl = (abl_all[u0: u0 + h] if consecutive
                   else abl_all[dynamic[slot: slot + h]])  # [h, n|1, P|1, d]
            # scattered into ``current`` too: the q inputs of heads read at the metric
            # positions only are read there in ``current`` (their keys and values are not)
            if at_p is not None and u0 < self.full_reach:  # read with weight 0
                current[:, slot: slot + h].zero_()
            change = (values - abl).expand(k_masks, h, n, n_pos, d)
            self.write_pos(current[:, slot: slot + h].view(k_masks, h, n, t, d), change, 3)
            if at_p is not None:
                at_p[:, slot: slot + h].view(k_masks, h, n, n_pos, d).copy_(change)
            return
        abl = ablated[u0: u0 + h] if consecutive else ablated[dynamic[slot: slot + h]]
        rows = current[:, slot: slot + h].view(k_masks, h, n, t, d)
        dst = rows
        if values.shape[3] != t or lo:  # the positions [lo, lo + T') only
            dst = rows[:, :, :, lo: lo + values.shape[3]]
            if abl.shape[2] > 1:
                abl = abl[:, :, lo: lo + values.shape[3]]
            if lo and u0 < self.full_reach:  # read with weight 0 before ``lo``
                rows[:, :, :, :lo].zero_()
        if written:
            dst.sub_(abl)
        elif once:  # the first mask's rows, copied to the others (no temporary)
            torch.sub(values[0], abl, out=dst[0])
            dst[1:].copy_(dst[:1])
        else:
            torch.sub(values, abl, out=dst)
        if at_p is not None:
            src = rows[:1] if once else rows
            at_p[:, slot: slot + h].view(k_masks, h, n, n_pos, d).copy_(
                self.select_pos(src, 3, fresh=False))

    def clean_minus_ablated(self, u: int) -> Tensor:
        """``a_u(clean) - a'_u`` flattened to ``[n*T*d]``."""
        diff = self.diff
        return diff[u].reshape(-1)

    def sparse_attention(self, layer: int, patches: list[tuple[int, Tensor | slice, Tensor]]
                         ) -> Tensor | None:
        """Block ``layer``'s residual after attention ``[K*n, T, d]`` from the clean run plus,
        per mask, the change of only the heads whose q/k/v inputs it touches.

        Used at the start layer, where every other head's output is its clean value; returns
        ``None`` when most (mask, head) pairs are touched (the dense path is cheaper).
        """
        cache, current, d, dev = self.cache, self.current, self.d, self.dev
        dyn_slot, dynamic, g, k_masks = self.dyn_slot, self.dynamic, self.g, self.k_masks
        lay, n, t = self.lay, self.n, self.t
        rep = g.n_heads // g.n_kv_heads
        affected = torch.zeros(k_masks, g.n_heads, dtype=torch.bool)
        rows: dict[int, Tensor] = {}  # receiver -> row of each mask in its patch, or -1
        for r, ks, _ in patches:
            rec = g.receivers[r]
            assert rec.head is not None  # q/k/v receivers belong to a head
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
                        xr = self.ablated_rows(r, ks_h[sel],
                                               base - patch_of[r][row[sel].to(dev)])
                        out[sel.to(dev)] = lay.project(layer, kind, idx, lay.ln_attn(layer, xr))
                inputs.append(out.reshape(len(ks_h) * n, t, 1, -1))
            q, k, v = inputs
            z = lay.attend(layer, q, k, v, grouped=False)  # [k_h*n, T, 1, dh]
            one = torch.tensor([head], device=dev)
            change = lay.head_results(layer, z, torch.zeros(1, dtype=torch.long, device=dev),
                                      heads=one)[:, :, 0].view(len(ks_h), n, t, d)
            change -= cache.senders[h0 + head]
            x_mid.index_add_(0, ks_h.to(dev), change)
            if h0 + head in dyn_slot:
                slot = dyn_slot[h0 + head]
                current[:, slot] = self.clean_minus_ablated(h0 + head)
                current[ks_h.to(dev), slot] += change.reshape(len(ks_h), -1)
        for u in dynamic:  # untouched dynamic heads of this layer: clean values
            if h0 <= u < h0 + g.n_heads and not affected[:, u - h0].any():
                current[:, dyn_slot[u]] = self.clean_minus_ablated(u)
        return x_mid.view(k_masks * n, t, d)

    def mlp_block(self, layer: int, x: Tensor, last: bool, x_in: Tensor, lo: int = 0
                  ) -> Tensor:
        """The MLP of ``layer`` added to the residual after attention ``x [K*n, T'|P, d]``
        (the positions ``lo..lo+T'``, or the metric positions with ``last``); in a parallel
        block the MLP reads the block's input ``x_in`` (same shape) instead."""
        d, dense_layers, dyn_slot, g = self.d, self.dense_layers, self.dyn_slot, self.g
        k_masks, lay, n, t, touched_cpu = self.k_masks, self.lay, self.n, self.t, self.touched_cpu
        out, x = x, (x_in if lay.parallel else x)
        r, u = g.mlp_receiver[layer], g.mlp_index[layer]
        assert r is not None and u is not None  # the block runner has no attention-only graphs
        tx = x.shape[1]
        if (layer in dense_layers and not last
                and 2 * int(touched_cpu[:, r].sum()) >= k_masks):
            xm = self.dense_inputs([r], x, lo)
            xm = xm.view(k_masks, n, t, d)[:, :, lo: lo + tx].reshape(x.shape)
        else:
            xm = x
            for _, ks, dlt in self.deltas([r]):
                xm = x.clone() if x.is_contiguous() else x.contiguous()
                xm.view(k_masks, n, -1, d)[ks] -= (self.at_positions(dlt) if last
                                                   else dlt[:, :, lo: lo + tx])
            xm = self.ablated_rows(r, slice(None), xm.reshape(k_masks, n, -1, d), last,
                                   lo=lo).view(x.shape)
        m = lay.mlp(layer, lay.ln_mlp(layer, xm))
        if u in dyn_slot:
            self.put(dyn_slot[u], m.view(k_masks, 1, n, -1, d), last, lo=0 if last else lo)
        return out + m

    def kept_form(self) -> Tensor:
        """Blocks ``start..`` and the logits in kept form: only senders in ``dynamic`` are
        computed; each receiver reads ``x'_L`` plus its kept edges, except the start layer's
        q/k/v inputs, which read the clean residual minus their removed edges (eq. (1); all
        their senders are cached). A receiver whose weights are equal in every mask and
        whose senders are all mask-invariant (cached, or computed once) is computed once
        and broadcast over the masks; only what depends on a mask's own edges runs K times
        (ACDC's candidates differ in one receiver)."""
        abl_resid, ablated, cache = self.abl_resid, self.ablated, self.cache
        diff, dyn_slot, dynamic = self.diff, self.dyn_slot, self.dynamic
        forms, g, k_masks, kept_w, lay = self.forms, self.g, self.k_masks, self.kept_w, self.lay
        n, start, t = self.n, self.start, self.t
        assert kept_w is not None  # the kept form runs only with kept weights
        pre, mid = self._abl = (abl_resid if abl_resid is not None
                                else self.runner.ablated_residuals(ablated, n, t))
        rep = g.n_heads // g.n_kv_heads
        for name in list(forms):
            forms[name + "1"] = forms[name].first_mask()
        # each form's weights on the host [K, S, R]: which receivers' weights are equal in
        # every mask [R], and which edges mask 0 keeps [S, R] (see _invariant, _input_key)
        assert self.kept_host is not None and self.kept_nz is not None  # set with kept_w
        host = {"removed": self.removed_host, "kept": self.kept_host}
        equal = {name: np.asarray((w == w[:1]).all((0, 1))) for name, w in host.items()}
        self.nonzero0 = {"removed": self.removed_nz[0], "kept": self.kept_nz[0]}
        self.host_weights = host
        variant = np.zeros(g.n_senders, dtype=bool)  # senders whose output differs by mask
        # Outputs of invariant nodes are kept across passes (ACDC tests one receiver after
        # another against a circuit that changes only there), keyed by the content of
        # their inputs: the receivers' weights and their senders' own keys, down to the
        # cached senders. ``fresh`` holds this pass's entries and replaces the old memo.
        # the data: the engine's memoised ``diff`` (the base tensor of this slice, held
        # here so that its memory cannot be reused under the same address) and the slice
        owner = diff if diff._base is None else diff._base
        data_key = (diff.storage_offset(), tuple(diff.shape))
        self.memo.follow(owner, data_key)
        keys: dict[int, Any] = {}
        fresh: dict[Any, Tensor] = {}
        ids: dict[Any, int] = {}
        # read by the helpers below (_heads_pass, _invariant, _input_key, _intern)
        self.pre, self.mid, self.rep = pre, mid, rep
        self.equal, self.variant, self.keys, self.ids = equal, variant, keys, ids
        self.fresh = fresh
        self.fresh_sums: dict[Any, Tensor] = {}  # this pass's static sums (static_sums)
        self._w0: dict[str, Any] = {}  # see _input_key
        self._input_keys: dict[tuple[int, str, int], tuple[Any, ...]] = {}  # see _input_key

        key: int | None  # memo key of a mask-invariant node's outputs
        pos_only = self._position_demand()
        for layer in range(start, g.n_layers):
            base = cache.resid[layer] if layer == start else pre[layer]
            form, sign = ("removed", -1.0) if layer == start else ("kept", 1.0)
            h0 = g.head_start[layer]
            layer_heads = [u - h0 for u in dynamic if h0 <= u < h0 + g.n_heads]
            for last in (False, True):  # heads needed at every position, at the metric ones
                heads = [hh for hh in layer_heads if (h0 + hh in pos_only) == last]
                if not heads:
                    continue
                span = self.spans[(layer, last)]
                q0, k0, v0 = g.q_start[layer], g.k_start[layer], g.v_start[layer]
                rs = [q0 + hh for hh in heads] + [k0 + hh // rep for hh in heads] + [
                    v0 + hh // rep for hh in heads]
                same = self._invariant(rs, form)
                nh = len(heads)
                once = [hh for i, hh in enumerate(heads)
                        if same[i] and same[nh + i] and same[2 * nh + i]]
                per_mask = [hh for hh in heads if hh not in once]
                if once:
                    key = self._intern(("heads", layer, last, span, self.hi, tuple(once), tuple(
                        self._input_key(r, form, layer) for i, r in enumerate(rs)
                        if heads[i % nh] in once)))
                    res = self.memo.entries.get(key)
                    if res is None:
                        res = self._heads_pass(layer, once, form + "1", base, sign, last, span)
                    fresh[key] = res
                    self._put_heads(layer, once, res, last, span[0])
                    for i, hh in enumerate(once):
                        keys[h0 + hh] = (key, i)
                if per_mask:
                    # their receivers equal in every mask: projected once (memo keys)
                    fixed = {r: self._intern(("recv", span[1], self.hi,
                                              self._input_key(r, form, layer)))
                             for i, r in enumerate(rs) if same[i] and heads[i % nh] in per_mask}
                    # per-mask outputs at every position go straight into ``current`` where
                    # their slots are consecutive (no second copy of ``[K, h, n*T, d]``)
                    s0 = dyn_slot[h0 + per_mask[0]]
                    into = (s0 if not last and span[0] == 0 and self.hi == t
                            and dyn_slot[h0 + per_mask[-1]] == s0 + len(per_mask) - 1 else None)
                    res = self._heads_pass(layer, per_mask, form, base, sign, last, span,
                                           fixed, into)
                    if into is None or res.shape[0] != k_masks:
                        self._put_heads(layer, per_mask, res, last, span[0])
                    for hh in per_mask:
                        if res.shape[0] > 1:
                            variant[h0 + hh] = True
                        else:  # no patches: the receivers read the base alone
                            keys[h0 + hh] = ("base", layer, hh, layer == start, last)
            u, r = g.mlp_index[layer], g.mlp_receiver[layer]
            assert u is not None and r is not None  # the block runner has no attention-only graphs
            if u in dyn_slot:
                last = u in pos_only  # the MLP's output is read at the metric positions only
                lo = 0 if last else self.lo[u]  # else its first position needed
                whole = not last and lo == 0 and self.hi == t
                once_m = self._invariant([r], "kept")[0]
                key = self._intern(("mlp", last, lo, self.hi, self._input_key(r, "kept", layer))
                                   ) if once_m else None
                m = self.memo.entries.get(key) if once_m else None
                if m is None:
                    mform = "kept1" if once_m else "kept"
                    patches = self.deltas([r], mform, at_pos=last)
                    xm = mid[layer].unsqueeze(0)
                    if last:
                        xm = self.ablated_at_positions(mid, layer)
                    elif not whole:  # the positions [lo, hi) only
                        xm = xm[:, :, lo: self.hi]
                        patches = [(rr, ks, dlt[:, :, lo: self.hi]) for rr, ks, dlt in patches]
                    if patches:
                        xm = self._patched(xm, patches, forms[mform].k)
                        variant[u] = forms[mform].k > 1
                    xm = lay.ln_mlp(layer, xm)
                    if not once_m and whole and xm.shape[0] == k_masks:
                        # per mask at every position: straight into ``current`` where the
                        # family writes its MLP there
                        dst = self.current[:, dyn_slot[u]].view(k_masks, n, t, -1)
                        if lay.mlp_into(layer, xm, out=dst) is not None:
                            self.put(dyn_slot[u], dst.unsqueeze(1), False, written=True)
                            continue
                    m = lay.mlp(layer, xm)
                if once_m:
                    fresh[key] = m
                    keys[u] = key
                self.put(dyn_slot[u], m.unsqueeze(1).expand(k_masks, -1, -1, -1, -1), last,
                         lo=lo)
        xf = self._patched(self.ablated_at_positions(pre, g.n_layers),
                           self.deltas([g.n_receivers - 1], "kept", at_pos=True), k_masks)
        # this pass's invariant outputs replace the memo (the next pass reuses them)
        self.memo.keep(fresh, ids, self.fresh_sums, memo_cap(g, start, self.cache.resid[0]))
        return lay.final(xf)

    @staticmethod
    def _patched(base: Tensor, patches: list[tuple[int, Tensor | slice, Tensor]], k: int
                 ) -> Tensor:
        """``base [1, n, T|P, d]`` repeated over ``k`` masks, plus each patch ``(r, masks,
        [k_r, n, T|P, d])`` of :meth:`deltas` at its masks (a new tensor): one addition where
        a single patch covers every mask (ACDC's kept form), else a copy and indexed adds."""
        if len(patches) == 1 and isinstance(patches[0][1], slice) and patches[0][2].shape[0] == k:
            return patches[0][2] + base
        out = base.repeat(k, 1, 1, 1)
        for _, ks, dlt in patches:
            out[ks] += dlt
        return out

    def _position_demand(self) -> set[int]:
        """The dynamic senders read at the metric positions only (kept form), and the
        positions every other computed node needs (the metric's dependency cone).

        Attention at a query position reads keys and values at earlier positions only, and
        with a sliding window ``w`` (:meth:`Architecture.window`) at the ``w`` positions up to
        it; queries, MLPs and the logits act position by position. So, from the logits back,
        a node is needed at the metric positions only unless one of its kept edges (in any
        mask) enters a receiver needed at a range of positions: the k/v inputs of a computed
        head, or the q input of a head, or the MLP input of an MLP, that is itself needed at a
        range. Every range ends after the last metric position of the batch (``hi``: later
        positions never reach the metric in a causal model) and starts at ``lo``, the least
        start of its readers' ranges; a head's keys and values start ``w - 1`` positions
        before its queries (at 0 without a window). The rest is computed at the metric
        positions alone, exactly (what the last block does in every pass).

        Sets :attr:`hi`, :attr:`lo` (sender -> first position computed, for senders needed at
        a range), :attr:`spans` (``(layer, at metric positions only)`` -> ``(q0, k0)``: the
        first position of the heads' outputs and of their keys and values; their q/k/v
        inputs are projected from ``k0``, the queries before ``q0`` dropped) and
        :attr:`full_reach`: senders before it may be read, with weight 0, by a receiver
        needed at a range, so their buffer rows are zeroed where they are not written
        (:meth:`put`)."""
        g, lay = self.g, self.layers
        assert self.kept_nz is not None
        kept = _any(self.kept_nz, 0)  # [S, R]: kept in some mask
        hi, p_lo = self.hi, self.p_lo
        none = hi  # "not read at a range"
        need = np.full(g.n_receivers, none, dtype=np.int64)  # each receiver's range start
        rep = g.n_heads // g.n_kv_heads
        dyn_slot = self.dyn_slot
        pos_only: set[int] = set()
        self.lo: dict[int, int] = {}
        self.spans: dict[tuple[int, bool], tuple[int, int]] = {}
        # from the last layer back: a layer's MLP, then its heads (which feed it; no head
        # feeds a receiver of its own layer's heads, so they are classified together)
        for layer in reversed(range(self.start, g.n_layers)):
            views = lay[layer]
            if views.mlp in dyn_slot:
                lo = int(need[kept[views.mlp]].min(initial=none))
                if lo < none:
                    self.lo[views.mlp] = lo
                else:
                    pos_only.add(views.mlp)
                need[views.mlp_receiver] = lo
            hs = [u for u in views.heads if u in dyn_slot]
            if not hs:
                continue
            window = self.lay.window(layer)
            los = [int(need[kept[u]].min(initial=none)) for u in hs]
            head = np.array(hs) - views.heads.start
            for last in (False, True):
                sel = [i for i, lo in enumerate(los) if (lo == none) == last]
                if not sel:
                    continue
                q0 = p_lo if last else min(los[i] for i in sel)
                k0 = 0 if window is None else max(0, q0 - window + 1)
                self.spans[(layer, last)] = (q0, k0)
                for i in sel:
                    if last:
                        pos_only.add(hs[i])
                    else:
                        self.lo[hs[i]] = q0
                        need[views.first["q"] + head[i]] = q0
                    for kind in "kv":
                        r = views.first[kind] + head[i] // rep
                        need[r] = min(int(need[r]), k0)
        full = need < none
        self.full_reach = int(self.tables.upstream[full].max()) if full.any() else 0
        return pos_only

    def _intern(self, key: tuple[Any, ...]) -> int:
        """A small stable id for a flat key, so that keys nest by id, not by content
        (nested content would make hashing grow with depth)."""
        ids = self.ids
        if key not in ids:
            ids[key] = self.memo.ids.get(key) or self.memo.new_id()
        return ids[key]

    def _invariant(self, rs: list[int], form: str) -> list[bool]:
        """Whether each receiver's input is the same in every mask."""
        reads = _any(self.nonzero0[form][self.variant][:, rs], 0)  # from variant senders
        return (self.equal[form][rs] & ~reads).tolist()

    def _heads_pass(self, layer: int, subset: list[int], form: str, base: Tensor,
                    sign: float, last: bool, span: tuple[int, int],
                    fixed: dict[int, Any] | None = None, into: int | None = None) -> Tensor:
        """The outputs ``[kk, h, n, T'|P, d]`` of the heads ``subset`` of ``layer``, per mask
        (``kk = K``) where the masks patch their inputs, else once (``kk = 1``): at the
        positions ``[q0, hi)`` (``T' = hi - q0``) or at the metric positions (``last``), from
        q/k/v inputs projected at ``[k0, hi)`` (``span = (q0, k0)``, see
        :meth:`_position_demand`; the queries before ``q0`` are dropped). With ``into``
        (the first of the heads' consecutive slots in ``current``) per-mask outputs are
        computed straight into ``current`` and :meth:`put` there (the caller skips its own
        put when ``kk = K``); the returned tensor then views ``current``.

        ``fixed`` maps the q/k/v receivers of ``subset`` whose input is the same in every mask
        (:meth:`_invariant`) to their memo key: those are projected once for all masks (or
        taken from the memo) and broadcast, and only the others per mask (a head whose value
        input alone differs between masks projects its query and key once; a key/value
        group shared by two query heads is projected once for both)."""
        lay, n, t = self.lay, self.n, self.t
        pos, rep = self.pos, self.rep
        groups = sorted({hh // rep for hh in subset})
        want = {"q": subset, "k": groups, "v": groups}
        first = self.layers[layer].first
        rs = [first[kind] + i for kind in "qkv" for i in want[kind]]
        proj: dict[int, Tensor] = {}  # receiver -> projected input [1|K, n*T, dh]
        fixed = fixed or {}
        todo = [r for r in rs if r not in fixed]
        once = []
        for r in rs:
            if r in fixed:
                got = self.memo.entries.get(fixed[r])
                if got is None:
                    once.append(r)
                else:
                    proj[r] = got
        q0, k0 = span
        tk = self.hi - k0
        if once:
            proj.update(self._project(layer, once, form + "1", base, sign, k0))
        for r, key in fixed.items():
            self.fresh[key] = proj[r]
        if todo:
            proj.update(self._project(layer, todo, form, base, sign, k0))
        kk = max(v.shape[0] for v in proj.values())
        h = len(subset)
        # whole key/value groups (every query head of each group, in order): keys and values
        # once per group, matched to their query heads inside the attention (no copies)
        grouped = rep > 1 and subset == [g0 * rep + i for g0 in groups for i in range(rep)]
        qkv = {}
        for kind in "qkv":  # attention layout [kk*n, T, h|groups, dh]
            slots = subset if kind == "q" else (groups if grouped else [hh // rep for hh in subset])
            parts = [proj[first[kind] + i] for i in slots]  # [kk|1, n*T, dh] each
            qkv[kind] = torch.stack([p if p.shape[0] == kk else p.expand(kk, -1, -1)
                                     for p in parts], 2).view(kk * n, tk, len(slots), -1)
        if last:
            z = lay.attend(layer, qkv["q"], qkv["k"], qkv["v"], grouped=grouped,
                           query_pos=pos.repeat(kk, 1), scratch=True,
                           spans=(k0, k0))
        else:
            z = lay.attend(layer, qkv["q"][:, q0 - k0:], qkv["k"], qkv["v"], grouped=grouped,
                           scratch=True, spans=span)
        # head-major [kk, h, n*(T'|P), d], contiguous: written into ``current`` by plain copies
        if into is not None and kk == self.k_masks:
            out = self.current[:, into: into + h].view(kk, h, n * t, self.d)
            res = lay.head_results_all(layer, z, kk, heads=subset, out=out)
            self.put(into, res.view(kk, h, n, t, self.d), False, written=True)
            return res.view(kk, h, n, t, self.d)
        res = lay.head_results_all(layer, z, kk, heads=subset)
        return res.view(kk, h, n, -1, self.d)

    def _project(self, layer: int, rs: list[int], form: str, base: Tensor, sign: float,
                 k0: int = 0) -> dict[int, Tensor]:
        """The q/k/v projections of receivers ``rs`` of ``layer`` (ordered q, k, v) of their
        inputs ``base + sign * sum_u w[u, r] (a_u - a'_u)`` in ``form`` at the positions
        ``[k0, hi)`` (``T' = hi - k0``): receiver -> ``[kk, n*T', dh]`` (``kk = 1`` where no
        mask patches it, else the form's masks), before positions and q/k norms
        (:meth:`Architecture.attend` applies those)."""
        d, forms, g, lay, n, t = self.d, self.forms, self.g, self.lay, self.n, self.t
        hi = self.hi
        tk = hi - k0  # inputs at the positions [k0, hi) only
        first = self.layers[layer].first
        kind_of = {r: g.receivers[r].kind for r in rs}
        out: dict[int, Tensor] = {}
        got = self.receiver_inputs(rs, form, base, sign)
        if got is not None:  # receivers patched in every mask or in none: batched by kind
            inputs, hit = got  # [kk, R_t, n*T*d]; which of ``rs`` they are
            kk = inputs.shape[0]
            hit_rs = [rs[i] for i in hit]
            x_hit = self.ablated_block(hit_rs, inputs, slice(0, kk))
            x_hit = x_hit.view(kk, len(hit), n, t, d)[:, :, :, k0:hi].reshape(
                kk, len(hit), n * tk, d)
            hit_heads = {kind: [r - first[kind] for r in hit_rs if kind_of[r] == kind]
                         for kind in "qkv"}
            projected = lay.project_heads_normed(layer, x_hit, heads=hit_heads)
            if projected is None:  # every receiver's own projection, one matmul per mask
                w, b = lay.qkv_head_weights(layer, hit_heads)  # [R_t, d, dh]
                part = heads_matmul(lay.ln_attn(layer, x_hit), w)  # [kk, R_t, n*T, dh]
                if b is not None:
                    part = part + b[:, None]
                projected = list(part.split([len(hit_heads[kind]) for kind in "qkv"], 1))
            for kind, part in zip("qkv", projected):
                for i, r in enumerate(r for r in hit_rs if kind_of[r] == kind):
                    out[r] = part[:, i]
            patches: list[tuple[int, Tensor | slice, Tensor]] = []
        else:
            patches = self.deltas(rs, form)
        rest = [r for r in rs if r not in out]  # the base alone (patches start from it)
        if rest:
            base_in = lay.ln_attn(layer, base[:, k0:hi]).reshape(n * tk, d)
            for kind in "qkv":
                sel = [r for r in rest if kind_of[r] == kind]
                if not sel:
                    continue
                w, b = lay.head_weights(layer, kind)
                idx = [r - first[kind] for r in sel]
                part = torch.matmul(base_in, w[idx])  # [h, n*T, dh]
                if b is not None:
                    part = part + b[idx][:, None]
                for i, r in enumerate(sel):
                    out[r] = part[i: i + 1]
        for r, ks, dlt in patches:
            kind = kind_of[r]
            one = out[r].expand(forms[form].k, -1, -1).clone()
            masks = slice(0, forms[form].k) if isinstance(ks, slice) else ks  # (form "...1")
            x = self.ablated_rows(r, masks, torch.add(base, dlt, alpha=sign))
            x = lay.ln_attn(layer, x[:, :, k0:hi])
            one[ks] = lay.project(layer, kind, r - first[kind], x).reshape(-1, n * tk,
                                                                           one.shape[-1])
            out[r] = one
        return out

    def _put_heads(self, layer: int, subset: list[int], res: Tensor, last: bool,
                   lo: int = 0) -> None:
        """Write heads ``subset``'s outputs ``[kk, h, n, T', d]`` at the positions ``lo..``
        (``[kk, h, n, P, d]`` at the metric positions with ``last``) into ``current``, one
        write per run of consecutive slots."""
        dyn_slot, g, k_masks = self.dyn_slot, self.g, self.k_masks
        h0 = g.head_start[layer]
        slots = [dyn_slot[h0 + hh] for hh in subset]
        i = 0
        while i < len(slots):
            j = i + 1
            while j < len(slots) and slots[j] == slots[j - 1] + 1:
                j += 1
            self.put(slots[i], res[:, i: j].expand(k_masks, -1, -1, -1, -1), last, lo=lo)
            i = j

    def _input_key(self, r: int, form: str, layer: int) -> tuple[Any, ...]:
        """What an invariant receiver's input is made of: its weights (mask 0), the
        content keys of its computed senders, and how it is read (start layer or not).
        Once per receiver and pass (its senders' keys are set before it is read)."""
        got = self._input_keys.get((r, form, layer))
        if got is not None:
            return got
        keys, n_static = self.keys, self.n_static
        w0 = self._w0.get(form)
        if w0 is None:  # mask 0's weights by receiver, once per pass: [R, S]
            assert self.host_weights is not None  # set by kept_form, the only caller
            w0 = self._w0[form] = np.ascontiguousarray(self.host_weights[form][0].T)
        col = w0[r]
        got = self._input_keys[(r, form, layer)] = (
            r, layer == self.start, col.tobytes(),
            tuple(keys[u] for u in np.flatnonzero(col).tolist() if u >= n_static))
        return got

    def removed_spans(self) -> dict[int, tuple[int, int]]:
        """The removed form's position cone: per layer from the start one ``(q0, k0)``, its
        heads' and MLP's outputs computed at ``[q0, hi)`` (the last layer's at the metric
        positions; its ``q0`` is the first of them) from a residual stream and q/k/v inputs
        at ``[k0, hi)``, ``k0`` the start of ``q0``'s sliding window (0 without one). Every
        node of a layer feeds every later receiver, so the demand is the same for all of a
        layer's nodes: ``q0`` of a layer is ``k0`` of the next, and a sender's rows are
        valid wherever a later receiver reads them (:meth:`_position_demand` for the kept
        form's per-node demand)."""
        spans: dict[int, tuple[int, int]] = {}
        q0 = self.p_lo
        for layer in reversed(range(self.start, self.g.n_layers)):
            window = self.lay.window(layer)
            k0 = 0 if window is None else max(0, q0 - window + 1)
            spans[layer] = (q0, k0)
            q0 = k0
        return spans

    def removed_form(self) -> Tensor:
        """Blocks ``start..`` and the logits in the removed form of eq. (1): dense layers,
        the sparse start layer or the shared path (see the module docstring), each layer at
        its positions of :meth:`removed_spans` only."""
        ablated, cache, current, d = self.ablated, self.cache, self.current, self.d
        dense_layers, dev, dyn_slot = self.dense_layers, self.dev, self.dyn_slot
        dynamic, g, k_masks = self.dynamic, self.g, self.k_masks
        lay, n, n_pos, row_pos = self.lay, self.n, self.n_pos, self.row_pos
        start, t, hi = self.start, self.t, self.hi

        spans = self.removed_spans()
        x0 = spans[start][1] if start < g.n_layers else 0  # x holds the positions x0..hi
        tx = hi - x0 if start < g.n_layers else t
        x = cache.resid[start][:, x0: x0 + tx].unsqueeze(0).expand(k_masks, n, tx, d).reshape(
            k_masks * n, tx, d)
        for layer in range(start, g.n_layers):
            q0, k0 = spans[layer]  # x holds the positions k0..hi (x0 == k0)
            tk = hi - k0
            xk = x.view(k_masks, n, tk, d)
            last = layer == g.n_layers - 1
            # the last block: queries, head outputs and residual at the metric positions;
            # else queries from q0 (the keys from k0 before them dropped)
            attend_at: dict[str, Any] = ({"query_pos": row_pos, "spans": (k0, k0)} if last
                                         else {"spans": (q0, k0)})
            if layer in dense_layers:
                sizes = {"q": g.n_heads, "k": g.n_kv_heads, "v": g.n_kv_heads}
                # receiver-major inputs [K, R', n*T', d]: one norm, one batched projection
                # per kind
                qkv_rs = self.layers[layer].qkv
                nr = len(qkv_rs)
                inputs = self.dense_inputs(qkv_rs, x, k0)
                inputs = inputs.view(k_masks, nr, n, t, d)[:, :, :, k0:hi].reshape(
                    k_masks, nr, n * tk, d)
                projected = lay.project_heads_normed(layer, inputs)
                if projected is None:
                    normed, projected, s0 = lay.ln_attn(layer, inputs), [], 0
                    for kind in "qkv":
                        projected.append(lay.project_heads(
                            layer, kind, normed[:, s0: s0 + sizes[kind]]))
                        s0 += sizes[kind]
                qkv = {}
                for kind, out in zip("qkv", projected):
                    # attention layout [K*n, T', heads, dh] as a view of [K*n, heads, T', dh]
                    qkv[kind] = (out.view(k_masks, sizes[kind], n, tk, -1).transpose(1, 2)
                                 .reshape(k_masks * n, sizes[kind], tk, -1).transpose(1, 2))
                q, k, v = qkv["q"], qkv["k"], qkv["v"]
                z = lay.attend(layer, q if last else q[:, q0 - k0:], k, v, **attend_at)
                h0 = g.head_start[layer]
                res = lay.head_results_all(layer, z, k_masks)  # [K, H, n*(T'|P), d]
                heads = [u - h0 for u in dynamic if h0 <= u < h0 + g.n_heads]
                if heads:  # consecutive slots of ``current``
                    i0, nh = dyn_slot[h0 + heads[0]], len(heads)
                    values = (res if nh == g.n_heads else res[:, heads]).view(
                        k_masks, nh, n, -1, d)
                    if last or q0 or hi < t:
                        self.put(i0, values, last, lo=q0)
                    else:
                        torch.sub(values, ablated[h0 + heads[0]: h0 + heads[-1] + 1]
                                  if nh == g.n_heads else ablated[[h0 + h for h in heads]],
                                  out=current[:, i0: i0 + nh].view(k_masks, nh, n, t, d))
                x = (self.at_positions(xk, k0).view(k_masks * n, n_pos, d) if last
                     else x[:, q0 - k0:])
                x_in, x = x, x + lay.attn_from_heads(layer, res, 1).view(k_masks * n, -1, d)
                x = self.mlp_block(layer, x, last, x_in, q0)
                continue
            patches = self.deltas(self.layers[layer].qkv)
            if layer == start:
                x_mid = self.sparse_attention(layer, patches)  # [K*n, T, d]
                if x_mid is not None:
                    x_in = x  # the block's input: the clean residual, per mask
                    if last:
                        x = self.at_positions(x_mid.view(k_masks, n, t, d)).view(
                            k_masks * n, n_pos, d)
                        x_in = self.at_positions(xk, k0).view(k_masks * n, n_pos, d)
                    else:
                        x, x_in = x_mid[:, q0:hi], x_in[:, q0 - k0:]
                    x = self.mlp_block(layer, x, last, x_in, q0)
                    continue
            # the shared path: one norm and projection for all heads; the touched receivers
            # of each mask recomputed from their own inputs
            q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
            qkv = {"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous()}
            first = self.layers[layer].first
            for r, ks, dlt in patches:
                kind = g.receivers[r].kind
                head = r - first[kind]
                xr = self.ablated_rows(r, ks, xk[ks] - dlt[:, :, k0:hi], lo=k0)
                out = lay.project(layer, kind, head, lay.ln_attn(layer, xr))
                target = qkv[kind]
                target.view(k_masks, n, tk, *target.shape[2:])[ks, :, :, head] = out
            q, k, v = qkv["q"], qkv["k"], qkv["v"]
            z = lay.attend(layer, q if last else q[:, q0 - k0:], k, v, **attend_at)
            h0 = g.head_start[layer]
            heads = [u - h0 for u in dynamic if h0 <= u < h0 + g.n_heads]
            if heads:
                res = lay.head_results(layer, z, torch.tensor(heads, device=dev))  # [B,T'|P,h,d]
                res = res.view(k_masks, n, -1, len(heads), d).permute(0, 3, 1, 2, 4)
                i0 = dyn_slot[h0 + heads[0]]
                self.put(i0, res, last, lo=q0)
            x = (self.at_positions(xk, k0).view(k_masks * n, n_pos, d) if last
                 else x[:, q0 - k0:])
            x_in, x = x, x + lay.attn_out(layer, z)
            x = self.mlp_block(layer, x, last, x_in, q0)
        x = x.view(k_masks, n, -1, d)
        xf = x if start < g.n_layers else self.at_positions(x)  # [K, n, P, d]
        for _, ks, dlt in self.deltas([g.n_receivers - 1]):
            xf = xf.clone()
            xf[ks] -= self.at_positions(dlt)
        xf = self.ablated_rows(g.n_receivers - 1, slice(None), xf, at_pos=True)
        return lay.final(xf)

    def logits(self) -> Tensor:
        """``[K, N, P, V]`` logits at the metric positions, in the pass's form."""
        return self.kept_form() if self.kept_w is not None else self.removed_form()
