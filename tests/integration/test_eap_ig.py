"""EAP-IG and clean-corrupted against slow references written with plain autograd.

The slow reference runs one forward/backward pass per interpolation point with hooks placed by
hand on the transformer-lens hook points (no engine code): it replaces the interpolated node's
output, keeps every receiver's input with its gradient, and contracts
``(a'_u - a_u) . mean_p d metric / d x_r`` edge by edge. Float64 tiny models (GPT-2 layout and
grouped-query Llama layout).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import circuitfind as cf
from circuitfind.algorithms import EAPIG, CleanCorrupted
from circuitfind.errors import ConfigError
from circuitfind.patching import GradientPoint, PatchingEngine
from circuitfind.testing import ToyTask
from tolerances import assert_close

MODELS = ["gpt2", "llama_gqa"]


def _sender_hook(graph, node):
    if node == "input":
        return "blocks.0.hook_resid_pre"
    layer = int(node[1:])
    return f"blocks.{layer}.attn.hook_result" if node[0] == "a" else f"blocks.{layer}.hook_mlp_out"


def _sender_acts(model, graph, tokens):
    """Every sender's output ``[S, N, T, d]`` from one plain run (hooks that only read)."""
    acts = {}
    names = ["input"] + [f"{k}{layer}" for layer in range(graph.n_layers) for k in "am"]

    def grab(x, hook, name):
        acts[name] = x.detach().clone()

    hooks = [(_sender_hook(graph, n), lambda x, hook, n=_sender_hook(graph, n): grab(x, hook, n))
             for n in names]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(tokens)
    rows = [acts["blocks.0.hook_resid_pre"]]
    for layer in range(graph.n_layers):
        rows += list(acts[f"blocks.{layer}.attn.hook_result"].unbind(2))
        rows.append(acts[f"blocks.{layer}.hook_mlp_out"])
    return torch.stack(rows), acts


def _receiver_grads(model, graph, data, tokens, replace):
    """``[R, N, T, d]`` gradients of the batch-mean metric at every receiver's input."""
    kept = {}

    def keep(x, hook, name):
        y = x.clone()
        kept[name] = y
        return y

    names = [f"blocks.{layer}.hook_{k}_input" for layer in range(graph.n_layers) for k in "qkv"]
    names += [f"blocks.{layer}.hook_mlp_in" for layer in range(graph.n_layers)]
    names.append("ln_final.hook_in")
    hooks = [(n, lambda x, hook, n=n: keep(x, hook, n)) for n in names] + list(replace.items())
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
        idx = data.positions[:, :, None].expand(-1, -1, logits.shape[-1])
        metric = data.metric(logits.gather(1, idx)).mean()
        grads = dict(zip(names, torch.autograd.grad(metric, [kept[n] for n in names],
                                                    materialize_grads=True)))
    rows = []
    for layer in range(graph.n_layers):
        for k in "qkv":
            rows += list(grads[f"blocks.{layer}.hook_{k}_input"].unbind(2))
        rows.append(grads[f"blocks.{layer}.hook_mlp_in"])
    rows.append(grads["ln_final.hook_in"])
    return torch.stack(rows)


def slow_scores(model, data, runs):
    """Scores from an explicit loop over ``runs``: ``(weight, tokens, node, alpha)``.

    ``node`` None runs ``tokens`` as they are; otherwise the node group's output becomes the
    constant ``alpha * clean + (1 - alpha) * corrupted`` and the input is made a leaf.
    """
    graph = cf.ComputeGraph.from_model(model)
    clean_s, clean_acts = _sender_acts(model, graph, data.clean)
    corr_s, corr_acts = _sender_acts(model, graph, data.corrupted)
    grad = 0
    for weight, tokens, node, alpha in runs:
        replace = {"blocks.0.hook_resid_pre": lambda x, hook: x.detach().requires_grad_(True)}
        if node is not None:
            name = _sender_hook(graph, node)
            value = alpha * clean_acts[name] + (1 - alpha) * corr_acts[name]
            if node == "input":
                replace[name] = lambda x, hook, v=value: v.clone().requires_grad_(True)
            else:
                replace[name] = lambda x, hook, v=value: v
        grad = grad + weight * _receiver_grads(model, graph, data, tokens, replace)
    scores = torch.einsum("sntd,rntd->sr", corr_s - clean_s, grad)
    return scores * graph.edge_mask


def _close(got, want):
    scale = want.abs().max()
    assert scale > 1e-3  # the comparison can fail
    torch.testing.assert_close(got.double(), want.double(), atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("steps", [1, 3])
def test_eap_ig_inputs_matches_slow_reference(tiny_models, name, steps):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=21)
    got = EAPIG(steps=steps).score(PatchingEngine(model), data)
    want = slow_scores(model, data, [(1 / steps, data.clean, "input", k / steps)
                                     for k in range(steps)])
    _close(got, want)


@pytest.mark.parametrize("name", MODELS)
def test_eap_ig_activations_matches_slow_reference(tiny_models, name):
    model = tiny_models(name)
    graph = cf.ComputeGraph.from_model(model)
    data = ToyTask().build(model.tokenizer, 3, seed=22)
    steps = 2
    nodes = ["input"] + [f"{k}{layer}" for layer in range(graph.n_layers) for k in "am"]
    runs = [(1 / (len(nodes) * steps), data.clean, node, k / steps)
            for node in nodes for k in range(1, steps + 1)]
    # a small budget forces several passes over examples and points: same scores
    engine = PatchingEngine(model, memory_budget=2**20)
    assert engine.attribution_plan(data.n, data.seq_len, len(runs))[1] < len(runs)
    got = EAPIG(interpolation="activations", steps=steps).score(engine, data)
    _close(got, slow_scores(model, data, runs))


@pytest.mark.parametrize("name", MODELS)
def test_clean_corrupted_matches_slow_reference(tiny_models, name):
    """The reference literally runs the corrupted tokens (the engine interpolates the input)."""
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=23)
    got = CleanCorrupted().score(PatchingEngine(model), data)
    want = slow_scores(model, data, [(0.5, data.clean, None, 1.0),
                                     (0.5, data.corrupted, None, 1.0)])
    _close(got, want)


def test_eap_equals_clean_point_and_ig_endpoints(tiny_models):
    """EAP is the single point alpha=1; clean-corrupted is the mean of alpha=1 and alpha=0."""
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=24)
    engine = PatchingEngine(model)
    eap = engine.edge_attribution(data)
    _close(engine.edge_attribution(data, points=[GradientPoint(1.0)]), eap)
    at_corrupted = EAPIG(steps=1).score(engine, data)
    _close(CleanCorrupted().score(engine, data), (eap + at_corrupted) / 2)


def test_eap_ig_converges_to_the_exact_integral(tiny_models):
    """Many steps -> the path integral: per edge (Gauss-Legendre quadrature of the slow
    reference, exact to rounding for this smooth path) and in closed form for the edges out of
    ``input`` (completeness: their sum is metric(corrupted) - metric(clean))."""
    model = tiny_models("gpt2")
    data = ToyTask(positions=2).build(model.tokenizer, 2, seed=25)
    engine = PatchingEngine(model)
    nodes, weights = np.polynomial.legendre.leggauss(16)
    exact = slow_scores(model, data, [(w / 2, data.clean, "input", (x + 1) / 2)
                                      for x, w in zip(nodes.tolist(), weights.tolist())])
    full = engine.graph.full_mask(torch.float64)
    m_clean, m_corrupted = engine.evaluate(data, torch.stack([full, torch.zeros_like(full)]))
    # the quadrature is the exact integral: completeness holds to rounding
    assert exact[0].sum().item() == pytest.approx((m_corrupted - m_clean).item(), abs=1e-8)
    errors = []
    for steps in (4, 32):
        got = EAPIG(steps=steps).score(engine, data).double()
        errors.append(((got - exact).abs().max() / exact.abs().max()).item())
    assert errors[1] < errors[0] / 4  # first-order convergence of the left Riemann sum
    assert errors[1] < 0.05, errors


def test_memory_budget_splits_give_identical_scores(tiny_models):
    model = tiny_models("llama_gqa")
    data = ToyTask(positions=2).build(model.tokenizer, 20, seed=26)
    whole = EAPIG(steps=2).score(PatchingEngine(model), data)
    small = PatchingEngine(model, memory_budget=2**20)
    n, p, cache = small.attribution_plan(data.n, data.seq_len, 2)
    assert n < data.n and p < 2 and not cache  # the budget forces a split everywhere
    assert_close(model, EAPIG(steps=2).score(small, data), whole, 1e-9)
    assert_close(model, EAPIG(steps=2, batch_size=7).score(PatchingEngine(model), data),
                               whole, 1e-9)
    eap = PatchingEngine(model).edge_attribution(data)
    assert_close(model, small.edge_attribution(data), eap, 1e-9)


def test_bad_input(tiny_models):
    with pytest.raises(ConfigError, match="'steps' parameter of EAPIG must be an int >= 1. Got 0"):
        EAPIG(steps=0)
    with pytest.raises(ConfigError, match="Did you mean 'inputs'"):
        EAPIG(interpolation="input")
    with pytest.raises(ConfigError, match="batch_size"):
        CleanCorrupted(batch_size=0)
    model = tiny_models("gpt2")
    data = ToyTask(seq_len=60).build(model.tokenizer, 2, seed=0)
    engine = PatchingEngine(model, memory_budget=2**20)
    with pytest.raises(ConfigError, match=r"needs at least \d+ bytes"):
        engine.edge_attribution(data)
    with pytest.raises(ConfigError, match="Did you mean 'a1'"):
        PatchingEngine(model).edge_attribution(data, points=[GradientPoint(0.5, "a11")])


@pytest.mark.parametrize("algorithm, params", [
    ("eap-ig", ["--param", "steps=2", "--param", "interpolation=activations"]),
    ("clean-corrupted", [])])
def test_cli_discover(tmp_path, monkeypatch, capsys, algorithm, params):
    """``circuitfind discover --algorithm eap-ig|clean-corrupted [--param K=V]``."""
    import json
    import sys

    from circuitfind.cli import main
    from circuitfind.testing import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "model", arch="gpt2")
    out = tmp_path / "run"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["circuitfind", "discover", "--model", str(model_dir),
                                      "--task", "induction", "--algorithm", algorithm,
                                      "--edges", "15", "--examples", "4", "--out", str(out),
                                      *params])
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    meta = json.loads((out / "circuit.json").read_text())["metadata"]
    assert meta["algorithm"] == algorithm.replace("-", "_")
    assert meta["selected_edges"] == 15
    if params:
        assert meta["algorithm_params"] == {"interpolation": "activations", "steps": 2,
                                            "batch_size": None}


def test_cli_param_errors(tmp_path, monkeypatch, capsys):
    import sys

    from circuitfind.cli import main

    for bad, message in ((["--param", "steps"], "KEY=VALUE"),
                         (["--param", "steps=0"], "must be an int >= 1. Got 0"),
                         (["--param", "stepz=3"], "has no parameter(s) stepz")):
        monkeypatch.setattr(sys, "argv", ["circuitfind", "discover", "--task", "induction",
                                          "--algorithm", "eap-ig", "--out",
                                          str(tmp_path / "x"), *bad])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code != 0 and message in err and "Traceback" not in err
