"""The shared base of the model-family adapters: attention, per-head outputs, weight access.

Each family's module (``gpt2``, ``llama``, ...) subclasses :class:`Architecture` with the
functions where that family differs; the block runner (:mod:`circuitfind.patching.runner`)
runs any registered family through this interface alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.patching.backward_rules import PLAIN, BackwardRules


DERIVED_BYTES = 32 << 20
"""Bytes of values derived from weights (EAP's folded q/k/v weights) an adapter keeps between
calls (:meth:`Architecture.derived`): all layers of small models (6 layers of d_model 256:
4.7 MiB), none of GPT-2 small's (85 MiB), whose passes are long enough not to notice."""

FUSED_GQA = torch.torch_version.TorchVersion(torch.__version__) >= "2.5"
"""Whether ``scaled_dot_product_attention`` takes ``enable_gqa`` (torch 2.5 and later)."""


class Architecture:
    """Primitives of one Hugging Face model family, reading the modules' weights in place.

    A subclass describes one family: where its weights live (``embed``, ``ln_attn``,
    ``ln_mlp``, ``qkv``, ``head_weights``, ``w_out``, ``mlp``, ``final``), its attention scale,
    and the few functions that differ (``rotate`` for positions, ``norm_parts`` for EAP's
    closed-form norm backward). Everything else (causal attention, per-head outputs) is shared
    here. Subclasses register themselves for their Hugging Face classes with
    :func:`circuitfind.patching.architectures.register`.

    Args:
        hf: The Hugging Face causal LM (possibly wrapped by the bridge).
        n_heads: Query heads per layer.
        n_kv: Key/value heads per layer.
    """

    hf_classes: ClassVar[tuple[str, ...]] = ()  # Hugging Face classes it runs (set by register)
    blocks: list[Any]  # the model's transformer blocks, unwrapped (set by each family)

    def __init__(self, hf: Any, n_heads: int, n_kv: int) -> None:
        self.hf = hf
        self.n_heads, self.n_kv = n_heads, n_kv
        # follow the model's own attention implementation, so results match it bit for bit
        # where possible (Hugging Face's eager Llama attention takes its softmax in float32)
        self.eager = getattr(hf.config, "_attn_implementation", None) == "eager"
        self._rotary: dict[tuple[Any, ...], tuple[Tensor, Tensor, Any]] = {}
        # values derived from weights (:meth:`derived`): key -> (sources, stamp, value, bytes)
        self._derived: dict[tuple[Any, ...], tuple[Any, Any, Any, int]] = {}
        self._derived_bytes = 0

    # modified backward rules (GIM, RelP, AtP*; see circuitfind.patching.backward_rules) ----
    rules: BackwardRules = PLAIN  # what the forward's norms, softmax, gates ... consult
    # called as tap(layer, q, k, pattern) with each layer's rotated q [B,H,T,dh], k [B,G,T,dh]
    # and pattern [B,H,T,T] (AtP*'s QK fix), or None
    attention_tap: Callable[[int, Tensor, Tensor, Tensor], None] | None = None

    @contextlib.contextmanager
    def backward_rules(self, rules: BackwardRules | None,
                       tap: Callable[[int, Tensor, Tensor, Tensor], None] | None = None
                       ) -> Iterator[None]:
        """Install ``rules`` (and an attention ``tap``) for the duration of the block: the
        one extension point of :mod:`circuitfind.patching.backward_rules` (``None``: plain)."""
        saved = self.rules, self.attention_tap
        self.rules, self.attention_tap = rules or PLAIN, tap
        try:
            yield
        finally:
            self.rules, self.attention_tap = saved

    # overridden per layout -------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def ln_attn(self, layer: int, x: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def ln_mlp(self, layer: int, x: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def norm_parts(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
        """``(xh, inv, weight, centred)`` of :meth:`ln_attn` at ``x [N, T, d]``: the normalised
        input, ``1 / sigma`` (``[N, T, 1]``), the norm's weight and whether it subtracts the
        mean (LayerNorm) or not (RMSNorm)."""
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def standardised(x: Tensor, eps: float, centred: bool) -> tuple[Tensor, Tensor]:
        """``(xh, inv)`` of a LayerNorm (``centred``) or RMSNorm without weight at ``x [..., d]``:
        the normalised input and ``1 / sigma`` (``[..., 1]``), in at least float32 (one fused
        kernel for LayerNorm; one reduction and one product for RMSNorm). The shared part of
        the families' :meth:`norm_parts`."""
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        if centred:
            xh, _, inv = torch.native_layer_norm(h, (h.shape[-1],), None, None, eps)
            return xh, inv
        inv = torch.linalg.vector_norm(h, 2, -1, keepdim=True).square_().div_(h.shape[-1])
        inv = inv.add_(eps).rsqrt_()
        return h * inv, inv

    def qkv_sources(self, layer: int) -> tuple[Tensor | None, ...] | None:
        """Every tensor that :meth:`ln_attn`'s weight and bias and :meth:`qkv` read (the norm's
        weight and bias, the projections' weights and biases), or ``None`` (here): what
        :meth:`qkv_input_grads` keeps derived from them (:meth:`qkv_input_weights`,
        :meth:`qkv_offsets`) is held between calls while they are unchanged
        (:meth:`derived`); ``None`` derives them anew in every call."""
        return None

    def derived(self, key: tuple[Any, ...], sources: tuple[Tensor | None, ...] | None,
                make: Callable[[], Any]) -> Any:
        """``make()``, a value derived from the weights ``sources`` only, kept under ``key``
        while every tensor of ``sources`` is unchanged: the same storage (the kept entry
        holds the tensors, so no other tensor can take their place) at the same in-place
        version (``Tensor._version``, shared by views: an optimiser step or any in-place
        write bumps it). Derived values are kept up to :data:`DERIVED_BYTES` in all
        (``None`` sources, or beyond that: made anew, nothing kept), so that large models do
        not hold second copies of their weights."""
        if sources is None:
            return make()
        stamp = tuple(None if t is None else (t.data_ptr(), t._version) for t in sources)
        held = self._derived.get(key)
        if held is not None and held[1] == stamp:
            return held[2]
        value = make()
        size = sum(v.numel() * v.element_size() for v in
                   (value if isinstance(value, tuple) else (value,)) if isinstance(v, Tensor))
        if held is not None:
            self._derived_bytes -= held[3]
            del self._derived[key]
        if self._derived_bytes + size <= DERIVED_BYTES:
            self._derived[key] = (sources, stamp, value, size)
            self._derived_bytes += size
        return value

    def qkv_input_weights(self, layer: int, w: Tensor, out: Tensor) -> Tensor:
        """Each q, k and v head's projection transposed, ``W_h^T``, times ``w [d]`` along ``d``
        (the norm's weight): ``out [H + 2G, dh, d]`` (q heads, then k and v heads), filled in
        place. Families whose three projections are one weight override it with one product
        (:class:`~circuitfind.patching.architectures.gpt2.GPT2`,
        :class:`~circuitfind.patching.architectures.gpt_neox.GPTNeoX`)."""
        s0 = 0
        for kind in "qkv":
            wh, _ = self.head_weights(layer, kind)  # [h, d, dh]
            torch.mul(wh.transpose(1, 2), w, out=out[s0: s0 + wh.shape[0]])
            s0 += wh.shape[0]
        return out

    def qkv_offsets(self, layer: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """The q, k and v projections of a zero residual, ``[H, dh]``, ``[G, dh]``, ``[G, dh]``
        (what the norm's bias and the projections' biases add to every row), or ``None`` where
        they are all zero. Here: :meth:`qkv` of :meth:`ln_attn` of one zero row; families
        override it with their biases."""
        w, _ = self.head_weights(layer, "q")
        zero = w.new_zeros(1, w.shape[1])
        q, k, v = self.qkv(layer, self.ln_attn(layer, zero))
        return q[0], k[0], v[0]

    def qkv_input_grads(self, layer: int, parts: tuple[Tensor, Tensor, Tensor, bool],
                        grads: tuple[Tensor, Tensor, Tensor], out: Tensor,
                        outputs: tuple[Tensor, Tensor, Tensor] | None = None,
                        copies: int = 1, skip: int = 0,
                        memo: dict[int, Tensor] | None = None) -> Tensor:
        """Each q, k and v head's gradient with respect to its own copy of the residual read
        by :meth:`ln_attn` and its projection, from the projections' gradients ``grads``
        (``[B, T, H, dh]``, ``[B, T, G, dh]``, ``[B, T, G, dh]``; ``B = copies * N``, the
        copies stacked on the batch): written into ``out [H + 2G, N*T, d]`` (q heads, then k
        and v heads) summed over the copies, in the norm's dtype (``parts`` is
        :meth:`norm_parts` of the residual ``[B, T, d]``).

        The norm's backward in closed form, ``dx = (gh - mean(gh) - xh mean(gh xh)) / sigma``
        with ``gh = w * (grad W_h^T)`` (no mean term for RMSNorm): ``1/sigma`` is folded into
        the small gradients, ``w`` and the mean term into the weights (centred along ``d``),
        so the only ``[H + 2G, N*T, d]`` work is one batched matmul for all heads of the
        three kinds and one in-place update per copy. The update's coefficient ``mean(gh
        xh)`` is a ``d``-long product per head and row; with the forward's projections
        ``outputs`` (:meth:`qkv` of :meth:`ln_attn`, same shapes as ``grads``) it is read in
        the head space instead, ``gh . xh = grad . (w xh) W_h = grad . (p_h - c_h)`` with
        ``c_h`` the projection of a zero residual (:meth:`qkv_offsets`): ``dh``-long products.
        Several copies are summed in the head space, before the matmul (the first term is
        linear in ``grad / sigma``; each copy's update has its own ``xh``). Under frozen norm
        statistics (:attr:`BackwardRules.freeze_norm`) the ``xh mean(gh xh)`` term, the
        derivative of ``1/sigma``, is left out.

        With ``skip`` (one copy only) the first ``skip`` heads (AtP*'s q and k heads, whose
        scores come from exact patterns) are not written: ``out`` holds the other heads'
        gradients (``[H + 2G - skip, N*T, d]``) and the residual's gradient, still through every
        head, is one matmul ``[N*T, (H + 2G) dh] x [(H + 2G) dh, d]`` with the norm's term
        ``xh mean(xh . g)`` taken once from the sum. ``memo`` (``{layer: weights}``) keeps the
        folded weights between calls on unchanged weights (the backward passes of one
        attribution pass).

        Returns:
            ``[B*T, d]`` the residual's gradient through the norm and the projections (the
            receivers' gradients summed over receivers, per copy), in the norm's dtype.

        Raises:
            ConfigError: ``skip`` with several copies.
        """
        xh, inv, w, centred = parts
        dt = xh.dtype  # float32 at least, as the norm computes
        b, t = grads[0].shape[:2]
        rows, d = b * t, xh.shape[-1]
        dh = grads[0].shape[-1]
        r = out.shape[0] + skip
        if skip and copies != 1:
            raise ConfigError(f"qkv_input_grads skips heads for a single copy only; got "
                              f"skip={skip} with {copies} copies.")
        # W_h^T with the norm's weight folded in, centred along d for LayerNorm
        def fold() -> Tensor:
            folded = self.qkv_input_weights(layer, w.to(dt), xh.new_empty(r, dh, d))
            if centred:
                folded -= folded.mean(2, keepdim=True)  # (gh - mean(gh)) from one matmul
            return folded

        sources = self.qkv_sources(layer)
        wt = None if memo is None else memo.get(layer)
        if wt is None or wt.dtype != dt or wt.shape != (r, dh, d):
            wt = self.derived(("qkv_input_weights", layer, dt, centred), sources, fold)
            if memo is not None:
                memo[layer] = wt
        exact = not self.rules.freeze_norm
        dqi = xh.new_empty(r, b, t, dh)  # 1/sigma folded in, head-major
        shifted = xh.new_empty(r, b, t, dh) if exact and outputs is not None else None
        offsets = None if shifted is None else self.derived(
            ("qkv_offsets", layer), sources, lambda: self.qkv_offsets(layer))
        inv4 = inv.reshape(1, b, t, 1)
        s0 = 0
        for i, grad in enumerate(grads):
            h = grad.shape[2]
            torch.mul(grad.permute(2, 0, 1, 3), inv4, out=dqi[s0: s0 + h])
            if shifted is not None and outputs is not None:  # p_h - c_h, head-major
                p = outputs[i].permute(2, 0, 1, 3)
                if offsets is None:
                    shifted[s0: s0 + h] = p
                else:
                    torch.sub(p, offsets[i][:, None, None], out=shifted[s0: s0 + h])
            s0 += h
        flat_xh = xh.reshape(rows, d)
        q: Tensor | None = None  # d mean(gh xh) / sigma [heads, B*T, 1] (1/d in the updates)
        if shifted is not None:  # = dqi . (p_h - c_h)
            q = shifted.mul_(dqi).sum(-1).view(r, rows, 1)
        if skip:  # the residual's gradient through every head from one matmul
            dx = dqi.permute(1, 2, 0, 3).reshape(rows, r * dh) @ wt.view(r * dh, d)
            torch.bmm(dqi[skip:].view(r - skip, rows, dh), wt[skip:], out=out)
            if exact:
                dx.addcmul_((dx * flat_xh).sum(-1, keepdim=True), flat_xh, value=-1.0 / d)
                if q is None:
                    q = torch.bmm(out.transpose(0, 1), flat_xh[:, :, None])
                    q = q.view(rows, -1).T[..., None]
                else:
                    q = q[skip:]
                out.addcmul_(q, flat_xh, value=-1.0 / d)
            return dx
        if copies == 1:
            torch.bmm(dqi.view(r, rows, dh), wt, out=out)  # [heads, N*T, d]
            if exact and q is None:  # = xh . out (xh has zero mean under LayerNorm):
                # one batched matrix-vector product per row, reading ``out`` in place
                q = torch.bmm(out.transpose(0, 1), flat_xh[:, :, None]).view(rows, -1).T[..., None]
            if q is not None:
                out.addcmul_(q, flat_xh, value=-1.0 / d)
            return out.sum(0)
        # per copy, the residual's gradient: the sum over heads is one matmul
        dx = dqi.permute(1, 2, 0, 3).reshape(rows, r * dh) @ wt.view(r * dh, d)
        n = rows // copies
        torch.bmm(dqi.view(r, copies, n, dh).sum(1), wt, out=out)  # summed over copies
        if exact:
            if q is None:  # xh . (dqi W_h), from the per-head matmul of each copy
                q = torch.bmm(dqi.view(r, rows, dh), wt).mul_(flat_xh).sum(-1, keepdim=True)
            dx.addcmul_(q.sum(0), flat_xh, value=-1.0 / d)
            for c in range(copies):
                rows_c = slice(c * n, (c + 1) * n)
                out.addcmul_(q[:, rows_c], flat_xh[rows_c], value=-1.0 / d)
        return dx

    def mlp(self, layer: int, x: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def mlp_into(self, layer: int, x: Tensor, out: Tensor) -> Tensor | None:
        """:meth:`mlp` of ``x [K, ..., d]`` written straight into ``out`` (the same shape; each
        row of ``K`` contiguous: a masked pass's per-mask buffer rows) and returned, or
        ``None`` (here: nothing written) where the family's last projection cannot write
        there directly (the caller then takes :meth:`mlp`'s result). Overridden by
        :class:`~circuitfind.patching.architectures.llama.Llama`."""
        return None

    def layer_norm(self, x: Tensor, w: Tensor, b: Tensor | None, eps: float) -> Tensor:
        """LayerNorm over the last axis of ``x`` (``F.layer_norm``; with frozen statistics,
        :attr:`BackwardRules.freeze_norm`, written out with ``1/sigma`` detached)."""
        if not self.rules.freeze_norm:
            return F.layer_norm(x, (x.shape[-1],), w, b, eps)
        h = x - x.mean(-1, keepdim=True)
        out = h * self.rules.statistic(torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)) * w
        return out if b is None else out + b

    def qkv(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def qk(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """The queries ``[..., H, dh]`` and keys ``[..., G, dh]`` of :meth:`qkv` without the
        values (families override it where that saves a projection)."""
        q, k, _ = self.qkv(layer, x)
        return q, k

    def head_weights(self, layer: int, kind: str) -> tuple[Tensor, Tensor | None]:
        """Per-head projection ``(W [heads, d, dh], b [heads, dh] | None)`` of ``kind`` (q, k, v)."""
        raise NotImplementedError  # pragma: no cover

    def project(self, layer: int, kind: str, head: int, x: Tensor) -> Tensor:
        """One head's ``kind`` projection of ``x [..., d]`` -> ``[..., dh]``."""
        w, b = self.head_weights(layer, kind)
        out = x @ w[head]
        return out if b is None else out + b[head]

    def project_some(self, layer: int, kind: str, x: Tensor, heads: list[int]) -> Tensor:
        """The projections of ``heads`` of one shared input ``x [..., d]`` -> ``[..., h, dh]``."""
        w, b = self.head_weights(layer, kind)
        if len(heads) == w.shape[0]:
            out = torch.einsum("...d,hde->...he", x, w)
            return out if b is None else out + b
        out = torch.einsum("...d,hde->...he", x, w[heads])
        return out if b is None else out + b[heads]

    def project_heads(self, layer: int, kind: str, x: Tensor) -> Tensor:
        """Every head's projection of its own rows, head-major: ``x [K, heads, rows, d]`` ->
        ``[K, heads, rows, dh]`` (one batched matmul, no transposes)."""
        w, b = self.head_weights(layer, kind)
        out = torch.matmul(x, w)
        return out if b is None else out + b[:, None]

    def qkv_head_weights(self, layer: int, heads: dict[str, list[int]] | None = None,
                         scale: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The q, k and v heads' projections stacked head-major, ``(W [R, d, dh], b [R, dh] |
        None)``: q heads, then k and v groups (``R = H + 2G``; with ``heads``, only the heads
        ``heads[kind]`` of each kind, in that order), with ``scale [d]`` (a norm's weight)
        folded in along ``d`` when given: what :func:`heads_matmul` multiplies each q, k and v
        receiver's own rows by. The whole stack is kept between calls on unchanged weights
        (:meth:`derived`), so a pass reads it without rebuilding it."""
        first = {"q": 0, "k": self.n_heads, "v": self.n_heads + self.n_kv}

        def make() -> tuple[Tensor, Tensor | None]:
            parts = [self.head_weights(layer, kind) for kind in "qkv"]
            w = torch.cat([wh if scale is None else scale[:, None] * wh for wh, _ in parts])
            if all(b is None for _, b in parts):
                return w, None
            return w, torch.cat([w.new_zeros(wh.shape[0], wh.shape[2]) if b is None else b
                                 for wh, b in parts])

        sources = self.qkv_sources(layer)
        key = ("qkv_head_weights", layer, scale is not None)
        w, b = self.derived(key, None if sources is None else (*sources, scale), make)
        if heads is None:
            return w, b
        idx = torch.tensor([first[kind] + i for kind in "qkv" for i in heads[kind]],
                           device=w.device)
        return w.index_select(0, idx), None if b is None else b.index_select(0, idx)

    def project_heads_normed(self, layer: int, x: Tensor,
                             heads: dict[str, list[int]] | None = None) -> list[Tensor] | None:
        """:meth:`project_heads` of :meth:`ln_attn` of each q, k and v receiver's own input
        ``x [K, H + 2G, rows, d]`` (q heads, then k and v groups; with ``heads``, only the
        heads ``heads[kind]`` of each kind, in that order) without writing the normalised
        inputs, or ``None`` where the layout has no such shortcut for this dtype (the caller
        then normalises first)."""
        return None

    def w_out(self, layer: int) -> tuple[Tensor, Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def final(self, x: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def scale(self, layer: int) -> float:  # pragma: no cover
        raise NotImplementedError

    softmax_dtype: torch.dtype | None = None  # dtype of the eager softmax (None: the model's)

    rotary: Any = None  # the model's own rotary-embedding module (None: no rotation)
    # whether :meth:`apply_rotary` is Hugging Face's half-split rotation (``rotate_half``) of
    # the first ``cos.shape[-1]`` dimensions of each head: :meth:`rotate` then runs it as
    # :class:`HalfSplitRotation` (three kernels forward and backward instead of ten)
    rotary_half_split: bool = False

    @staticmethod
    def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The family's rotation of ``q`` and ``k`` by ``cos``/``sin`` (its Hugging Face
        ``apply_rotary_pos_emb``); families with :attr:`rotary` override it."""
        raise NotImplementedError  # pragma: no cover

    def rotate(self, q: Tensor, k: Tensor, spans: tuple[int, int] | None = None
               ) -> tuple[Tensor, Tensor]:
        """Positional rotation of ``q [B, H, T, dh]`` and ``k [B, G, T, dh]``: the model's
        rotary module's ``cos``/``sin`` for ``T`` positions (kept for the last ``T``, dtype and
        device) through :meth:`apply_rotary`, or, for :attr:`rotary_half_split` families whose
        ``cos``/``sin`` repeat their first half (every rope type of Hugging Face's rotary
        modules), through :class:`HalfSplitRotation` (equal up to float rounding); none
        without :attr:`rotary`. With ``spans = (q0, k0)`` ``q [B, H, Tq, dh]`` and ``k [B, G,
        Tk, dh]`` hold the absolute positions ``q0..q0+Tq-1`` and ``k0..k0+Tk-1`` (a masked
        pass's position cone): each is turned by its own positions' rows of the table."""
        if self.rotary is None:
            return q, k
        if spans is not None and (spans != (0, 0) or q.shape[-2] != k.shape[-2]):
            return self._rotate_spans(q, k, spans)
        cos, sin, fast = self._rotary_for(q)
        if fast is None:
            return self.apply_rotary(q, k, cos, sin)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return HalfSplitRotation.apply(q, k, *fast)
        return HalfSplitRotation.turn(q, *fast), HalfSplitRotation.turn(k, *fast)

    def _rotate_spans(self, q: Tensor, k: Tensor, spans: tuple[int, int]
                      ) -> tuple[Tensor, Tensor]:
        """:meth:`rotate` of ``q`` and ``k`` at the absolute positions ``spans = (q0, k0)``
        onwards: the rows of the table for the first ``max(q0 + Tq, k0 + Tk)`` positions
        (each position's row is the same whatever the table's length)."""
        (q0, k0), tq, tk = spans, q.shape[-2], k.shape[-2]
        cos, sin, fast = self._rotary_for(q, max(q0 + tq, k0 + tk))
        if fast is None:
            return (self.apply_rotary(q, q, cos[:, q0: q0 + tq], sin[:, q0: q0 + tq])[0],
                    self.apply_rotary(k, k, cos[:, k0: k0 + tk], sin[:, k0: k0 + tk])[1])
        c, s, half = fast
        qf = (c[:, :, q0: q0 + tq], s[:, :, q0: q0 + tq], half)
        kf = (c[:, :, k0: k0 + tk], s[:, :, k0: k0 + tk], half)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return HalfSplitRotation.apply(q, q, *qf)[0], HalfSplitRotation.apply(k, k, *kf)[1]
        return HalfSplitRotation.turn(q, *qf), HalfSplitRotation.turn(k, *kf)

    def _rotary_for(self, q: Tensor, t: int | None = None) -> tuple[Tensor, Tensor, Any]:
        """``(cos, sin, half-split factors or None)`` for ``t`` positions (default: ``q [...,
        T, dh]``'s ``T``), ``q``'s dtype and device (kept for the last such key)."""
        t = q.shape[-2] if t is None else t
        key = (t, q.dtype, q.device, q.shape[-1])
        if key not in self._rotary:
            pos = torch.arange(t, device=q.device)[None]
            cos, sin = self.rotary(q, pos)
            fast = (HalfSplitRotation.factors(cos, sin, q.shape[-1])
                    if self.rotary_half_split else None)
            self._rotary = {key: (cos, sin, fast)}
        return self._rotary[key]

    def half_split_factors(self, q: Tensor) -> tuple[Tensor, Tensor, int] | None:
        """:meth:`HalfSplitRotation.factors` of :meth:`rotate` for ``q [..., T, dh]``'s
        positions, dtype and device (``cos [1, 1, T, dh]``, ``sin [1, 1, T, r/2]``, ``r/2``),
        or ``None`` where :meth:`rotate` does not run the half-split rotation (no rotation, or
        another one): what AtP*'s QK fix needs to turn clean queries and keys by other
        positions' rotations."""
        if self.rotary is None:
            return None
        return self._rotary_for(q)[2]

    attn_softcap: float | None = None  # soft cap c of the attention scores, c tanh(s / c)
    parallel: bool = False  # attention and MLP read the same residual (GPT-NeoX, GPT-J)
    attn_post_norm: bool = False  # a norm after the heads' sum (Gemma-2): see post_norm

    def post_norm(self, layer: int, x: Tensor) -> Tensor:
        """The norm applied to the heads' summed output before it joins the residual stream
        (none here: the identity); families with :attr:`attn_post_norm` override it and
        :meth:`post_norm_jvp`."""
        return x

    def post_norm_jvp(self, layer: int, s: Tensor, delta: Tensor) -> Tensor:
        """``J(s) delta`` of :meth:`post_norm` at ``s [X, d]`` for directions ``delta [h, X',
        d]``, ``X = copies * X'`` (each direction at each copy of the rows; EAP pushes the
        heads' differences through the norm once a layer): ``[h, X, d]``, the identity
        here."""
        copies = s.shape[0] // delta.shape[1]
        return delta if copies == 1 else delta.repeat(1, copies, 1)

    def post_norm_rms(self, layer: int) -> tuple[Tensor, float] | None:
        """``(scale [d], eps)`` when :meth:`post_norm` is the RMSNorm ``scale * x /
        sqrt(mean(x^2) + eps)`` (computed in float32), which lets the post-norm pass get every
        receiver's norm of its own mixture from the heads' Gram matrices
        (:mod:`circuitfind.patching.post_norm_pass`); ``None`` otherwise."""
        return None

    def ln_attn_rms(self, layer: int) -> tuple[Tensor, float] | None:
        """``(scale [d], eps)`` when :meth:`ln_attn` is the RMSNorm ``scale * x / sqrt(mean(x^2)
        + eps)`` computed in the model's dtype for float32 models, which lets the post-norm pass
        fold the scale into the q/k/v projections and apply ``1/rms`` to their outputs
        (:mod:`circuitfind.patching.post_norm_pass`); ``None`` otherwise."""
        return None

    def window(self, layer: int) -> int | None:
        """Sliding-window length of ``layer``'s attention (``None``: every earlier position)."""
        return None

    def qk_norm(self, layer: int, q: Tensor, k: Tensor,
                scratch: bool = False) -> tuple[Tensor, Tensor]:
        """Per-head norms of ``q [B, T, H, dh]`` and ``k [B, T, G, dh]`` before the rotation
        (Qwen3, OLMo-2); none here. With ``scratch`` q and k are the caller's to overwrite
        and no gradient is taken (AtP*'s QK fix): a family may norm them in place, equal to
        the plain norm up to float32 rounding."""
        return q, k

    def qk_norm_parts(self, layer: int) -> tuple[Tensor, Tensor, float] | None:
        """``(w_q [dh], w_k [dh], eps)`` where :meth:`qk_norm` with ``scratch`` on float32
        is the per-head RMSNorm ``w x / sqrt(mean(x^2) + eps)`` (AtP*'s QK fix then takes
        each patched head's ``1/rms`` on its scores and folds ``w`` into the clean sides
        instead of norming the patched projections); ``None`` here (no norms)."""
        return None

    # shared ------------------------------------------------------------------------------
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor,
               query_pos: Tensor | None = None, grouped: bool = True,
               prefer_fused: bool = False, scratch: bool = False,
               spans: tuple[int, int] | None = None) -> Tensor:
        """Causal attention: ``q [B,T,H,dh]``, ``k, v [B,T,G,dh]`` -> ``z [B,T,H,dh]``.

        With ``query_pos [B, P]`` only those query positions are computed: ``z [B,P,H,dh]``.
        With ``spans = (q0, k0)`` the queries ``q [B,Tq,H,dh]`` and the keys and values
        ``[B,Tk,G,dh]`` hold the absolute positions ``q0..`` and ``k0..`` (a masked pass's
        position cone; ``query_pos`` then absolute too, within the queries' span): rotation,
        causal and window masks at those positions.
        With ``grouped=False`` key/value head i serves query head i (the caller has already
        matched them). The family's extras apply here: :meth:`qk_norm` before the rotation,
        :attr:`attn_softcap` on the scores and :meth:`window` on the keys. Under modified
        backward rules (:attr:`rules`) or with an :attr:`attention_tap` the eager path runs
        with the rules' softmax and q/k/v gradient scales. Short sequences on a CPU take
        :meth:`_attend_small` unless the fused kernel applies and either a backward pass will
        read the result or the caller asks for it (``prefer_fused``: the plain runs). With
        ``scratch`` ``q`` and ``k`` are the caller's to overwrite (fresh tensors, no gradient
        taken): :meth:`qk_norm` may norm them in place (the masked passes' stacked inputs).
        """
        if self.attention_tap is not None or not self.rules.plain_attention:
            return self._attend_with_rules(layer, q, k, v, query_pos, grouped, spans)
        q, k = self.qk_norm(layer, q, k, scratch=scratch and not torch.is_grad_enabled())
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.rotate(q, k, spans)
        rep = self.n_heads // self.n_kv if grouped else 1
        t = k.shape[2]
        window = self.window(layer)
        window = window if window is not None and window < t else None
        if spans is not None and (spans != (0, 0) or q.shape[2] != t):
            return self._attend_small(layer, q, k, v, rep, query_pos, window, spans)
        n_scores = q.shape[0] * q.shape[1] * t * (t if query_pos is None else query_pos.shape[1])
        softmax_ok = not self.eager or self.softmax_dtype in (None, q.dtype)
        fused = self.attn_softcap is None and softmax_ok
        # recorded for a backward pass (EAP, EAP-IG): the fused kernel's forward and backward
        # beat the three small kernels' (about 1.5-2.5x at d_head 8-64, T 16-64 on a CPU)
        graph = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad)
        if (q.device.type == "cpu" and n_scores <= 1 << 20 and softmax_ok
                and not (fused and (graph or prefer_fused))):
            return self._attend_small(layer, q, k, v, rep, query_pos, window)
        gqa = fused and rep > 1 and FUSED_GQA  # the fused kernel matches key/value heads itself
        if rep > 1 and not gqa:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if query_pos is not None:
            q = q.gather(2, query_pos[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
        causal = fused and query_pos is None and window is None
        # the keys each query may not see, [T, T] or [B, 1, P, T] (the fused kernel's causal
        # mode needs none)
        hidden = None if causal else self._hidden(t, query_pos, window, q.device)
        if fused:  # the fused kernel: equal to the eager softmax up to float rounding
            mask = None if hidden is None else ~hidden
            if gqa:  # (torch 2.4 has no enable_gqa argument)
                z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                   scale=self.scale(layer), enable_gqa=True)
            else:
                z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                   scale=self.scale(layer))
            return z.transpose(1, 2)
        scores = self._capped((q @ k.transpose(-1, -2)) * self.scale(layer))
        if hidden is not None:  # (always, off the fused kernel)
            scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
        pattern = torch.softmax(scores, -1, dtype=self.softmax_dtype).to(v.dtype)
        return (pattern @ v).transpose(1, 2)

    def attention_pattern(self, layer: int, q: Tensor, k: Tensor,
                          query_pos: Tensor | None = None) -> Tensor:
        """The eager attention pattern of rotated ``q [..., B,H,P,dh]`` and ``k [..., B,H,T,dh]``
        (key heads already matched to query heads; leading axes broadcast): scale, soft cap,
        causal and window mask (``query_pos [B, P]``: the queries' positions, default all ``T``),
        softmax with :attr:`rules`' backward: ``[..., B,H,P,T]`` (probability)."""
        t = k.shape[-2]
        window = self.window(layer)
        window = window if window is not None and window < t else None
        hidden = self._hidden(t, query_pos, window, q.device)
        scores = self._capped((q @ k.transpose(-1, -2)) * self.scale(layer))
        fill = torch.finfo(scores.dtype).min
        scores = (scores.masked_fill(hidden, fill) if scores.requires_grad
                  else scores.masked_fill_(hidden, fill))
        return self.rules.softmax(scores, self.softmax_dtype)

    def hidden_keys(self, layer: int, t: int, device: torch.device) -> Tensor:
        """``[T, T]`` bool: the keys each query of ``layer`` may not see (later ones, and those
        outside its sliding window)."""
        window = self.window(layer)
        return self._hidden(t, None, window if window is not None and window < t else None,
                            device)

    def pattern_from_scores(self, layer: int, scores: Tensor, hidden: Tensor | None,
                            dim: int, out: Tensor | None = None,
                            capped: bool = False) -> Tensor:
        """The plain attention pattern (probability) from scaled scores ``scale q . k`` of
        ``layer`` laid out with the keys along ``dim`` (without autograd: ``scores`` is
        overwritten): soft cap, ``hidden`` keys masked (broadcast against ``scores``; ``None``:
        the caller has already set them to the dtype's lowest value; ``capped``: the caller
        has already soft-capped the scores), softmax
        in :attr:`softmax_dtype`, as :meth:`attention_pattern` computes it (into ``out``,
        contiguous and of that dtype, when given)."""
        cap = None if capped else self.attn_softcap  # (in place: as _capped)
        scores = scores if cap is None else scores.div_(cap).tanh_().mul_(cap)
        if hidden is not None:
            scores = scores.masked_fill_(hidden, torch.finfo(scores.dtype).min)
        if out is None:
            return torch.softmax(scores, dim, dtype=self.softmax_dtype)
        return torch.ops.aten.softmax.int_out(scores, dim, self.softmax_dtype, out=out)

    def _attend_with_rules(self, layer: int, q: Tensor, k: Tensor, v: Tensor,
                           query_pos: Tensor | None, grouped: bool,
                           spans: tuple[int, int] | None = None) -> Tensor:
        """:meth:`attend` on the eager path under :attr:`rules` (q/k/v gradient scales, the
        rules' softmax), reporting each pattern to :attr:`attention_tap`.

        Raises:
            ConfigError: with position ``spans`` (the masked passes' cone runs plain
                attention only)."""
        if spans is not None and spans != (0, 0):
            raise ConfigError("attention under backward rules or a tap takes every position")
        r = self.rules
        q, k, v = r.scale(q, r.q_scale), r.scale(k, r.k_scale), r.scale(v, r.v_scale)
        q, k = self.qk_norm(layer, q, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.rotate(q, k)
        rep = self.n_heads // self.n_kv if grouped else 1
        kr, vr = ((k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if rep > 1
                  else (k, v))
        if query_pos is not None:
            q = q.gather(2, query_pos[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
        pattern = self.attention_pattern(layer, q, kr, query_pos)
        if self.attention_tap is not None:
            self.attention_tap(layer, q, k, pattern)
        return (pattern.to(v.dtype) @ vr).transpose(1, 2)

    def _capped(self, scores: Tensor) -> Tensor:
        """Attention scores after the family's soft-capping ``c tanh(s / c)`` (if any)."""
        cap = self.attn_softcap
        return scores if cap is None else torch.tanh(scores / cap) * cap

    @staticmethod
    def _hidden(t: int, query_pos: Tensor | None, window: int | None,
                device: torch.device, q0: int = 0, k0: int = 0,
                t_q: int | None = None) -> Tensor:
        """Keys a query may not see: later ones, and with a sliding ``window`` those ``window``
        or more positions back (Hugging Face's ``kv_idx > q_idx - window``). ``[Tq, T]`` for
        every query, ``[B, 1, P, T]`` for the queries ``query_pos [B, P]``: ``T`` keys at the
        positions ``k0..``, ``Tq`` queries (default ``T``) at ``q0..`` (a masked pass's
        position cone; default both from 0)."""
        keys = torch.arange(k0, k0 + t, device=device)
        queries = (query_pos[:, None, :, None] if query_pos is not None else
                   torch.arange(q0, q0 + (t if t_q is None else t_q), device=device)[:, None])
        hidden = keys > queries
        if window is not None:
            hidden = hidden | (keys <= queries - window)
        return hidden

    def _attend_small(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rep: int,
                      query_pos: Tensor | None, window: int | None = None,
                      spans: tuple[int, int] | None = None) -> Tensor:
        """:meth:`attend` for short sequences on a CPU: rotated ``q [B,H,Tq,dh]``, ``k, v
        [B,G,Tk,dh]`` -> ``z [B,Tq|P,H,dh]``; with ``spans = (q0, k0)`` the queries and keys
        hold the absolute positions ``q0..`` and ``k0..`` (a masked pass's position cone;
        ``query_pos [B, P]`` then absolute too), else both ``0..T-1``.

        Scores, softmax and values as three batched kernels, each
        query head's rows stacked under its key/value head (no repeated keys and values). On a
        CPU this beats the fused kernel by about a quarter while the scores stay small (up to
        2^20 of them, the limit :meth:`attend` applies) and loses by up to half beyond, where
        materialising them costs more than the kernel's overhead (measured on stories260k's
        shapes, ``d_head`` 8); the masked passes' position cone takes it at any size."""
        b, h, tq, dh = q.shape
        g, tk = k.shape[1], k.shape[2]
        q0, k0 = spans if spans is not None else (0, 0)
        hidden = self._hidden(tk, query_pos, window, q.device, q0, k0, tq)
        if query_pos is None:
            mask = hidden.repeat(rep, 1)  # [rep*Tq, Tk]
            p = tq
        else:
            p = query_pos.shape[1]
            rows = query_pos - q0 if q0 else query_pos  # within the queries held
            q = q.gather(2, rows[:, None, :, None].expand(-1, h, -1, dh))
            mask = hidden.expand(b, rep, p, tk).reshape(b, 1, rep * p, tk)
        scores = torch.matmul(q.reshape(b, g, rep * p, dh), k.transpose(-1, -2))
        scores = self._capped(scores.mul_(self.scale(layer))).masked_fill_(mask, float("-inf"))
        # the softmax's dtype as the model computes it (Hugging Face's eager attention in
        # softmax_dtype, its fused kernels in the inputs' own)
        pattern = torch.softmax(scores, -1, dtype=self.softmax_dtype if self.eager else None)
        z = torch.matmul(pattern.to(v.dtype), v)  # [B, G, rep*P, dh]
        return z.view(b, h, p, dh).transpose(1, 2)

    def head_results(self, layer: int, z: Tensor, slots: Tensor,
                     heads: Tensor | None = None) -> Tensor:
        """Per-head outputs ``z_h W_O[h]`` (no bias): ``z[:, :, slots]`` ``[B,T,h,dh]`` ->
        ``[B,T,h,d]``, with ``heads`` the model heads those slots are (default: ``slots``)."""
        w, _ = self.w_out(layer)  # [H*dh, d]
        dh = w.shape[0] // self.n_heads
        heads = slots if heads is None else heads
        return torch.einsum("bthe,hed->bthd", z[:, :, slots],
                            w.reshape(self.n_heads, dh, -1)[heads])

    def head_results_all(self, layer: int, z: Tensor, k_masks: int,
                         heads: list[int] | None = None, out: Tensor | None = None) -> Tensor:
        """Every head's output ``z_h W_O[h]`` (no bias), head-major: ``z [K*n, T, H, dh]`` ->
        ``[K, H, n*T, d]``; with ``heads``, ``z``'s H slots are those model heads; written into
        ``out`` (``[K, H, n*T, d]``, each mask's ``[H, n*T, d]`` contiguous) when given."""
        w, _ = self.w_out(layer)  # [H*dh, d]
        b, t, h, dh = z.shape
        zh = z.reshape(k_masks, b // k_masks, t, h, dh).permute(0, 3, 1, 2, 4)
        wh = w.view(self.n_heads, dh, -1)
        if heads is not None and len(heads) < self.n_heads:
            wh = wh[heads]
        return heads_matmul(zh.reshape(k_masks, h, -1, dh), wh, out)

    def head_outputs(self, layer: int, z: Tensor, out: Tensor) -> Tensor:
        """Every head's output ``z_h W_O[h]`` (no bias), head-major: ``z [N, T, H, dh]`` ->
        ``out [H, N, T, d]`` (contiguous), written in place by one batched matmul."""
        w, _ = self.w_out(layer)  # [H*dh, d]
        n, t, h, dh = z.shape
        zh = z.permute(2, 0, 1, 3).reshape(h, n * t, dh)
        torch.bmm(zh, w.reshape(h, dh, -1), out=out.view(h, n * t, -1))
        return out

    def attn_from_heads(self, layer: int, res: Tensor, dim: int) -> Tensor:
        """Attention output (with bias) from the per-head outputs ``res`` (heads along
        ``dim``, model dimension last): their sum plus the output bias (equal to
        :meth:`attn_out` up to rounding, without a second projection)."""
        _, bias = self.w_out(layer)
        out = res.sum(dim)
        return out if bias is None else out + bias

    def attn_out(self, layer: int, z: Tensor) -> Tensor:
        """Attention output (all heads, with bias): ``[B,T,H,dh]`` -> ``[B,T,d]``."""
        w, b = self.w_out(layer)
        return conv1d(z.reshape(*z.shape[:2], -1), w, b)


class HalfSplitRotation(torch.autograd.Function):
    """Hugging Face's half-split rotary embedding (``apply_rotary_pos_emb`` with
    ``rotate_half``, Llama and GPT-NeoX alike) of ``x [..., T, dh]``: with ``r`` rotated
    dimensions (``r = dh`` for Llama, ``partial_rotary_factor * dh`` for GPT-NeoX) and ``x1, x2``
    its halves, ``y1 = x1 cos - x2 sin``, ``y2 = x2 cos + x1 sin`` and the other ``dh - r``
    dimensions unchanged.

    Three kernels (one product with ``cos`` padded by ones, two in-place updates) instead of
    Hugging Face's ten (slices, ``neg``, two ``cat``, products, sum), and the same three in
    the backward pass (the transposed rotation) instead of autograd's slice and cat
    backwards: at the small shapes of attribution on a CPU each kernel costs more in
    dispatch than in arithmetic. Equal to Hugging Face's up to float rounding (the updates
    may fuse a multiply-add).

    References:
        Su et al. (2021), "RoFormer: Enhanced Transformer with Rotary Position Embedding",
        eq. 34 (in Hugging Face's half-split layout).
    """

    @staticmethod
    def factors(cos: Tensor, sin: Tensor, dh: int) -> tuple[Tensor, Tensor, int] | None:
        """``(cos padded with ones to dh [1, 1, T, dh], sin's first half [1, 1, T, r/2],
        r / 2)`` from the rotary module's ``cos, sin [1, T, r]``, or ``None`` where they do not
        repeat their first half (then the rotation is not the half-split one this computes)."""
        r = cos.shape[-1]
        half = r // 2
        if r % 2 or r > dh or not (torch.equal(cos[..., :half], cos[..., half:])
                                   and torch.equal(sin[..., :half], sin[..., half:])):
            return None
        padded = cos.new_ones(*cos.shape[:-1], dh)
        padded[..., :r] = cos
        return padded[:, None], sin[:, None, :, :half].contiguous(), half

    @staticmethod
    def turn(x: Tensor, cos: Tensor, sin: Tensor, half: int, sign: float = 1.0,
             out: Tensor | None = None) -> Tensor:
        """The rotation of ``x [..., T, dh]`` by the :meth:`factors` ``cos, sin, half``
        (``sign=-1``: its inverse, the transpose), without autograd: a new contiguous tensor
        (as Hugging Face's ``cat`` makes: the small attention kernels then read it without
        a copy), or ``out`` (the shape ``x``, ``cos`` and ``sin`` broadcast to: each ``x``
        turned by each position's factors, as AtP*'s QK fix needs)."""
        y = torch.mul(x, cos, out=x.new_empty(x.shape) if out is None else out)
        y[..., :half].addcmul_(x[..., half: 2 * half], sin, value=-sign)
        y[..., half: 2 * half].addcmul_(x[..., :half], sin, value=sign)
        return y

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                half: int) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(cos, sin)
        ctx.half = half
        turn = HalfSplitRotation.turn
        return turn(q, cos, sin, half), turn(k, cos, sin, half)

    @staticmethod
    def backward(ctx: Any, dq: Tensor | None, dk: Tensor | None
                 ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        cos, sin = ctx.saved_tensors
        turn, half = HalfSplitRotation.turn, ctx.half
        return (None if dq is None else turn(dq, cos, sin, half, -1.0),
                None if dk is None else turn(dk, cos, sin, half, -1.0), None, None, None)


def heads_matmul(x: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """Each of R heads' (or receivers') own product, ``x [K, R, rows, a] @ w [R, a, b]`` ->
    ``[K, R, rows, b]`` (a new contiguous tensor, or ``out``, each of whose rows of ``K`` must
    be contiguous): one batched matmul per row of ``K``
    (``torch.matmul`` broadcasting ``w`` over ``K`` copies ``x`` wherever its ``K`` and ``R``
    axes do not merge, e.g. a slice of the receivers, and copies ``w`` K times otherwise), and
    one in all where ``x`` is broadcast over ``K`` (stride 0: the product is taken once and
    broadcast, not materialised; not with ``out``)."""
    k = x.shape[0]
    if k > 1 and x.stride(0) == 0 and out is None:
        return heads_matmul(x[:1], w).expand(k, -1, -1, -1)
    if out is None:
        out = x.new_empty(k, w.shape[0], x.shape[2], w.shape[2])
    for i in range(k):
        torch.bmm(x[i], w, out=out[i])
    return out


def unwrap(module: Any) -> Any:
    """The Hugging Face module inside transformer-lens bridge components (itself if plain)."""
    while hasattr(module, "original_component"):
        module = module.original_component
    return module


def weights(module: Any) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` of a (possibly bridge-wrapped) Linear, Conv1D or norm module."""
    module = unwrap(module)
    return module.weight, getattr(module, "bias", None)


def conv1d(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """GPT-2's Conv1D: ``x @ w + b`` with ``w [in, out]``."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ w if b is None else torch.addmm(b, flat, w)
    return out.view(*x.shape[:-1], w.shape[1])
