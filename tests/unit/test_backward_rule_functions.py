"""The backward rules' functions on small tensors (no model): forward values untouched, the
backward as each paper defines it."""

from __future__ import annotations

import pytest
import torch

from circuitfind.errors import ConfigError
from circuitfind.patching.backward_rules import PLAIN, BackwardRules


def _grad(fn, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (fn(x) * weight).sum().backward()
    return x.grad


def test_softmax_temperature_is_the_gradient_of_softmax_at_s_over_t_times_t():
    """GIM's TSG: the backward of ``softmax(s / T)`` without its ``1/T``, i.e. ``T`` times the
    true gradient of ``softmax(s / T)``; the forward is the plain softmax."""
    gen = torch.Generator().manual_seed(0)
    s, w = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen,
                                                                                dtype=torch.float64)
    rules = BackwardRules(softmax_temperature=2.0)
    assert torch.equal(rules.softmax(s), torch.softmax(s, -1))
    got = _grad(rules.softmax, s, w)
    want = 2.0 * _grad(lambda x: torch.softmax(x / 2.0, -1), s, w)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, _grad(PLAIN.softmax, s, w))
    assert _grad(BackwardRules(detach_pattern=True).softmax, s, w).abs().max() == 0


def test_identity_rule_scales_and_activation_values():
    """RelP's identity rule: backward ``act(x) / x``; gate/up and GradDrop factors."""
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64)
    w = torch.ones_like(x)
    rules = BackwardRules(activation="identity")
    act = torch.nn.functional.silu
    assert torch.allclose(rules.activation_fn(act, x), act(x))
    stabilised = x + torch.where(x == 0, 1.0, x.sign()) * 1e-6  # never 0
    torch.testing.assert_close(_grad(lambda t: rules.activation_fn(act, t), x, w),
                               act(x) / stabilised)
    gated = BackwardRules(gate_scale=0.25, up_scale=0.5)
    a, b = torch.tensor([2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    gated.gate(a, b).backward()
    assert (float(a.grad), float(b.grad)) == (0.25 * 3.0, 0.5 * 2.0)
    drop = BackwardRules(drop_layer=1)
    assert _grad(lambda t: drop.through(1, t), x, w).abs().max() == 0
    assert torch.equal(_grad(lambda t: drop.through(0, t), x, w), w)


def test_plain_and_description_and_bad_values():
    assert PLAIN.plain and PLAIN.plain_attention and PLAIN.describe() == {}
    gim = BackwardRules(freeze_norm=True, softmax_temperature=2.0, q_scale=0.25)
    assert not gim.plain and not gim.plain_attention
    assert gim.describe() == {"freeze_norm": True, "softmax_temperature": 2.0, "q_scale": 0.25}
    assert BackwardRules(freeze_norm=True).plain_attention
    for bad, match in ((dict(softmax_temperature=0.0), "softmax_temperature"),
                       (dict(activation="relu"), "activation rule"),
                       (dict(drop_layer=-1), "drop_layer")):
        with pytest.raises(ConfigError, match=match):
            BackwardRules(**bad)
