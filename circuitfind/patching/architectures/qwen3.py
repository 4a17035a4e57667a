"""Qwen3 (``Qwen3ForCausalLM``): the Llama layout with an RMSNorm on each head's query and key
(``q_norm``, ``k_norm`` over ``d_head``) before the rotation, and no q/k/v biases."""

from __future__ import annotations

from torch import Tensor

from circuitfind.patching.architectures.llama import Llama
from circuitfind.patching.architectures.registry import register


@register("Qwen3ForCausalLM")
class Qwen3(Llama):
    """``Qwen3ForCausalLM``: :class:`Llama` plus per-head q/k RMSNorms (Qwen3 report, 2025).

    The norms act on each head's projection, after the q/k inputs are projected, so a q or k
    receiver's input and its edges are as in Llama; the norms are part of the attention that
    reads them (and of EAP's backward pass through it).
    """

    def qk_norm(self, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``q_norm(q)``, ``k_norm(k)`` over ``d_head`` (Hugging Face's ``Qwen3RMSNorm``)."""
        attn = self.attn[layer]
        return self._rms(attn.q_norm, q), self._rms(attn.k_norm, k)
