"""Gemma-2 (``Gemma2ForCausalLM``): scaled embeddings, ``1 + w`` RMSNorms, a norm after the
attention and after the MLP, soft-capped attention scores and logits, local and global layers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitfind.patching.architectures.base import unwrap, weights
from circuitfind.patching.architectures.llama import Llama
from circuitfind.patching.architectures.registry import register


@register("Gemma2ForCausalLM")
class Gemma2(Llama):
    """``Gemma2ForCausalLM`` (Gemma Team 2024, "Gemma 2").

    Differences from Llama: the embedding is multiplied by ``sqrt(d_model)``; every RMSNorm
    computes in float32 and multiplies by ``1 + w``; the MLP reads ``pre_feedforward_layernorm``
    and its output passes ``post_feedforward_layernorm`` (part of the MLP node's output); the
    heads' summed output passes ``post_attention_layernorm`` before it joins the residual stream
    (:attr:`attn_post_norm`: a receiver then reads the post-norm of its own mixture of kept and
    ablated head outputs, see :mod:`circuitfind.patching.post_norm_pass`); attention scores and the
    final logits are soft-capped (``c tanh(s / c)``); ``sliding_attention`` layers attend within a
    window; the attention scale is ``query_pre_attn_scalar ** -0.5``.
    """

    attn_post_norm = True

    def __init__(self, hf: Any, n_heads: int, n_kv: int) -> None:
        super().__init__(hf, n_heads, n_kv)
        from transformers.activations import ACT2FN

        cfg = unwrap(hf).config
        self.act = ACT2FN[cfg.hidden_activation]
        self.attn_softcap = cfg.attn_logit_softcapping
        self.final_softcap = cfg.final_logit_softcapping
        self.embed_scale = float(cfg.hidden_size) ** 0.5

    def _rms(self, module: Any, x: Tensor) -> Tensor:
        """Hugging Face's ``Gemma2RMSNorm``: ``x / rms(x) * (1 + w)`` in float32, cast back
        (``1/rms`` detached under :attr:`BackwardRules.freeze_norm`)."""
        norm = unwrap(module)
        h = x.float()
        h = h * self.rules.statistic(torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps))
        return (h * (1.0 + norm.weight.float())).type_as(x)

    def embed(self, tokens: Tensor) -> Tensor:
        w = weights(self.body.embed_tokens)[0]
        return F.embedding(tokens, w) * torch.tensor(self.embed_scale, dtype=w.dtype)

    def ln_mlp(self, layer: int, x: Tensor) -> Tensor:
        return self._rms(self.blocks[layer].pre_feedforward_layernorm, x)

    def norm_parts(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
        norm = unwrap(self.blocks[layer].input_layernorm)
        return (*self.standardised(x, norm.eps, False), 1.0 + norm.weight.float(), False)

    def project_heads_normed(self, layer: int, x: Tensor,
                             heads: dict[str, list[int]] | None = None) -> list[Tensor] | None:
        return None  # Gemma's norm rounds through float32: normalise first

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        return self._rms(self.blocks[layer].post_feedforward_layernorm, super().mlp(layer, x))

    def post_norm(self, layer: int, x: Tensor) -> Tensor:
        """``post_attention_layernorm`` of the heads' summed output ``x [..., d]``."""
        return self._rms(self.blocks[layer].post_attention_layernorm, x)

    def post_norm_jvp(self, layer: int, s: Tensor, delta: Tensor) -> Tensor:
        """``J(s) delta`` of :meth:`post_norm` at ``s [X, d]`` for directions ``delta [h, X', d]``
        (``X = copies * X'``: each direction at each copy of the rows, ``s`` holding the copies
        one after the other): ``c (inv delta - inv^3 s mean(s delta))`` with ``c = 1 + w``
        (closed form, float32 like the norm; float64 inputs stay float64); ``c inv delta``
        under frozen statistics (:attr:`BackwardRules.freeze_norm`). Returns ``[h, X, d]``.

        ``c`` is applied to the directions and to ``s`` before the copies are spread (so the
        only ``[h, X, d]`` work is one product and one update)."""
        norm = unwrap(self.blocks[layer].post_attention_layernorm)
        dt = torch.promote_types(s.dtype, torch.float32)
        h, rows, d = delta.shape
        copies = s.shape[0] // rows
        hs = s.to(dt).view(copies, rows, d)
        inv = torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + norm.eps)  # [C, X', 1]
        scale = 1.0 + norm.weight.to(dt)
        dd = delta.to(dt)
        out = (dd * scale)[:, None] * inv[None]  # [h, C, X', d]
        if not self.rules.freeze_norm:
            # mean(s delta) inv^3 per direction, copy and row: [h, C, X']
            coef = torch.einsum("hxd,cxd->hcx", dd, hs).div_(d).mul_(inv[..., 0].pow(3))
            out.addcmul_(coef[..., None], (hs * scale)[None], value=-1.0)
        return out.view(h, copies * rows, d)

    def post_norm_rms(self, layer: int) -> tuple[Tensor, float]:
        """``(1 + w [d] float32, eps)`` of ``post_attention_layernorm`` (:meth:`_rms`)."""
        norm = unwrap(self.blocks[layer].post_attention_layernorm)
        return 1.0 + norm.weight.float(), float(norm.eps)

    def ln_attn_rms(self, layer: int) -> tuple[Tensor, float]:
        """``(1 + w [d] float32, eps)`` of ``input_layernorm`` (:meth:`_rms`)."""
        norm = unwrap(self.blocks[layer].input_layernorm)
        return 1.0 + norm.weight.float(), float(norm.eps)

    def attn_out(self, layer: int, z: Tensor) -> Tensor:
        return self.post_norm(layer, super().attn_out(layer, z))

    def attn_from_heads(self, layer: int, res: Tensor, dim: int) -> Tensor:
        return self.post_norm(layer, super().attn_from_heads(layer, res, dim))

    def final(self, x: Tensor) -> Tensor:
        logits = super().final(x)
        cap = self.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
