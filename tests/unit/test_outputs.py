"""Unit tests of circuitfind.outputs: results are written before the drawing, which may fail."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

import circuitfind as cf
from circuitfind.errors import ConfigError, OutputExistsError
from circuitfind.graphs import ComputeGraph, select_top_n
from circuitfind.graphs.render import RENDERERS, RenderOptions
from circuitfind.outputs import DATA_FILES, check_output_dir, check_output_file, write_run


def circuit():
    graph = ComputeGraph(2, 4)
    scores = torch.randn(graph.n_senders, graph.n_receivers,
                         generator=torch.Generator().manual_seed(1))
    return select_top_n(graph, scores, 12, metadata={"model": "tiny", "task": "ioi"})


def test_write_run_writes_results_then_drawing(tmp_path, without_dot):
    out = tmp_path / "a" / "b"  # missing parents are created
    files = cf.write_run(circuit(), out, options=RenderOptions(collapse_qkv=True))
    assert files.drawing_error is None
    assert [p.name for p in files.written] == [*DATA_FILES, "circuit.dot", "circuit.svg",
                                               "view.html"]
    assert cf.Circuit.load(out / "circuit.json") == circuit()
    assert "<qkv>" in (out / "circuit.dot").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.written)
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_run(circuit(), out)
    assert write_run(circuit(), out, overwrite=True).drawing_error is None


def test_a_failed_drawing_costs_nothing(tmp_path, monkeypatch, caplog):
    def broken(scene, fmt):
        raise MemoryError("out of memory")

    for name in RENDERERS.names():
        renderer = dataclasses.replace(RENDERERS.get(name), draw=broken)
        monkeypatch.setitem(RENDERERS._items, name, renderer)
    (tmp_path / "circuit.svg").write_text("a stale drawing of an earlier run")
    with caplog.at_level(logging.WARNING, logger="circuitfind"):
        files = write_run(circuit(), tmp_path, overwrite=True)
    assert files.drawing_error == "circuit.svg: MemoryError: out of memory"
    assert not (tmp_path / "circuit.svg").exists()
    assert (tmp_path / "circuit.dot").exists()  # the other drawing is still made
    assert json.loads((tmp_path / "circuit.json").read_text())["metadata"]["task"] == "ioi"
    lines = [r.getMessage() for r in caplog.records if "circuitfind render" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "report.md" in lines[0]


def test_a_failed_viewer_costs_nothing_and_view_false_writes_none(tmp_path, monkeypatch, caplog):
    import circuitfind.outputs as outputs

    def broken(circuit, path):
        raise ValueError("no viewer today")

    monkeypatch.setattr(outputs, "write_view", broken)
    with caplog.at_level(logging.WARNING, logger="circuitfind"):
        files = write_run(circuit(), tmp_path / "a")
    assert files.drawing_error == "view.html: ValueError: no viewer today"
    assert (tmp_path / "a" / "circuit.svg").exists() and not (tmp_path / "a" / "view.html").exists()
    lines = [r.getMessage() for r in caplog.records if "circuitfind view" in r.getMessage()]
    assert len(lines) == 1 and "view.html not drawn" in lines[0]
    files = write_run(circuit(), tmp_path / "b", view=False)
    assert files.drawing_error is None and not (tmp_path / "b" / "view.html").exists()


def test_output_paths_are_checked(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match="not a directory"):
        check_output_dir(tmp_path / "file" / "run")
    with pytest.raises(ConfigError, match="does not exist"):
        check_output_file(tmp_path / "missing" / "c.svg")
    with pytest.raises(ConfigError, match="is a directory"):
        check_output_file(tmp_path)
    assert check_output_file(tmp_path / "c.svg") == tmp_path / "c.svg"


def test_a_failed_dot_still_draws_the_svg(tmp_path, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "graphviz", None)  # no Graphviz Python package
    with caplog.at_level(logging.WARNING, logger="circuitfind"):
        files = write_run(circuit(), tmp_path, renderer="matplotlib")
    assert files.drawing_error.startswith("circuit.dot: CircuitFindError")
    assert (tmp_path / "circuit.svg").read_bytes().startswith(b"<?xml")
    assert any(r.getMessage().startswith("circuit.dot not drawn") for r in caplog.records)


def test_faithfulness_above_one_is_explained_where_users_see_it():
    from circuitfind.evaluation.faithfulness import ABOVE_ONE, FaithfulnessCurve
    from circuitfind.outputs import report_markdown

    c = circuit()
    report = {"faithfulness": 1.27, "metric_circuit": 3.0, "metric_full": 2.5,
              "metric_empty": 0.6, "kl_div": 0.1, "metric_unit": "logits"}
    text = report_markdown(c.with_metadata(faithfulness=report))
    assert "moves the metric further than the full model" in text
    plain = report_markdown(c.with_metadata(faithfulness={**report, "faithfulness": 0.8}))
    assert ABOVE_ONE[1:40] not in plain

    def curve(values):
        return FaithfulnessCurve(
            fractions=[0.1, 1.0], n_edges=[1, 10], faithfulness=values, metric=[0.0, 0.0],
            cpr=1.0, cmd=0.0, absolute=None, metric_full=1.0, metric_empty=0.0,
            convention="mib", faithfulness_cmd=values, metric_cmd=[0.0, 0.0], n_kept=[1, 10],
            n_kept_cmd=[1, 10], pruned=True)

    assert "past the full model" in curve([1.42, 1.0]).label
    assert "past the full model" not in curve([0.5, 1.0]).label
