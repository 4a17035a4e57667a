"""Edge pruning and its differentiable masked forward.

The forward with continuous masks is pinned to obviously correct references: all masks 1 is
the model (plain Hugging Face logits), all masks 0 the ablated model (for resample ablation,
Hugging Face on the corrupted prompts), a fractional mask the engine's masked pass (itself
pinned to one-edge-at-a-time hooks), and its gradient with respect to the masks equals central
finite differences of the same continuous-mask forward (float64). The training loop is checked
for its sparsity target, determinism under a seed, and resuming after an interruption to the
identical scores.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import circuitfind as cf
from circuitfind.algorithms import EdgePruning, RunContext
from circuitfind.errors import CheckpointMismatchError, ConfigError
from circuitfind.patching import PatchingEngine
from circuitfind.patching.architectures import Architecture
from circuitfind.patching.soft_mask import soft_masked_logits
from circuitfind.testing import ToyTask, make_tiny_model_dir, tiny_model
from circuitfind.testing.tiny import FAMILY_CONFIGS


def _inputs(engine, data):
    t = int(data.positions.max()) + 1
    values = engine.ablation_values(data)
    return data.clean[:, :t], values[:, :, :t] if values.shape[2] > 1 else values


def _hf_logits(model, tokens, positions):
    hf = model.original_model
    with torch.no_grad():
        logits = hf(tokens).logits
    return logits.gather(1, positions[:, :, None].expand(-1, -1, logits.shape[-1]))


@pytest.mark.parametrize("arch", ["gpt2", *sorted(FAMILY_CONFIGS)])
def test_all_ones_is_the_model_all_zeros_the_corrupted_model(tmp_path, arch):
    kv = {"n_kv_heads": 2} if arch not in ("gpt_neox", "gpt_neox_seq", "gpt2") else {}
    model = tiny_model(tmp_path, arch=arch, n_layers=2, n_heads=4, dtype=torch.float64, seed=5,
                       **kv)
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=51)
    engine = PatchingEngine(model)
    tokens, ablated = _inputs(engine, data)
    ones = engine.graph.full_mask(torch.float64)
    with torch.no_grad():
        full = soft_masked_logits(engine.runner, tokens, ablated, data.positions, ones)
        empty = soft_masked_logits(engine.runner, tokens, ablated, data.positions, ones * 0)
        frac = torch.rand(ones.shape, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
        mixed = soft_masked_logits(engine.runner, tokens, ablated, data.positions, frac)
    want_full = _hf_logits(model, data.clean, data.positions)
    want_empty = _hf_logits(model, data.corrupted, data.positions)
    assert (want_full - want_empty).abs().max() > 1e-2  # the comparison can fail
    for got, want in ((full, want_full), (empty, want_empty),
                      (mixed, engine.run(data, frac)[0])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gradient_equals_finite_differences(tiny_models):
    """GPT-2 in float64 (every step float64: central differences are exact to ~1e-10)."""
    model = tiny_models("gpt2")
    data = ToyTask(positions=2).build(model.tokenizer, 2, seed=52)
    engine = PatchingEngine(model)
    tokens, ablated = _inputs(engine, data)
    g = engine.graph
    gen = torch.Generator().manual_seed(1)
    masks = 0.2 + 0.6 * torch.rand(g.n_senders, g.n_receivers, generator=gen, dtype=torch.float64)
    weights = torch.randn(data.n, data.positions.shape[1], int(model.cfg.d_vocab), generator=gen,
                          dtype=torch.float64)

    def loss(m):
        return (soft_masked_logits(engine.runner, tokens, ablated, data.positions, m)
                * weights).sum()

    leaf = masks.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(leaf), [leaf])
    edges = g.edge_mask.nonzero()
    picks = edges[torch.randperm(len(edges), generator=gen)[:12]]
    eps = 1e-5
    for s, r in picks.tolist():
        step = torch.zeros_like(masks)
        step[s, r] = eps
        with torch.no_grad():
            fd = (loss(masks + step) - loss(masks - step)) / (2 * eps)
        assert float(grad[s, r]) == pytest.approx(float(fd), rel=1e-4, abs=1e-4 * max(1.0, abs(float(fd))))
    assert grad[~g.edge_mask].abs().max() == 0  # off real edges: no effect
    assert grad.abs().max() > 1e-3


def test_gradient_at_the_full_model_is_minus_eap(tiny_models):
    """Grouped-query Llama (float32 softmax and norms inside: finite differences are too
    noisy): at M = 1 the mask gradient of the mean metric is minus EAP's score, eq. (2)."""
    model = tiny_models("llama_gqa")
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=55)
    engine = PatchingEngine(model)
    tokens, ablated = _inputs(engine, data)
    leaf = engine.graph.full_mask(torch.float64).requires_grad_(True)
    logits = soft_masked_logits(engine.runner, tokens, ablated, data.positions, leaf)
    (grad,) = torch.autograd.grad(data.metric(logits).mean(), [leaf])
    eap = engine.edge_attribution(data).double()
    assert eap.abs().max() > 1e-2
    torch.testing.assert_close(-grad, eap, atol=1e-5 * float(eap.abs().max()), rtol=1e-4)


def test_training_prunes_towards_its_target_and_is_deterministic(tiny_models):
    """The sparsity penalty removes edges (short runs oscillate around the target under the
    paper's learning rates, so only the direction is checked here); same seed, same scores."""
    model = tiny_models("gpt2")
    data = ToyTask(positions=2).build(model.tokenizer, 8, seed=53)
    engine = PatchingEngine(model)
    g = engine.graph
    algo = EdgePruning(target_edges=25, steps=150, warmup_steps=100, batch_size=4,
                       progress=False)
    first = algo.score(engine, data)
    assert algo.report["expected_kept_edges"] < 0.6 * g.n_edges
    assert algo.report["expected_sparsity"] > 0.4
    assert int((first[g.edge_mask] > 0.5).sum()) < 0.6 * g.n_edges
    assert (first[~g.edge_mask] == 0).all()
    short = dict(target_edges=25, steps=5, warmup_steps=4, batch_size=4, init=1.0,
                 progress=False)
    again = EdgePruning(**short).score(engine, data)
    assert torch.equal(again, EdgePruning(**short).score(engine, data))
    assert not torch.equal(again, EdgePruning(**short, seed=1).score(engine, data))


def test_a_run_short_of_its_target_says_so(tiny_models):
    """Five steps cannot prune to 25 edges: the report says the target was not reached (with
    the expected and target edge counts) and the run warns; a target at the full graph is
    reached at once."""
    model = tiny_models("gpt2")
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=53)
    engine = PatchingEngine(model)
    n = engine.graph.n_edges
    algo = EdgePruning(target_edges=25, steps=5, warmup_steps=4, batch_size=4, progress=False)
    with pytest.warns(RuntimeWarning, match="short of its target of 25.0"):
        algo.score(engine, data)
    report = algo.report
    assert report["target_kept_edges"] == pytest.approx(25.0)
    assert report["expected_kept_edges"] > 25 + max(1.0, 0.01 * n)
    assert report["target_reached"] is False and len(report["lambdas"]) == 2
    full = EdgePruning(target_edges=n, steps=5, warmup_steps=4, batch_size=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full.score(engine, data)
    assert full.report["target_reached"] is True


def test_interrupted_run_resumes_to_identical_scores(tiny_models, tmp_path, ctrl_c):
    """Ctrl-C inside steps 7 and 19 (each step attends twice: one call per layer), then the
    same call again: the scores of an uninterrupted run, bit for bit."""
    model = tiny_models("gpt2")
    data = ToyTask(positions=2).build(model.tokenizer, 6, seed=54)
    engine = PatchingEngine(model)
    algo = EdgePruning(target_edges=20, steps=30, warmup_steps=20, batch_size=4, progress=False)
    whole = algo.score(engine, data)
    ckpt = tmp_path / "ep.pt"
    for kill_at in (14, 38):
        with ctrl_c(Architecture, "attend", kill_at), pytest.raises(KeyboardInterrupt):
            algo.score(engine, data, RunContext(checkpoint=ckpt, progress=False, save_every_s=0))
        assert ckpt.exists()
    resumed = algo.score(engine, data, RunContext(checkpoint=ckpt, progress=False))
    assert torch.equal(resumed, whole)
    with pytest.raises(CheckpointMismatchError, match="different run"):
        EdgePruning(target_edges=21, steps=30, warmup_steps=20, batch_size=4,
                    progress=False).score(engine, data, RunContext(checkpoint=ckpt))


def test_discover_and_cli(tmp_path, run):
    model_dir = make_tiny_model_dir(tmp_path / "m", arch="gpt2")
    params = dict(target_edges=15, steps=20, warmup_steps=10, batch_size=4)
    circuit = cf.discover(str(model_dir), "induction", algorithm="edge_pruning", n_edges=15,
                          n_examples=6, algorithm_params=params)
    assert circuit.n_edges <= 15 and circuit.metadata["scores"]["kind"] == "importance"
    args = ["discover", "--model", str(model_dir), "--task", "induction", "--examples", "6",
            "--algorithm", "edge-pruning", "--edges", "15", "--no-progress"]
    args += [x for k, v in params.items() for x in ("-p", f"{k}={v}")]
    out = run(*args, "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "o" / "circuit.json").read_text())
    assert saved["metadata"]["algorithm"] == "edge_pruning"


@pytest.mark.parametrize("params, match", [
    (dict(sparsity=1.0), "'sparsity' parameter of EdgePruning"),
    (dict(steps=0), "'steps' parameter"),
    (dict(target_edges=0), "'target_edges' parameter"),
    (dict(objective="mse"), "'objective' parameter"),
    (dict(lr=-1), "'lr' parameter"),
])
def test_bad_input(params, match):
    with pytest.raises(ConfigError, match=match):
        EdgePruning(**params)
