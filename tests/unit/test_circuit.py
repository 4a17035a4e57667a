"""Unit tests of circuitfind.graphs.circuit: construction, selection, pruning, exports."""

from __future__ import annotations

import json
import math
import os
import struct

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitfind.errors import CircuitFindError, ConfigError, UnknownNameError
from circuitfind.graphs import (Circuit, ComputeGraph, prune_dangling, select_threshold,
                                select_top_n)
from circuitfind._files import floats_for_json
from circuitfind.graphs.io import FORMAT_VERSION
from circuitfind.graphs.scores import ScoreMeaning

MHA = ComputeGraph(2, 4)
GQA = ComputeGraph(3, 4, 2)
GRAPHS = {"mha": MHA, "gqa": GQA}
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_scores(graph: ComputeGraph, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(graph.n_senders, graph.n_receivers, generator=gen)


def random_kept(graph: ComputeGraph, seed: int, p: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(graph.n_senders, graph.n_receivers, generator=gen) < p) & graph.edge_mask


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# ---------------------------------------------------------------------------------- basics
@pytest.mark.parametrize("graph", GRAPHS.values(), ids=GRAPHS.keys())
def test_full_and_empty(graph):
    full, empty = Circuit.full(graph), Circuit.empty(graph)
    assert full.n_edges == len(full) == graph.n_edges
    assert full.edges == list(graph.edge_names)
    assert full.nodes == [n.name for n in graph.nodes]
    assert empty.n_edges == 0 and empty.edges == [] and empty.nodes == []
    assert full.scores is None and full.metadata == {}


def test_from_edges_edges_and_nodes_in_canonical_order():
    names = ["a1.h2->logits", "input->a0.h1<q>", "a0.h1->a1.h2<k>", "input->a0.h1<q>"]
    c = Circuit.from_edges(MHA, names)
    assert c.n_edges == 3
    ids = sorted(MHA.edge_id(n) for n in set(names))
    assert c.edges == [MHA.edge_names[i] for i in ids]
    assert c.nodes == ["input", "a0.h1", "a1.h2", "logits"]
    assert "a1.h2->logits" in c and "a1.h3->logits" not in c and "nonsense" not in c


def test_gqa_receiver_touches_every_query_head():
    c = Circuit.from_edges(GQA, ["input->a1.kv1<v>"])
    assert c.nodes == ["input", "a1.h2", "a1.h3"]


def test_from_edges_unknown_name():
    with pytest.raises(UnknownNameError, match="a9.h0"):
        Circuit.from_edges(MHA, ["a9.h0->logits"])
    with pytest.raises(ConfigError, match="list of names"):
        Circuit.from_edges(MHA, "input->logits")


def test_scores_mapping_and_edge_scores():
    c = Circuit.from_edges(MHA, ["input->logits", "m1->logits"],
                           scores={"input->logits": 0.5, "m1->logits": -2.0, "m0->m1": 3.0})
    assert c.edge_scores() == {"input->logits": 0.5, "m1->logits": -2.0}
    s, r = MHA.edge_index("m0->m1")
    assert c.scores[s, r] == 3.0 and c.scores.dtype == torch.float32
    with pytest.raises(ConfigError, match="no scores"):
        Circuit.full(MHA).edge_scores()


def test_validation_errors():
    kept = MHA.edge_mask.clone()
    kept[-1, 0] = True  # the last sender does not feed the first receiver
    with pytest.raises(ConfigError, match="not edges"):
        Circuit(MHA, kept)
    with pytest.raises(ConfigError, match="shape"):
        Circuit(MHA, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="graph.to_dense"):
        Circuit(MHA, torch.zeros(MHA.n_edges, dtype=torch.bool))
    with pytest.raises(ConfigError, match="boolean"):
        Circuit(MHA, MHA.edge_mask.float() * 0.5)
    with pytest.raises(ConfigError, match="JSON"):
        Circuit.full(MHA, metadata={"x": object()})
    with pytest.raises(ConfigError, match="node_classes"):
        Circuit.full(MHA, metadata={"node_classes": ["a0.h0"]})
    with pytest.raises(ConfigError, match="ComputeGraph"):
        Circuit("graph", MHA.edge_mask)  # type: ignore[arg-type]
    numeric = Circuit(MHA, MHA.edge_mask.long())
    assert numeric.kept.dtype == torch.bool and numeric.n_edges == MHA.n_edges


def test_immutable_values_and_with_metadata():
    scores = random_scores(MHA)
    c = Circuit.full(MHA, scores=scores, metadata={"model": "m", "params": (1, 2)})
    assert c.metadata["params"] == [1, 2]  # normalised through JSON
    scores.zero_()  # the circuit holds its own copy
    assert c.scores.abs().sum() > 0
    assert not c.scores[~MHA.edge_mask].any()  # 0 off-edge
    d = c.with_metadata(task="ioi", model="m2")
    assert d.metadata == {"model": "m2", "params": [1, 2], "task": "ioi"}
    assert c.metadata == {"model": "m", "params": [1, 2]}
    assert d != c and d == c.with_metadata(task="ioi", model="m2")
    with pytest.raises(AttributeError):
        c.kept = MHA.edge_mask  # type: ignore[misc]


# ---------------------------------------------------------------------------------- selection
def _keys(graph, scores, absolute):
    """|score|, or the signed importance of a metric change of a higher-is-better metric (the
    meaning of scores without metadata): the most negative score first."""
    values = graph.to_edges(scores)
    return values.abs() if absolute else -values


@pytest.mark.parametrize("name", GRAPHS)
@FAST
@given(seed=st.integers(0, 10_000), frac=st.floats(0, 1), absolute=st.booleans(),
       ties=st.booleans())
def test_top_n_property(name, seed, frac, absolute, ties):
    graph = GRAPHS[name]
    scores = random_scores(graph, seed)
    if ties:  # few distinct values: exercises the tie-breaking
        scores = torch.round(scores * 2)
    n = round(frac * graph.n_edges)
    c = select_top_n(graph, scores, n, absolute=absolute)
    assert c.n_edges == n
    keys = _keys(graph, scores, absolute)
    kept = graph.to_edges(c.kept)
    if 0 < n < graph.n_edges:
        assert keys[kept].min() >= keys[~kept].max()
        # ties at the boundary go to the lower canonical edge id
        boundary = keys[kept].min()
        tied = (keys == boundary).nonzero().flatten()
        kept_tied = tied[kept[tied]]
        dropped_tied = tied[~kept[tied]]
        if len(kept_tied) and len(dropped_tied):
            assert kept_tied.max() < dropped_tied.min()
    assert c.metadata["selection"] == {"method": "top_n", "n": n, "absolute": absolute}
    assert c == select_top_n(graph, scores, n, absolute=absolute)  # deterministic


def test_top_n_signed_vs_absolute():
    scores = torch.zeros(MHA.n_senders, MHA.n_receivers)
    a, b = MHA.edge_index("input->logits"), MHA.edge_index("m1->logits")
    scores[a] = -5.0
    scores[b] = 1.0
    assert select_top_n(MHA, scores, 1).edges == ["input->logits"]
    # signed: the most important edge first, as the scores' meaning reads them
    assert select_top_n(MHA, scores, 1, absolute=False).edges == ["input->logits"]
    lower = ScoreMeaning("metric_change", "nats", higher_is_better=False)
    assert select_top_n(MHA, scores, 1, absolute=False, meaning=lower).edges == ["m1->logits"]
    acdc = {"scores": ScoreMeaning("importance", "nats").to_dict()}
    assert select_top_n(MHA, scores, 1, absolute=False, metadata=acdc).edges == ["m1->logits"]
    assert select_threshold(MHA, scores, 1.0, absolute=False, metadata=acdc).edges == [
        "m1->logits"]


def test_top_n_errors_and_edge_cases():
    scores = random_scores(MHA)
    assert select_top_n(MHA, scores, 0).n_edges == 0
    assert select_top_n(MHA, scores, MHA.n_edges).n_edges == MHA.n_edges
    assert select_top_n(MHA, scores, np.int64(3)).n_edges == 3
    with pytest.raises(ConfigError, match=str(MHA.n_edges)):
        select_top_n(MHA, scores, MHA.n_edges + 1)
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="n must be"):
            select_top_n(MHA, scores, bad)  # type: ignore[arg-type]
    nan = scores.clone()
    nan[MHA.edge_index("m0->m1")] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        select_top_n(MHA, nan, 3)
    nan_off_edge = scores.clone()
    nan_off_edge[-1, 0] = float("nan")  # not an edge: ignored
    assert select_top_n(MHA, nan_off_edge, 3).n_edges == 3
    with pytest.raises(ConfigError, match="shape"):
        select_top_n(MHA, scores[:, :-1], 3)


@pytest.mark.parametrize("name", GRAPHS)
@FAST
@given(seed=st.integers(0, 10_000), t1=st.floats(-3, 3), t2=st.floats(-3, 3),
       absolute=st.booleans())
def test_threshold_property(name, seed, t1, t2, absolute):
    graph = GRAPHS[name]
    scores = random_scores(graph, seed)
    lo, hi = min(t1, t2), max(t1, t2)
    c_lo = select_threshold(graph, scores, lo, absolute=absolute)
    c_hi = select_threshold(graph, scores, hi, absolute=absolute)
    assert not (c_hi.kept & ~c_lo.kept).any()  # monotone: higher threshold keeps a subset
    keys = _keys(graph, scores, absolute)
    assert torch.equal(graph.to_edges(c_lo.kept), keys >= lo)


def test_threshold_errors():
    scores = random_scores(MHA)
    assert select_threshold(MHA, scores, float("inf")).n_edges == 0
    assert select_threshold(MHA, scores, 0.0).n_edges == MHA.n_edges
    for bad in (float("nan"), "x", None, True):
        with pytest.raises(ConfigError, match="threshold"):
            select_threshold(MHA, scores, bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- pruning
def slow_prune(circuit: Circuit) -> set[str]:
    """Reference: the same rules over edge names, one edge at a time."""
    graph = circuit.graph
    kept = set(circuit.edges)
    while True:
        parsed = [(e, *e.split("->")) for e in kept]
        has_in = {"input"}
        has_out = {"logits"}
        for _, sender, receiver in parsed:
            has_in.update(graph.receivers[graph.receiver_index(receiver)].nodes)
            has_out.add(sender)
        new = {e for e, sender, receiver in parsed
               if sender in has_in
               and any(n in has_out for n in graph.receivers[graph.receiver_index(receiver)].nodes)}
        if new == kept:
            return kept
        kept = new


@pytest.mark.parametrize("name", GRAPHS)
@FAST
@given(seed=st.integers(0, 10_000), p=st.floats(0, 0.3))
def test_prune_matches_reference_idempotent_subset(name, seed, p):
    graph = GRAPHS[name]
    c = Circuit(graph, random_kept(graph, seed, p), random_scores(graph, seed),
                {"seed": seed})
    pruned = prune_dangling(c)
    assert set(pruned.edges) == slow_prune(c)
    assert not (pruned.kept & ~c.kept).any()  # only removes
    assert prune_dangling(pruned) == pruned  # idempotent
    assert _bits_equal(pruned.scores, c.scores) and pruned.metadata == c.metadata


def _bits_equal(a, b):
    return torch.equal(bits(a), bits(b))


def test_prune_hand_made_mha():
    c = Circuit.from_edges(MHA, [
        "input->a0.h0<q>", "a0.h0->logits",  # a live path
        "a1.h2->logits",  # a1.h2 reads nothing kept: dangling
        "input->a0.h1<v>",  # a0.h1 feeds nothing kept: dangling
        "input->a0.h3<k>", "a0.h3->a1.h1<q>",  # a chain into a dead end: removed in 2 rounds
    ])
    assert prune_dangling(c).edges == ["input->a0.h0<q>", "a0.h0->logits"]
    assert prune_dangling(Circuit.full(MHA)) == Circuit.full(MHA)
    assert prune_dangling(Circuit.empty(MHA)) == Circuit.empty(MHA)
    only_logits = Circuit.from_edges(MHA, ["input->logits"])
    assert prune_dangling(only_logits) == only_logits


def test_prune_hand_made_gqa():
    c = Circuit.from_edges(GQA, [
        "input->a1.kv0<k>",  # shared by a1.h0 and a1.h1
        "a1.h1->logits",  # a1.h1 has input through the shared k: kept
        "a1.h0->logits",  # so does a1.h0
        "a1.h2->logits",  # a1.h2 reads q a1.h2, kv1: nothing kept -> removed
        "input->a2.kv1<v>",  # a2.h2 and a2.h3 have no kept output -> removed
        "a0.h0->a2.kv1<k>",  # a0.h0 has no input and a2.h2/a2.h3 no output -> removed
    ])
    assert prune_dangling(c).edges == ["input->a1.kv0<k>", "a1.h0->logits", "a1.h1->logits"]
    # the kv receiver stays alive while any one of its query heads has an output
    c2 = Circuit.from_edges(GQA, ["input->a2.kv1<v>", "a2.h3->logits"])
    assert prune_dangling(c2) == c2


def test_selection_on_gpt2_small():
    graph = ComputeGraph(12, 12)
    assert graph.n_edges == 32491
    scores = random_scores(graph)
    c = select_top_n(graph, scores, 1000)
    t = select_threshold(graph, scores, 1.0)
    p = prune_dangling(c)
    flat = graph.to_edges(scores).abs()
    assert c.n_edges == 1000 and p.n_edges <= 1000 and p.edges and p.nodes
    assert t.n_edges == int((flat >= 1.0).sum())
    assert float(flat[graph.to_edges(c.kept)].min()) >= float(flat[~graph.to_edges(c.kept)].max())


# ---------------------------------------------------------------------------------- networkx
def test_to_networkx_attributes_mha():
    meta = {"model": "tiny", "node_classes": {"a0.h0": "induction", "m9": "ignored"}}
    names = ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>", "a0.h0->m0",
             "m0->logits"]
    scores = {n: float(i) - 1.5 for i, n in enumerate(names)}
    c = Circuit.from_edges(MHA, names, scores=scores, metadata=meta)
    g = c.to_networkx()
    assert isinstance(g, nx.MultiDiGraph)
    assert list(g.nodes) == ["input", "a0.h0", "m0", "logits"]
    assert g.nodes["a0.h0"] == {"layer": 0, "kind": "attention", "head": 0, "class": "induction"}
    assert g.nodes["input"] == {"layer": -1, "kind": "input"}  # no head attribute
    assert g.nodes["logits"] == {"layer": 2, "kind": "logits"}
    assert g.number_of_edges("input", "a0.h0") == 3  # parallel q/k/v edges
    q = g.edges["input", "a0.h0", "input->a0.h0<q>"]
    assert q == {"name": "input->a0.h0<q>", "receiver": "a0.h0<q>", "qkv": "q", "score": -1.5}
    assert g.edges["a0.h0", "m0", "a0.h0->m0"]["qkv"] == ""
    assert json.loads(g.graph["metadata"]) == c.metadata
    assert json.loads(g.graph["graph_config"]) == MHA.config()
    assert Circuit.from_networkx(g) == c


def test_to_networkx_gqa_edge_to_each_query_head():
    c = Circuit.from_edges(GQA, ["a0.h1->a2.kv1<k>"], scores={"a0.h1->a2.kv1<k>": 0.25})
    g = c.to_networkx()
    assert sorted(g.edges(keys=True)) == [("a0.h1", "a2.h2", "a0.h1->a2.kv1<k>"),
                                          ("a0.h1", "a2.h3", "a0.h1->a2.kv1<k>")]
    for _, _, data in g.edges(data=True):
        assert data == {"name": "a0.h1->a2.kv1<k>", "receiver": "a2.kv1<k>", "qkv": "k",
                        "score": 0.25}
    assert Circuit.from_networkx(g) == c
    assert "score" not in next(iter(Circuit.from_edges(GQA, ["input->logits"])
                                    .to_networkx().edges(data=True)))[2]


# ---------------------------------------------------------------------------------- files
def awkward_scores(graph: ComputeGraph, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(-2**31, 2**31 - 1, (graph.n_senders, graph.n_receivers), generator=gen,
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    raw = torch.where(torch.isfinite(raw), raw, torch.tensor(1.0))
    values = raw.flatten()
    specials = torch.tensor([0.1, -0.0, 1e-45, 3.4028235e38, float("inf"), -float("inf"),
                             1 / 3, 2.0**-149, 16777217.0])
    values[: len(specials)] = specials
    idx = graph.edge_mask.flatten().nonzero().flatten()
    out = torch.zeros_like(values)
    out[idx] = values[: len(idx)]
    return out.view(graph.n_senders, graph.n_receivers)


META = {"model": "tiny-stories", "task": "ioi", "algorithm": "eap_ig",
        "params": {"steps": 5, "absolute": True}, "seed": 0, "wall_time_s": 1.25,
        "faithfulness": 0.8125, "versions": {"circuitfind": "0.1.0"},
        "node_classes": {"a1.h0": "name mover", "a0.h2": 3}}


@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("suffix", [".json", ".graphml"])
def test_file_round_trip_lossless(tmp_path, name, suffix):
    graph = GRAPHS[name]
    scores = awkward_scores(graph, 1)
    c = Circuit(graph, random_kept(graph, 2, 0.3), scores, META)
    path = c.save(tmp_path / f"c{suffix}")
    back = Circuit.load(path)
    assert back == c
    assert torch.equal(back.kept, c.kept)
    assert torch.equal(bits(back.scores), bits(c.scores))
    assert back.metadata == c.metadata
    assert [p.name for p in tmp_path.iterdir()] == [f"c{suffix}"]  # no temporary files left
    # without scores, and empty
    for other in (Circuit(graph, c.kept, None, META), Circuit.empty(graph)):
        other.save(tmp_path / f"d{suffix}")
        assert Circuit.load(tmp_path / f"d{suffix}") == other


def test_json_layout(tmp_path):
    scores = random_scores(MHA)
    c = select_top_n(MHA, scores, 5, metadata={"model": "m"})
    data = json.loads(c.to_json(tmp_path / "c.json").read_text())
    assert data["format"] == "circuitfind.circuit" and data["format_version"] == FORMAT_VERSION
    assert data["graph"] == MHA.config() and data["edges"] == c.edges and data["n_edges"] == 5
    assert len(data["scores"]) == MHA.n_edges  # all edges, canonical order
    assert np.array_equal(np.asarray(data["scores"], dtype=np.float32),
                          MHA.to_edges(scores).numpy())
    assert Circuit.from_dict(c.to_dict()) == c
    # the scores of a file can be re-thresholded later
    back = Circuit.load(tmp_path / "c.json")
    assert select_top_n(MHA, back.scores, 20) == select_top_n(MHA, scores, 20)


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_json_numbers_exact(x):
    value = torch.tensor([x], dtype=torch.float32)
    text = json.dumps(floats_for_json(value))
    back = np.asarray(json.loads(text), dtype=np.float64).astype(np.float32)
    assert struct.pack("<f", back[0]) == struct.pack("<f", value.item())
    assert len(text) <= 2 + len(repr(value.item()))


def test_bad_files(tmp_path):
    c = Circuit.from_edges(MHA, ["input->logits"], scores=random_scores(MHA))
    good = c.to_dict()

    def write(name, content):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    cases = {
        "not json": ("{oops", "not valid JSON"),
        "other format": ({**good, "format": "other"}, "Not a circuitfind circuit"),
        "newer": ({**good, "format_version": FORMAT_VERSION + 1}, "Upgrade circuitfind"),
        "bad version": ({**good, "format_version": "1"}, "format_version"),
        "scores length": ({**good, "scores": [0.0, 1.0]}, "scores"),
        "scores type": ({**good, "scores": ["a"] * MHA.n_edges}, "numbers"),
        "unknown edge": ({**good, "edges": ["a7.h0->logits"]}, "do not fit"),
        "missing field": ({k: v for k, v in good.items() if k != "edges"}, "edges"),
        "graph config": ({**good, "graph": {"n_layers": 2, "bogus": 1}}, "graph config"),
        "n_edges": ({**good, "n_edges": 7}, "n_edges"),
        "list": ([1, 2], "Not a circuitfind circuit"),
    }
    for i, (content, match) in enumerate(cases.values()):
        with pytest.raises(ConfigError, match=match):
            Circuit.load(write(f"bad{i}.json", content))
    with pytest.raises(ConfigError, match="No circuit JSON file"):
        Circuit.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="GraphML"):
        Circuit.load(write("bad.graphml", "<graphml><oops"))
    with pytest.raises(ConfigError, match="graph_config"):
        path = tmp_path / "plain.graphml"
        nx.write_graphml(nx.MultiDiGraph([("a", "b")]), path)
        Circuit.load(path)
    with pytest.raises(ConfigError, match=r"\.json"):
        Circuit.load(tmp_path / "c.txt")
    with pytest.raises(ConfigError, match="render"):
        c.save(tmp_path / "c.svg")
    assert issubclass(ConfigError, CircuitFindError)


def test_graphml_without_scores_attribute_uses_edge_scores(tmp_path):
    c = Circuit.from_edges(MHA, ["input->logits", "m0->m1"],
                           scores={"input->logits": 0.1, "m0->m1": -3.0})
    g = c.to_networkx()
    nx.write_graphml(g, tmp_path / "c.graphml")  # a third-party writer: no scores_f32
    back = Circuit.load(tmp_path / "c.graphml")
    assert back.edge_scores() == c.edge_scores() and back.edges == c.edges


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    c = Circuit.full(MHA)
    path = c.to_json(tmp_path / "c.json")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        Circuit.empty(MHA).to_json(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_nan_scores_survive_files(tmp_path):
    scores = random_scores(MHA)
    scores[MHA.edge_index("m0->m1")] = float("nan")
    c = Circuit.full(MHA, scores=scores)
    for suffix in (".json", ".graphml"):
        back = Circuit.load(c.save(tmp_path / f"c{suffix}"))
        assert math.isnan(back.edge_scores()["m0->m1"])
        assert torch.equal(bits(back.scores), bits(c.scores))


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from circuitfind.algorithms import RunContext

    ctx = RunContext(checkpoint=tmp_path / "run.ckpt", progress=False)
    assert ctx.save("key", {"done": 1}, force=True)
    before = (tmp_path / "run.ckpt").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ctx.save("key", {"done": 2}, force=True)
    assert (tmp_path / "run.ckpt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]
    monkeypatch.undo()
    assert RunContext(checkpoint=tmp_path / "run.ckpt").resume("key") == {"done": 1}
