"""EAP equals minus the derivative of the metric with respect to the edge's mask.

By the engine's patching identity x_r = x_r - (1 - M[u, r]) (a_u - a'_u), the derivative of the
metric with respect to M[u, r] at M = 1 is (a_u - a'_u) . dm/dx_r = -EAP(u -> r). We take that
derivative by central finite differences through the (fractional-mask) engine.

GPT-2 layout in float64: every op runs in float64, so the check is to 1e-4 relative (measured:
5e-6 on default, AVX2 and AVX-512 kernels). Hugging Face's Llama RMSNorm and eager softmax compute
in float32 whatever the model dtype, so each metric value carries float32 rounding
(tests/tolerances.py) that central differences divide by 2h; for Llama (MHA and GQA) we use a
larger step (h = 3e-3: truncation 3e-5 of the largest score) and allow that rounding plus 1e-4
(measured: 1.2e-4 of the largest score in all, the limit 2e-3 to 4e-3).

The same holds under zero, mean and mean_positional ablation (``a'_u`` the ablation value), which
checks that the gradient path and the masked pass agree on what a removed edge carries.
"""

from __future__ import annotations

import pytest
import torch

from circuitfind.patching import PatchingEngine
from circuitfind.testing import ToyTask
from tolerances import atol_for


def _fd(engine, data, edges, h):
    g = engine.graph
    full = g.full_mask(torch.float64)
    masks = []
    for e in edges:
        s, r = g.edge_pairs[e].tolist()
        for sign in (1, -1):
            m = full.clone()
            m[s, r] += sign * h
            masks.append(m)
    values = engine.evaluate(data, torch.stack(masks))
    return (values[0::2] - values[1::2]) / (2 * h)


def test_eap_matches_finite_differences_gpt2(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=11)
    engine = PatchingEngine(model)
    scores = engine.graph.to_edges(engine.edge_attribution(data)).double()
    edges = list(range(engine.graph.n_edges))  # every edge (110)
    deriv = _fd(engine, data, edges, h=1e-5)
    eap = scores[edges]
    big = deriv.abs() > 1e-6
    assert big.sum() > len(edges) // 2
    rel = ((eap + deriv).abs() / deriv.abs())[big]
    assert rel.max() < 1e-4, rel.max()


@pytest.mark.parametrize("name", ["llama", "llama_gqa"])
def test_eap_matches_finite_differences_llama(tiny_models, name):
    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, 3, seed=12)
    engine = PatchingEngine(model)
    scores = engine.graph.to_edges(engine.edge_attribution(data)).double()
    edges = list(range(engine.graph.n_edges))
    h = 3e-3
    deriv = _fd(engine, data, edges, h=h)
    err = (scores + deriv).abs().max() / scores.abs().max()
    # the two metric values' rounding (logits of order 1) over 2h, plus truncation
    limit = 1e-4 + 2 * atol_for(model, 1.0) / (2 * h) / scores.abs().max()
    assert err < limit, (err, limit)


@pytest.mark.parametrize("kind", ["zero", "mean", "mean_positional"])
def test_eap_under_each_ablation_matches_finite_differences(tiny_models, kind):
    model = tiny_models("gpt2")
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=11)
    engine = PatchingEngine(model, ablation=kind)
    g = engine.graph
    eap = g.to_edges(engine.edge_attribution(data)).double()
    deriv = _fd(engine, data, list(range(g.n_edges)), h=1e-5)
    big = deriv.abs() > 1e-6
    assert big.sum() > g.n_edges // 2
    assert ((eap + deriv).abs() / deriv.abs())[big].max() < 1e-4
    # the ablation matters: resample-ablation scores are different
    resample = g.to_edges(engine.edge_attribution(data, ablation="resample")).double()
    assert (resample - eap).abs().max() > 1e-3 * eap.abs().max()
