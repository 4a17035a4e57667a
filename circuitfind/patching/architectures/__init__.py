"""Model-family adapters for the block runner, one module per family.

Each module describes where a family's weights live and the few functions that differ from
the shared :class:`Architecture` (norms, positions, attention extras, block wiring), and
registers itself for its Hugging Face classes. :func:`architecture_for` finds the adapter of a
model class; classes without one run on the bridge's hooked forward.
"""

from __future__ import annotations

from circuitfind.patching.architectures import (  # noqa: F401  (each registers itself)
    gemma2,
    gpt2,
    gpt_neox,
    llama,
    mistral,
    qwen2,
    qwen3,
)
from circuitfind.patching.architectures.base import Architecture, unwrap
from circuitfind.patching.architectures.registry import architecture_for, register, supported

__all__ = ["Architecture", "architecture_for", "register", "supported", "unwrap"]
