"""discover() scores against a reference circuit when one exists (zoo organisms here)."""

from __future__ import annotations

import pytest

import circuitfind as cf
from circuitfind import zoo
from circuitfind.api import find_reference
from circuitfind.cli import report_markdown


def test_zoo_reference_flows_into_metadata_and_report():
    circuit = cf.discover("zoo:induction-2l", "induction", n_edges=30, n_examples=32)
    ref = circuit.metadata["reference"]
    assert ref["n_edges"] == zoo.reference_circuit("induction-2l").n_edges
    assert ref["edge_auc"] > 0.9  # measured 0.98 (benchmarks/results/zoo_auroc.md)
    assert "Against the reference circuit" in report_markdown(circuit)
    assert circuit.metadata["faithfulness"]["faithfulness"] > 0.9  # measured 0.97


def test_no_reference_is_none():
    graph = cf.ComputeGraph(2, 4)
    assert find_reference("induction", "some/other-model", graph) is None
    assert find_reference("ioi", "zoo:induction-2l", graph) is None
    assert find_reference("ioi", "gpt2", graph) is None  # gpt2's reference needs its 12x12 graph
    ioi = find_reference("ioi", "gpt2", cf.ComputeGraph(12, 12))
    assert ioi is not None and len(ioi.metadata["node_classes"]) == 26


@pytest.mark.parametrize("name", ["zoo:nope"])
def test_unknown_zoo_name(name):
    with pytest.raises(cf.CircuitFindError, match="induction-2l"):
        cf.load_model(name)
