"""Ablation types everywhere: each kind changes results the way its definition says.

- (EAP under each ablation against finite differences: test_eap_finite_differences.py)
- exact patching under zero and mean ablation equals a hand-written hook on the bridge that
  replaces the sender's contribution at the receiver by the ablation value;
- the empty circuit under each ablation is its definition, computed from the model alone: zero
  = the final norm of the attention output biases (no sender writes anything), mean = the final
  norm of the corrupted run's final residual stream averaged over examples and positions,
  mean_positional = the same average per position;
- ``cf.discover`` / ``cf.score_edges`` / ``cf.evaluate`` / ``cf.faithfulness_curve`` and the CLI
  take the same spec and record it (the CLI's ``--ablation``: test_cli.py); bad specs fail with
  one clear message.
"""

from __future__ import annotations

import pytest
import torch

import circuitfind as cf
from circuitfind.algorithms import ExactPatching
from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.patching import PatchingEngine
from circuitfind.testing import ToyTask

from bridge_reference import add_at_receiver, metric_with_hooks
from tolerances import EPS32, atol_for

@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_exact_under_ablation_equals_manual_hooks(tiny_models, kind):
    model = tiny_models("llama_gqa")
    data = ToyTask().build(model.tokenizer, 3, seed=4)
    engine = PatchingEngine(model, ablation=kind)
    g = engine.graph
    scores = ExactPatching(progress=False).score(engine, data)
    clean = engine.sender_outputs(data.clean)  # [S, N, T, d]
    corrupted = engine.sender_outputs(data.corrupted)
    ablated = (torch.zeros_like(corrupted) if kind == "zero"
               else corrupted.mean((1, 2), keepdim=True).expand_as(corrupted))
    base = metric_with_hooks(model, data, [])
    for e in (0, g.n_edges // 2, g.n_edges - 5, g.n_edges - 1):
        s, r = g.edge_pairs[e].tolist()
        hook = add_at_receiver(g.receivers[r], ablated[s] - clean[s])
        want = metric_with_hooks(model, data, [hook]) - base
        # float32 softmaxes inside this float64 Llama (the tiny models' logits are O(1), the
        # scale atol_for takes at least); the float32 score rounds once more (rel=eps32)
        assert scores[s, r].item() == pytest.approx(want, abs=atol_for(model, want), rel=EPS32)
    resample = ExactPatching(progress=False).score(PatchingEngine(model), data)
    assert (resample - scores).abs().max() > 1e-3


def test_empty_circuit_is_the_ablation_definition(tiny_models):
    # GPT-2 in float64 has no float32 step: its comparisons keep float64 tolerances
    from transformers import AutoModelForCausalLM

    model = tiny_models("gpt2")
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(model.cfg.model_name, dtype=torch.float64)
    grab = _Grab()
    with torch.no_grad(), model.hooks(fwd_hooks=[("ln_final.hook_in", grab)]):
        model(data.corrupted)
    final = grab.value  # [N, T, d] corrupted run's final residual stream
    bias = sum(block.attn.c_proj.bias for block in hf.transformer.h).detach()  # [d]
    definitions = {
        "zero": bias.expand_as(final),
        "mean": final.mean((0, 1), keepdim=True).expand_as(final),
        "mean_positional": final.mean(0, keepdim=True).expand_as(final),
    }
    empty = Circuit.empty(cf.ComputeGraph.from_model(model))
    seen = {}
    for kind, value in definitions.items():
        want = metric_with_hooks(model, data, [("ln_final.hook_in", lambda x, hook, v=value: v)])
        report = cf.evaluate(model, empty, data, ablation=kind)
        assert report.ablation == kind
        assert report.metric_empty == pytest.approx(want, abs=1e-9)
        assert report.metric_circuit == pytest.approx(want, abs=1e-9)
        seen[kind] = want
    resample = cf.evaluate(model, empty, data)
    assert resample.ablation == "resample"
    values = [*seen.values(), resample.metric_empty]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1:]) > 1e-3


class _Grab:
    """A forward hook that records the tensor it sees."""

    def __call__(self, x, hook):
        self.value = x.detach().clone()
        return x


def test_python_entry_points_take_and_record_the_ablation(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=5)
    engine = PatchingEngine(model)
    zero = cf.score_edges(model, data=data, algorithm="eap", ablation="zero")
    torch.testing.assert_close(zero, engine.edge_attribution(data, ablation="zero"))
    assert not torch.allclose(zero, engine.edge_attribution(data))
    circuit = cf.discover(model, data=data, algorithm="eap", n_edges=20, ablation="mean")
    assert circuit.metadata["ablation"] == {"kind": "mean"}
    faith = circuit.metadata["faithfulness"]
    assert faith["ablation"] == "mean"
    report = cf.evaluate(model, circuit, data, ablation="mean")
    assert faith["metric_empty"] == pytest.approx(report.metric_empty, abs=1e-9)
    assert faith["metric_empty"] != pytest.approx(cf.evaluate(model, circuit, data).metric_empty,
                                                  abs=1e-6)
    # an engine built with an ablation is used with it unless a call says otherwise (the same
    # float64 computation on GPT-2, which has no float32 step: equal to float64 rounding)
    mean_engine = PatchingEngine(model, ablation="mean")
    assert cf.evaluate(mean_engine, circuit, data).metric_empty == pytest.approx(
        report.metric_empty, abs=1e-12)
    curve = cf.faithfulness_curve(model, zero, data, fractions=(0.1, 1.0), ablation="zero")
    assert curve.ablation == "zero"
    assert curve.metric_empty == pytest.approx(
        cf.evaluate(model, circuit, data, ablation="zero").metric_empty, abs=1e-9)
    assert curve.faithfulness[-1] == pytest.approx(1.0)


def test_bad_ablations_are_one_clear_error(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=0)
    with pytest.raises(ConfigError, match="mean_positional"):  # listed before loading anything
        cf.discover("no/such-model", "ioi", ablation="gaussian")
    with pytest.raises(ConfigError, match="n >= 2"):
        cf.score_edges(model, data=data.subset([0]), algorithm="eap", ablation="mean")
    with pytest.raises(ConfigError, match="n >= 2"):
        cf.evaluate(model, Circuit.empty(cf.ComputeGraph.from_model(model)), data.subset([1]),
                    ablation="mean_positional")
