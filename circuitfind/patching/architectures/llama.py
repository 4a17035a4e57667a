"""Llama 1-3 (``LlamaForCausalLM``): RMSNorm, rotary positions (Llama-3 rope scaling through
the model's own rotary module), gated MLP, grouped-query attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitfind.patching.architectures.base import (
    Architecture,
    heads_matmul,
    unwrap,
    weights,
)
from circuitfind.patching.architectures.registry import register


@register("LlamaForCausalLM")
class Llama(Architecture):
    """``LlamaForCausalLM``: RMSNorm, rotary embeddings, gated MLP, grouped-query attention."""

    softmax_dtype = torch.float32
    rotary_half_split = True  # Hugging Face's rotation, as HalfSplitRotation's three kernels

    def __init__(self, hf: Any, n_heads: int, n_kv: int) -> None:
        super().__init__(hf, n_heads, n_kv)
        from transformers.activations import ACT2FN

        hf = unwrap(hf)
        self.body = unwrap(hf.model)
        self.blocks = [unwrap(b) for b in self.body.layers]
        self.attn = [unwrap(b.self_attn) for b in self.blocks]
        self.mlps = [unwrap(b.mlp) for b in self.blocks]
        self.rotary = unwrap(self.body.rotary_emb)
        self.lm_head = hf.lm_head
        cfg = hf.config
        self.act = ACT2FN[getattr(cfg, "hidden_act", None) or cfg.hidden_activation]
        self.d_head = int(self.attn[0].head_dim)
        self._scale = float(self.attn[0].scaling)

    def _rms(self, module: Any, x: Tensor) -> Tensor:
        """Hugging Face's ``LlamaRMSNorm`` (statistics in float32, weight in the model's dtype;
        ``1/rms`` detached under :attr:`BackwardRules.freeze_norm`)."""
        norm = unwrap(module)
        if (x.dtype == torch.float32 and norm.weight.dtype == torch.float32
                and not self.rules.freeze_norm):
            # the same computation in one kernel (bit for bit, checked on torch 2.13)
            return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
        h = x.float()
        h = h * self.rules.statistic(
            torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
        return norm.weight * h.to(x.dtype)

    def embed(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, weights(self.body.embed_tokens)[0])

    def ln_attn(self, layer: int, x: Tensor) -> Tensor:
        return self._rms(self.blocks[layer].input_layernorm, x)

    def ln_mlp(self, layer: int, x: Tensor) -> Tensor:
        return self._rms(self.blocks[layer].post_attention_layernorm, x)

    def norm_parts(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
        norm = unwrap(self.blocks[layer].input_layernorm)
        return (*self.standardised(x, norm.variance_epsilon, False), norm.weight, False)

    def project_heads_normed(self, layer: int, x: Tensor,
                             heads: dict[str, list[int]] | None = None) -> list[Tensor] | None:
        """RMSNorm folded into the projections, ``W (w * x * inv) = ((W diag(w)) x) * inv``:
        one reduction and one matmul read the receivers' inputs (the norm alone reads and
        writes them three times). Only in float32, where Hugging Face's norm computes in the
        model's dtype, so the two differ by rounding order only (in float64 it rounds to
        float32, which only the unfolded norm reproduces)."""
        if x.dtype != torch.float32:
            return None
        if x.shape[0] > 1 and x.stride(0) == 0:  # the same inputs in every mask: once
            return [p.expand(x.shape[0], -1, -1, -1)
                    for p in self.project_heads_normed(layer, x[:1], heads) or ()]
        norm = unwrap(self.blocks[layer].input_layernorm)
        ms = torch.linalg.vector_norm(x, 2, -1, keepdim=True).square_().div_(x.shape[-1])
        inv = torch.rsqrt(ms.add_(norm.variance_epsilon))  # [K, R', rows, 1]
        # every receiver's own product in one batched matmul per mask (no copies of x)
        w, b = self.qkv_head_weights(layer, heads, norm.weight)  # [R', d, dh]
        out = heads_matmul(x, w).mul_(inv)
        if b is not None:
            out = out.add_(b[:, None])
        sizes = ([len(heads[kind]) for kind in "qkv"] if heads is not None
                 else [self.n_heads, self.n_kv, self.n_kv])
        return list(out.split(sizes, 1))

    def _mlp_weights(self, layer: int) -> tuple[tuple[Tensor, Tensor | None], ...]:
        """``(gate, up, down)`` projections' ``(weight, bias)`` of ``layer``'s MLP."""
        mlp = self.mlps[layer]
        return tuple(weights(getattr(mlp, f"{n}_proj")) for n in ("gate", "up", "down"))

    def _gated_in_place(self, x: Tensor, gate: tuple[Tensor, Tensor | None],
                        up: tuple[Tensor, Tensor | None]) -> Tensor:
        """``act(gate(x)) * up(x)`` ``[..., d_ff]`` with the product in place (no autograd:
        the masked passes; one buffer less)."""
        return self.act(F.linear(x, *gate)).mul_(F.linear(x, *up))

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        gate, up, down = self._mlp_weights(layer)
        r = self.rules
        if not torch.is_grad_enabled() and r.activation == "gradient":
            return F.linear(self._gated_in_place(x, gate, up), *down)
        return F.linear(r.gate(r.activation_fn(self.act, F.linear(x, *gate)), F.linear(x, *up)),
                        *down)

    def mlp_into(self, layer: int, x: Tensor, out: Tensor) -> Tensor | None:
        """:meth:`mlp` with the down projection written straight into ``out``: one matrix
        product per row of ``K`` (``None``, nothing written, with gradients, another
        activation rule or a down-projection bias)."""
        gate, up, down = self._mlp_weights(layer)
        if torch.is_grad_enabled() or self.rules.activation != "gradient" or down[1] is not None:
            return None
        h = self._gated_in_place(x, gate, up)
        k = x.shape[0]
        hk, ok, wt = h.view(k, -1, h.shape[-1]), out.view(k, -1, out.shape[-1]), down[0].t()
        for i in range(k):
            torch.mm(hk[i], wt, out=ok[i])
        return out

    def qkv(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.attn[layer]
        shape = (*x.shape[:-1], -1, self.d_head)
        q, k, v = (F.linear(x, *weights(getattr(a, f"{name}_proj"))).view(shape)
                   for name in "qkv")
        return q, k, v

    def qk(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.attn[layer]
        shape = (*x.shape[:-1], -1, self.d_head)
        return (F.linear(x, *weights(a.q_proj)).view(shape),
                F.linear(x, *weights(a.k_proj)).view(shape))

    def head_weights(self, layer: int, kind: str) -> tuple[Tensor, Tensor | None]:
        w, b = weights(getattr(self.attn[layer], f"{kind}_proj"))
        w = w.view(-1, self.d_head, w.shape[1]).transpose(1, 2)  # [heads, d, dh]
        return w, None if b is None else b.view(-1, self.d_head)

    def qkv_offsets(self, layer: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """The projections' biases (RMSNorm has none; ``None`` without biases)."""
        heads = [self.head_weights(layer, kind) for kind in "qkv"]
        if all(b is None for _, b in heads):
            return None
        q, k, v = (w.new_zeros(w.shape[0], w.shape[2]) if b is None else b for w, b in heads)
        return q, k, v

    def qkv_sources(self, layer: int) -> tuple[Tensor | None, ...]:
        a = self.attn[layer]
        return (weights(self.blocks[layer].input_layernorm)[0],
                *(t for name in "qkv" for t in weights(getattr(a, f"{name}_proj"))))

    def w_out(self, layer: int) -> tuple[Tensor, Tensor | None]:
        w, b = weights(self.attn[layer].o_proj)
        return w.T, b

    def scale(self, layer: int) -> float:
        return self._scale

    def window(self, layer: int) -> int | None:
        """The layer's sliding window where the model has one (Qwen2/3's ``sliding_attention``
        layers set it on their attention modules), else ``None``."""
        return getattr(self.attn[layer], "sliding_window", None)

    @staticmethod
    def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Hugging Face's Llama rotation (half-split, every dimension)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb(q, k, cos, sin)

    def final(self, x: Tensor) -> Tensor:
        return F.linear(self._rms(self.body.norm, x), *weights(self.lm_head))
