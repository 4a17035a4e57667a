"""Engine invariants on tiny random models (GPT-2 and Llama layouts, MHA and GQA).

- all edges kept = the clean model, no edges kept = the corrupted model (float64 models, to the
  precision each has: tests/tolerances.py);
- K masks in one batched pass = the K masks one at a time;
- scores and metrics do not depend on how examples are split into batches;
- no hooks are left behind and parameters are untouched, also after an error.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitfind.errors import ConfigError, HookError
from circuitfind.patching import PatchingEngine
from circuitfind.testing import ToyTask

from bridge_reference import edge_patched_logits, logits_at
from tolerances import assert_close

MODELS = ["gpt2", "llama", "llama_gqa"]
SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _hook_count(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
@SETTINGS
@given(n=st.integers(1, 4), seed=st.integers(0, 10_000), n_pos=st.integers(1, 3))
def test_full_and_empty_masks_give_clean_and_corrupted(tiny_models, name, n, seed, n_pos):
    model = tiny_models(name)
    data = ToyTask(positions=n_pos).build(model.tokenizer, n, seed=seed)
    engine = PatchingEngine(model)
    full = engine.graph.full_mask()
    out = engine.run(data, torch.stack([full, torch.zeros_like(full)]))
    clean = logits_at(model, data.clean, data.positions)
    corrupted = logits_at(model, data.corrupted, data.positions)
    assert (clean - corrupted).abs().max() > 1e-2  # the test can fail
    assert_close(model, out[0], clean, 1e-9)
    assert_close(model, out[1], corrupted, 1e-9)


@pytest.mark.parametrize("name", MODELS)
@SETTINGS
@given(k=st.integers(1, 5), n=st.integers(1, 4), seed=st.integers(0, 10_000),
       binary=st.booleans(), batch=st.integers(1, 4))
def test_batched_masks_equal_one_at_a_time(tiny_models, name, k, n, seed, binary, batch):
    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, n, seed=seed)
    engine = PatchingEngine(model)
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(k, engine.graph.n_senders, engine.graph.n_receivers, generator=gen,
                       dtype=torch.float64)
    if binary:
        masks = (masks > 0.5).double()
    batched = engine.run(data, masks)
    single = torch.stack([engine.run(data, m, batch_size=batch)[0] for m in masks])
    assert_close(model, batched, single, 1e-9)
    metric = engine.evaluate(data, masks, batch_size=batch)
    assert_close(model, metric, data.metric(batched).mean(-1).cpu(), 1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_single_edge_patch_matches_manual_hooks(tiny_models, name):
    """One removed edge = manually adding (a'_u - a_u) at the receiver's hook (slow reference)."""
    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, 3, seed=5)
    engine = PatchingEngine(model)
    g = engine.graph
    clean_out = engine.sender_outputs(data.clean)
    corr_out = engine.sender_outputs(data.corrupted)
    for edge in (g.edge_names[0], g.edge_names[g.n_edges // 2], g.edge_names[-1]):
        s, r = g.edge_index(edge)
        mask = g.full_mask(torch.float64)
        mask[s, r] = 0
        got = engine.run(data, mask)[0]
        want = edge_patched_logits(model, g, data, s, r, clean_out, corr_out)
        assert_close(model, got, want, 1e-8)


@pytest.mark.parametrize("name", MODELS)
def test_eap_does_not_depend_on_batch_split(tiny_models, name):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 5, seed=3)
    engine = PatchingEngine(model)
    whole = engine.edge_attribution(data)
    split = engine.edge_attribution(data, batch_size=2)
    assert whole.abs().max() > 0
    assert_close(model, split, whole)  # float32 steps in Llama; float32 scores
    assert (whole[~engine.graph.edge_mask] == 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_no_hooks_left_and_parameters_unchanged(tiny_models, name):
    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, 2, seed=0)
    before, hooks_before = _params(model), _hook_count(model)
    flags = [p.requires_grad for p in model.parameters()]
    engine = PatchingEngine(model)
    engine.run(data, torch.rand(2, engine.graph.n_senders, engine.graph.n_receivers))
    engine.edge_attribution(data)
    with pytest.raises(ConfigError):
        engine.run(data, torch.ones(3, 3))
    with pytest.raises(HookError), engine.hooked([("blocks.0.hook_mlp_in", lambda x, h: 1 / 0)]):
        model(data.clean)
    assert _hook_count(model) == hooks_before
    assert [p.requires_grad for p in model.parameters()] == flags
    for key, value in _params(model).items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_missing_hook_is_a_clear_error(tiny_models):
    model = tiny_models("gpt2")
    model.set_use_split_qkv_input(False)
    try:
        with pytest.raises(HookError, match="use_split_qkv_input"):
            PatchingEngine(model)
    finally:
        model.set_use_split_qkv_input(True)


def test_tokens_outside_vocabulary_are_rejected(tiny_models):
    model = tiny_models("gpt2")
    engine = PatchingEngine(model)
    with pytest.raises(ConfigError, match="tokenizer"):
        engine.sender_outputs(torch.full((1, 3), 10_000))


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(["gpt2", "llama"]), layers=st.integers(1, 3),
       kv=st.integers(1, 2), group=st.integers(1, 2), seed=st.integers(0, 1000))
def test_invariants_on_random_model_shapes(tmp_path_factory, arch, layers, kv, group, seed):
    """Keep all = clean, keep none = corrupted, batched = single, on freshly drawn shapes."""
    from circuitfind.testing import tiny_model

    heads = kv * group if arch == "llama" else kv * group + 1
    model = tiny_model(tmp_path_factory.mktemp("shape"), dtype=torch.float64, arch=arch,
                       n_layers=layers, n_heads=heads, d_model=8 * heads,
                       n_kv_heads=kv if arch == "llama" else None, seed=seed)
    data = ToyTask().build(model.tokenizer, 2, seed=seed)
    engine = PatchingEngine(model)
    full = engine.graph.full_mask(torch.float64)
    masks = torch.stack([full, torch.zeros_like(full),
                         torch.rand(full.shape, generator=torch.Generator().manual_seed(seed),
                                    dtype=torch.float64)])
    out = engine.run(data, masks)
    assert_close(model, out[0], logits_at(model, data.clean, data.positions), 1e-9)
    assert_close(model, out[1], logits_at(model, data.corrupted, data.positions), 1e-9)
    assert_close(model, out[2], engine.run(data, masks[2])[0], 1e-9)


def test_a_receiver_group_without_gradient_is_an_error(tiny_models):
    """If a receiver group gets no gradient (here: its input is detached after our hook), EAP
    raises instead of leaving its edges' scores at zero."""

    class Detaching(PatchingEngine):
        def _gradient_hooks(self, *args, **kwargs):
            hooks, check = super()._gradient_hooks(*args, **kwargs)
            return hooks + [("blocks.0.hook_mlp_in", lambda x, hook: x.detach())], check

    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 2, seed=0)
    assert PatchingEngine(model).edge_attribution(data).abs().max() > 0
    with pytest.raises(HookError, match="received no gradient"):
        Detaching(model, use_runner=False).edge_attribution(data)  # the bridge's hooks


def test_a_receiver_without_gradient_in_the_runners_attribution_is_an_error(tiny_models,
                                                                             monkeypatch):
    """The runner's EAP pass checks that every receiver group's gradient arrived."""
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 2, seed=0)
    engine = PatchingEngine(model)
    lay = engine.runner.arch
    mlp = lay.mlp
    # the MLP of layer 0 reads a detached input: its receiver gets no gradient
    monkeypatch.setattr(lay, "mlp", lambda layer, x: mlp(layer, x.detach() if layer == 0 else x))
    with pytest.raises(HookError, match="received no gradient"):
        engine.edge_attribution(data)
