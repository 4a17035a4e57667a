"""Reference circuits (circuitfind.tasks.references) and Task.reference_circuit."""

from __future__ import annotations

import pytest
import torch

from circuitfind import zoo
from circuitfind.errors import CircuitFindError, ConfigError, UnknownNameError
from circuitfind.evaluation.roc import edge_roc
from circuitfind.graphs import Circuit, ComputeGraph
from circuitfind.tasks import get_task
from circuitfind.tasks.references import (
    GREATER_THAN_NODES,
    IOI_HEADS,
    NoReferenceError,
    available_references,
    greater_than_reference,
    ioi_reference,
    reference_circuit,
    register_reference,
    unregister_reference,
)

GPT2 = ComputeGraph(12, 12, model_name="gpt2")

EXPECTED_IOI = {
    "name mover": ["a9.h9", "a9.h6", "a10.h0"],
    "backup name mover": ["a10.h10", "a10.h6", "a10.h2", "a10.h1", "a11.h2", "a9.h7", "a9.h0",
                          "a11.h9"],
    "negative name mover": ["a10.h7", "a11.h10"],
    "S-inhibition": ["a7.h3", "a7.h9", "a8.h6", "a8.h10"],
    "induction": ["a5.h5", "a5.h8", "a5.h9", "a6.h9"],
    "duplicate token": ["a0.h1", "a0.h10", "a3.h0"],
    "previous token": ["a2.h2", "a4.h11"],
}


def _heads(circuit: Circuit) -> set[str]:
    return {n for n in circuit.nodes if n.startswith("a")}


# ---------------------------------------------------------------------------------- IOI
@pytest.mark.parametrize("name", ["gpt2", "GPT2", "openai-community/gpt2", "gpt2-small"])
def test_ioi_model_names(name):
    circuit = get_task("ioi").reference_circuit(name)
    assert circuit.metadata["task"] == "ioi"
    assert circuit.graph.n_layers == 12 and circuit.graph.n_heads == 12


def test_ioi_has_the_26_heads_by_class():
    circuit = reference_circuit("ioi", "gpt2")
    classes = circuit.metadata["node_classes"]
    assert len(classes) == 26
    expected = {h: cls for cls, heads in EXPECTED_IOI.items() for h in heads}
    assert classes == expected
    assert sum(len(v) for v in IOI_HEADS.values()) == 26
    # the circuit's heads are exactly the 26 (no other head touched by an edge)
    assert _heads(circuit) == set(expected)
    # ACDC recipe: every MLP is in the circuit
    assert {f"m{i}" for i in range(12)} <= set(circuit.nodes)


def test_ioi_edges_follow_the_class_diagram():
    c = reference_circuit("ioi", GPT2)
    edges = set(c.edges)
    for name in edges:  # valid names that round-trip
        GPT2.edge_index(name)
    # class connections, with the q/k/v input stated in the docstring
    assert "a4.h11->a5.h5<k>" in edges and "a4.h11->a5.h5<v>" in edges
    assert "a4.h11->a5.h5<q>" not in edges                  # prev token -> induction: k, v
    assert "a5.h5->a7.h3<k>" in edges and "a0.h1->a8.h6<v>" in edges
    assert "a5.h5->a7.h3<q>" not in edges                   # -> S-inhibition: k, v
    assert "a7.h3->a9.h9<q>" in edges and "a8.h10->a10.h7<q>" in edges
    assert "a7.h3->a9.h9<k>" not in edges                   # S-inhibition -> movers: q
    assert "input->a9.h9<k>" in edges and "input->a9.h9<q>" not in edges
    assert "input->a7.h3<q>" in edges and "input->a7.h3<k>" not in edges
    assert not any(e.startswith("input->a5.h5") for e in edges)  # induction: no input edge
    for head in ("a9.h9", "a10.h7", "a11.h9"):
        assert f"{head}->logits" in edges
    for head in ("a7.h3", "a5.h5", "a0.h1", "a2.h2"):
        assert f"{head}->logits" not in edges
    # MLP paths (ACDC): mlp <-> circuit heads, mlp -> mlp, input -> logits
    assert "m3->a5.h5<q>" in edges and "a9.h9->m9" in edges and "m0->m11" in edges
    assert "input->logits" in edges and "m11->logits" in edges
    # nothing from or into a non-circuit head
    assert "a1.h1->m2" not in edges and "m0->a1.h1<q>" not in edges
    assert c.n_edges == len(edges) == 963 and len(c.nodes) == 40


def test_ioi_heads_recipe_is_attention_only():
    c = ioi_reference(ComputeGraph(12, 12), recipe="heads")
    assert set(c.nodes) == set(EXPECTED_IOI_ALL) | {"input", "logits"}
    assert c.n_edges == 182
    full = set(ioi_reference(ComputeGraph(12, 12)).edges)
    assert set(c.edges) < full
    with pytest.raises(ConfigError, match="recipe"):
        ioi_reference(ComputeGraph(12, 12), recipe="nope")


EXPECTED_IOI_ALL = [h for heads in EXPECTED_IOI.values() for h in heads]


def test_ioi_renders(tmp_path):
    import xml.etree.ElementTree as ET

    # Graphviz where `dot` is installed, matplotlib otherwise: the classes are in the legend
    path = reference_circuit("ioi", "gpt2").render(tmp_path / "ioi.svg")
    root = ET.fromstring(path.read_bytes())
    texts = {"".join(t.itertext()).strip() for t in root.iter() if t.tag.endswith("text")}
    assert {"backup name mover", "S-inhibition", "a9.h9", "logits"} <= texts


# ---------------------------------------------------------------------------------- greater-than
def test_greater_than_nodes():
    c = get_task("greater_than").reference_circuit("gpt2")
    classes = c.metadata["node_classes"]
    heads = {"a0.h1", "a0.h3", "a0.h5", "a5.h5", "a6.h1", "a6.h9", "a7.h10", "a8.h11", "a9.h1"}
    mlps = {"m0", "m1", "m2", "m3", "m8", "m9", "m10", "m11"}
    assert set(classes) == heads | mlps
    assert {n for n in classes if n.startswith("a")} == heads
    assert _heads(c) == heads                       # no other head is touched
    assert classes["m9"] == "late MLP" and classes["a7.h10"] == "mid attention"
    assert set(GREATER_THAN_NODES) == {"early attention", "early MLP", "mid attention", "late MLP"}
    # ACDC's "connect all MLPs before the mid heads" brings MLPs 4-7 in, unclassified
    assert {"m4", "m5", "m6", "m7"} <= set(c.nodes)


def test_greater_than_edges():
    edges = set(reference_circuit("greater-than", "gpt2").edges)
    for name in edges:
        GPT2.edge_index(name)
    assert {"input->a0.h1<q>", "input->a0.h3<k>", "input->m0", "a0.h1->m0"} <= edges
    assert {"a0.h5->a5.h5<v>", "m3->a6.h9<k>", "a9.h1->m11", "a8.h11->m8", "m8->logits",
            "a9.h1->logits", "m5->a7.h10<q>", "m2->m7"} <= edges
    assert "a0.h3->m0" not in edges                 # ACDC: only 0.1 feeds the early MLPs
    assert "m5->a7.h10<k>" not in edges             # mid-layer MLPs feed queries only
    assert "m0->logits" not in edges and "a0.h1->logits" not in edges
    assert "a9.h1->m8" not in edges                 # not upstream
    assert len(edges) == 235


def test_greater_than_induced_recipe():
    c = greater_than_reference(ComputeGraph(12, 12), recipe="induced")
    nodes = set(c.nodes) - {"input", "logits"}
    assert nodes == {n for members in GREATER_THAN_NODES.values() for n in members}
    assert "a0.h3->m0" in c.edges and "m3->a5.h5<k>" in c.edges


# ---------------------------------------------------------------------------------- registry
def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError) as err:
        get_task("ioi").reference_circuit("pythia-70m")
    message = str(err.value)
    # the zoo organisms register their references in the same registry
    assert message == ("no reference circuit for task 'ioi' on model 'pythia-70m'; available: "
                       "gpt2, zoo:ioi-small.")
    assert isinstance(err.value, (CircuitFindError, UnknownNameError, NoReferenceError))


def test_task_without_reference_lists_none():
    with pytest.raises(NoReferenceError, match="available: none"):
        get_task("gendered_pronoun").reference_circuit("gpt2")
    with pytest.raises(NoReferenceError, match="available: zoo:induction-2l"):
        get_task("induction").reference_circuit("gpt2")


def test_graph_checks():
    with pytest.raises(ConfigError, match="model_name"):
        reference_circuit("ioi", ComputeGraph(12, 12))
    with pytest.raises(ConfigError, match="shape"):
        reference_circuit("ioi", ComputeGraph(6, 12, model_name="gpt2"))
    with pytest.raises(ConfigError, match="GPT-2 small"):
        ioi_reference(ComputeGraph(12, 12, 4))
    with pytest.raises(ConfigError):
        reference_circuit("ioi", 12)
    # a graph with another spelling of the name gets the reference over that very graph
    graph = ComputeGraph(12, 12, model_name="openai-community/gpt2")
    c = reference_circuit("ioi", graph)
    assert c.graph == graph


def test_register_reference_for_a_zoo_model(tmp_path):
    graph = ComputeGraph(2, 4, 2, model_name="organism-x")
    source = Circuit.from_edges(graph, ["input->a0.h0<q>", "a0.h0->a1.kv0<k>", "a1.h1->logits"],
                                metadata={"node_classes": {"a0.h0": "prev", "a1.h1": "mover"}})
    path = source.to_json(tmp_path / "ref.json")
    register_reference("induction", "Organism-X", lambda g: Circuit.from_json(path),
                       graph=graph, aliases=["zoo/organism-x"])
    try:
        zoo_induction = sorted(f"zoo:{name}" for name, entry in zoo.ZOO.items()
                               if entry.task == "induction" and entry.shipped)
        assert "zoo:induction-2l" in zoo_induction
        assert available_references("induction") == {"induction": ["organism-x",
                                                                   *zoo_induction]}
        assert "gpt2" in available_references()["ioi"]
        c = reference_circuit("induction", "zoo/organism-x")
        assert c.edges == source.edges
        # asked with a graph of the same shape but another model_name: rebuilt on that graph
        other = ComputeGraph(2, 4, 2, model_name="zoo/organism-x")
        on_other = reference_circuit("induction", other)
        assert on_other.graph is other and on_other.graph.model_name == "zoo/organism-x"
        with pytest.raises(ConfigError, match="already registered"):
            register_reference("induction", "organism-x", lambda g: source)
        register_reference("induction", "organism-x", lambda g: source, graph=graph,
                           replace=True)
        assert reference_circuit("induction", "organism-x") == source
    finally:
        unregister_reference("induction", "organism-x")
    with pytest.raises(NoReferenceError):
        reference_circuit("induction", "organism-x")


@pytest.mark.parametrize("name", ["induction-2l", "ioi-small", "greater-than-small"])
def test_zoo_references_come_through_the_registry(name):
    from circuitfind import zoo

    task = zoo.ZOO[name].task
    assert f"zoo:{name}" in available_references(task)[task]
    shipped = zoo.reference_circuit(name)
    via_registry = reference_circuit(task, f"zoo:{name}")
    assert via_registry.edges == shipped.edges and via_registry.n_edges > 0
    assert via_registry.graph.config() == shipped.graph.config()


def test_builders_must_return_non_empty_circuits():
    graph = ComputeGraph(1, 1, model_name="tiny")
    register_reference("ioi", "tiny", lambda g: Circuit.empty(g), graph=graph)
    try:
        with pytest.raises(ConfigError, match="empty"):
            reference_circuit("ioi", "tiny")
        register_reference("ioi", "tiny", lambda g: "x", graph=graph, replace=True)
        with pytest.raises(ConfigError, match="not a Circuit"):
            reference_circuit("ioi", "tiny")
        register_reference("ioi", "tiny", lambda g: Circuit.full(ComputeGraph(2, 1)),
                           graph=graph, replace=True)
        with pytest.raises(ConfigError, match="expected the shape"):
            reference_circuit("ioi", "tiny")
        register_reference("ioi", "nograph", lambda g: Circuit.full(g))
        with pytest.raises(ConfigError, match="needs the model's graph"):
            reference_circuit("ioi", "nograph")
        assert reference_circuit("ioi", ComputeGraph(1, 1, model_name="NoGraph")).n_edges > 0
    finally:
        unregister_reference("ioi", "tiny")
        unregister_reference("ioi", "nograph")
    with pytest.raises(ConfigError, match="callable"):
        register_reference("ioi", "x", 3)


# ---------------------------------------------------------------------------------- with ROC
def test_edge_auc_equals_the_mann_whitney_statistic():
    """ROC AUC of noisy scores = U / (n_pos * n_neg) (Mann-Whitney), computed independently."""
    from scipy.stats import mannwhitneyu

    ref = reference_circuit("ioi", "gpt2")
    g = ref.graph
    gen = torch.Generator().manual_seed(0)
    scores = ref.kept.double() + 0.6 * torch.randn(ref.kept.shape, generator=gen, dtype=torch.float64)
    flat, labels = g.to_edges(scores).abs(), g.to_edges(ref.kept)
    u = mannwhitneyu(flat[labels].numpy(), flat[~labels].numpy()).statistic
    want = u / (int(labels.sum()) * int((~labels).sum()))
    assert 0.6 < want < 0.99  # noisy, not trivially perfect
    assert edge_roc(scores, ref).auc == pytest.approx(want, abs=1e-9)
