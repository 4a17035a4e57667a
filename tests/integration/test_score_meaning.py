"""Every circuit declares what its scores mean, and every consumer reads it.

ACDC's KL effects are importances (larger = more important); every other algorithm's scores are
metric changes. The report, faithfulness curves, signed selection and the MIB export follow
the declaration; circuits saved before it existed are read the same way.
"""

from __future__ import annotations

import json

import pytest
import torch

import circuitfind as cf
from circuitfind.graphs.scores import ScoreMeaning, score_meaning
from circuitfind.graphs.selection import select_top_n
from circuitfind.outputs import report_markdown
from circuitfind.testing import ToyTask

CASES = [("eap", {}, None), ("exact", {}, None), ("eap_ig", {"steps": 2}, None),
         ("clean_corrupted", {}, None), ("acdc", {}, 3e-5),
         ("acdc", {"objective": "metric"}, 3e-3), ("path_patching", {}, 0.05)]


@pytest.mark.parametrize("algorithm, params, threshold", CASES)
def test_curves_of_a_circuit_read_its_declared_meaning(tiny_models, algorithm, params, threshold):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 4, seed=2)
    kwargs = {"threshold": threshold} if threshold is not None else {"n_edges": 20}
    circuit = cf.discover(model, data=data, algorithm=algorithm, algorithm_params=params,
                          **kwargs)
    meaning = score_meaning(circuit.metadata)
    expected = "importance" if algorithm == "acdc" and not params else "metric_change"
    assert circuit.metadata["scores"]["kind"] == meaning.kind == expected
    from_circuit = cf.faithfulness_curve(model, circuit, data)
    explicit = cf.faithfulness_curve(model, circuit.scores, data, score_kind=expected)
    assert from_circuit.score_kind == expected
    assert "most important edges first" in from_circuit.label  # true of either kind
    assert from_circuit.cpr == pytest.approx(explicit.cpr)
    assert from_circuit.cmd == pytest.approx(explicit.cmd)


def test_acdc_circuits_are_importances_everywhere(tiny_models, tmp_path):
    """The report calls ACDC's scores what they are; the MIB export ranks its kept edges first;
    signed top-n picks the most important edges; an old circuit without the field is read the
    same way."""
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 4, seed=2)
    circuit = cf.discover(model, data=data, algorithm="acdc", threshold=3e-5)
    assert 0 < circuit.n_edges < circuit.graph.n_edges
    text = report_markdown(circuit)
    assert "increase of the KL divergence to the full model (nats)" in text
    assert "estimated change of the metric" not in text
    # MIB: scores written so that the signed ranking (descending) puts kept edges first
    path = cf.export_mib(circuit, tmp_path / "acdc.json", d_model=32)
    edges = json.loads(path.read_text())["edges"]
    ranked = sorted(edges, key=lambda name: -edges[name]["score"])
    top = ranked[:circuit.n_edges]
    kept_names = {name for name in edges if edges[name]["in_graph"]}
    assert set(top) == kept_names  # every kept edge outranks every removed one
    back = cf.import_mib(path)
    assert torch.equal(back.scores, circuit.scores) and torch.equal(back.kept, circuit.kept)
    # signed selection: the largest importances
    top_n = select_top_n(circuit.graph, circuit.scores, 5, absolute=False,
                            metadata=circuit.metadata)
    values = circuit.graph.to_edges(circuit.scores)
    assert set(top_n.edge_ids.tolist()) == set(torch.topk(values, 5).indices.tolist())
    # a circuit saved before the field existed: inferred from the algorithm and objective
    old = circuit.with_metadata(scores=None)
    assert score_meaning(old.metadata) == ScoreMeaning("importance", "nats", True,
                                                       "the KL divergence to the full model")


def test_metric_changes_rank_the_most_negative_first_for_higher_is_better(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 4, seed=2)
    circuit = cf.discover(model, data=data, algorithm="exact", n_edges=10, absolute=False)
    values = circuit.graph.to_edges(circuit.scores)
    assert set(circuit.edge_ids.tolist()) <= set(torch.topk(-values, 10).indices.tolist())
    assert "most negative" in report_markdown(circuit)


def test_an_acdc_circuit_json_from_before_the_declaration_loads_and_reads_the_same(tiny_models,
                                                                                    tmp_path):
    """A circuit.json written before circuits declared their scores (no ``scores`` or
    ``higher_is_better`` in its metadata; ACDC's own ``ablation`` among its parameters, as
    then) loads, and every consumer reads it as the new file: curve, report, MIB order."""
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 4, seed=2)
    circuit = cf.discover(model, data=data, algorithm="acdc", threshold=3e-5)
    path = circuit.save(tmp_path / "new.json")
    old = json.loads(path.read_text())
    for key in ("scores", "higher_is_better"):
        del old["metadata"][key]
    old["metadata"]["algorithm_params"]["ablation"] = "resample"
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = cf.Circuit.load(tmp_path / "old.json")
    assert "scores" not in loaded.metadata
    assert score_meaning(loaded.metadata) == score_meaning(circuit.metadata)
    assert (cf.faithfulness_curve(model, loaded, data).cpr
            == pytest.approx(cf.faithfulness_curve(model, circuit, data).cpr))
    assert report_markdown(loaded).split("## Top edges")[1] == report_markdown(circuit).split(
        "## Top edges")[1]
    new_mib = json.loads(cf.export_mib(circuit, tmp_path / "new_mib.json", d_model=32)
                         .read_text())["edges"]
    old_mib = json.loads(cf.export_mib(loaded, tmp_path / "old_mib.json", d_model=32)
                         .read_text())["edges"]
    assert {k: v["score"] for k, v in old_mib.items()} == {k: v["score"]
                                                          for k, v in new_mib.items()}
