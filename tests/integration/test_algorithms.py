"""Every registered algorithm passes the conformance suite; exact patching is exact and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid

import circuitfind as cf
from circuitfind.algorithms import ExactPatching, RunContext
from circuitfind.errors import ConfigError
from circuitfind.graphs.selection import select_top_n
from circuitfind.testing import ToyTask
from circuitfind.testing.conformance import ConformanceError, check_algorithm
from tolerances import assert_close


@pytest.mark.parametrize("algorithm", sorted(cf.ALGORITHMS.names()))
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_conformance(tiny_models, name, algorithm):
    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, 3, seed=0)
    params = {"progress": False} if algorithm in ("exact", "acdc") else {}
    if algorithm == "edge_pruning":  # a few training steps, not the paper's 3000
        params = {"progress": False, "steps": 4, "warmup_steps": 2, "init": 0.0}
    check_algorithm(lambda: cf.get_algorithm(algorithm, **params), model, data)


class _IgnoresEngineAblation(cf.algorithms.EAP):
    """EAP on a resample engine of its own, whatever engine it is given (the bug of issue 16)."""

    def score(self, engine, data, context=None):
        return super().score(cf.PatchingEngine(engine.model), data, context)


class _UndeclaredScores(cf.algorithms.PathPatching):
    """Path patching whose circuit does not say what its scores mean."""

    def discover(self, engine, data, context=None):
        return super().discover(engine, data, context).replace(metadata={})


@pytest.mark.parametrize("make, match", [(_IgnoresEngineAblation, "ignores the engine's ablation"),
                                         (_UndeclaredScores, "declare what its scores mean")])
def test_conformance_catches_ignored_ablation_and_undeclared_scores(tiny_models, make, match):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=0)
    with pytest.raises(ConformanceError, match=match):
        check_algorithm(make, model, data)


def test_exact_equals_one_edge_at_a_time_and_resumes(tiny_models, tmp_path):
    model = tiny_models("llama_gqa")
    data = ToyTask().build(model.tokenizer, 3, seed=4)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    scores = ExactPatching(masks_per_pass=7, progress=False).score(engine, data)
    full = g.full_mask(torch.float64)
    base = engine.evaluate(data, full)[0]
    for e in (0, 41, g.n_edges - 1):
        s, r = g.edge_pairs[e].tolist()
        mask = full.clone()
        mask[s, r] = 0
        assert scores[s, r].item() == pytest.approx((engine.evaluate(data, mask)[0] - base).item(),
                                                    abs=1e-6)
    # an interrupted run resumes from its checkpoint with the same result
    ckpt = tmp_path / "exact.pt"
    algo = ExactPatching(masks_per_pass=7, progress=False)
    ctx = lambda: RunContext(checkpoint=ckpt, progress=False)  # noqa: E731
    calls = {"n": 0}
    original = engine.evaluate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    engine.evaluate = flaky
    with pytest.raises(KeyboardInterrupt):
        algo.score(engine, data, ctx())
    engine.evaluate = original
    state = torch.load(ckpt, weights_only=True)["state"]
    assert 0 < state["done"] < g.n_edges
    torch.testing.assert_close(algo.score(engine, data, ctx()), scores)
    other = ToyTask().build(model.tokenizer, 3, seed=5)
    with pytest.raises(ConfigError, match="different run"):
        algo.score(engine, other, ctx())


def test_discover_and_score_edges_api(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 4, seed=2)
    circuit = cf.discover(model, data=data, algorithm="eap", n_edges=30)
    meta = circuit.metadata
    assert meta["algorithm"] == "eap" and meta["selected_edges"] == 30
    assert circuit.n_edges <= 30 and 0 <= meta["faithfulness"]["n_edges"] == circuit.n_edges
    report = cf.evaluate(model, circuit, data)
    assert report.faithfulness == pytest.approx(meta["faithfulness"]["faithfulness"])
    scores = cf.score_edges(model, data=data, algorithm="eap")
    assert scores.shape == (cf.ComputeGraph.from_model(model).n_senders,
                            cf.ComputeGraph.from_model(model).n_receivers)
    with pytest.raises(ConfigError):
        cf.discover(model, data=data, n_edges=5, threshold=0.1)
    curve = cf.faithfulness_curve(model, scores, data, fractions=(0.05, 0.2, 0.5),
                                 convention="single")
    # every point of the batched curve equals evaluating that top-n circuit on its own
    for n_edges, faith in zip(curve.n_edges, curve.faithfulness):
        alone = cf.evaluate(model, select_top_n(cf.ComputeGraph.from_model(model), scores, n_edges),
                            data)
        assert faith == pytest.approx(alone.faithfulness, abs=1e-6)
    assert curve.cpr == pytest.approx(trapezoid(curve.faithfulness, curve.fractions))
    assert curve.cmd == pytest.approx(trapezoid(np.abs(1 - np.array(curve.faithfulness)),
                                                curve.fractions))


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_pruning_dangling_edges_never_changes_the_output(tiny_models, name):
    """prune_dangling's docstring claim, checked through the engine on sparse random circuits."""
    from circuitfind.graphs.circuit import Circuit
    from circuitfind.graphs.selection import prune_dangling

    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=6)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    gen = torch.Generator().manual_seed(0)
    removed_some = 0
    for density in (0.05, 0.1, 0.2, 0.4):
        kept = (torch.rand(g.n_senders, g.n_receivers, generator=gen) < density) & g.edge_mask
        circuit = Circuit(g, kept)
        pruned = prune_dangling(circuit)
        removed_some += circuit.n_edges - pruned.n_edges
        out = engine.run(data, torch.stack([circuit.kept, pruned.kept]).double())
        assert_close(model, out[0], out[1], 1e-9)
    assert removed_some > 0  # the check exercised pruning
