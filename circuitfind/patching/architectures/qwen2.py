"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): the Llama layout with q/k/v biases (read by the Llama
adapter's projections) and optional sliding-window layers (``config.layer_types``)."""

from __future__ import annotations

from circuitfind.patching.architectures.llama import Llama
from circuitfind.patching.architectures.registry import register


@register("Qwen2ForCausalLM")
class Qwen2(Llama):
    """``Qwen2ForCausalLM``: :class:`Llama` with biased q/k/v projections; a layer's sliding
    window is its attention module's ``sliding_window`` (set for ``sliding_attention`` layers)."""
