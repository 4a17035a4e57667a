"""EAP-GP against a slow reference written with plain autograd and hand-placed hooks.

The reference builds the gradient path on the bridge itself (the input embedding replaced by a
leaf through ``blocks.0.hook_resid_pre``, the squared logit distance to the corrupted run
differentiated with ``torch.autograd.grad``, one normalised step per example), then takes each
point's receiver gradients with hooks that keep every receiver's input and contracts
``(a'_u - a_u) . mean_j d metric / d x_r (gamma_j)`` edge by edge (the helpers of
``test_eap_ig``). No engine code runs in the reference.
"""

from __future__ import annotations

import pytest
import torch

import circuitfind as cf
from circuitfind.algorithms import EAPGP, EAPIG
from circuitfind.errors import ConfigError
from circuitfind.patching import PatchingEngine
from circuitfind.testing import ToyTask, tiny_model
from circuitfind.testing.tiny import FAMILY_CONFIGS
from test_eap_ig import _close, _receiver_grads, _sender_acts


def _reference_path(model, data, steps, step_size=None):
    """The path points on the bridge (hooks only), ``[N, T, d]`` each."""
    graph = cf.ComputeGraph.from_model(model)
    clean_s, _ = _sender_acts(model, graph, data.clean)
    corr_s, _ = _sender_acts(model, graph, data.corrupted)
    with torch.no_grad():
        target = model(data.corrupted)
    t = int(data.positions.max()) + 1
    real = (data.attention_mask.bool() & (torch.arange(data.seq_len) < t))[..., None]
    x, x_c = clean_s[0], corr_s[0]
    eta = [(x[n] - x_c[n]).norm() / steps if step_size is None else step_size
           for n in range(data.n)]
    point, points = x.clone(), []
    for _ in range(steps):
        leaf = point.clone().requires_grad_(True)
        with torch.enable_grad(), model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre",
                                                          lambda a, hook: leaf)]):
            distance = ((model(data.clean) - target) * real).pow(2).sum()
            (grad,) = torch.autograd.grad(distance, [leaf])
        point = torch.stack([point[n] - eta[n] * grad[n] / grad[n].norm()
                             for n in range(data.n)]).detach()
        points.append(point)
    return points, clean_s, corr_s, graph


def slow_eap_gp(model, data, steps, step_size=None):
    points, clean_s, corr_s, graph = _reference_path(model, data, steps, step_size)
    grad = 0
    for point in points:
        replace = {"blocks.0.hook_resid_pre": lambda a, hook, p=point: p.clone().requires_grad_(True)}
        grad = grad + _receiver_grads(model, graph, data, data.clean, replace) / steps
    return torch.einsum("sntd,rntd->sr", corr_s - clean_s, grad) * graph.edge_mask


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("steps", [1, 3])
def test_eap_gp_matches_slow_reference(tiny_models, name, steps):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=31)
    want = slow_eap_gp(model, data, steps)
    assert want.abs().max() > 1e-3  # the comparison can fail
    # a small budget splits examples and points: the same scores
    for engine in (PatchingEngine(model), PatchingEngine(model, memory_budget=2**20)):
        _close(EAPGP(steps=steps).score(engine, data), want)


def test_unit_steps_and_the_path_moves(tiny_models):
    """``step_size`` is the paper's fixed step; the path leaves the clean point and differs
    from EAP-IG's straight line, so the scores differ from EAP-IG's."""
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=32)
    engine = PatchingEngine(model)
    got = EAPGP(steps=2, step_size=0.5).score(engine, data)
    _close(got, slow_eap_gp(model, data, 2, 0.5))
    ig = EAPIG(steps=2).score(engine, data)
    eap = engine.edge_attribution(data)
    assert (got - ig).abs().max() > 1e-3 * ig.abs().max()
    assert (got - eap).abs().max() > 1e-3 * eap.abs().max()


@pytest.mark.parametrize("arch", sorted(FAMILY_CONFIGS))
def test_every_family_matches_the_runner_free_reference(tmp_path, arch):
    """Every family the engine has: the same path and scores through the bridge's hooks
    (float64; float32 steps inside some families bound the agreement)."""
    kv = {"n_kv_heads": 2} if arch not in ("gpt_neox", "gpt_neox_seq", "gpt2") else {}
    model = tiny_model(tmp_path, arch=arch, n_layers=2, n_heads=4, dtype=torch.float64, seed=3,
                       **kv)
    data = ToyTask(positions=2).build(model.tokenizer, 2, seed=33)
    want = slow_eap_gp(model, data, 2)
    engine = PatchingEngine(model)
    got = EAPGP(steps=2).score(engine, data)
    if engine.runner.arch.attn_post_norm:
        # Gemma-2: a head's edge carries its difference through the post-attention norm's
        # Jacobian (tests/integration/test_post_norm.py), the hooks' heads do not: compare
        # the other senders' rows (the path enters every one of them)
        rows = [0] + [m for m in engine.graph.mlp_index if m is not None]
        got, want = got[rows], want[rows]
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))


def test_bad_input(tiny_models):
    with pytest.raises(ConfigError, match="'steps' parameter of EAPGP must be an int >= 1"):
        EAPGP(steps=0)
    with pytest.raises(ConfigError, match="'step_size' parameter of EAPGP"):
        EAPGP(step_size=-1.0)
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=34)
    with pytest.raises(ConfigError, match="resample"):
        EAPGP().score(PatchingEngine(model, ablation="zero"), data)
