"""Mistral (``MistralForCausalLM``): the Llama layout with sliding-window attention in every layer
(``config.sliding_window`` keys back, ``None`` for none)."""

from __future__ import annotations

from circuitfind.patching.architectures.llama import Llama
from circuitfind.patching.architectures.registry import register


@register("MistralForCausalLM")
class Mistral(Llama):
    """``MistralForCausalLM``: :class:`Llama` whose every layer attends within a sliding window."""

    def window(self, layer: int) -> int | None:
        """``config.sliding_window`` for every layer (``None``: full causal attention)."""
        window = getattr(self.hf.config, "sliding_window", None)
        return None if window is None else int(window)
