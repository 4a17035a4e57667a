"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``): LayerNorm, fused per-head q/k/v projection,
partial rotary positions, and attention and MLP in parallel (``use_parallel_residual``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from circuitfind.patching.architectures.base import Architecture, unwrap, weights
from circuitfind.patching.architectures.registry import register


@register("GPTNeoXForCausalLM")
class GPTNeoX(Architecture):
    """``GPTNeoXForCausalLM`` (Pythia, GPT-NeoX-20B).

    Wiring. With ``use_parallel_residual`` (Pythia's default) a block computes
    ``x + attn(ln1(x)) + mlp(ln2(x))``: the MLP reads the block's input, not the attention's
    output (:attr:`parallel`; the graph then has no edge from a layer's heads into its own MLP).
    Without it the block is sequential, as in GPT-2.

    Weights. ``query_key_value`` is one Linear whose output rows are laid out per head as
    ``[q | k | v]`` of ``d_head`` each; the rotary embedding turns the first
    ``partial_rotary_factor * d_head`` dimensions of each query and key (the model's own rotary
    module and Hugging Face's ``apply_rotary_pos_emb`` for GPT-NeoX); eager attention takes its
    softmax in float32.
    """

    softmax_dtype = torch.float32
    rotary_half_split = True  # Hugging Face's rotation, as HalfSplitRotation's three kernels

    def __init__(self, hf: Any, n_heads: int, n_kv: int) -> None:
        super().__init__(hf, n_heads, n_kv)
        from transformers.activations import ACT2FN

        hf = unwrap(hf)
        self.body = unwrap(hf.gpt_neox)
        self.blocks = [unwrap(b) for b in self.body.layers]
        self.attn = [unwrap(b.attention) for b in self.blocks]
        self.mlps = [unwrap(b.mlp) for b in self.blocks]
        self.rotary = unwrap(self.body.rotary_emb)
        self.lm_head = hf.lm_head if hasattr(hf, "lm_head") else hf.embed_out
        cfg = hf.config
        self.parallel = bool(cfg.use_parallel_residual)
        self.act = ACT2FN[cfg.hidden_act]
        self.d_model = int(cfg.hidden_size)
        self.d_head = self.d_model // n_heads
        self._scale = float(self.attn[0].scaling)

    def _ln(self, module: Any, x: Tensor) -> Tensor:
        norm = unwrap(module)
        return self.layer_norm(x, norm.weight, norm.bias, norm.eps)

    def embed(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, weights(self.body.embed_in)[0])

    def ln_attn(self, layer: int, x: Tensor) -> Tensor:
        return self._ln(self.blocks[layer].input_layernorm, x)

    def ln_mlp(self, layer: int, x: Tensor) -> Tensor:
        return self._ln(self.blocks[layer].post_attention_layernorm, x)

    def norm_parts(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
        norm = unwrap(self.blocks[layer].input_layernorm)
        return (*self.standardised(x, norm.eps, True), norm.weight, True)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        mlp = self.mlps[layer]
        hidden = F.linear(x, *weights(mlp.dense_h_to_4h))
        return F.linear(self.rules.activation_fn(self.act, hidden),
                        *weights(mlp.dense_4h_to_h))

    def qkv(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = F.linear(x, *weights(self.attn[layer].query_key_value))
        out = out.view(*x.shape[:-1], self.n_heads, 3, self.d_head)
        return out[..., 0, :], out[..., 1, :], out[..., 2, :]

    def head_weights(self, layer: int, kind: str) -> tuple[Tensor, Tensor | None]:
        w, b = weights(self.attn[layer].query_key_value)  # [3d, d]: rows per head [q|k|v]
        i = "qkv".index(kind)
        wh = w.view(self.n_heads, 3, self.d_head, -1)[:, i].transpose(1, 2)  # [H, d, dh]
        return wh, None if b is None else b.view(self.n_heads, 3, self.d_head)[:, i]

    def qkv_offsets(self, layer: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """The norm's bias through the fused projection, plus its bias (one product)."""
        norm = unwrap(self.blocks[layer].input_layernorm)
        fused, bias = weights(self.attn[layer].query_key_value)
        if norm.bias is None and bias is None:
            return None
        shift = norm.bias if norm.bias is not None else fused.new_zeros(fused.shape[1])
        out = F.linear(shift, fused, bias).view(self.n_heads, 3, self.d_head)
        return out[:, 0], out[:, 1], out[:, 2]

    def qkv_input_weights(self, layer: int, w: Tensor, out: Tensor) -> Tensor:
        """:meth:`Architecture.qkv_input_weights` in one product: the fused weight's rows
        are ``W_h^T`` already, per head ``[q | k | v]``."""
        fused, _ = weights(self.attn[layer].query_key_value)  # [H*3*dh, d]
        per_kind = fused.view(self.n_heads, 3, self.d_head, -1).transpose(0, 1)
        torch.mul(per_kind, w, out=out.view(3, self.n_heads, self.d_head, -1))
        return out

    def qkv_sources(self, layer: int) -> tuple[Tensor | None, ...]:
        return (*weights(self.blocks[layer].input_layernorm),
                *weights(self.attn[layer].query_key_value))

    def w_out(self, layer: int) -> tuple[Tensor, Tensor | None]:
        w, b = weights(self.attn[layer].dense)
        return w.T, b

    def scale(self, layer: int) -> float:
        return self._scale

    @staticmethod
    def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Hugging Face's GPT-NeoX rotation (the first ``rotary_ndims`` of each head only)."""
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

        return apply_rotary_pos_emb(q, k, cos, sin)

    def final(self, x: Tensor) -> Tensor:
        return F.linear(self._ln(self.body.final_layer_norm, x), *weights(self.lm_head))
