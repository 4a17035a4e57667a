"""Unit tests of circuitfind.graphs.render (Graphviz output)."""

from __future__ import annotations

import shutil
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from circuitfind.errors import CircuitFindError, ConfigError
from circuitfind.graphs import Circuit, ComputeGraph, render, select_top_n
from circuitfind.graphs.render import EDGE_COLOURS, _deterministic_pdf, to_dot

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="the Graphviz `dot` binary is not installed")

MHA = ComputeGraph(2, 4)
GQA = ComputeGraph(3, 4, 2)


def circuit(graph: ComputeGraph = MHA, classes: bool = True) -> Circuit:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.n_senders, graph.n_receivers, generator=gen)
    meta = {"model": "tiny", "task": "ioi", "algorithm": "eap"}
    if classes:
        meta["node_classes"] = {"a1.h0": "name mover", "a0.h1": "induction"}
    return select_top_n(graph, scores, 30, metadata=meta)


@needs_dot
def test_svg_is_deterministic_and_valid(tmp_path):
    c = circuit()
    first = render(c, tmp_path / "a.svg").read_bytes()
    second = c.render(tmp_path / "b.svg").read_bytes()
    assert first == second
    root = ET.fromstring(first)  # `<q>` in edge names is escaped properly
    assert root.tag.endswith("svg")
    text = first.decode()
    assert "a1.h0" in text and any(f"&lt;{kind}&gt;" in text for kind in "qkv")
    # the same circuit rebuilt from its file draws the same bytes
    c.save(tmp_path / "c.json")
    assert Circuit.load(tmp_path / "c.json").render(tmp_path / "c.svg").read_bytes() == first


@needs_dot
@pytest.mark.parametrize("suffix", [".pdf", ".png"])
def test_binary_formats_deterministic(tmp_path, suffix):
    c = circuit(GQA)
    a = render(c, tmp_path / f"a{suffix}").read_bytes()
    b = render(c, tmp_path / f"b{suffix}").read_bytes()
    assert a == b and len(a) > 100
    assert a.startswith(b"%PDF" if suffix == ".pdf" else b"\x89PNG")


def test_pdf_dates_fixed_in_place():
    data = b"<< /CreationDate (D:20261121001701Z) /ModDate (D:20261121001701+01'00') >>"
    fixed = _deterministic_pdf(data)
    assert len(fixed) == len(data) and b"2026" not in fixed
    assert b"/CreationDate (D:19700101000000Z)" in fixed


def test_dot_source(tmp_path):
    c = circuit(GQA)
    path = render(c, tmp_path / "c.dot")
    source = path.read_text()
    assert source == to_dot(c) == render(c, tmp_path / "c2.gv").read_text()
    assert source.startswith("digraph circuit {")
    assert '"a1.h0"' in source  # node IDs with dots are quoted
    assert "rank=source" in source and "rank=sink" in source and "rank=same" in source
    for line in source.splitlines():
        if "->" in line and "tooltip" in line and "style=invis" not in line:
            # every drawn edge has a colour from the palette and a pen width in [0.5, 5]
            assert any(colour in line for colour in EDGE_COLOURS.values())
            width = float(line.split("penwidth=")[1].split()[0].strip('"'))
            assert 0.5 <= width <= 5.0
    assert "name mover" in source and "legend" in source
    # a GQA k/v edge is drawn to every query head of its group
    kv_edges = [e for e in c.edges if ".kv" in e]
    if kv_edges:
        name = kv_edges[0]
        assert source.count(f'tooltip="{name} ') == GQA.group_size


def test_widths_scale_with_scores_and_no_scores():
    c = Circuit.from_edges(MHA, ["input->logits", "m1->logits"],
                           scores={"input->logits": -4.0, "m1->logits": 1.0})
    source = to_dot(c)
    assert "penwidth=5.000" in source and "penwidth=1.625" in source
    plain = to_dot(Circuit.from_edges(MHA, ["input->logits"]))
    assert "penwidth=1.000" in plain
    assert "edges" in to_dot(Circuit.empty(MHA))  # an empty circuit still renders


def test_node_fills_by_kind_without_classes():
    source = to_dot(circuit(classes=False))
    assert "#56B4E9" in source  # attention fill
    assert "legend.class" not in source


def test_bad_suffix_and_format(tmp_path):
    c = circuit()
    with pytest.raises(ConfigError, match="suffix"):
        render(c, tmp_path / "c.jpeg")
    with pytest.raises(ConfigError, match="suffix"):
        c.render(tmp_path / "c")
    with pytest.raises(ConfigError, match="format"):
        render(c, tmp_path / "c.svg", format="bmp")
    with pytest.raises(ConfigError, match="Circuit"):
        render("not a circuit", tmp_path / "c.svg")  # type: ignore[arg-type]
    out = render(c, tmp_path / "c.txt", format="dot")
    assert out.read_text().startswith("digraph")


def test_missing_graphviz_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)
    with pytest.raises(CircuitFindError, match="pip install graphviz"):
        render(circuit(), tmp_path / "c.dot")


def test_missing_dot_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CircuitFindError, match="`dot` binary"):
        render(circuit(), tmp_path / "c.svg")
    assert not (tmp_path / "c.svg").exists()
    assert render(circuit(), tmp_path / "c.dot").exists()  # DOT needs no binary
