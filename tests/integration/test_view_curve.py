"""The faithfulness curve discover stores for the viewer's size slider, pinned to evaluating
each of its circuits (the top k edges of the viewer's order) one at a time; the CLI writes
view.html beside circuit.svg unless --no-view."""

from __future__ import annotations

import json

import pytest
import torch

import circuitfind as cf
from circuitfind.graphs.circuit import Circuit
from circuitfind.testing import ToyTask, make_tiny_model_dir
from circuitfind.view import view_order


@pytest.mark.parametrize("name, absolute", [("llama_gqa", True), ("gpt2", False)])
def test_stored_curve_is_the_faithfulness_of_the_sliders_circuits(tiny_models, name, absolute):
    torch.set_num_threads(1)
    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, 4, seed=3)
    circuit = cf.discover(model, data=data, algorithm="eap", n_edges=15, absolute=absolute,
                          curve=True)
    stored = circuit.metadata["faithfulness_curve"]
    g = circuit.graph
    assert stored["ranking"] == "view" and stored["n_edges"] == sorted(stored["n_edges"])
    assert circuit.n_edges in stored["n_edges"] and g.n_edges in stored["n_edges"]
    order = view_order(circuit)
    engine = cf.PatchingEngine(model)
    for k, faith in zip(stored["n_edges"], stored["faithfulness"]):
        kept = torch.zeros(g.n_edges, dtype=torch.bool)
        kept[order[:k]] = True
        top_k = Circuit(g, g.to_dense(kept))
        assert faith == pytest.approx(cf.evaluate(engine, top_k, data).faithfulness, abs=1e-6)
    at_kept = stored["faithfulness"][stored["n_edges"].index(circuit.n_edges)]
    assert at_kept == pytest.approx(circuit.metadata["faithfulness"]["faithfulness"], abs=1e-6)
    assert "faithfulness_curve" not in cf.discover(model, data=data, n_edges=15).metadata


def test_cli_discover_writes_view_html_unless_no_view(run, tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "model", arch="gpt2")
    args = ["discover", "--model", str(model_dir), "--task", "induction", "--edges", "10",
            "--examples", "4", "--no-progress"]
    out = run(*args, "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "a" / "view.html").read_text(encoding="utf-8")
    assert (tmp_path / "a" / "circuit.svg").exists() and '"ranking"' not in page
    meta = json.loads((tmp_path / "a" / "circuit.json").read_text())["metadata"]
    assert meta["faithfulness_curve"]["ranking"] == "view"
    out = run(*args, "--out", str(tmp_path / "b"), "--no-view")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "b" / "view.html").exists()
    assert "faithfulness_curve" not in json.loads(
        (tmp_path / "b" / "circuit.json").read_text())["metadata"]
