"""Two adapter shortcuts that EAP's speed rests on, each against its slow, obvious reference.

- :class:`~circuitfind.patching.architectures.base.HalfSplitRotation`, the rotary embedding in
  three kernels: equals the family's own Hugging Face ``apply_rotary_pos_emb`` (values and
  gradients) for partial rotary (GPT-NeoX), full rotary (Llama) and Llama-3 rope scaling, and
  is taken wherever the family declares it.
- :meth:`~circuitfind.patching.architectures.base.Architecture.derived`, EAP's folded q/k/v
  weights kept between passes: after the weights change in place or are replaced, EAP's
  scores equal those of a fresh engine (which holds nothing), and they differ from before.
"""

from __future__ import annotations

import pytest
import torch

from circuitfind.patching import PatchingEngine
from circuitfind.patching.architectures import base
from circuitfind.patching.architectures.base import HalfSplitRotation
from circuitfind.testing import ToyTask, tiny_model
from tolerances import EPS32

ROTARY = {  # family -> tiny-model settings
    "gpt_neox": dict(arch="gpt_neox", n_layers=1, seed=7),  # rotary_pct 0.5: partial
    "llama": dict(arch="llama", n_layers=1, n_kv_heads=2, seed=3),  # every dimension
    "llama3": dict(arch="llama3", n_layers=1, n_kv_heads=2, seed=10),  # rope scaling
}


@pytest.mark.parametrize("name", sorted(ROTARY))
def test_half_split_rotation_equals_hugging_face(tmp_path, name):
    """Values and gradients of the adapter's rotation equal Hugging Face's own rotation
    (``apply_rotary``) of the same ``cos``/``sin``, in float64 to rounding."""
    model = tiny_model(tmp_path, dtype=torch.float64, **ROTARY[name])
    lay = PatchingEngine(model).runner.arch
    gen = torch.Generator().manual_seed(0)
    b, t, dh = 2, 7, lay.d_head
    q = torch.randn(b, lay.n_heads, t, dh, generator=gen, dtype=torch.float64,
                    requires_grad=True)
    k = torch.randn(b, lay.n_kv, t, dh, generator=gen, dtype=torch.float64, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    ours = lay.rotate(q, k)
    cos, sin, fast = next(iter(lay._rotary.values()))
    assert fast is not None  # the three-kernel rotation ran, not the fallback
    ref = lay.apply_rotary(q, k, cos, sin)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, atol=1e-14, rtol=0)
    grads = torch.autograd.grad(ours, (q, k), (dq, dk))
    ref_grads = torch.autograd.grad(ref, (q, k), (dq, dk))
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-14, rtol=0)
    # the rotation is not the identity on these shapes (a skipped rotation would pass above
    # only if Hugging Face's were skipped too)
    assert float((ours[0] - q).detach().abs().max()) > 0.1


def test_half_split_rotation_gradcheck_and_fallback():
    """The backward pass is the forward's transpose (gradcheck, partial rotary), and ``cos``
    that do not repeat their first half (not Hugging Face's half-split layout) are refused."""
    gen = torch.Generator().manual_seed(1)
    cos = torch.rand(1, 5, 4, generator=gen, dtype=torch.float64)
    sin = torch.rand(1, 5, 4, generator=gen, dtype=torch.float64)
    assert HalfSplitRotation.factors(cos, sin, 8) is None
    cos, sin = cos[..., :2].repeat(1, 1, 2), sin[..., :2].repeat(1, 1, 2)
    factors = HalfSplitRotation.factors(cos, sin, 8)
    assert factors is not None
    x = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 1, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: HalfSplitRotation.apply(a, b, *factors), (x, y))
    # a gradient for one of the two only (the other output unused)
    (gx,) = torch.autograd.grad(HalfSplitRotation.apply(x, y, *factors)[0].sum(), (x,))
    torch.testing.assert_close(gx, HalfSplitRotation.turn(torch.ones_like(x), *factors, -1.0))


@pytest.mark.parametrize("change", ["in_place", "replaced"])
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_held_weights_follow_weight_changes(tmp_path, arch, change):
    """EAP after the q/k/v weights and the norm change equals a fresh engine's EAP."""
    model = tiny_model(tmp_path, dtype=torch.float64, arch=arch, n_layers=2, seed=4)
    engine = PatchingEngine(model)
    data = ToyTask(seq_len=6).build(model.tokenizer, 3, seed=0)
    before = engine.edge_attribution(data)
    lay = engine.runner.arch
    assert lay._derived  # the folded weights are held
    with torch.no_grad():
        for layer in range(2):
            sources = [s for s in lay.qkv_sources(layer) if s is not None]
            for i, s in enumerate(sources):
                new = s * 1.5 + 0.01 * (i + 1)
                if change == "in_place":
                    s.copy_(new)
                else:  # a new Parameter in the module's place
                    for module in base.unwrap(lay.hf).modules():
                        for pname, p in list(module.named_parameters(recurse=False)):
                            if p is s:
                                setattr(module, pname, torch.nn.Parameter(new,
                                                                          requires_grad=False))
    after = engine.edge_attribution(data)
    fresh = PatchingEngine(model).edge_attribution(data)
    scale = float(fresh.abs().max())
    torch.testing.assert_close(after, fresh, atol=16 * EPS32 * scale, rtol=EPS32)
    assert float((after - before).abs().max()) > 1e-3 * scale  # the change mattered


def test_nothing_held_beyond_the_byte_limit(tmp_path, monkeypatch):
    """With no room for derived values nothing is held, and the scores are the same."""
    model = tiny_model(tmp_path, dtype=torch.float64, arch="gpt_neox", n_layers=2, seed=4)
    data = ToyTask(seq_len=6).build(model.tokenizer, 3, seed=0)
    held = PatchingEngine(model)
    expected = held.edge_attribution(data)
    monkeypatch.setattr(base, "DERIVED_BYTES", 0)
    engine = PatchingEngine(model)
    got = engine.edge_attribution(data)
    assert not engine.runner.arch._derived
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_eap_in_kept_buffers_equals_a_fresh_engine(tmp_path):
    """EAP writes its sender differences over the corrupted run's outputs, in buffers the
    runner keeps between passes: scores equal a fresh engine's whatever the previous call's
    shapes, and the memoised corrupted run (not overwritten) gives the same scores."""
    model = tiny_model(tmp_path, dtype=torch.float64, arch="gpt_neox", n_layers=2, seed=4)
    a = ToyTask(seq_len=6).build(model.tokenizer, 3, seed=0)
    b = ToyTask(seq_len=8).build(model.tokenizer, 2, seed=1)
    engine = PatchingEngine(model)
    got = [engine.edge_attribution(x) for x in (a, b, a)]  # buffers kept, then reshaped
    assert engine.runner._scratch
    for x, scores in zip((a, b), got):
        torch.testing.assert_close(scores, PatchingEngine(model).edge_attribution(x),
                                   atol=0, rtol=0)
    torch.testing.assert_close(got[2], got[0], atol=0, rtol=0)
    engine.evaluate(a, engine.graph.full_mask())  # memoises the corrupted run
    memoised = engine.corrupted_outputs(a).clone()
    scale = float(got[0].abs().max())
    torch.testing.assert_close(engine.edge_attribution(a), got[0],
                               atol=16 * EPS32 * scale, rtol=EPS32)
    torch.testing.assert_close(engine.corrupted_outputs(a), memoised, atol=0, rtol=0)
