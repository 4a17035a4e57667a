"""Test tolerances derived from the precision each computation really has.

Why this module exists. Two computations of the same value (batched and one at a time, the
block runner and a hooked reference, circuitfind and plain Hugging Face) agree only as far as
their least precise step, and where that step rounds in float32 *how* it rounds depends on the
CPU's kernels (AVX-512, AVX2, ARM and the default path differ) and on the shapes a batch gives
them. A tolerance tighter than that precision passes on the developer's CPU and fails on
another: ``test_invariants_on_padded_data[llama_gqa]`` allowed 1e-8 and failed by 6.8e-8 on an
AMD EPYC CPU, a difference reproduced here with ``ATEN_CPU_CAPABILITY=avx2``.

The precision classes, and the tolerance of each:

- **float64 end to end** (GPT-2 in float64: Hugging Face's eager GPT-2 attention takes its
  softmax and LayerNorm in the model's dtype). Agreement to ~1e-15 on every CPU; tests keep a
  tight float64 tolerance (the caller's ``float64``, 1e-9 by default) and catch small bugs.
- **float64 with float32 steps** (the Llama-style families, GPT-NeoX, and families circuitfind
  has no adapter for): Hugging Face's eager attention takes its softmax in float32 and RMSNorm
  its statistics in float32 even for a float64 model, so results agree to float32 rounding of
  the values that flow through the model: :data:`ULPS` float32 ulps of the largest compared
  value (at least of 1, the logits' order of magnitude in the tiny test models). Measured worst
  case over default/AVX2/AVX-512 kernels and 1-2 threads: 0.6 ulps on logits (6.8e-8, the AMD
  failure), 2.4 ulps on a log-probability (two logits' errors; allowed twice the tolerance),
  at most 0.072 of a tolerance; an error of 1e-4 of a logit still fails.
- **float32 models** (stories260k; float32 variants of the tiny models): rounding compounds over
  every op of the forward and the two sides take different kernels (folded norms, one matmul
  for many heads), so :data:`FLOAT32_MODEL_ULPS` ulps of the largest value (of the logits, where
  a metric derived from them is compared). Measured worst case: 7 ulps (stories260k's logits,
  runner vs plain Hugging Face), 0.057 of the tolerance; an error of 1e-3 of a logit still fails.
- **half-precision models** (float16, bfloat16): every op's output is rounded to the half
  dtype (8 significant bits for bfloat16, ``eps = 2**-7``; 11 for float16, ``eps = 2**-10``),
  so a half model agrees with its float32 twin (the same weights, rounded to the half dtype,
  then cast to float32) and with Hugging Face's own half-precision forward to
  :data:`HALF_ULPS` half-dtype ulps of the largest compared value (:func:`half_atol`; of the
  logits where a metric derived from them is compared, of the largest score where edge
  scores are). Measured worst case over GPT-2, Llama (grouped-query), GPT-NeoX, Gemma-2, Qwen3
  and Mistral layouts of 3 layers, two seeds, both dtypes: 4.4 ulps (float16 EAP scores),
  3.4 ulps (bfloat16 logits), 1.8 ulps (runner vs Hugging Face): at most 0.28 of the
  tolerance. Accumulations circuitfind adds run in float32 or wider (metrics read half logits
  in float32, score contractions sum in float32, scores in float64), which the tests pin
  separately and exactly.
- **results stored in float32** (EAP, EAP-IG, exact and ACDC scores are accumulated in float64
  and returned as float32): two float64 values a rounding apart may round to neighbouring
  float32 values, one ulp apart, so comparisons of float32 results add ``rtol = eps32``.

``OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 python -m pytest tests/integration`` (and
``=default``, ``=avx512`` where the CPU has it) exercises other kernels than the native ones.
"""

from __future__ import annotations

from typing import Any

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2**-23: one ulp at 1.0
ULPS = 16  # float64 models with float32 steps: ulps of the largest compared value
FLOAT32_MODEL_ULPS = 128  # float32 models: ulps of the largest compared value
HALF_ULPS = 16  # float16 / bfloat16 models: ulps of the half dtype of the largest compared value
HALF_DTYPES = (torch.float16, torch.bfloat16)


def float32_atol(reference: torch.Tensor | float, ulps: int = ULPS) -> float:
    """``ulps`` float32 ulps of the largest magnitude in ``reference`` (at least of 1).

    Args:
        reference: The values whose magnitude bounds the rounding: the compared values, or the
            logits a compared metric derives from.
        ulps: How many ulps of that magnitude to allow.

    Returns:
        ``ulps * eps32 * max(1, max |reference|)`` (the unit of ``reference``).
    """
    largest = float(torch.as_tensor(reference).abs().max())
    return ulps * EPS32 * max(1.0, largest)


def half_atol(reference: torch.Tensor | float, dtype: torch.dtype, ulps: int = HALF_ULPS,
              floor: float = 1.0) -> float:
    """``ulps`` ulps of the half ``dtype`` at the largest magnitude in ``reference``.

    Args:
        reference: The values whose magnitude bounds the rounding (the compared values, or
            the logits a compared metric derives from).
        dtype: ``torch.float16`` or ``torch.bfloat16``.
        ulps: How many ulps of that magnitude to allow.
        floor: The smallest magnitude to scale by (1: logits' order of magnitude; 0 for
            values such as edge scores whose own scale is far below the logits').

    Returns:
        ``ulps * eps(dtype) * max(floor, max |reference|)`` (the unit of ``reference``).
    """
    largest = float(torch.as_tensor(reference).abs().max())
    return ulps * torch.finfo(dtype).eps * max(floor, largest)


def float32_inside(model: Any) -> bool:
    """Whether a float64 ``model``'s forward rounds through float32 steps.

    The Llama-style families' and GPT-NeoX's eager attention takes its softmax in float32 (their
    RMSNorm statistics are float32 too); families circuitfind has no adapter for count as such.

    Args:
        model: A TransformerBridge.

    Returns:
        True for a float64 model with a float32 step; False for GPT-2 (float64 end to end) and
        for models that are not float64 (see :func:`atol_for`).
    """
    from circuitfind.patching.architectures import architecture_for, unwrap

    if model.cfg.dtype != torch.float64:
        return False
    arch = architecture_for(type(unwrap(model.original_model)).__name__)
    return arch is None or arch.softmax_dtype == torch.float32


def atol_for(model: Any, reference: torch.Tensor | float, float64: float = 1e-9) -> float:
    """Absolute tolerance for comparing two computations of ``reference`` on ``model``.

    Args:
        model: The TransformerBridge the values come from.
        reference: The expected values, or the logits they derive from (their largest
            magnitude scales the tolerance where float32 rounds).
        float64: The tolerance where every step is float64 (GPT-2 in float64).

    Returns:
        :func:`half_atol` for a float16 / bfloat16 model, :data:`FLOAT32_MODEL_ULPS` float32 ulps
        of ``max(1, |reference|)`` for a float32 model, :data:`ULPS` ulps for a float64 model
        with float32 steps, else ``float64``.
    """
    if model.cfg.dtype in HALF_DTYPES:
        return half_atol(reference, model.cfg.dtype)
    if model.cfg.dtype != torch.float64:
        return float32_atol(reference, FLOAT32_MODEL_ULPS)
    if float32_inside(model):
        return float32_atol(reference, ULPS)
    return float64


def assert_close(model: Any, got: torch.Tensor, want: torch.Tensor, float64: float = 1e-9,
                 scale: torch.Tensor | float | None = None) -> None:
    """``torch.testing.assert_close`` at the precision the computation on ``model`` has.

    Args:
        model: The TransformerBridge the values come from.
        got: The values under test.
        want: The reference values.
        float64: The absolute tolerance where every step is float64.
        scale: The values whose magnitude bounds the rounding (default ``want``), e.g. the
            logits behind compared metric values.

    Raises:
        AssertionError: ``got`` and ``want`` differ by more than :func:`atol_for` plus, for
            results stored in float32, one float32 rounding (``rtol = eps32``).
    """
    stored32 = torch.float32 in (got.dtype, want.dtype)
    atol = atol_for(model, want if scale is None else scale, float64)
    torch.testing.assert_close(got, want, atol=atol, rtol=EPS32 if stored32 else 0.0)
