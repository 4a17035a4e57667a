"""float16 / bfloat16 models: the block runner, masked passes and gradient attribution.

A half-precision model is compared with its float32 twin (the same weights, rounded to the half
dtype, then cast to float32: only the rounding of activations differs) and with Hugging Face's
own half-precision forward, at the precision a half dtype has (``tests/tolerances.py``, class
"half-precision models"). The accumulations circuitfind adds are pinned exactly: a metric reads
half logits in float32, and score contractions sum in float32 whatever the operands' dtype.
"""

from __future__ import annotations

import pytest
import torch

from circuitfind.patching import PatchingEngine
from circuitfind.patching.attribution import matmul_nt
from circuitfind.patching.engine import GradientPoint
from circuitfind.testing import ToyTask, tiny_model

from tolerances import half_atol

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# plain sequential blocks, grouped-query RMSNorm/rotary, parallel blocks, post-norms with soft caps
FAMILIES = {"gpt2": dict(arch="gpt2"), "llama_gqa": dict(arch="llama", n_kv_heads=2),
            "gpt_neox": dict(arch="gpt_neox"), "gemma2": dict(arch="gemma2")}


def twins(tmp_path, family: str, dtype: torch.dtype):
    """A half-precision tiny model and a float32 model holding the same (rounded) weights."""
    spec = dict(n_layers=3, n_heads=4, seed=3, **FAMILIES[family])
    half = tiny_model(tmp_path / "half", dtype=dtype, **spec)
    full = tiny_model(tmp_path / "full", dtype=torch.float32, **spec)
    with torch.no_grad():
        for p32, p16 in zip(full.original_model.parameters(), half.original_model.parameters(),
                            strict=True):
            p32.copy_(p16.float())
    return half, full


@pytest.mark.parametrize("dtype", list(HALF), ids=list(HALF))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_half_model_matches_its_float32_twin(tmp_path, family, dtype):
    half, full = twins(tmp_path, family, HALF[dtype])
    dt = HALF[dtype]
    data = ToyTask(seq_len=8, positions=2).build(half.tokenizer, 6, seed=1)
    engine, reference = PatchingEngine(half), PatchingEngine(full)
    assert engine.runner is not None and engine.dtype == dt

    # plain forward: the runner against Hugging Face in the same dtype, and the float32 twin
    logits = engine.runner.logits(data.clean)
    with torch.no_grad():
        hf = half.original_model(data.clean).logits
    want = reference.runner.logits(data.clean)
    assert logits.dtype == dt and want.abs().max() > 0.1
    atol = half_atol(want, dt)
    torch.testing.assert_close(logits.float(), hf.float(), atol=atol, rtol=0)
    torch.testing.assert_close(logits.float(), want, atol=atol, rtol=0)

    # masked passes (random circuits, from several start layers): metric means in float64
    g = engine.graph
    gen = torch.Generator().manual_seed(2)
    masks = (torch.rand(4, g.n_senders, g.n_receivers, generator=gen) > 0.5).double()
    got = engine.evaluate(data, masks)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference.evaluate(data, masks), atol=atol, rtol=0)

    # EAP and EAP-IG: float32 scores within the half dtype's precision of the largest score
    for points in (None, [GradientPoint(a) for a in (0.25, 0.75)]):
        scores = engine.edge_attribution(data, points=points)
        want_scores = reference.edge_attribution(data, points=points)
        assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
        assert want_scores.abs().max() > 1e-3
        torch.testing.assert_close(scores, want_scores, rtol=0,
                                   atol=half_atol(want_scores, dt, floor=0.0))


def test_hooked_path_on_a_half_model_matches_the_runner(tmp_path):
    """The bridge's hooked forward (the slow reference the runner is pinned to) in bfloat16."""
    half, _ = twins(tmp_path, "llama_gqa", torch.bfloat16)
    data = ToyTask(seq_len=8, positions=2).build(half.tokenizer, 4, seed=2)
    fast, slow = PatchingEngine(half), PatchingEngine(half, use_runner=False)
    want = slow.edge_attribution(data)
    torch.testing.assert_close(fast.edge_attribution(data), want, rtol=0,
                               atol=half_atol(want, torch.bfloat16, floor=0.0))
    g = fast.graph
    masks = (torch.rand(3, g.n_senders, g.n_receivers,
                        generator=torch.Generator().manual_seed(0)) > 0.5).double()
    logits = fast.runner.logits(data.clean)
    torch.testing.assert_close(fast.evaluate(data, masks), slow.evaluate(data, masks), rtol=0,
                               atol=half_atol(logits.float(), torch.bfloat16))


def test_metric_reads_half_logits_in_float32(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask(seq_len=4, positions=1).build(model.tokenizer, 64, seed=0)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(data.n, 1, 64, generator=gen, dtype=torch.float64) * 8).bfloat16()
    got = data.metric(logits)
    assert got.dtype == torch.float32
    exact = data.metric(logits.double())  # the same bfloat16 values, in float64
    torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=0)
    # in bfloat16 a logit difference near 10 is rounded to 1/16: the upcast is what passes
    in_half = data.task.metric(logits, data)
    assert (in_half.double() - exact).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", list(HALF), ids=list(HALF))
def test_score_contraction_sums_in_float32(monkeypatch, dtype):
    """Eq. (2)'s contraction over examples x positions x d_model (here X = 3 * 2^16 terms) of
    half-precision operands: no term and no partial sum is rounded to the half dtype.

    Tolerance: rounding a float32 running sum of X terms errs like a random walk,
    ``eps32 * sqrt(X) * ||terms||_2`` (measured 0.11 of it); a half-precision matmul, which
    rounds its result to 8 or 11 bits, errs by 12x (float16) to 77x (bfloat16) that.
    """
    import circuitfind.patching.attribution as attribution

    dt = HALF[dtype]
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(5, 3 << 16, generator=gen).to(dt)
    grad = torch.randn(4, 3 << 16, generator=gen)  # float32 gradients stay float32
    exact = delta.double() @ grad.double().T
    terms = (delta.double()[:, None] * grad.double()[None]).norm(dim=-1)  # [5, 4]
    atol = torch.finfo(torch.float32).eps * (3 << 16) ** 0.5 * terms
    for chunk_bytes in (attribution.ACCUMULATION_CHUNK_BYTES, 1 << 16):  # one chunk, many
        monkeypatch.setattr(attribution, "ACCUMULATION_CHUNK_BYTES", chunk_bytes)
        got = matmul_nt(delta, grad)
        assert got.dtype == torch.float32
        assert ((got.double() - exact).abs() <= atol).all()
    rounded = (delta @ grad.to(dt).T).double()  # what a half-precision contraction gives
    assert ((rounded - exact).abs() > atol).any()


@pytest.mark.parametrize("dtype", list(HALF), ids=list(HALF))
def test_per_example_magnitudes_sum_in_float32(monkeypatch, dtype):
    """GradDrop's per-example contraction (each example's score in magnitude, summed over the
    examples) of half-precision operands: each example's sum in float32, in one chunk of
    examples or one example at a time; the tolerance as above, per example."""
    import circuitfind.patching.attribution as attribution

    dt = HALF[dtype]
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(3, 5, 1 << 16, generator=gen).to(dt)  # [N, U, X]
    grad = torch.randn(4, 3, 1 << 16, generator=gen)  # [R, N, X], float32
    per = torch.einsum("nux,rnx->nur", delta.double(), grad.double())  # [N, U, R]
    exact = per.abs().sum(0)
    terms = (delta.double()[:, :, None] * grad.double().permute(1, 0, 2)[:, None]).norm(dim=-1)
    atol = torch.finfo(torch.float32).eps * (1 << 16) ** 0.5 * terms.sum(0)
    for chunk_bytes in (attribution.ACCUMULATION_CHUNK_BYTES, 1 << 16):  # all, one at a time
        monkeypatch.setattr(attribution, "ACCUMULATION_CHUNK_BYTES", chunk_bytes)
        scores = torch.zeros(7, 6, dtype=torch.float64)
        attribution.contract_magnitudes(scores, delta, 1, grad)
        assert ((scores[:5, 1:5] - exact).abs() <= atol).all()
        assert scores[5:].abs().max() == 0 and scores[:, [0, 5]].abs().max() == 0
    rounded = torch.einsum("nux,rnx->nur", delta, grad.to(dt)).double().abs().sum(0)
    assert ((rounded - exact).abs() > atol).any()
