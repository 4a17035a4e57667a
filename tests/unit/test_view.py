"""The viewer's data (no browser): the slider's edge order against a plain sort, the rank
scores, what the page embeds, and the file and CLI entry points."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.graphs.scores import ScoreMeaning
from circuitfind.graphs.selection import prune_dangling, select_top_n
from circuitfind.view import rank_scores, view, view_html, view_order
from circuitfind.view.data import view_data


def _circuit(graph: ComputeGraph, n: int, seed: int = 0, absolute: bool = True,
             meaning: ScoreMeaning | None = None) -> Circuit:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(graph.n_senders, graph.n_receivers, generator=gen)
    scores[0, 3] = float("nan") if graph.edge_mask[0, 3] else scores[0, 3]
    md = {"scores": meaning.to_dict()} if meaning else None
    return prune_dangling(select_top_n(graph, scores.nan_to_num(0.0) if n else scores, n,
                                       absolute=absolute, metadata=md))


def _reference_order(circuit: Circuit) -> list[int]:
    """A plain Python sort: kept first, then larger key, then canonical id; NaN last."""
    g = circuit.graph
    kept = g.to_edges(circuit.kept).tolist()
    values = circuit.edge_values.tolist()
    absolute = circuit.metadata["selection"]["absolute"]
    sign = ScoreMeaning.from_dict(circuit.metadata.get("scores") or {}).sign

    def key(i: int) -> tuple:
        v = values[i]
        k = -math.inf if math.isnan(v) else (abs(v) if absolute else sign * v)
        return (not kept[i], -k, i)

    return sorted(range(g.n_edges), key=key)


@pytest.mark.parametrize("absolute, meaning", [
    (True, None), (False, None), (False, ScoreMeaning("importance", "nats")),
    (False, ScoreMeaning("metric_change", "nats", higher_is_better=False))])
def test_view_order_is_kept_first_then_by_the_selection_key(absolute, meaning):
    g = ComputeGraph(3, 4, n_kv_heads=2)
    circuit = _circuit(g, 25, absolute=absolute, meaning=meaning)
    order = view_order(circuit).tolist()
    assert order == _reference_order(circuit)
    assert set(order[: circuit.n_edges]) == set(circuit.edge_ids.tolist())
    # rank scores: their |score| ranking is the order, with no ties
    ranked = g.to_edges(rank_scores(circuit)).abs()
    assert torch.argsort(ranked, descending=True, stable=True).tolist() == order
    assert len(set(ranked.tolist())) == g.n_edges


def test_view_order_with_nan_scores_puts_them_last():
    g = ComputeGraph(2, 2)
    values = torch.arange(g.n_edges, dtype=torch.float32)
    values[5] = float("nan")
    circuit = Circuit(g, g.to_dense(torch.zeros(g.n_edges, dtype=torch.bool)),
                      g.to_dense(values))
    assert view_order(circuit).tolist()[-1] == 5


def test_view_data_embeds_the_graph_the_order_and_the_stored_scores_exactly():
    g = ComputeGraph(3, 4, n_kv_heads=2)
    circuit = _circuit(g, 30).with_metadata(
        faithfulness={"faithfulness": 0.5},
        faithfulness_curve={"ranking": "view", "n_edges": [1, 2, 100], "faithfulness":
                            [0.1, 0.2, 0.9]})
    data = view_data(circuit, max_edges=50)
    edges, receivers, nodes = data["edges"], data["receivers"], data["nodes"]
    order = view_order(circuit).tolist()
    assert len(edges["s"]) == 50
    names = [f"{nodes['name'][s]}->{receivers['name'][r]}" for s, r in zip(edges["s"], edges["r"])]
    assert names == [g.edge_names[e] for e in order[:50]]
    values = circuit.edge_values
    for e, score in zip(order[:50], edges["score"]):
        assert np.float32(score) == np.float32(values[e].item())
    # GQA k/v receivers are read by every query head of their group
    kv = receivers["name"].index("a1.kv0<k>")
    assert [nodes["name"][n] for n in receivers["nodes"][kv]] == ["a1.h0", "a1.h1"]
    # the renderer's layered layout: input on top, logits at the bottom, heads left to right
    y = dict(zip(nodes["name"], nodes["y"]))
    x = dict(zip(nodes["name"], nodes["x"]))
    assert y["input"] < y["a0.h0"] < y["m0"] < y["a1.h0"] < y["m2"] < y["logits"]
    assert x["a1.h0"] < x["a1.h1"] < x["a1.h2"] < x["a1.h3"] and y["a1.h0"] == y["a1.h3"]
    info = data["circuits"][0]
    assert info["n_kept"] == circuit.n_edges
    assert info["curve"]["sizes"] == sorted({1, 2, 100, circuit.n_edges})
    assert info["curve"]["faithfulness"][info["curve"]["sizes"].index(circuit.n_edges)] == 0.5
    # at least the kept edges, at most the finite scores
    assert len(view_data(circuit, max_edges=0)["edges"]["s"]) == circuit.n_edges
    finite = int(torch.isfinite(values).sum())
    assert len(view_data(circuit)["edges"]["s"]) == finite


def test_a_curve_over_another_ranking_is_not_shown():
    g = ComputeGraph(2, 2)
    circuit = _circuit(g, 5).with_metadata(faithfulness_curve={
        "ranking": "mib", "n_edges": [1, 2], "faithfulness": [0.1, 0.2]})
    assert view_data(circuit)["circuits"][0]["curve"] is None


def test_compare_data_is_the_union_with_each_circuits_ranks():
    g = ComputeGraph(3, 4)
    a, b = _circuit(g, 30, seed=1), _circuit(g, 20, seed=2)
    data = view_data(a, b, labels=("eap", "acdc"))
    edges = data["edges"]
    names = {g.edge_name(s, r) for s, r in zip(edges["s"], edges["r"])}
    assert names == set(a.edges) | set(b.edges)
    for c, ranks in zip((a, b), edges["rank"]):
        order = view_order(c).tolist()[: c.n_edges]
        assert sorted(r for r in ranks if r >= 0) == list(range(c.n_edges))
        for i, r in enumerate(ranks):
            if r >= 0:
                assert g.edge_id(g.edge_name(edges["s"][i], edges["r"][i])) == order[r]
    assert [c["label"] for c in data["circuits"]] == ["eap", "acdc"]


def test_bad_input_gives_clear_errors(tmp_path):
    g = ComputeGraph(2, 2)
    with pytest.raises(ConfigError, match="different graphs"):
        view_data(_circuit(g, 3), _circuit(ComputeGraph(2, 4), 3))
    with pytest.raises(ConfigError, match="max_edges"):
        view_data(_circuit(g, 3), max_edges=-1)
    with pytest.raises(ConfigError, match="does not exist"):
        view(_circuit(g, 3), tmp_path / "missing" / "v.html")
    with pytest.raises(ConfigError, match="does not exist"):
        view(tmp_path / "nothing.json", tmp_path / "v.html")
    with pytest.raises(ConfigError, match="Circuit or a path"):
        view(42, tmp_path / "v.html")


def test_the_page_is_self_contained_and_reads_back(tmp_path):
    g = ComputeGraph(2, 4)
    circuit = _circuit(g, 10).with_metadata(task="x</script><script>alert(1)</script>")
    circuit.save(tmp_path / "circuit.json")
    path = view(tmp_path, tmp_path / "v.html")  # a run directory
    page = path.read_text(encoding="utf-8")
    # nothing fetched from anywhere: no http(s) URL, no src= or external stylesheet
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", page)
    assert not re.search(r"<(script|img|iframe)[^>]+src=", page)
    assert "<link rel=\"stylesheet\"" not in page
    # the data reads back, and no string in it closes the script element
    blob = page.split('<script id="cf-data" type="application/json">', 1)[1].split("</script>")[0]
    assert json.loads(blob)["circuits"][0]["title"].startswith("task: x</script>")
    assert view_html(circuit) == page  # same circuit, same bytes


def test_cli_view_writes_one_file_and_compares_with_mib_json(tmp_path, capsys, monkeypatch):
    import sys

    from circuitfind.cli import main
    from circuitfind.graphs.mib import export_mib

    g = ComputeGraph(2, 4)
    a, b = _circuit(g, 12, seed=3), _circuit(g, 12, seed=4)
    a.save(tmp_path / "a.json")
    mib = export_mib(b, tmp_path / "b.json", d_model=16)
    monkeypatch.setattr(sys, "argv", ["circuitfind", "view", str(tmp_path / "a.json"), str(mib),
                                      "--out", str(tmp_path / "ab.html")])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None), capsys.readouterr().err
    page = (tmp_path / "ab.html").read_text(encoding="utf-8")
    blob = page.split('<script id="cf-data" type="application/json">', 1)[1].split("</script>")[0]
    data = json.loads(blob)
    assert data["mode"] == "compare" and [c["label"] for c in data["circuits"]] == ["a.json",
                                                                                   "b.json"]
    assert sum(r >= 0 for r in data["edges"]["rank"][1]) == b.n_edges
