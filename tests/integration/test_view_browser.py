"""The HTML viewer in a real browser: Debian's headless Chromium driven by Playwright.

Without Playwright or Chromium (a user's machine) these tests skip with the reason; under
``CI=true`` (``.ci/run`` installs both) they fail instead. Every expected value is computed
here in Python from the circuit: the slider's edges from :func:`view_order`, the pinned paths
with networkx, the comparison's colours from the two edge sets.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import networkx as nx
import numpy as np
import pytest
import torch

from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.graphs.selection import select_top_n
from circuitfind.testing.browser import browser_missing, chromium_page
from circuitfind.view import view, view_order
from circuitfind.view.data import COMPARE_COLOURS

N_KEPT = 30


@pytest.fixture(scope="module")
def page():
    problem = browser_missing()
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the browser tests need a browser under CI: {problem}")
        pytest.skip(problem)
    with chromium_page() as pg:
        yield pg


def _scored(graph: ComputeGraph, n: int, seed: int) -> Circuit:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(graph.n_senders, graph.n_receivers, generator=gen)
    return select_top_n(graph, scores, n, metadata={
        "model": "tiny", "task": "ioi", "algorithm": "eap", "metric_unit": "logits",
        "faithfulness": {"faithfulness": 0.625},
        "faithfulness_curve": {"ranking": "view", "n_edges": [1, 10, 100],
                               "faithfulness": [0.125, 0.5, 0.875]}})


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    graph = ComputeGraph(3, 4, n_kv_heads=2)  # grouped-query: k/v edges reach two heads
    circuit = _scored(graph, N_KEPT, seed=0)
    path = view(circuit, tmp_path_factory.mktemp("view") / "view.html")
    return circuit, path


def _open(page, path):
    page.console_errors.clear()
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready]")


def _drawn(page) -> list[tuple[int, str]]:
    """(edge index, target node name) of every drawn path."""
    return page.evaluate("""() => [...document.querySelectorAll('#edges path.edge:not(.off)')]
        .map(p => [+p.dataset.e, document.querySelector(`[data-n="${p.dataset.t}"]`).dataset.name])""")


def _names(page, indices) -> list[str]:
    return page.evaluate("(ix) => ix.map(i => window.circuitView.edgeName(i))", list(indices))


def test_loads_without_console_errors_and_shows_the_circuit(page, single):
    circuit, path = single
    _open(page, path)
    assert page.console_errors == []
    edges = {e for e, _ in _drawn(page)}
    assert sorted(_names(page, edges)) == sorted(circuit.edges)
    assert page.get_attribute("#count", "data-count") == str(circuit.n_edges)
    assert float(page.get_attribute("#faith", "data-faithfulness")) == 0.625


@pytest.mark.parametrize("k", [0, 1, 10, 55])
def test_the_slider_at_k_shows_exactly_the_top_k_edges(page, single, k):
    circuit, path = single
    _open(page, path)
    page.fill("#size", str(k))  # a real input event on the range control
    drawn = _drawn(page)
    edges = {e for e, _ in drawn}
    assert len(edges) == k
    g = circuit.graph
    expected = [g.edge_names[e] for e in view_order(circuit).tolist()[:k]]
    assert sorted(_names(page, edges)) == sorted(expected)
    assert page.get_attribute("#count", "data-count") == str(k)
    if k == 10:  # a size the curve measured
        assert float(page.get_attribute("#faith", "data-faithfulness")) == 0.5
    if k == 55:  # between 30 (0.625, the circuit) and 100 (0.875): interpolated
        assert float(page.get_attribute("#faith", "data-faithfulness")) == pytest.approx(
            0.625 + (55 - 30) / 70 * 0.25)
    assert page.console_errors == []


@pytest.mark.parametrize("rank", [20, 45])
def test_a_threshold_on_score_shows_the_edges_at_or_above_it(page, single, rank):
    circuit, path = single
    _open(page, path)
    values = circuit.edge_values.abs()
    order = view_order(circuit)
    threshold = str(np.float32(values[order[rank - 1]].item()))  # as the page shows it
    expected = int((values >= np.float32(threshold)).sum())  # top-n: the order is by |score|
    assert expected == rank
    page.fill("#threshold", threshold)
    page.press("#threshold", "Enter")
    assert len({e for e, _ in _drawn(page)}) == expected
    assert page.get_attribute("#count", "data-count") == str(expected)


def test_hovering_an_edge_shows_its_stored_score_and_rank(page, single):
    circuit, path = single
    _open(page, path)
    page.fill("#size", "1")
    point = page.evaluate("""() => {
        const p = document.querySelector('#edges path.edge:not(.off)');
        const q = p.getPointAtLength(p.getTotalLength() / 2).matrixTransform(p.getScreenCTM());
        return [q.x, q.y]; }""")
    page.mouse.move(*point)
    first = view_order(circuit).tolist()[0]
    name = circuit.graph.edge_names[first]
    assert page.get_attribute("#info", "data-edge") == name
    shown = page.get_attribute("#info", "data-score")
    assert np.float32(float(shown)) == np.float32(circuit.edge_values[first].item())
    assert page.get_attribute("#info", "data-rank") == "1"
    text = page.text_content("#info")
    assert f"{shown} logits" in text and "metric change" in text


def _visible_graph(page) -> nx.MultiDiGraph:
    graph = nx.MultiDiGraph()
    names = page.evaluate("() => [...document.querySelectorAll('#edges path.edge:not(.off)')]"
                          ".map(p => p.dataset.e)")
    for (e, target), name in zip(_drawn(page), _names(page, [int(x) for x in names])):
        graph.add_edge(name.split("->")[0], target, key=name)
    return graph


def test_pinning_a_node_highlights_every_path_through_it_to_the_logits(page, single):
    circuit, path = single
    _open(page, path)
    page.fill("#size", "40")
    graph = _visible_graph(page)
    # a node in the middle of the drawing with edges in and out
    node = next(n for n in ("a1.h0", "a1.h1", "a1.h2", "a1.h3", "m1", "m0")
                if graph.in_degree(n) and graph.out_degree(n))
    page.click(f'[data-name="{node}"]')
    assert page.get_attribute("#graph", "data-pinned") == node
    highlighted = set(map(tuple, page.evaluate(
        """() => [...document.querySelectorAll('#edges path.hl')].map(p =>
            [window.circuitView.edgeName(+p.dataset.e),
             document.querySelector(`[data-n="${p.dataset.t}"]`).dataset.name])""")))
    to_logits = nx.ancestors(graph, "logits") | {"logits"}
    down = nx.descendants(graph, node) | {node}
    up = nx.ancestors(graph, node) | {node}
    expected = {(key, v) for u, v, key in graph.edges(keys=True)
                if (u in down and v in to_logits) or (v in up and node in to_logits)}
    assert highlighted == expected and expected
    # hovering the node lists its drawn in- and out-edges
    assert page.get_attribute("#info", "data-in") == str(graph.in_degree(node))
    assert page.get_attribute("#info", "data-out") == str(
        len({k for _, _, k in graph.out_edges(node, keys=True)}))
    page.click(f'[data-name="{node}"]')  # a second click unpins
    assert page.get_attribute("#graph", "data-pinned") is None
    # search by name pins too
    page.fill("#search", "m2")
    page.press("#search", "Enter")
    assert page.get_attribute("#graph", "data-pinned") == "m2"
    assert page.console_errors == []


def test_export_svg_and_png_of_the_current_view(page, single, tmp_path):
    circuit, path = single
    _open(page, path)
    page.fill("#size", "12")
    n_paths = len(_drawn(page))
    with page.expect_download() as info:
        page.click("#export-svg")
    svg_path = tmp_path / "view.svg"
    info.value.save_as(svg_path)
    root = ET.parse(svg_path).getroot()  # parses as XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    paths = root.findall(".//{http://www.w3.org/2000/svg}path")
    assert len([p for p in paths if "edge" in p.get("class", "")]) == n_paths
    with page.expect_download() as info:
        page.click("#export-png")
    png_path = tmp_path / "view.png"
    info.value.save_as(png_path)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 1000
    assert page.console_errors == []


def test_two_circuits_are_coloured_by_set_with_their_jaccard(page, tmp_path):
    graph = ComputeGraph(3, 4)
    a, b = _scored(graph, 25, seed=1), _scored(graph, 18, seed=2)
    path = view(a, tmp_path / "ab.html", other=b, labels=("eap", "acdc"))
    _open(page, path)
    assert page.console_errors == []
    strokes = page.evaluate("""() => [...document.querySelectorAll('#edges path.edge:not(.off)')]
        .map(p => [window.circuitView.edgeName(+p.dataset.e), p.getAttribute('stroke')])""")
    sa, sb = set(a.edges), set(b.edges)
    assert {name for name, _ in strokes} == sa | sb
    for name, colour in strokes:
        key = "shared" if name in sa and name in sb else "a" if name in sa else "b"
        assert colour == COMPARE_COLOURS[key], name
    jaccard = float(page.get_attribute("#faith", "data-jaccard"))
    assert jaccard == pytest.approx(len(sa & sb) / len(sa | sb))
    # at a smaller size each circuit shows its top k
    page.fill("#size", "5")
    top = [set(graph.edge_names[e] for e in view_order(c).tolist()[:5]) for c in (a, b)]
    shown = set(_names(page, {e for e, _ in _drawn(page)}))
    assert shown == top[0] | top[1]
    assert float(page.get_attribute("#faith", "data-jaccard")) == pytest.approx(
        len(top[0] & top[1]) / len(top[0] | top[1]))
