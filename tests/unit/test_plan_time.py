"""The plan's time model (no model: shapes written out): the unit is Hugging Face's eager
forward (every score, and an elementwise cost per score); a half-precision run pays the
measured float32 cost for the parts the engine keeps in float32 (the score contraction, the
q/k/v receivers' gradients); float32 runs do not."""

from __future__ import annotations

import math

import pytest

from circuitfind.patching import plan as mp
from circuitfind.patching.plan import ModelShape

GiB = 2**30
GEMMA = ModelShape(name="gemma-2-2b", n_layers=26, n_heads=8, n_kv_heads=4, d_model=2304,
                   d_head=256, d_mlp=9216, d_vocab=256000, n_params=2_614_341_888,
                   width=2, eager_attention=True, post_norm=True, rms_norm=True, mlp_mats=3)
QWEN = ModelShape(name="qwen2.5-0.5b", n_layers=24, n_heads=14, n_kv_heads=2, d_model=896,
                  d_head=64, d_mlp=4864, d_vocab=151936, n_params=494_032_768, rms_norm=True,
                  mlp_mats=3)


def _matmuls(s: ModelShape) -> int:
    """A plain forward's projection and MLP matmul FLOPs per token (reference, by hand)."""
    q_k_v_o = s.d_model * s.d_head * (2 * s.n_heads + 2 * s.n_kv_heads)
    return 2 * s.n_layers * (q_k_v_o + s.mlp_mats * s.d_model * s.d_mlp)


@pytest.mark.parametrize("points", [1, 5])
def test_half_precision_pays_the_float32_parts(monkeypatch, points):
    monkeypatch.setattr(mp, "EAGER_SCORE_FLOPS", 0)  # the unit then does not depend on it
    t = 32
    costs = {}
    for cost in (1.0, 5.0):
        monkeypatch.setattr(mp, "HALF_FLOAT32_COST", cost)
        costs[cost] = mp.attribution_plan(GEMMA, 8, t, points, 64 * GiB)
    plan = costs[5.0]
    unit = _matmuls(GEMMA) + 4 * GEMMA.n_layers * GEMMA.n_heads * GEMMA.d_head * t + \
        2 * GEMMA.d_vocab * GEMMA.d_model
    contraction = 2 * GEMMA.d_model * GEMMA.graph.n_edges * math.ceil(
        points / plan.points_per_pass)
    receivers = points * 2 * GEMMA.n_layers * (GEMMA.n_heads + 2 * GEMMA.n_kv_heads) * \
        GEMMA.d_head * GEMMA.d_model
    extra = 4 * (contraction + receivers) / unit
    assert plan.forward_units - costs[1.0].forward_units == pytest.approx(extra, abs=0.02)
    assert plan.passes["contraction"] == pytest.approx(5 * contraction / unit, abs=0.01)


def test_float32_runs_do_not_pay_the_half_precision_cost(monkeypatch):
    before = mp.attribution_plan(QWEN, 8, 32, 5, 64 * GiB).forward_units
    monkeypatch.setattr(mp, "HALF_FLOAT32_COST", 100.0)
    assert mp.attribution_plan(QWEN, 8, 32, 5, 64 * GiB).forward_units == before


def test_the_unit_counts_eager_attention_on_long_prompts(monkeypatch):
    # the checkpointed pass (fused attention) against Hugging Face's eager forward: every
    # score, plus EAGER_SCORE_FLOPS per score; on 32 tokens the term is a few per cent
    t, budget = 2048, 6 * GiB
    plan = mp.attribution_plan(QWEN, 1, t, 1, budget)
    per_score = mp.EAGER_SCORE_FLOPS
    monkeypatch.setattr(mp, "EAGER_SCORE_FLOPS", 0)
    no_scores = mp.attribution_plan(QWEN, 1, t, 1, budget)
    assert plan.position_chunk is not None
    body = _matmuls(QWEN) + 2 * QWEN.n_layers * QWEN.n_heads * QWEN.d_head * t
    scores = QWEN.n_layers * QWEN.n_heads * t
    unit = _matmuls(QWEN) + 4 * QWEN.n_layers * QWEN.n_heads * QWEN.d_head * t + \
        2 * QWEN.d_vocab * QWEN.d_model
    # the ratio of the two plans is the ratio of their units
    assert no_scores.forward_units / plan.forward_units == pytest.approx(
        (unit + per_score * scores) / unit, rel=0.01)
    assert body < unit  # the engine's forward: the causal half, logits at one position
    short = mp.attribution_plan(QWEN, 8, 32, 1, budget).forward_units
    monkeypatch.setattr(mp, "EAGER_SCORE_FLOPS", per_score)
    assert 0.95 < mp.attribution_plan(QWEN, 8, 32, 1, budget).forward_units / short <= 1.0
