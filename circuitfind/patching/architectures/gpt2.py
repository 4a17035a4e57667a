"""GPT-2 (``GPT2LMHeadModel``): LayerNorm, learned positions, Conv1D weights, biases."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitfind.patching.architectures.base import Architecture, conv1d, unwrap, weights
from circuitfind.patching.architectures.registry import register


@register("GPT2LMHeadModel")
class GPT2(Architecture):
    """``GPT2LMHeadModel``: LayerNorm, learned positions, Conv1D (``x @ W + b``) weights."""

    def __init__(self, hf: Any, n_heads: int, n_kv: int) -> None:
        super().__init__(hf, n_heads, n_kv)
        from transformers.activations import ACT2FN

        hf = unwrap(hf)
        self.tr = unwrap(hf.transformer)
        self.blocks = [unwrap(b) for b in self.tr.h]
        self.attn = [unwrap(b.attn) for b in self.blocks]
        self.mlps = [unwrap(b.mlp) for b in self.blocks]
        cfg = hf.config
        self.eps = float(cfg.layer_norm_epsilon)
        self.act = ACT2FN[cfg.activation_function]
        if cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh"):
            # the same tanh approximation as one fused kernel (HF's gelu_new is five ops)
            self.act = lambda x: F.gelu(x, approximate="tanh")
        self.lm_head = hf.lm_head
        self.d_model = int(cfg.n_embd)
        self.d_head = self.d_model // n_heads
        self._scale = [
            (self.d_head ** -0.5 if cfg.scale_attn_weights else 1.0)
            / (float(i + 1) if cfg.scale_attn_by_inverse_layer_idx else 1.0)
            for i in range(int(cfg.n_layer))]

    def _ln(self, module: Any, x: Tensor) -> Tensor:
        w, b = weights(module)
        return self.layer_norm(x, w, b, self.eps)

    def embed(self, tokens: Tensor) -> Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return (F.embedding(tokens, weights(self.tr.wte)[0])
                + F.embedding(pos, weights(self.tr.wpe)[0])[None])

    def ln_attn(self, layer: int, x: Tensor) -> Tensor:
        return self._ln(self.blocks[layer].ln_1, x)

    def ln_mlp(self, layer: int, x: Tensor) -> Tensor:
        return self._ln(self.blocks[layer].ln_2, x)

    def norm_parts(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
        w, _ = weights(self.blocks[layer].ln_1)
        return (*self.standardised(x, self.eps, True), w, True)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        mlp = self.mlps[layer]
        (w1, b1), (w2, b2) = weights(mlp.c_fc), weights(mlp.c_proj)
        return conv1d(self.rules.activation_fn(self.act, conv1d(x, w1, b1)), w2, b2)

    def qkv(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w, b = weights(self.attn[layer].c_attn)
        out = conv1d(x, w, b).view(*x.shape[:-1], 3, self.n_heads, self.d_head)
        return out[..., 0, :, :], out[..., 1, :, :], out[..., 2, :, :]

    def qk(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        w, b = weights(self.attn[layer].c_attn)
        assert b is not None  # GPT-2's c_attn always has a bias
        d = self.d_model
        out = conv1d(x, w[:, : 2 * d], b[: 2 * d]).view(*x.shape[:-1], 2, self.n_heads,
                                                           self.d_head)
        return out[..., 0, :, :], out[..., 1, :, :]

    def head_weights(self, layer: int, kind: str) -> tuple[Tensor, Tensor | None]:
        w, b = weights(self.attn[layer].c_attn)
        assert b is not None  # GPT-2's Conv1D always has a bias
        cols = slice("qkv".index(kind) * self.d_model, ("qkv".index(kind) + 1) * self.d_model)
        return (w[:, cols].reshape(self.d_model, self.n_heads, self.d_head).permute(1, 0, 2),
                b[cols].view(self.n_heads, self.d_head))

    def qkv_offsets(self, layer: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """``ln_1``'s bias through ``c_attn``, plus its bias (one product)."""
        _, shift = weights(self.blocks[layer].ln_1)
        fused, bias = weights(self.attn[layer].c_attn)
        shift = shift if shift is not None else fused.new_zeros(fused.shape[0])
        out = conv1d(shift[None], fused, bias).view(3, self.n_heads, self.d_head)
        return out[0], out[1], out[2]

    def qkv_input_weights(self, layer: int, w: Tensor, out: Tensor) -> Tensor:
        """:meth:`Architecture.qkv_input_weights` in one product over ``c_attn``'s weight
        (``[d, 3 * H * dh]``, columns per kind, then head)."""
        fused, _ = weights(self.attn[layer].c_attn)
        per_kind = fused.view(-1, 3, self.n_heads, self.d_head).permute(1, 2, 3, 0)
        torch.mul(per_kind, w, out=out.view(3, self.n_heads, self.d_head, -1))
        return out

    def qkv_sources(self, layer: int) -> tuple[Tensor | None, ...]:
        return (*weights(self.blocks[layer].ln_1), *weights(self.attn[layer].c_attn))

    def w_out(self, layer: int) -> tuple[Tensor, Tensor | None]:
        return weights(self.attn[layer].c_proj)

    def scale(self, layer: int) -> float:
        return self._scale[layer]

    def final(self, x: Tensor) -> Tensor:
        w, b = weights(self.lm_head)
        return F.linear(self._ln(self.tr.ln_f, x), w, b)
