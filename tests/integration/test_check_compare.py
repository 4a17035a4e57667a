"""Researchers' everyday checks: does the model do the task, how alike are two circuits."""

from __future__ import annotations

import json

import pytest
import torch

import circuitfind as cf
from circuitfind.errors import ConfigError
from circuitfind.evaluation.check import check as check_data
from circuitfind.graphs import ComputeGraph
from circuitfind.graphs.circuit import Circuit
from circuitfind.testing import ToyTask


def test_check_reports_accuracy_and_the_metric_on_clean_and_corrupted(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 6, seed=1)
    result = check_data(model, data, per_example=True)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    full, empty = engine.evaluate(data, torch.stack([g.full_mask(torch.float64),
                                                     torch.zeros_like(g.full_mask(torch.float64))]))
    assert result.clean["mean"] == pytest.approx(float(full))
    assert result.corrupted["mean"] == pytest.approx(float(empty))
    assert result.gap == pytest.approx(float(full - empty))
    # accuracy: the answer's logit beats the wrong answer's at the metric position
    with torch.no_grad():
        logits = model(data.clean)[torch.arange(data.n), data.positions[:, 0]]
    wins = logits.gather(1, data.answers)[:, 0] > logits.gather(1, data.wrong_answers)[:, 0]
    assert result.accuracy == pytest.approx(float(wins.double().mean()))
    assert [row["correct"] for row in result.examples] == wins.tolist()
    assert len(result.examples) == 6 and json.dumps(result.to_dict())


def test_check_recognises_a_real_behaviour():
    real = cf.check("zoo:ioi-small", "ioi", n_examples=16)
    assert not real.noise and real.accuracy > 0.9 and "the model does ioi" in real.verdict


def test_check_flags_a_task_the_model_does_not_do(tiny_models):
    """A random model on random tokens has no behaviour: the gap is within the spread."""
    model = tiny_models("llama")
    result = check_data(model, ToyTask().build(model.tokenizer, 16, seed=5))
    assert result.noise and "NOT" in result.verdict


def test_compare_measures_overlap_rank_agreement_and_refuses_other_graphs(tmp_path):
    g = ComputeGraph(2, 4)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(g.n_senders, g.n_receivers, generator=gen) * g.edge_mask
    a = cf.graphs.select_top_n(g, scores, 20)
    same = cf.compare(a, a)
    assert same.edge_jaccard == same.node_jaccard == 1.0 and same.spearman == pytest.approx(1.0)
    assert same.top_k == {10: 1.0, 50: 1.0, 100: 1.0}
    # B: the same scores negated and stored as importances: |score| and importance orders of
    # the kept edges then disagree, and the numbers follow the definitions
    b = Circuit(g, cf.graphs.select_top_n(g, -scores, 30, absolute=False).kept, -scores,
                {"scores": {"kind": "importance", "unit": "nats"}})
    result = cf.compare(a, b, ks=(5, 40))
    ea, eb = set(a.edge_ids.tolist()), set(b.edge_ids.tolist())
    assert result.edge_jaccard == pytest.approx(len(ea & eb) / len(ea | eb))
    assert result.score_kinds == ("metric_change", "importance")
    ka, kb = g.to_edges(scores).abs(), g.to_edges(-scores)
    top = lambda keys, k: set(torch.sort(keys, descending=True, stable=True).indices[:k].tolist())  # noqa: E731
    assert result.top_k[40] == pytest.approx(len(top(ka, 40) & top(kb, 40)) / 40)
    with pytest.raises(ConfigError, match="different graphs"):
        cf.compare(a, Circuit.empty(ComputeGraph(3, 4)))
    with pytest.raises(ConfigError, match="integers"):
        cf.compare(a, a, ks=(0,))


def test_cli_check_and_compare(run, tmp_path):
    checked = run("check", "--task", "ioi", "--examples", "8", "--per-example")
    assert checked.returncode == 0, checked.stderr
    assert "the model does ioi" in checked.stdout and "#7" in checked.stdout
    out = tmp_path / "a"
    assert run("discover", "--task", "ioi", "--examples", "8", "--edges", "20", "--out",
               str(out), "--renderer", "matplotlib").returncode == 0
    assert run("export", str(out / "circuit.json"), "--format", "mib", "--out",
               str(tmp_path / "m.json")).returncode == 0
    # a circuitfind circuit against its own MIB export: identical
    compared = run("compare", str(out / "circuit.json"), str(tmp_path / "m.json"), "--json")
    assert compared.returncode == 0, compared.stderr
    result = json.loads(compared.stdout)
    assert result["edge_jaccard"] == 1.0 and result["spearman"] == pytest.approx(1.0)
