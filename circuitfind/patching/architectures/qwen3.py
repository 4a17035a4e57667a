"""Qwen3 (``Qwen3ForCausalLM``): the Llama layout with an RMSNorm on each head's query and key
(``q_norm``, ``k_norm`` over ``d_head``) before the rotation, and no q/k/v biases."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from circuitfind.patching.architectures.base import unwrap
from circuitfind.patching.architectures.llama import Llama
from circuitfind.patching.architectures.registry import register


@register("Qwen3ForCausalLM")
class Qwen3(Llama):
    """``Qwen3ForCausalLM``: :class:`Llama` plus per-head q/k RMSNorms (Qwen3 report, 2025).

    The norms act on each head's projection, after the q/k inputs are projected, so a q or k
    receiver's input and its edges are as in Llama; the norms are part of the attention that
    reads them (and of EAP's backward pass through it).
    """

    def qk_norm(self, layer: int, q: Tensor, k: Tensor,
                scratch: bool = False) -> tuple[Tensor, Tensor]:
        """``q_norm(q)``, ``k_norm(k)`` over ``d_head`` (Hugging Face's ``Qwen3RMSNorm``);
        with ``scratch`` (float32, no gradient) in place, ``1/rms`` from one vector-norm
        reduction: about half the time of the fused-but-composite ``rms_norm`` on a CPU."""
        attn = self.attn[layer]
        if scratch and q.dtype == k.dtype == torch.float32:
            return _rms_in_place(attn.q_norm, q), _rms_in_place(attn.k_norm, k)
        return self._rms(attn.q_norm, q), self._rms(attn.k_norm, k)

    def qk_norm_parts(self, layer: int) -> tuple[Tensor, Tensor, float] | None:
        """The q and k norms' weights and their (shared) epsilon: :meth:`qk_norm`'s scratch
        path is this per-head RMSNorm."""
        attn = self.attn[layer]
        q, k = unwrap(attn.q_norm), unwrap(attn.k_norm)
        if q.variance_epsilon != k.variance_epsilon:
            return None
        return q.weight, k.weight, float(q.variance_epsilon)


def _rms_in_place(module: Any, x: Tensor) -> Tensor:
    """``x [..., dh]`` (float32, no gradient) overwritten with ``RMSNorm(x)``: ``x w /
    sqrt(mean(x^2) + eps)``."""
    norm = unwrap(module)
    inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    inv.square_().div_(x.shape[-1]).add_(norm.variance_epsilon).rsqrt_()
    return x.mul_(inv).mul_(norm.weight.to(x.dtype))
