"""MIB circuit-track JSON: the EAP-IG ``Graph.from_json`` format, folder layout, lossless import.

``EapigReader`` below is written from the EAP-IG library's documented format (``Graph.to_json`` /
``Graph.from_json`` / ``Graph.from_model``: keys ``cfg`` (n_layers, n_heads, parallel_attn_mlp,
d_model), ``nodes`` (``in_graph``, optional ``score``), ``edges`` (``score``, ``in_graph``); the
``[n_forward, n_backward]`` index layout; an edge from every node whose forward index is below
the receiver's "previous index"), not from their code and not from circuitfind's codec.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import circuitfind as cf
from circuitfind.errors import ConfigError
from circuitfind.graphs import Circuit, ComputeGraph, prune_dangling
from circuitfind.graphs.mib import (from_mib_dict, mib_folder_name, to_mib_dict)


class EapigReader:
    """What ``Graph.from_json`` builds: dense [n_forward, n_backward] scores and in_graph."""

    def __init__(self, data: dict) -> None:
        for key in ("cfg", "nodes", "edges"):
            assert key in data, f"missing {key}"
        cfg = data["cfg"]
        assert isinstance(cfg["n_layers"], int) and isinstance(cfg["n_heads"], int)
        assert isinstance(cfg["parallel_attn_mlp"], bool) and isinstance(cfg["d_model"], int)
        self.L, self.H, self.parallel = cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"]
        L, H = self.L, self.H
        self.n_forward = 1 + L * (H + 1)
        self.n_backward = L * (3 * H + 1) + 1
        self.real = np.zeros((self.n_forward, self.n_backward), dtype=bool)
        self.edge_index: dict[str, tuple[int, int]] = {}
        forward_names = ["input"] + [n for l in range(L)
                                     for n in [f"a{l}.h{h}" for h in range(H)] + [f"m{l}"]]
        for l in range(L):
            first = 1 + l * (H + 1)
            for i, x in enumerate("qkv"):
                for h in range(H):
                    self._add(forward_names, first, l * (3 * H + 1) + i * H + h,
                              f"a{l}.h{h}<{x}>")
            self._add(forward_names, first if self.parallel else first + H,
                      l * (3 * H + 1) + 3 * H, f"m{l}")
        self._add(forward_names, self.n_forward, self.n_backward - 1, "logits")
        self.node_names = set(forward_names) | {"logits"}
        self.scores = np.zeros((self.n_forward, self.n_backward))
        self.in_graph = np.zeros((self.n_forward, self.n_backward), dtype=bool)
        for name, node in data["nodes"].items():
            assert name in self.node_names, name
            assert isinstance(node["in_graph"], bool)
            assert "score" not in node or isinstance(node["score"], float)
        for name, info in data["edges"].items():
            f, b = self.edge_index[name]  # KeyError, as from_json raises, for unknown edges
            assert isinstance(info["in_graph"], bool)
            self.scores[f, b] = info["score"]
            self.in_graph[f, b] = info["in_graph"]

    def _add(self, forward_names, prev, backward, receiver):
        for f in range(prev):
            self.real[f, backward] = True
            self.edge_index[f"{forward_names[f]}->{receiver}"] = (f, backward)


def random_circuit(graph: ComputeGraph, seed: int, metadata: dict | None = None) -> Circuit:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(graph.n_senders, graph.n_receivers, generator=gen) ** 3
    kept = (torch.rand(graph.n_senders, graph.n_receivers, generator=gen) < 0.3) & graph.edge_mask
    return Circuit(graph, kept, scores, metadata or {"task": "ioi", "model": "gpt2"})


GRAPHS = {
    "mha": ComputeGraph(3, 4),
    "gqa": ComputeGraph(2, 4, n_kv_heads=2),
    "attn_only": ComputeGraph(2, 3, attn_only=True),
    "parallel": ComputeGraph(2, 2, parallel_attn_mlp=True),
}


def our_edge(graph: ComputeGraph, name: str) -> str | None:
    """circuitfind's edge for a MIB edge name, derived by hand for the checks below."""
    sender, receiver = name.split("->")
    if graph.attn_only and ("m" in (sender[0], receiver[0])):
        return None
    if graph.is_grouped_query and receiver[-3:] in ("<k>", "<v>"):
        layer, head = receiver[1:-3].split(".h")
        receiver = f"a{layer}.kv{int(head) // graph.group_size}{receiver[-3:]}"
    return f"{sender}->{receiver}"


@pytest.mark.parametrize("kind", list(GRAPHS))
def test_file_loads_as_eapig_graph_with_our_scores_and_kept_edges(tmp_path, kind):
    graph = GRAPHS[kind]
    circuit = random_circuit(graph, 1)
    path = cf.export_mib(circuit, tmp_path / "c.json", d_model=16)
    data = json.loads(path.read_text())
    reader = EapigReader(data)
    # every edge of EAP-IG's graph is listed (what to_json writes), nothing else
    assert set(data["edges"]) == set(reader.edge_index)
    assert set(data["nodes"]) == reader.node_names
    assert data["cfg"] == {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
                           "parallel_attn_mlp": graph.parallel_attn_mlp, "d_model": 16}
    kept, scores = circuit.kept, circuit.scores
    n_mapped = 0
    for name, (f, b) in reader.edge_index.items():
        ours = our_edge(graph, name)
        if ours is None:
            assert reader.scores[f, b] == 0 and not reader.in_graph[f, b]
            continue
        s, r = graph.edge_index(ours)
        n_mapped += 1
        # MIB's sign: a loss attribution, i.e. minus circuitfind's (higher-is-better metric)
        assert np.float32(reader.scores[f, b]) == -scores[s, r].item()
        assert reader.in_graph[f, b] == bool(kept[s, r])
    if graph.is_grouped_query:
        assert n_mapped > graph.n_edges  # k/v edges expanded to each query head
    else:
        assert n_mapped == graph.n_edges


def test_gpt2_small_file_has_mibs_32491_edges_and_158_nodes():
    data = to_mib_dict(Circuit.empty(ComputeGraph(12, 12)), d_model=768, provenance=False)
    assert len(data["edges"]) == 32491 and len(data["nodes"]) == 158
    assert set(data) == {"cfg", "nodes", "edges"}
    assert data["edges"]["a0.h1->a3.h0<q>"] == {"score": 0.0, "in_graph": False}


def test_node_in_graph_follows_eapig_pruning_rule():
    graph = ComputeGraph(2, 2)
    circuit = Circuit.from_edges(graph, ["input->a0.h0<q>", "a0.h0->logits", "a1.h1->logits"])
    nodes = to_mib_dict(circuit, d_model=8)["nodes"]
    assert {n for n, v in nodes.items() if v["in_graph"]} == {"input", "a0.h0", "logits"}
    # a1.h1 has no incoming edge: EAP-IG leaves it out, and so does pruning
    assert prune_dangling(circuit).nodes == ["input", "a0.h0", "logits"]


@pytest.mark.parametrize("kind", list(GRAPHS))
def test_round_trip_is_lossless(tmp_path, kind):
    graph = GRAPHS[kind]
    circuit = random_circuit(graph, 2, {"task": "greater_than", "model": "zoo:ioi-small",
                                        "algorithm_params": {"steps": 5}})
    values = circuit.scores.clone()
    edges = graph.edge_pairs
    values[edges[0, 0], edges[0, 1]] = float("nan")
    values[edges[1, 0], edges[1, 1]] = float("-inf")
    values[edges[2, 0], edges[2, 1]] = 1e-45  # float32 subnormal
    values[edges[3, 0], edges[3, 1]] = 0.1
    circuit = circuit.replace(scores=values)
    path = cf.export_mib(circuit, tmp_path, d_model=32)
    assert path == tmp_path / "greater-than_ioi-small" / "importances.json"
    back = cf.import_mib(path.parent)
    assert back == circuit
    unscored = Circuit(graph, circuit.kept, None, circuit.metadata)
    assert cf.import_mib(cf.export_mib(unscored, tmp_path / "u.json", d_model=8)) == unscored


def test_scores_tensor_export_and_d_model_from_zoo_config(tmp_path):
    graph = GRAPHS["mha"]
    scores = random_circuit(graph, 3).scores
    back = cf.import_mib(cf.export_mib(scores, tmp_path / "s.json", graph=graph, d_model=4))
    assert back.n_edges == 0 and torch.equal(back.scores, scores * graph.edge_mask)
    circuit = random_circuit(ComputeGraph(2, 4), 4, {"task": "ioi", "model": "zoo:ioi-small"})
    data = json.loads(cf.export_mib(circuit, tmp_path / "z").read_text())
    assert data["cfg"]["d_model"] == 64  # the organism's n_embd
    with pytest.raises(ConfigError, match="pass graph="):
        cf.export_mib(scores, tmp_path / "x.json", d_model=4)
    with pytest.raises(ConfigError, match="d_model must be an int"):
        cf.export_mib(circuit, tmp_path / "x.json", d_model=0)
    with pytest.raises(ConfigError, match="task= and model="):
        cf.export_mib(Circuit.empty(graph), tmp_path, d_model=4)


def test_score_sign_follows_the_metric_direction():
    graph = ComputeGraph(1, 1)
    name = "input->a0.h0<q>"
    circuit = Circuit.from_edges(graph, [name], scores={name: -2.5},
                                 metadata={"metric": "logit difference"})
    assert to_mib_dict(circuit, 4)["edges"][name]["score"] == 2.5
    kl = circuit.with_metadata(metric="KL divergence")
    assert to_mib_dict(kl, 4)["edges"][name]["score"] == -2.5
    assert to_mib_dict(kl, 4, higher_is_better=True)["edges"][name]["score"] == 2.5
    assert from_mib_dict(to_mib_dict(kl, 4)) == kl
    # a circuit without scores: 1 on kept edges, so MIB's ranking returns the circuit
    assert to_mib_dict(Circuit.from_edges(graph, [name]), 4)["edges"][name]["score"] == 1.0


def test_folder_names():
    assert mib_folder_name("ioi", "gpt2") == "ioi_gpt2"
    assert mib_folder_name("greater_than", "../shared/models/stories260k/") == \
        "greater-than_stories260k"
    assert mib_folder_name("arc_easy", "meta-llama/Llama_3") == "arc-easy_Llama-3"
    with pytest.raises(ConfigError):
        mib_folder_name("", "gpt2")


def test_grouped_query_heads_that_disagree(tmp_path):
    graph = GRAPHS["gqa"]
    data = to_mib_dict(Circuit.empty(graph), d_model=8, provenance=False)
    data["edges"]["input->a1.h0<k>"] = {"score": 1.0, "in_graph": True}
    data["edges"]["input->a1.h1<k>"] = {"score": 3.0, "in_graph": False}
    with pytest.raises(ConfigError, match="gqa='sum'"):
        from_mib_dict(data, graph=graph)
    s, r = graph.edge_index("input->a1.kv0<k>")
    summed = from_mib_dict(data, graph=graph, gqa="sum")
    mean = from_mib_dict(data, graph=graph, gqa="mean")
    # MIB-signed scores of a higher-is-better task become circuitfind's by negation
    assert summed.scores[s, r] == -4.0 and mean.scores[s, r] == -2.0
    assert from_mib_dict(data, graph=graph, gqa="sum", higher_is_better=False).scores[s, r] == 4.0
    assert summed.edges == mean.edges == ["input->a1.kv0<k>"]
    # without the graph, the cfg alone describes a multi-head model
    assert from_mib_dict(data).graph == ComputeGraph(2, 4)


def test_bad_files(tmp_path):
    graph = GRAPHS["attn_only"]
    good = to_mib_dict(Circuit.empty(graph), d_model=8)
    with pytest.raises(ConfigError, match="missing \\['edges'\\]"):
        from_mib_dict({"cfg": good["cfg"], "nodes": {}})
    bad = json.loads(json.dumps(good))
    bad["edges"]["input->a9.h0<q>"] = {"score": 0.0, "in_graph": False}
    bad["edges"]["input->a0.h0<q>"] = {"score": "x", "in_graph": False}
    with pytest.raises(ConfigError, match="unknown edge 'input->a9.h0<q>'") as err:
        from_mib_dict(bad)
    assert "'input->a0.h0<q>' needs a number 'score'" in str(err.value)
    mlp = json.loads(json.dumps(good))
    mlp["edges"]["input->m0"]["in_graph"] = True
    with pytest.raises(ConfigError, match="attention-only"):
        from_mib_dict(mlp)
    with pytest.raises(ConfigError, match="does not match"):
        from_mib_dict(good, graph=ComputeGraph(3, 3))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        cf.import_mib(tmp_path / "bad.json")
