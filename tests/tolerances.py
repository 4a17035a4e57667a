"""Test tolerances derived from the precision each computation really has.

Why this module exists. The tiny test models run in float64, but Hugging Face's Llama-style
families (Llama, Mistral, Qwen2/3, Gemma-2) take their eager attention softmax in float32 and
compute RMSNorm statistics in float32 even for a float64 model, so their logits are only as
precise as float32 (about 1.2e-7 relative per step). How that float32 rounding falls depends on
the CPU's kernels (AVX-512, AVX2 and ARM differ) and on the shapes a batch gives the kernels, so
two float64 computations of the same value (batched and one at a time, runner and hooked
reference) agree only to float32 rounding: 6.8e-8 apart on an AMD EPYC CPU, or under
``ATEN_CPU_CAPABILITY=avx2`` on an Intel one, where a 1e-8 tolerance failed. GPT-2 has no float32
step (its eager softmax and LayerNorm run in the model's dtype), so its float64 comparisons keep
float64 tolerances.

:func:`atol_for` gives the tolerance of one comparison: ``16 eps32 max(1, |reference|)`` for a
model with float32 steps (16 ulps of the largest value: the observed worst case is below one;
an error of 1e-4 of a logit still fails), the caller's float64 tolerance otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

EPS32 = torch.finfo(torch.float32).eps
ULPS = 16  # float32 ulps allowed, relative to the largest compared value


def float32_inside(model: Any) -> bool:
    """Whether ``model``'s Hugging Face forward rounds through float32 although the model is
    float64 (a float32 softmax, as the Llama-style families' eager attention takes it; their
    RMSNorm statistics are float32 too). Models of unknown families count as such."""
    from circuitfind.patching.architectures import architecture_for, unwrap

    if model.cfg.dtype != torch.float64:
        return False  # float32 models: their tests use float32 tolerances already
    arch = architecture_for(type(unwrap(model.original_model)).__name__)
    return arch is None or arch.softmax_dtype == torch.float32


def atol_for(model: Any, reference: torch.Tensor, float64: float = 1e-9) -> float:
    """Absolute tolerance for comparing two computations of ``reference`` on ``model``.

    Args:
        model: The TransformerBridge the values come from.
        reference: The expected values (their largest magnitude scales the tolerance).
        float64: The tolerance where every step is float64.

    Returns:
        ``16 eps32 max(1, |reference|)`` for a model with float32 steps, else ``float64``.
    """
    if float32_inside(model):
        return ULPS * EPS32 * max(1.0, float(reference.abs().max()))
    return float64


def assert_close(model: Any, got: torch.Tensor, want: torch.Tensor, float64: float = 1e-9) -> None:
    """``torch.testing.assert_close`` at :func:`atol_for` (no relative tolerance)."""
    torch.testing.assert_close(got, want, atol=atol_for(model, want, float64), rtol=0)
